"""Helpers for tests with real processes: waiting on conditions, never on fixed sleeps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent


def wait_for(
    condition: Callable[[], T],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = condition()
            if result:
                return result
        except Exception as error:  # the condition may fail while things start up
            last_error = error
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(
                f"timed out after {timeout}s waiting for {message}{detail}"
            )
        time.sleep(interval)


def spawn_python(
    args: list[str], env: dict[str, str], log_path: Path | None = None
) -> subprocess.Popen:
    """Start ``python ARGS`` as a real process; its output goes to ``log_path``."""
    output = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, *args],
        env=env,
        cwd=REPO,
        stdout=output,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def end_process(process: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGCONT, SIGTERM, then SIGKILL after ``timeout``: for test clean-up."""
    if process.poll() is not None:
        return process.returncode
    for signum in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.kill(process.pid, signum)
        except ProcessLookupError:
            return process.poll()
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout)
