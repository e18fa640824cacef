"""Running a terminal as a process: signals, graceful stop, fencing and exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from pglive import errors
from pglive.registry import TerminalRegistry

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ALREADY_RUNNING = 3
EXIT_FENCED = 4

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

Work = Callable[[TerminalRegistry], Awaitable[None]]


def configure_logging(
    log_file_path: str | None = None, level: str | int = "INFO"
) -> None:
    """Log to stderr, and to ``log_file_path`` (rotated at 10 MB, 5 kept) when given.

    Under the launcher (``PGLIVE_LOG_TO_STDERR=1``) stderr already goes to that file, so
    the file handler is left out to avoid writing every line twice.
    """
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)

    formatter = logging.Formatter(LOG_FORMAT)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(formatter)
    root.addHandler(stderr)

    if log_file_path and os.environ.get("PGLIVE_LOG_TO_STDERR") != "1":
        Path(log_file_path).parent.mkdir(parents=True, exist_ok=True)
        rotating = logging.handlers.RotatingFileHandler(
            log_file_path, maxBytes=10 * 1024 * 1024, backupCount=5
        )
        rotating.setFormatter(formatter)
        root.addHandler(rotating)


def run_terminal(registry: TerminalRegistry, work: Work) -> int:
    """Register, run ``work(registry)`` until it ends or a signal stops it; the exit code.

    SIGTERM or SIGINT cancel the work (its ``finally`` blocks put the equipment in a safe
    state), then the stop is recorded: exit 0. A fenced instance cancels its work at once
    and exits 4 without recording anything; a duplicate exits 3; a failed work exits 1.
    Logging not configured yet is configured for the registry's ``log_file_path``.
    """
    if not logging.getLogger().handlers:
        configure_logging(registry.log_file_path)
    return asyncio.run(_run(registry, work))


async def _run(registry: TerminalRegistry, work: Work) -> int:
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    received: list[str] = []

    def request_stop(signum: int) -> None:
        received.append(signal.Signals(signum).name)
        stop_requested.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop, signum)

    try:
        await registry.register()
    except errors.TerminalAlreadyRunningError as error:
        logger.error("not starting: %s", error)
        return EXIT_ALREADY_RUNNING
    except errors.ConfigurationError as error:
        logger.error("not starting %s: %s", registry.terminal_type, error)
        return EXIT_USAGE
    except errors.PgliveError as error:
        logger.error("not starting %s: %s", registry.terminal_type, error)
        return EXIT_FAILED

    work_task = asyncio.create_task(
        work(registry), name=f"{registry.terminal_type} work"
    )
    stop_task = asyncio.create_task(stop_requested.wait())
    fenced_task = asyncio.create_task(registry.wait_fenced())
    await asyncio.wait(
        {work_task, stop_task, fenced_task}, return_when=asyncio.FIRST_COMPLETED
    )
    for task in (stop_task, fenced_task):
        task.cancel()

    if registry.fenced:
        # TODO: the work learns of the fencing as a cancellation, not as TerminalFencedError
        # raised at its next await: asyncio can only cancel a task, not throw into it.
        # registry.fenced tells a `finally` block why it runs.
        stopped = await _cancel(work_task)
        await registry.close()
        if not stopped:
            _exit_now(EXIT_FENCED, registry)
        logger.error(
            "%s instance %s exits: it was replaced and must not act (exit %s)",
            registry.name,
            registry.instance_id,
            EXIT_FENCED,
        )
        return EXIT_FENCED

    if stop_requested.is_set():
        reason = f"received {received[0]}" if received else "stop requested"
        logger.info("%s %s; stopping gracefully", registry.name, reason)
        stopped = await _cancel(work_task)
        await registry.shutdown(reason=reason)
        code = EXIT_FENCED if registry.fenced else EXIT_OK
        if not stopped:
            _exit_now(code, registry)
        return code

    error = work_task.exception()
    if error is None:
        await registry.shutdown(reason="work finished")
        return EXIT_OK

    logger.error(
        "%s failed: %s: %s; stopping",
        registry.name,
        type(error).__name__,
        error,
        exc_info=error,
    )
    if isinstance(error, errors.TerminalFencedError):
        await registry.close()
        return EXIT_FENCED
    registry.record_error(f"{type(error).__name__}: {error}")
    await registry.shutdown(reason=f"failed: {type(error).__name__}: {error}")
    return EXIT_FAILED


WORK_STOP_TIMEOUT = 3.0


async def _cancel(task: asyncio.Task[None], timeout: float = WORK_STOP_TIMEOUT) -> bool:
    """Cancel the work and wait for it to end; False when it would not end in time.

    The cancellation is repeated: a library may swallow one (Python 3.11's
    ``asyncio.wait_for`` loses a cancellation that arrives as its inner future completes),
    and a terminal that ignores its stop must not go on acting.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=min(0.5, max(0.0, deadline - loop.time())))
    if task.done():
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()
        return True
    return False


def _exit_now(code: int, registry: TerminalRegistry) -> None:
    """End the process although its work would not stop (see _cancel)."""
    logger.error(
        "%s: its work did not stop within %.0fs of being cancelled; exiting anyway "
        "(exit %s)",
        registry.name,
        WORK_STOP_TIMEOUT,
        code,
    )
    logging.shutdown()
    os._exit(code)
