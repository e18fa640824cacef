"""Who and where a terminal is: machine id, environment, terminal type."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from pglive.errors import ConfigurationError

# A fixed namespace, so that one /etc/machine-id always gives the same pglive machine id.
MACHINE_ID_NAMESPACE = uuid.UUID("4f1b2c6e-9a53-4d7e-8c31-6b0f2a9d5e17")
MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))

ENVIRONMENTS = ("production", "development", "testing")

# The types seeded by sql/0001_schema.sql. A site that adds a type to pglive.terminal_types
# lists it in PGLIVE_EXTRA_TERMINAL_TYPES (comma-separated) so the client accepts it too.
BUILTIN_TERMINAL_TYPES = ("terminal1", "terminal2", "terminal3", "launcher")


class UnknownTerminalTypeError(ConfigurationError):
    """Unknown terminal type."""


class InvalidEnvironmentError(ConfigurationError):
    """Unknown environment."""


class InvalidMachineIdError(ConfigurationError):
    """The machine id is not a UUID."""


class InvalidHeartbeatIntervalError(ConfigurationError):
    """The heartbeat interval must be a positive number of seconds."""


def known_terminal_types() -> tuple[str, ...]:
    extra = os.environ.get("PGLIVE_EXTRA_TERMINAL_TYPES", "")
    names = [name.strip() for name in extra.split(",") if name.strip()]
    return BUILTIN_TERMINAL_TYPES + tuple(names)


def check_terminal_type(terminal_type: str) -> str:
    known = known_terminal_types()
    if terminal_type not in known:
        raise UnknownTerminalTypeError(
            f"unknown terminal type {terminal_type!r}; known types: {', '.join(known)}"
        )
    return terminal_type


def check_environment(environment: str) -> str:
    if environment not in ENVIRONMENTS:
        raise InvalidEnvironmentError(
            f"unknown environment {environment!r}; use one of {', '.join(ENVIRONMENTS)}"
        )
    return environment


def check_heartbeat_interval(interval: float) -> float:
    try:
        seconds = float(interval)
    except (TypeError, ValueError):
        raise InvalidHeartbeatIntervalError(
            f"heartbeat interval {interval!r} is not a number of seconds"
        ) from None
    if not seconds > 0 or seconds != seconds:
        raise InvalidHeartbeatIntervalError(
            f"heartbeat interval {interval!r} must be a positive number of seconds"
        )
    return seconds


def parse_machine_id(value: str | uuid.UUID) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value).strip())
    except ValueError:
        raise InvalidMachineIdError(f"machine id {value!r} is not a UUID") from None


def machine_id(explicit: str | uuid.UUID | None = None) -> uuid.UUID:
    """The argument, else ``MACHINE_ID``, else a UUID derived from ``/etc/machine-id``."""
    if explicit:
        return parse_machine_id(explicit)
    if os.environ.get("MACHINE_ID"):
        return parse_machine_id(os.environ["MACHINE_ID"])
    for path in MACHINE_ID_FILES:
        if path.exists():
            content = path.read_text().strip()
            if re.fullmatch(r"[0-9a-f]{32}", content):
                return uuid.uuid5(MACHINE_ID_NAMESPACE, content)
    raise InvalidMachineIdError(
        "no machine id: pass one, set MACHINE_ID, or make sure /etc/machine-id exists"
    )
