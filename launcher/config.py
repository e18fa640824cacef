"""The launcher's config file: which terminals this machine runs, and how.

Example::

    [launcher]
    machine_id = "7d1c..."          # optional: else --machine-id, MACHINE_ID, /etc/machine-id

    [terminals.terminal1]
    command = ["{python}", "-m", "terminals.plc_data_service"]
    environment = "production"
    working_directory = "."
    log_file = "logs/terminal1.log"
    stop_timeout = 10
    enabled = true
    heartbeat_interval = 10
    env = { PLC_TYPE = "simulation" }

Relative paths are relative to the config file's directory. ``{python}`` in a command is
the interpreter running the launcher. The launcher runs only these commands: nothing read
from the database is ever executed.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tomllib
import uuid
from pathlib import Path
from typing import Any

from pglive import identity
from pglive.errors import ConfigurationError
from pglive.registry import DEFAULT_HEARTBEAT_INTERVAL

LAUNCHER_KEYS = {"machine_id"}
TERMINAL_KEYS = {
    "command",
    "environment",
    "working_directory",
    "log_file",
    "stop_timeout",
    "enabled",
    "heartbeat_interval",
    "env",
}


class ConfigError(ConfigurationError):
    """The launcher's config file is invalid."""


@dataclasses.dataclass(frozen=True)
class TerminalConfig:
    terminal_type: str
    command: tuple[str, ...]
    environment: str
    working_directory: Path
    log_file: Path
    stop_timeout: float
    enabled: bool
    heartbeat_interval: float | None
    env: dict[str, str]


@dataclasses.dataclass(frozen=True)
class LauncherConfig:
    path: Path
    machine_id: uuid.UUID | None
    terminals: tuple[TerminalConfig, ...]

    @property
    def enabled_terminals(self) -> tuple[TerminalConfig, ...]:
        return tuple(terminal for terminal in self.terminals if terminal.enabled)

    def check_heartbeat_timeout(self, timeout: float) -> None:
        """Every terminal's heartbeat interval must be below the machine's timeout."""
        for terminal in self.enabled_terminals:
            interval = terminal.heartbeat_interval
            source = "heartbeat_interval"
            if interval is None:
                interval = float(
                    terminal.env.get(
                        "PGLIVE_HEARTBEAT_INTERVAL", DEFAULT_HEARTBEAT_INTERVAL
                    )
                )
                source = "heartbeat_interval (not set: the terminal's default)"
            if interval >= timeout:
                raise ConfigError(
                    f"{self.path}: terminals.{terminal.terminal_type}.{source}: "
                    f"{interval:g} s is not below --heartbeat-timeout {timeout:g} s "
                    "(the timeout should be 2-3 times the interval)"
                )


def load(path: str | Path) -> LauncherConfig:
    """Read and check the config file; any problem raises ConfigError naming file and key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise ConfigError(
            f"{path}: cannot read the config file: {error.strerror}"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None

    base = path.resolve().parent
    _check_keys(path, "", data, {"launcher", "terminals"})
    launcher = _table(path, "launcher", data.get("launcher", {}))
    _check_keys(path, "launcher.", launcher, LAUNCHER_KEYS)
    machine_id = None
    if "machine_id" in launcher:
        try:
            machine_id = identity.parse_machine_id(launcher["machine_id"])
        except ConfigurationError as error:
            raise ConfigError(f"{path}: launcher.machine_id: {error}") from None

    terminals_table = _table(path, "terminals", data.get("terminals", {}))
    if not terminals_table:
        raise ConfigError(f"{path}: no [terminals.NAME] table: nothing to launch")
    terminals = tuple(
        _terminal(path, base, name, _table(path, f"terminals.{name}", table))
        for name, table in terminals_table.items()
    )
    return LauncherConfig(path=path, machine_id=machine_id, terminals=terminals)


def _terminal(
    path: Path, base: Path, name: str, table: dict[str, Any]
) -> TerminalConfig:
    where = f"{path}: terminals.{name}"
    _check_keys(path, f"terminals.{name}.", table, TERMINAL_KEYS)
    try:
        identity.check_terminal_type(name)
    except ConfigurationError as error:
        raise ConfigError(f"{where}: {error}") from None
    if name == "launcher":
        raise ConfigError(f"{where}: the launcher cannot launch itself")

    command = table.get("command")
    if command is None:
        raise ConfigError(f"{where}: missing key 'command' (a list of strings)")
    if (
        not isinstance(command, list)
        or not command
        or not all(isinstance(part, str) and part for part in command)
    ):
        raise ConfigError(f"{where}.command: must be a non-empty list of strings")

    environment = table.get("environment", "production")
    try:
        identity.check_environment(environment)
    except ConfigurationError as error:
        raise ConfigError(f"{where}.environment: {error}") from None

    stop_timeout = _positive(where, "stop_timeout", table.get("stop_timeout", 10))
    interval = table.get("heartbeat_interval")
    if interval is not None:
        interval = _positive(where, "heartbeat_interval", interval)

    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}.enabled: must be true or false, not {enabled!r}")

    env = table.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(key, str) and isinstance(value, str | int | float)
        for key, value in env.items()
    ):
        raise ConfigError(f'{where}.env: must be a table of NAME = "value"')

    working_directory = base / str(table.get("working_directory", "."))
    log_file = base / str(table.get("log_file", f"logs/{name}.log"))
    python = sys.executable
    return TerminalConfig(
        terminal_type=name,
        command=tuple(part.replace("{python}", python) for part in command),
        environment=environment,
        working_directory=working_directory.resolve(),
        log_file=log_file.resolve(),
        stop_timeout=stop_timeout,
        enabled=enabled,
        heartbeat_interval=interval,
        env={key: str(value) for key, value in env.items()},
    )


def _table(path: Path, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {key}: must be a table, not {type(value).__name__}")
    return value


def _check_keys(
    path: Path, prefix: str, table: dict[str, Any], allowed: set[str]
) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key '{prefix}{unknown[0]}' "
            f"(allowed: {', '.join(sorted(allowed))})"
        )


def _positive(where: str, key: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(
            f"{where}.{key}: must be a positive number of seconds, not {value!r}"
        )
    return float(value)
