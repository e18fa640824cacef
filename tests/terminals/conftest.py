"""Fixtures for the terminals: the PLC simulator as a real process on loopback."""

from __future__ import annotations

import asyncio
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from terminals.plc import regmap
from terminals.plc.client import PlcClient, PlcConfig
from tests.helpers import REPO, end_process

HOST = "127.0.0.1"
READY = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")


class Simulator:
    """`python -m terminals.plc.simulator` in its own process, plus ways to poke it."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.plc_map = regmap.load()

    def start(self, port: int = 0, timeout: float = 15.0) -> int:
        log = open(self.log_dir / "plc-sim.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "terminals.plc.simulator",
                "--host",
                HOST,
                "--port",
                str(port),
                "--seed",
                "7",
            ],
            cwd=REPO,
            env=plc_env(),
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.port = self._read_port(timeout)
        return self.port

    def stop(self) -> None:
        if self.process is not None:
            end_process(self.process)

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def restart(self) -> None:
        """Start again on the same port, as a PLC that comes back would."""
        self.start(self.port)

    def env(self) -> dict[str, str]:
        return {"PLC_TYPE": "simulation", "PLC_PORT": str(self.port)}

    def read(self, name: str) -> Any:
        return self._run(lambda plc: plc.read(name))

    def read_all(self) -> dict[str, Any]:
        return self._run(lambda plc: plc.read_all())

    def write(self, name: str, value: Any) -> Any:
        return self._run(lambda plc: plc.write(name, value))

    def status(self) -> dict[str, Any]:
        return self._run(lambda plc: plc.read_all(), control=True)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """Run a `plc-sim` subcommand against this simulator."""
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "terminals.plc.simulator",
                *args,
                "--host",
                HOST,
                "--port",
                str(self.port),
            ],
            cwd=REPO,
            env=plc_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )

    def client(self, control: bool = False, timeout: float = 0.5) -> PlcClient:
        config = PlcConfig(port=self.port, timeout=timeout)
        if control:
            return PlcClient(
                config, self.plc_map.control, unit=self.plc_map.control_unit
            )
        return PlcClient(config, self.plc_map.reactor)

    def _run(self, call, control: bool = False) -> Any:
        async def once() -> Any:
            async with self.client(control=control, timeout=2.0) as plc:
                return await call(plc)

        return asyncio.run(once())

    def _read_port(self, timeout: float) -> int:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not selector.select(timeout=max(deadline - time.monotonic(), 0)):
                    continue
                line = self.process.stdout.readline()
                if not line:
                    break
                match = READY.search(line)
                if match:
                    return int(match.group(1))
        log = (self.log_dir / "plc-sim.log").read_text(errors="replace")
        raise AssertionError(f"PLC simulator did not report its port:\n{log}")


def plc_env() -> dict[str, str]:
    """The environment for processes started from the repository checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[Simulator]:
    sim = Simulator(tmp_path)
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()
