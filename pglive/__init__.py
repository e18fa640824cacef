"""pglive: liveness of long-running terminals, with PostgreSQL as the control plane.

Terminals use :class:`TerminalRegistry` (register, heartbeat, graceful stop) and usually
:func:`run_terminal`, which adds signal handling, fencing and exit codes.
"""

from pglive.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    PgliveError,
    TerminalAlreadyRunningError,
    TerminalFencedError,
)
from pglive.registry import TerminalRegistry
from pglive.runner import configure_logging, run_terminal

__all__ = [
    "ConfigurationError",
    "DatabaseUnavailableError",
    "PgliveError",
    "TerminalAlreadyRunningError",
    "TerminalFencedError",
    "TerminalRegistry",
    "configure_logging",
    "run_terminal",
]
