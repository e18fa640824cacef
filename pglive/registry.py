"""The heartbeat client that every terminal uses.

A terminal registers once, then beats every ``heartbeat_interval`` seconds, carrying the
commands and errors counted since the last beat. It never decides its own liveness: the
server does (``pglive.sweep``). The client only has to keep beating, keep the counters
exact, and stop acting when the server says it was replaced (fenced).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import socket
import time
import uuid
from typing import Any

import psycopg

from pglive import db, errors, identity

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL = 10.0
DEFAULT_ENVIRONMENT = "development"


@dataclasses.dataclass(frozen=True)
class _Batch:
    """Counters on their way to the server, under one sequence number.

    A batch is sent again, unchanged, until the server acknowledges it; the server applies a
    sequence number once, so a retry after an ambiguous failure (the first try committed but
    its answer was lost) adds nothing twice.
    """

    sequence: int
    commands: int
    errors: int
    last_error: str | None


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, first: float = 0.5, cap: float = 30.0) -> None:
        self.first = first
        self.cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.first * 2**self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class TerminalRegistry:
    """Registration, heartbeats and graceful stop of one terminal instance.

    Usable as ``async with TerminalRegistry(...) as registry:``: registered on entry,
    stopped gracefully on exit; when the block raises, the error is recorded, the stop
    carries it as the reason, and the exception propagates.
    """

    def __init__(
        self,
        terminal_type: str,
        machine_id: str | uuid.UUID | None = None,
        environment: str | None = None,
        heartbeat_interval: float | None = None,
        log_file_path: str | None = None,
        dsn: str | None = None,
        *,
        hostname: str | None = None,
        pid: int | None = None,
        reconnect_max_delay: float = 30.0,
        register_timeout: float = 30.0,
    ) -> None:
        self.terminal_type = identity.check_terminal_type(terminal_type)
        self.machine_id = identity.machine_id(machine_id)
        self.environment = identity.check_environment(
            environment or os.environ.get("PGLIVE_ENVIRONMENT") or DEFAULT_ENVIRONMENT
        )
        self.heartbeat_interval = identity.check_heartbeat_interval(
            heartbeat_interval
            if heartbeat_interval is not None
            else os.environ.get("PGLIVE_HEARTBEAT_INTERVAL", DEFAULT_HEARTBEAT_INTERVAL)
        )
        self.log_file_path = log_file_path or os.environ.get("PGLIVE_LOG_FILE") or None
        self._dsn = dsn
        self.hostname = hostname or socket.gethostname()
        self.pid = pid or os.getpid()
        self.register_timeout = register_timeout

        self.instance_id: uuid.UUID | None = None
        self.token: str | None = None
        self.status: str | None = None

        self._conn: psycopg.AsyncConnection[dict[str, Any]] | None = None
        self._sequence = 0
        self._commands = 0
        self._errors = 0
        self._last_error: str | None = None
        self._inflight: _Batch | None = None
        self._backoff = Backoff(cap=reconnect_max_delay)
        self._next_connect_at = 0.0
        self._outage_started: float | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._fenced = asyncio.Event()
        self._fenced_error: errors.TerminalFencedError | None = None
        self._lock: asyncio.Lock | None = None

    # -- what the terminal calls ------------------------------------------------------------

    @property
    def dsn(self) -> str:
        if self._dsn is None:
            self._dsn = db.resolve_dsn()
        return self._dsn

    @property
    def name(self) -> str:
        return f"{self.terminal_type} on machine {self.machine_id}"

    def increment_commands(self, count: int = 1) -> None:
        """Count successful operations; they travel with the next heartbeat."""
        self._commands += count

    def record_error(self, message: str) -> None:
        """Count one failed operation and remember its message as the last error."""
        self._errors += 1
        self._last_error = str(message)[:1000]

    @property
    def fenced(self) -> bool:
        return self._fenced.is_set()

    async def wait_fenced(self) -> errors.TerminalFencedError:
        """Wait until the server fences this instance; returns the error it raised."""
        await self._fenced.wait()
        assert self._fenced_error is not None
        return self._fenced_error

    async def register(self) -> uuid.UUID:
        """Register, send the first heartbeat (starting -> healthy), start beating.

        Retries an unreachable server for ``register_timeout`` seconds, then raises
        DatabaseUnavailableError. Raises TerminalAlreadyRunningError naming the running
        instance when this slot is taken.
        """
        self._lock = asyncio.Lock()
        deadline = time.monotonic() + self.register_timeout
        while True:
            try:
                conn = await self._connection()
                with db.translated_errors():
                    cursor = await conn.execute(
                        db.query("register_terminal"),
                        {
                            "terminal_type": self.terminal_type,
                            "machine_id": self.machine_id,
                            "environment": self.environment,
                            "pid": self.pid,
                            "hostname": self.hostname,
                            "heartbeat_interval": self.heartbeat_interval,
                            "log_file_path": self.log_file_path,
                        },
                    )
                    row = await cursor.fetchone()
                break
            except (errors.DatabaseUnavailableError, psycopg.OperationalError) as error:
                await self._drop_connection()
                if time.monotonic() > deadline:
                    raise errors.DatabaseUnavailableError(
                        f"{self.name} could not register: {_describe(error)}"
                    ) from None
                delay = self._backoff.next_delay()
                logger.warning(
                    "%s cannot register yet (%s); retrying in %.1fs",
                    self.name,
                    _describe(error),
                    delay,
                )
                await asyncio.sleep(delay)

        self.instance_id = row["instance_id"]
        self.token = row["token"]
        self.status = "starting"
        logger.info(
            "%s registered as instance %s (pid %s, heartbeat every %ss)",
            self.name,
            self.instance_id,
            self.pid,
            _seconds(self.heartbeat_interval),
        )

        await self._beat()
        self._heartbeat_task = asyncio.create_task(
            self._heartbeat_loop(), name=f"pglive heartbeat {self.terminal_type}"
        )
        return self.instance_id

    async def shutdown(
        self, reason: str = "graceful stop", *, timeout: float = 5.0
    ) -> bool:
        """Stop gracefully: stopping, flush the counters, stopped. True when recorded.

        When the server cannot be reached within ``timeout`` seconds the stop is not
        recorded; the sweep then marks the instance crashed once its heartbeats are overdue.
        """
        await self._stop_heartbeats()
        if self.instance_id is None or self.fenced:
            await self._drop_connection()
            return False

        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    await self._stop_once(reason)
                    logger.info(
                        "%s instance %s stopped (%s)",
                        self.name,
                        self.instance_id,
                        reason,
                    )
                    return True
                except (
                    errors.DatabaseUnavailableError,
                    psycopg.OperationalError,
                ) as error:
                    await self._drop_connection()
                    if time.monotonic() > deadline:
                        logger.warning(
                            "%s could not record its stop (%s); the sweep will mark "
                            "instance %s crashed when its heartbeats are overdue",
                            self.name,
                            _describe(error),
                            self.instance_id,
                        )
                        return False
                    await asyncio.sleep(min(1.0, self._backoff.next_delay()))
        except errors.TerminalFencedError as error:
            self._set_fenced(error)
            return False
        finally:
            await self._drop_connection()

    async def close(self) -> None:
        """Stop beating and disconnect without recording anything (for a fenced instance)."""
        await self._stop_heartbeats()
        await self._drop_connection()

    async def __aenter__(self) -> TerminalRegistry:
        await self.register()
        return self

    async def __aexit__(self, exc_type, exc, traceback) -> None:
        if exc is None:
            await self.shutdown()
        elif isinstance(exc, errors.TerminalFencedError) or self.fenced:
            await self.close()
        else:
            self.record_error(f"{type(exc).__name__}: {exc}")
            await self.shutdown(
                reason=f"stopped after an error: {type(exc).__name__}: {exc}"
            )

    # -- heartbeats -------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        """Beat on a fixed grid (start + k * interval), so the schedule never drifts.

        After a pause longer than an interval (SIGSTOP, a slow beat) the missed slots are
        skipped rather than fired in a burst.
        """
        loop = asyncio.get_running_loop()
        interval = self.heartbeat_interval
        next_at = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            late = loop.time() - next_at
            next_at += interval * (1 + max(0, int(late // interval)))
            try:
                await self._beat()
            except errors.TerminalFencedError:
                return

    async def _beat(self) -> None:
        assert self._lock is not None
        async with self._lock:
            if time.monotonic() < self._next_connect_at:
                return
            try:
                await self._send_batches()
            except errors.TerminalFencedError as error:
                self._set_fenced(error)
                raise
            except (
                errors.DatabaseUnavailableError,
                psycopg.OperationalError,
                TimeoutError,
            ) as error:
                await self._drop_connection()
                self._note_outage(error)
            else:
                self._note_recovery()

    async def _send_batches(self) -> None:
        """Send the batch in flight, if any, then one with everything counted since."""
        conn = await self._connection()
        while True:
            batch = self._take_batch()
            with db.translated_errors():
                cursor = await asyncio.wait_for(
                    conn.execute(
                        db.query("heartbeat"),
                        {
                            "instance_id": self.instance_id,
                            "token": self.token,
                            "commands": batch.commands,
                            "errors": batch.errors,
                            "last_error": batch.last_error,
                            "sequence": batch.sequence,
                        },
                    ),
                    timeout=max(5.0, self.heartbeat_interval),
                )
                row = await cursor.fetchone()
            self._inflight = None
            if self.status != row["status"]:
                logger.info(
                    "%s instance %s is %s", self.name, self.instance_id, row["status"]
                )
            self.status = row["status"]
            logger.debug(
                "%s heartbeat %s sent (%s commands, %s errors)",
                self.name,
                batch.sequence,
                batch.commands,
                batch.errors,
            )
            if not (self._commands or self._errors):
                return

    def _take_batch(self) -> _Batch:
        if self._inflight is None:
            self._sequence += 1
            self._inflight = _Batch(
                self._sequence, self._commands, self._errors, self._last_error
            )
            self._commands = 0
            self._errors = 0
            self._last_error = None
        return self._inflight

    async def _stop_once(self, reason: str) -> None:
        conn = await self._connection()
        with db.translated_errors():
            await conn.execute(
                db.query("begin_terminal_stop"),
                {
                    "instance_id": self.instance_id,
                    "token": self.token,
                    "reason": reason,
                },
            )
            if self._inflight is not None:
                await self._send_batches()
            batch = self._take_batch()
            cursor = await conn.execute(
                db.query("finish_terminal_stop"),
                {
                    "instance_id": self.instance_id,
                    "token": self.token,
                    "commands": batch.commands,
                    "errors": batch.errors,
                    "last_error": batch.last_error,
                    "sequence": batch.sequence,
                    "reason": reason,
                },
            )
            row = await cursor.fetchone()
        self._inflight = None
        self.status = row["status"]

    async def _stop_heartbeats(self) -> None:
        task, self._heartbeat_task = self._heartbeat_task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        if self._lock is not None:
            async with self._lock:
                pass

    # -- connection -------------------------------------------------------------------------

    async def _connection(self) -> psycopg.AsyncConnection[dict[str, Any]]:
        if self._conn is None or self._conn.closed:
            self._conn = await db.connect_async(
                self.dsn, application_name=f"{self.terminal_type} pid {self.pid}"
            )
        return self._conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except (
                Exception
            ):  # a broken connection may fail to close; it is gone either way
                logger.debug("closing a broken connection failed", exc_info=True)

    def _note_outage(self, error: BaseException) -> None:
        delay = self._backoff.next_delay()
        self._next_connect_at = time.monotonic() + delay
        if self._outage_started is None:
            self._outage_started = time.monotonic()
            logger.warning(
                "database unreachable for %s (%s); heartbeats paused, work goes on, "
                "reconnecting with backoff up to %.0fs (not fatal)",
                self.name,
                _describe(error),
                self._backoff.cap,
            )
        else:
            logger.debug("%s still cannot reach the database: %s", self.name, error)

    def _note_recovery(self) -> None:
        self._backoff.reset()
        if self._outage_started is not None:
            logger.warning(
                "database reachable again for %s after %.1fs; heartbeats resumed and "
                "counters flushed",
                self.name,
                time.monotonic() - self._outage_started,
            )
            self._outage_started = None

    def _set_fenced(self, error: errors.TerminalFencedError) -> None:
        if not self._fenced.is_set():
            logger.error(
                "%s instance %s was fenced by the server (%s); it must stop acting now",
                self.name,
                self.instance_id,
                error,
            )
            self._fenced_error = error
            self._fenced.set()


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no answer in time"
    if isinstance(error, psycopg.Error):
        return errors.describe_connection_error(error)
    return str(error)


def _seconds(value: float) -> str:
    return f"{value:g}"
