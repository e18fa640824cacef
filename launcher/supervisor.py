"""The per-machine launcher: starts terminals, watches them, restarts them as told.

It decides nothing about liveness itself. Process exits are reported to the control plane,
which marks crashes and answers ``pglive.recovery_decision`` (start, restart after a delay,
gave up); hung processes are found by the pg_cron sweep, which NOTIFYs the machine's channel.
NOTIFY is not durable, so every supervisor also reconciles with the database after each
(re)connection and every ``check_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import logging.handlers
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.rows import dict_row

from launcher.config import LauncherConfig, TerminalConfig
from pglive import db, errors
from pglive.registry import Backoff, TerminalRegistry

logger = logging.getLogger("pglive.launcher")

LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5
# After a spawn, look for the new instance this often until it has registered.
REGISTRATION_POLL_SECONDS = 0.25
# After a failed database call, look again this soon (the pool reconnects meanwhile).
DATABASE_RETRY_SECONDS = 1.0


def _q(name: str) -> str:
    return db.query(name, package="launcher")


@dataclasses.dataclass(frozen=True)
class Settings:
    machine_id: Any
    dsn: str
    check_interval: float = 30.0
    heartbeat_timeout: float = 30.0
    auto_recovery: bool = True
    restart_delay: float = 5.0


@dataclasses.dataclass(frozen=True)
class ProcessExit:
    pid: int | None  # None: the process could not be started at all
    spawned_at: dt.datetime
    exit_code: int | None
    signal: int | None
    detail: str | None = None

    def describe(self) -> str:
        if self.pid is None:
            return f"could not be started: {self.detail}"
        if self.signal is not None:
            return f"killed by {signal.Signals(self.signal).name}"
        if self.exit_code is not None:
            return f"exited with code {self.exit_code}"
        return "exited (not a child of this launcher: exit status unknown)"


class WatchedProcess:
    """A terminal process: a child of ours, or one adopted from an earlier launcher.

    An adopted process is held through a pidfd, so that waiting for it and signalling it
    can never reach another process that has since been given the same pid.
    """

    def __init__(
        self,
        pid: int,
        spawned_at: dt.datetime,
        child: asyncio.subprocess.Process | None = None,
        pidfd: int | None = None,
    ) -> None:
        self.pid = pid
        self.spawned_at = spawned_at
        self.child = child
        self.pidfd = pidfd
        self.exited = asyncio.Event()
        self.exit: ProcessExit | None = None
        self.instance_id: Any = None
        self.ending = False

    async def watch(self) -> ProcessExit:
        if self.child is not None:
            code = await self.child.wait()
            exit_code, signum = (None, -code) if code < 0 else (code, None)
        else:
            await self._wait_foreign()
            exit_code, signum = None, None
        self.exit = ProcessExit(self.pid, self.spawned_at, exit_code, signum)
        self.exited.set()
        return self.exit

    async def _wait_foreign(self) -> None:
        """Wait for a process that is not our child: its pidfd turns readable at exit."""
        if self.pidfd is None:
            return
        loop = asyncio.get_running_loop()
        gone = asyncio.Event()
        loop.add_reader(self.pidfd, gone.set)
        try:
            await gone.wait()
        finally:
            loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None

    def send(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            if self.child is not None:
                self.child.send_signal(signum)
            elif self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signum)

    async def end(self, stop_timeout: float) -> None:
        """SIGTERM (and SIGCONT, so a stopped process can act on it), SIGKILL after timeout."""
        self.ending = True
        self.send(signal.SIGTERM)
        self.send(signal.SIGCONT)
        try:
            await asyncio.wait_for(self.exited.wait(), stop_timeout)
        except TimeoutError:
            logger.warning(
                "pid %s did not exit within %.0fs of SIGTERM; sending SIGKILL",
                self.pid,
                stop_timeout,
                extra={"action": "kill", "pid": self.pid},
            )
            self.send(signal.SIGKILL)
            await self.exited.wait()


def open_process(
    pid: int, registered_at: dt.datetime, clock_offset: float
) -> int | None:
    """A pidfd for ``pid`` if it is still the process that registered at ``registered_at``.

    Pids are reused: a process that started after the instance registered is another one.
    ``clock_offset`` is the server's clock minus ours, since ``registered_at`` is the
    server's time. None when the process is gone or is not that one.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except (ProcessLookupError, PermissionError):
        return None
    started = process_start_time(pid)
    registered_local = registered_at.timestamp() - clock_offset
    # 2 s of slack: /proc gives the boot time in whole seconds.
    if started is None or started > registered_local + 2:
        os.close(pidfd)
        return None
    return pidfd


def runs_command(pid: int, command: tuple[str, ...]) -> bool:
    """Whether ``pid`` was started with exactly ``command`` as its argv."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return [part.decode(errors="replace") for part in argv if part] == list(command)


def process_start_time(pid: int) -> float | None:
    """When ``pid`` started, in seconds since the epoch (Linux /proc), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration):
        return None
    # Fields counted after the ")" closing the command name (which may hold spaces):
    # state is field 3, starttime field 22.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # exited, not yet reaped: gone all the same
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


class TerminalSupervisor:
    """Keeps one terminal of this machine running, as the control plane decides."""

    def __init__(self, launcher: Launcher, config: TerminalConfig) -> None:
        self.launcher = launcher
        self.config = config
        self.terminal_type = config.terminal_type
        self.process: WatchedProcess | None = None
        self.pending_exits: list[ProcessExit] = []
        self.stopped_gracefully = False
        self._kick = asyncio.Event()
        self._said: set[tuple[Any, ...]] = set()
        self._watch_task: asyncio.Task[None] | None = None

    @property
    def label(self) -> str:
        return f"terminal '{self.terminal_type}' on {self.launcher.machine_label}"

    def kick(self) -> None:
        self._kick.set()

    def _extra(self, action: str, **more: Any) -> dict[str, Any]:
        return {
            "extra": {
                "action": action,
                "terminal": self.terminal_type,
                "machine_id": str(self.launcher.settings.machine_id),
                **more,
            }
        }

    def _once(self, key: tuple[Any, ...]) -> bool:
        """True the first time ``key`` is seen: for lines that must not repeat every check."""
        if key in self._said:
            return False
        self._said.add(key)
        return True

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        while not self.launcher.stopping:
            wait = self.launcher.settings.check_interval
            try:
                wait = min(wait, await self.reconcile())
            except (
                psycopg.OperationalError,
                psycopg_pool.PoolTimeout,
                errors.PgliveError,
            ):
                logger.debug("%s: database unavailable, reconciling soon", self.label)
                wait = min(wait, DATABASE_RETRY_SECONDS)
            except Exception:
                logger.exception(
                    "unexpected error while checking %s; checking again in %.0fs",
                    self.label,
                    wait,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout=wait)
            self._kick.clear()

    async def reconcile(self) -> float:
        """Bring this terminal in line with the database; returns when to look again."""
        await self._report_exits()
        if self.launcher.stopping:
            return self.launcher.settings.check_interval

        if self.process is not None:
            return await self._check_running_process()

        active = await self.launcher.fetch_one(_q("active_instance"), self._slot())
        if active is not None:
            return await self._found_active_instance(active)

        return await self._follow_decision()

    async def _check_running_process(self) -> float:
        process = self.process
        assert process is not None
        newest = await self.launcher.fetch_one(_q("newest_instance"), self._slot())
        ours = (
            newest is not None
            and newest["pid"] == process.pid
            and newest["hostname"] == self.launcher.hostname
            and newest["started_at"] >= process.spawned_at - dt.timedelta(seconds=1)
        )
        if not ours:
            # Not registered yet: look again soon.
            return REGISTRATION_POLL_SECONDS

        if process.instance_id != newest["instance_id"]:
            process.instance_id = newest["instance_id"]
            logger.info(
                "%s running: instance %s, pid %s",
                self.label,
                newest["instance_id"],
                process.pid,
                **self._extra("registered", pid=process.pid),
            )

        if newest["status"] == "crashed" and not process.ending:
            await self._end_hung_process(process, newest["status_reason"])
        return self.launcher.settings.check_interval

    async def _end_hung_process(self, process: WatchedProcess, reason: str) -> None:
        logger.warning(
            "dead %s detected by the database: instance %s marked crashed (%s)",
            self.label,
            process.instance_id,
            reason,
            **self._extra("detected", pid=process.pid, how="sweep"),
        )
        if not self.launcher.settings.auto_recovery:
            if self._once(("hung-no-recovery", process.pid)):
                logger.warning(
                    "auto-recovery is off: leaving pid %s of %s alone",
                    process.pid,
                    self.label,
                    **self._extra("monitor_only", pid=process.pid),
                )
            return
        logger.warning(
            "ending pid %s of %s (SIGTERM, SIGKILL after %.0fs) before replacing it",
            process.pid,
            self.label,
            self.config.stop_timeout,
            **self._extra("end_process", pid=process.pid),
        )
        await process.end(self.config.stop_timeout)

    async def _found_active_instance(self, active: dict[str, Any]) -> float:
        """An instance runs that we did not start (an earlier launcher's, or a manual one)."""
        if active["hostname"] != self.launcher.hostname:
            if self._once(("foreign-host", active["instance_id"])):
                logger.warning(
                    "%s is running on another host (%s, pid %s): watching it through "
                    "the database only",
                    self.label,
                    active["hostname"],
                    active["pid"],
                    **self._extra("watch_remote"),
                )
            return self.launcher.settings.check_interval

        pidfd = open_process(
            active["pid"], active["started_at"], await self.launcher.clock_offset()
        )
        if pidfd is not None and not runs_command(active["pid"], self.config.command):
            # Only a process running this terminal's configured command is ever signalled:
            # a row naming some other pid (a terminal started by hand, or a forged
            # registration) must not make the launcher kill that process.
            os.close(pidfd)
            if self._once(("not-ours", active["instance_id"])):
                logger.warning(
                    "%s runs as pid %s, which is not this launcher's command for it: "
                    "watching it through the database only (it is never signalled)",
                    self.label,
                    active["pid"],
                    **self._extra("watch_foreign", pid=active["pid"]),
                )
            return self.launcher.settings.check_interval
        if pidfd is None:
            logger.warning(
                "dead %s detected: instance %s has no process (pid %s is gone, or is "
                "another process now)",
                self.label,
                active["instance_id"],
                active["pid"],
                **self._extra("detected", pid=active["pid"], how="pid gone"),
            )
            self.pending_exits.append(
                ProcessExit(active["pid"], active["started_at"], None, None)
            )
            await self._report_exits()
            return 0

        logger.info(
            "%s already running (instance %s, pid %s): watching it",
            self.label,
            active["instance_id"],
            active["pid"],
            **self._extra("adopt", pid=active["pid"]),
        )
        process = WatchedProcess(active["pid"], active["started_at"], pidfd=pidfd)
        process.instance_id = active["instance_id"]
        self._watch(process)
        return self.launcher.settings.check_interval

    async def _follow_decision(self) -> float:
        decision = await self.launcher.fetch_one(_q("recovery_decision"), self._slot())
        assert decision is not None
        action = decision["action"]

        if action == "running":
            return REGISTRATION_POLL_SECONDS
        if action == "gave_up":
            if self._once(("gave_up", decision["reason"])):
                logger.error(
                    "GAVE UP on %s after %s restart attempts; it stays down. %s. "
                    "To try again: pglive reset-recovery %s",
                    self.label,
                    decision["attempt"],
                    decision["reason"],
                    self.terminal_type,
                    **self._extra("gave_up", attempt=decision["attempt"]),
                )
            return self.launcher.settings.check_interval
        if action == "start":
            if self.stopped_gracefully:
                if self._once(("stopped",)):
                    logger.info(
                        "%s stopped gracefully; not restarting it (send SIGHUP to the "
                        "launcher to start it again)",
                        self.label,
                        **self._extra("stay_stopped"),
                    )
                return self.launcher.settings.check_interval
            await self._spawn(attempt=0)
            return REGISTRATION_POLL_SECONDS

        # action == "restart"
        if not self.launcher.settings.auto_recovery:
            if self._once(("no-recovery", decision["attempt"])):
                logger.warning(
                    "auto-recovery is off: not restarting %s",
                    self.label,
                    **self._extra("monitor_only"),
                )
            return self.launcher.settings.check_interval

        delay = float(decision["delay_seconds"])
        if self._once(("recovery", decision["attempt"], decision["restart_at"])):
            logger.warning(
                "recovery initiated for %s: attempt %s of %s in %.1fs",
                self.label,
                decision["attempt"],
                decision["max_attempts"],
                delay,
                **self._extra("recovery", attempt=decision["attempt"], delay=delay),
            )
        if delay > 0:
            return delay
        await self._spawn(attempt=decision["attempt"])
        return REGISTRATION_POLL_SECONDS

    def start_again(self) -> None:
        """Forget a graceful stop, so the next reconcile starts the terminal (SIGHUP)."""
        self.stopped_gracefully = False
        self._said.discard(("stopped",))
        self.kick()

    # -- processes ------------------------------------------------------------------------

    def _slot(self) -> dict[str, Any]:
        return {
            "machine_id": self.launcher.settings.machine_id,
            "terminal_type": self.terminal_type,
        }

    async def _spawn(self, attempt: int) -> None:
        config = self.config
        row = await self.launcher.fetch_one(_q("server_now"), {})
        spawned_at = row["now"]
        log = _open_log(config.log_file)
        if not config.working_directory.is_dir():
            self._spawn_failed(
                attempt,
                spawned_at,
                log,
                f"working directory {config.working_directory} does not exist",
            )
            return
        try:
            child = await asyncio.create_subprocess_exec(
                *config.command,
                cwd=config.working_directory,
                env=self.launcher.child_environment(config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                # Its own session: a Ctrl-C meant for the launcher does not reach it, and it
                # outlives a launcher that is killed (the next launcher adopts it).
                start_new_session=True,
            )
        except OSError as error:
            self._spawn_failed(
                attempt, spawned_at, log, f"{config.command[0]}: {error.strerror}"
            )
            return
        finally:
            log.close()

        verb = "restarted" if attempt else "started"
        logger.info(
            "%s %s: pid %s%s, log %s",
            self.label,
            verb,
            child.pid,
            f" (attempt {attempt})" if attempt else "",
            config.log_file,
            **self._extra(verb, pid=child.pid, attempt=attempt),
        )
        self._watch(WatchedProcess(child.pid, spawned_at, child))

    def _spawn_failed(
        self, attempt: int, spawned_at: dt.datetime, log: Any, reason: str
    ) -> None:
        """Record a process that could not even be started, in its log and the database."""
        logger.error(
            "cannot start %s: %s",
            self.label,
            reason,
            **self._extra("spawn_failed", attempt=attempt),
        )
        log.write(
            f"pglive-launcher: cannot start {self.terminal_type}: {reason}\n".encode()
        )
        log.close()
        self.pending_exits.append(ProcessExit(None, spawned_at, None, None, reason))

    def _watch(self, process: WatchedProcess) -> None:
        self.process = process
        self._watch_task = asyncio.create_task(self._await_exit(process))

    async def _await_exit(self, process: WatchedProcess) -> None:
        exit_ = await process.watch()
        if self.process is process:
            self.process = None
        self.pending_exits.append(exit_)
        if not (self.launcher.stopping or process.ending):
            logger.warning(
                "dead %s detected: pid %s %s",
                self.label,
                exit_.pid,
                exit_.describe(),
                **self._extra(
                    "detected",
                    pid=exit_.pid,
                    exit_code=exit_.exit_code,
                    signal=exit_.signal,
                ),
            )
        self.kick()

    async def _report_exits(self) -> None:
        while self.pending_exits:
            exit_ = self.pending_exits[0]
            row = await self.launcher.fetch_one(
                _q("report_process_exit"),
                {
                    **self._slot(),
                    "pid": exit_.pid,
                    "hostname": self.launcher.hostname,
                    "spawned_at": exit_.spawned_at,
                    "exit_code": exit_.exit_code,
                    "signal": exit_.signal,
                    "detail": exit_.detail,
                },
            )
            self.pending_exits.pop(0)
            self._log_outcome(exit_, row)

    def _log_outcome(self, exit_: ProcessExit, row: dict[str, Any]) -> None:
        outcome = row["outcome"]
        extra = self._extra(outcome, pid=exit_.pid, exit_code=exit_.exit_code)
        if outcome in ("stopped", "already_stopped"):
            self.stopped_gracefully = not self.launcher.stopping
            logger.info(
                "%s stopped gracefully (instance %s, pid %s)",
                self.label,
                row["instance_id"],
                exit_.pid,
                **extra,
            )
        elif outcome == "crashed":
            logger.warning(
                "%s marked crashed: instance %s, pid %s %s",
                self.label,
                row["instance_id"],
                exit_.pid,
                exit_.describe(),
                **extra,
            )
        elif outcome == "never_started":
            logger.warning(
                "%s failed to start: %s", self.label, exit_.describe(), **extra
            )
        elif outcome == "never_registered":
            logger.warning(
                "%s failed to start: pid %s %s before it registered",
                self.label,
                exit_.pid,
                exit_.describe(),
                **extra,
            )
        else:
            logger.info(
                "%s: pid %s has exited; instance %s was already crashed",
                self.label,
                exit_.pid,
                row["instance_id"],
                **extra,
            )

    async def stop(self) -> None:
        """End the process (graceful, then SIGKILL) and report its exit."""
        process = self.process
        if process is not None:
            logger.info(
                "stopping %s (pid %s, SIGTERM, SIGKILL after %.0fs)",
                self.label,
                process.pid,
                self.config.stop_timeout,
                **self._extra("stop", pid=process.pid),
            )
            await process.end(self.config.stop_timeout)
        if self._watch_task is not None:
            await self._watch_task
        with contextlib.suppress(
            psycopg.Error, psycopg_pool.PoolTimeout, errors.PgliveError
        ):
            await self._report_exits()


def _open_log(path) -> Any:
    """The terminal's log file for appending, rotated first when it has grown too big.

    TODO: rotation happens only when the terminal (re)starts, because the child writes to
    the file itself (so that its output survives a launcher restart); a terminal that runs
    for months grows its file unbounded. Rotating under a running child needs a pipe the
    launcher reads, or logrotate with copytruncate (which works: the file is O_APPEND).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > LOG_MAX_BYTES:
        rotator = logging.handlers.RotatingFileHandler(
            path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, delay=True
        )
        rotator.doRollover()
        rotator.close()
    return open(path, "ab")  # noqa: SIM115 (the child inherits it; closed after spawn)


class Launcher:
    """Supervises the enabled terminals of one machine."""

    def __init__(self, config: LauncherConfig, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.hostname = socket.gethostname()
        self.machine_label = str(settings.machine_id)[:8]
        self.stopping = False
        self.supervisors = [
            TerminalSupervisor(self, terminal) for terminal in config.enabled_terminals
        ]
        self._pool: psycopg_pool.AsyncConnectionPool | None = None
        self._registry: TerminalRegistry | None = None
        self._stop = asyncio.Event()
        self._database_down_since: float | None = None

    @property
    def channel(self) -> str:
        return f"pglive_{self.settings.machine_id.hex}"

    def child_environment(self, terminal: TerminalConfig) -> dict[str, str]:
        env = dict(os.environ)
        env.update(terminal.env)
        env.update(
            MACHINE_ID=str(self.settings.machine_id),
            PGLIVE_DSN=self.settings.dsn,
            PGLIVE_ENVIRONMENT=terminal.environment,
            PGLIVE_LOG_FILE=str(terminal.log_file),
            PGLIVE_LOG_TO_STDERR="1",
            PYTHONUNBUFFERED="1",
        )
        if terminal.heartbeat_interval is not None:
            env["PGLIVE_HEARTBEAT_INTERVAL"] = str(terminal.heartbeat_interval)
        return env

    async def clock_offset(self) -> float:
        """The server's clock minus this machine's, in seconds."""
        row = await self.fetch_one(_q("server_now"), {})
        return row["now"].timestamp() - time.time()

    async def _launcher_alive(self, previous: dict[str, Any]) -> bool:
        pidfd = open_process(
            previous["pid"], previous["started_at"], await self.clock_offset()
        )
        if pidfd is None:
            return False
        os.close(pidfd)
        return True

    async def fetch_one(
        self, query: str, params: dict[str, Any]
    ) -> dict[str, Any] | None:
        assert self._pool is not None
        async with self._pool.connection(timeout=5) as conn:
            cursor = await conn.execute(query, params)
            return await cursor.fetchone()

    # -- life cycle -----------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._request_stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self._start_stopped_terminals)

        self._pool = psycopg_pool.AsyncConnectionPool(
            self.settings.dsn,
            min_size=1,
            max_size=3,
            open=False,
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "application_name": "pglive-launcher",
            },
            reconnect_timeout=0,  # keep trying for as long as the launcher runs
            # A connection handed out after a server restart must work, or the first
            # reconcile after the restart fails and waits a whole check interval.
            check=psycopg_pool.AsyncConnectionPool.check_connection,
        )
        try:
            await self._pool.open(wait=True, timeout=30)
            await self._check_terminal_types()
            exit_code = await self._register_launcher()
            if exit_code is not None:
                return exit_code
            # Only a launcher that runs may set its machine's settings.
            await self._apply_machine_settings()
            return await self._supervise()
        finally:
            await self._pool.close()

    async def _check_terminal_types(self) -> None:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(_q("terminal_types"))
            known = {row["terminal_type"] for row in await cursor.fetchall()}
        for terminal in self.config.terminals:
            if terminal.terminal_type not in known:
                raise errors.ConfigurationError(
                    f"{self.config.path}: terminals.{terminal.terminal_type}: unknown "
                    f"terminal type (the database knows {', '.join(sorted(known))})"
                )

    async def _apply_machine_settings(self) -> None:
        async with self._pool.connection() as conn:
            for key, value in (
                ("heartbeat_timeout_seconds", self.settings.heartbeat_timeout),
                ("restart_delay_seconds", self.settings.restart_delay),
            ):
                with db.translated_errors():
                    await conn.execute(
                        _q("set_machine_setting"),
                        {
                            "machine_id": self.settings.machine_id,
                            "key": key,
                            "value": value,
                        },
                    )

    async def _register_launcher(self) -> int | None:
        """Register the launcher itself, taking over from a launcher whose process is gone.

        Its heartbeat interval is a third of the heartbeat timeout: of the one in force now
        (set by an earlier launcher) as well as the one this launcher is about to set.
        """
        current = await self.fetch_one(_q("heartbeat_timeout"), self._machine())
        timeout = min(self.settings.heartbeat_timeout, float(current["timeout"]))
        interval = max(0.3, min(10.0, timeout / 3))
        for _ in range(2):
            self._registry = TerminalRegistry(
                "launcher",
                machine_id=self.settings.machine_id,
                environment="production",
                heartbeat_interval=interval,
                dsn=self.settings.dsn,
            )
            try:
                await self._registry.register()
                return None
            except errors.TerminalAlreadyRunningError as error:
                previous = await self.fetch_one(
                    _q("active_instance"),
                    {
                        "machine_id": self.settings.machine_id,
                        "terminal_type": "launcher",
                    },
                )
                if (
                    previous is None
                    or previous["hostname"] != self.hostname
                    or await self._launcher_alive(previous)
                ):
                    logger.error(
                        "another launcher runs on this machine; not starting: %s",
                        error,
                        extra={"action": "duplicate_launcher"},
                    )
                    return 3
                logger.warning(
                    "the previous launcher (pid %s) is gone; taking over from instance %s",
                    previous["pid"],
                    previous["instance_id"],
                    extra={"action": "take_over", "pid": previous["pid"]},
                )
                await self.fetch_one(
                    _q("mark_terminal_crashed"),
                    {
                        "instance_id": previous["instance_id"],
                        "reason": f"launcher process {previous['pid']} is gone from "
                        f"{self.hostname}",
                    },
                )
        return 3

    async def _supervise(self) -> int:
        logger.info(
            "launcher for machine %s supervising %s (auto-recovery %s, heartbeat timeout "
            "%.0fs, check every %.0fs)",
            self.settings.machine_id,
            ", ".join(s.terminal_type for s in self.supervisors) or "nothing",
            "on" if self.settings.auto_recovery else "off",
            self.settings.heartbeat_timeout,
            self.settings.check_interval,
            extra={"action": "start"},
        )
        tasks = [asyncio.create_task(s.run()) for s in self.supervisors]
        listener = asyncio.create_task(self._listen())
        stop = asyncio.create_task(self._stop.wait())
        while True:
            fenced = asyncio.create_task(self._registry.wait_fenced())
            await asyncio.wait({fenced, stop}, return_when=asyncio.FIRST_COMPLETED)
            if stop.done() or not await self._register_again():
                break

        self.stopping = True
        listener.cancel()
        for task in (fenced, stop):
            task.cancel()
        for supervisor in self.supervisors:
            supervisor.kick()
        await asyncio.gather(*tasks, return_exceptions=True)

        if self._registry.fenced:
            logger.error(
                "this launcher was replaced by another one; exiting and leaving the "
                "terminals to it",
                extra={"action": "fenced"},
            )
            await self._registry.close()
            return 4

        await asyncio.gather(*(s.stop() for s in self.supervisors))
        await self._registry.shutdown(reason="launcher stopped")
        logger.info(
            "launcher stopped; every terminal stopped", extra={"action": "stopped"}
        )
        return 0

    async def _register_again(self) -> bool:
        """After being declared dead (paused, or cut off for longer than the timeout):
        register anew unless another launcher has taken over. True when registered."""
        logger.warning(
            "this launcher was declared dead (no heartbeat within the timeout: paused or "
            "cut off?); registering again unless another launcher has taken over",
            extra={"action": "fenced"},
        )
        await self._registry.close()
        try:
            registered = await self._register_launcher() is None
        except (psycopg.Error, psycopg_pool.PoolTimeout, errors.PgliveError) as error:
            logger.error(
                "could not register again: %s", error, extra={"action": "fenced"}
            )
            return False
        if registered:
            logger.warning(
                "registered again as instance %s; supervising on",
                self._registry.instance_id,
                extra={"action": "registered_again"},
            )
        return registered

    def _machine(self) -> dict[str, Any]:
        return {"machine_id": self.settings.machine_id}

    def _request_stop(self, signum: int) -> None:
        logger.info(
            "received %s: stopping every terminal gracefully",
            signal.Signals(signum).name,
            extra={"action": "shutdown"},
        )
        self._stop.set()

    def _start_stopped_terminals(self) -> None:
        logger.info(
            "received SIGHUP: starting any stopped terminal", extra={"action": "hup"}
        )
        for supervisor in self.supervisors:
            supervisor.start_again()

    async def _listen(self) -> None:
        """LISTEN on the machine's channel; reconcile everything after each (re)connection."""
        backoff = Backoff(first=1.0, cap=30.0)
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn = await db.connect_async(
                    self.settings.dsn, application_name="pglive-launcher listen"
                )
                async with conn:
                    await conn.execute(
                        sql.SQL("LISTEN {}").format(sql.Identifier(self.channel))
                    )
                    if self._database_down_since is not None:
                        logger.warning(
                            "database reachable again after %.1fs; reconciling every terminal",
                            loop.time() - self._database_down_since,
                            extra={"action": "reconnected"},
                        )
                        self._database_down_since = None
                    backoff.reset()
                    for supervisor in self.supervisors:
                        supervisor.kick()
                    while True:
                        async for notify in conn.notifies(timeout=5.0):
                            self._on_notify(notify.payload)
                        await conn.execute("SELECT 1")  # notices a dead connection
            except (psycopg.OperationalError, errors.DatabaseUnavailableError) as error:
                delay = backoff.next_delay()
                if self._database_down_since is None:
                    self._database_down_since = loop.time()
                    logger.warning(
                        "database unreachable (%s); terminals keep running, retrying in "
                        "%.1fs (not fatal)",
                        errors.describe_connection_error(error),
                        delay,
                        extra={"action": "db_unreachable"},
                    )
                await asyncio.sleep(delay)

    def _on_notify(self, payload: str) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            logger.warning("ignoring a malformed notification: %r", payload[:200])
            return
        logger.debug("notification: %s", event)
        for supervisor in self.supervisors:
            if supervisor.terminal_type == event.get("terminal_type"):
                supervisor.kick()
