"""terminal1, the PLC data service: all mapped values, once a second, into ald.readings.

    python -m terminals.plc_data_service [--demo] [--machine-id ID] [--log-file F] ...

Cycle k is due at start + k seconds, whatever the previous cycles took, so the schedule
never drifts; a cycle that overruns skips the slots it missed. Each successful cycle
counts one command, each failed one an error (pglive's sweep turns the instance
degraded from the error rate). A PLC outage never stops the service: reads fail fast
while the client backs off, and succeed again when the PLC is back.

Readings are stored in batches by a task of their own, so a slow or absent database
never delays a read. --demo also logs the measurements every ten cycles.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from pglive import TerminalRegistry
from terminals import service
from terminals.plc.client import PlcError

logger = logging.getLogger(__name__)

PERIOD_SECONDS = 1.0
BATCH_SIZE = 5
MAX_BATCH_AGE_SECONDS = 5.0
# About an hour of readings survive a database outage; older ones are dropped first.
MAX_BUFFERED_READINGS = 3600
FINAL_FLUSH_TIMEOUT_SECONDS = 5.0
DEMO_SUMMARY_EVERY = 10  # cycles between the --demo summary lines


@dataclass(frozen=True)
class Reading:
    cycle: int
    scheduled_at: datetime
    sampled_at: datetime
    values: dict[str, Any]


class ReadingStore:
    """Buffers readings and writes them in batches; survives database outages."""

    def __init__(self, registry: TerminalRegistry) -> None:
        self.registry = registry
        self.buffer: collections.deque[Reading] = collections.deque()
        self.dropped = 0
        self.stored = 0
        self._ready = asyncio.Event()
        self._conn: psycopg.AsyncConnection | None = None

    def add(self, reading: Reading) -> None:
        if len(self.buffer) >= MAX_BUFFERED_READINGS:
            self.buffer.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 600 == 0:
                logger.warning(
                    "%s: reading buffer full, dropped %d oldest readings so far",
                    self.registry.name,
                    self.dropped,
                )
        self.buffer.append(reading)
        if len(self.buffer) >= BATCH_SIZE:
            self._ready.set()

    async def run(self) -> None:
        """Flush whenever a batch is full or the oldest reading is getting old."""
        retry = service.Retry()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), MAX_BATCH_AGE_SECONDS)
            self._ready.clear()
            try:
                await self.flush()
            except psycopg.Error as exc:
                await self._drop_connection()
                delay = retry.next_delay_hint()
                logger.warning(
                    "%s: cannot store %d readings (%s), retrying in %.1fs (not fatal)",
                    self.registry.name,
                    len(self.buffer),
                    _first_line(exc),
                    delay,
                )
                await retry.sleep()
                continue
            if retry.failures:
                logger.info("%s: storing readings again", self.registry.name)
            retry.reset()

    async def flush(self) -> None:
        if not self.buffer:
            return
        batch = list(self.buffer)
        conn = await self._connection()
        async with conn.transaction(), conn.cursor() as cursor:
            await cursor.executemany(
                service.query("insert_reading"),
                [self._row(reading) for reading in batch],
            )
        # By cycle, not by count: add() may have dropped old readings meanwhile.
        last_cycle = batch[-1].cycle
        while self.buffer and self.buffer[0].cycle <= last_cycle:
            self.buffer.popleft()
        self.stored += len(batch)
        logger.debug("%s: stored %d readings", self.registry.name, len(batch))

    async def close(self) -> None:
        await self._drop_connection()

    def _row(self, reading: Reading) -> dict[str, Any]:
        return {
            "machine_id": self.registry.machine_id,
            "instance_id": self.registry.instance_id,
            "token": self.registry.token,
            "cycle": reading.cycle,
            "scheduled_at": reading.scheduled_at,
            "sampled_at": reading.sampled_at,
            "data": json.dumps(reading.values),
        }

    async def _connection(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed:
            self._conn = await service.connect(self.registry, "readings")
        return self._conn

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self._conn.close()
            self._conn = None


class Schedule:
    """Cycle k is due at start + k * period, so lateness never accumulates.

    A cycle that overruns its slot skips the slots it missed rather than running
    them back to back.
    """

    def __init__(self, registry: TerminalRegistry, period: float) -> None:
        self.registry = registry
        self.period = period
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()
        self.wall_start = datetime.now(UTC)
        self.cycle = 0
        self._overrunning = False

    def scheduled_at(self) -> datetime:
        return self.wall_start + timedelta(seconds=self.cycle * self.period)

    async def wait_next(self) -> None:
        due = self.cycle + 1
        ahead = math.floor((self.loop.time() - self.start) / self.period) + 1
        if ahead > due:
            # A slow PLC overruns every cycle: say it once, then at debug level.
            log = logger.debug if self._overrunning else logger.warning
            log(
                "%s: read cycle %d took longer than %.1fs, skipping %d slot(s)",
                self.registry.name,
                self.cycle,
                self.period,
                ahead - due,
            )
        self._overrunning = ahead > due
        self.cycle = max(due, ahead)
        delay = self.start + self.cycle * self.period - self.loop.time()
        await asyncio.sleep(max(delay, 0.0))


async def work(registry: TerminalRegistry, context: service.ServiceContext) -> None:
    plc = context.plc_client()
    store = ReadingStore(registry)
    flusher = asyncio.create_task(store.run(), name="readings flusher")
    failing_since: int | None = None
    failed_cycles = 0

    schedule = Schedule(registry, PERIOD_SECONDS)
    logger.info(
        "%s reading %d values from the %s every %.1fs",
        registry.name,
        len(context.plc_map.reactor),
        context.plc_config.describe(),
        PERIOD_SECONDS,
    )
    try:
        while True:
            cycle, scheduled_at = schedule.cycle, schedule.scheduled_at()
            sampled_at = datetime.now(UTC)
            try:
                values = await plc.read_all()
            except PlcError as exc:
                registry.record_error(str(exc))
                failed_cycles += 1
                if failing_since is None:
                    failing_since = cycle
                    logger.warning(
                        "%s: read cycle %d failed: %s (keeps reading every %.1fs)",
                        registry.name,
                        cycle,
                        exc,
                        PERIOD_SECONDS,
                    )
                else:
                    logger.debug(
                        "%s: read cycle %d failed: %s", registry.name, cycle, exc
                    )
            else:
                registry.increment_commands()
                store.add(Reading(cycle, scheduled_at, sampled_at, values))
                if context.demo and cycle % DEMO_SUMMARY_EVERY == 0:
                    logger.info("%s: %s", registry.name, _summary(context, values))
                if failing_since is not None:
                    logger.info(
                        "%s: PLC reads work again after %d failed cycles",
                        registry.name,
                        failed_cycles,
                    )
                    failing_since = None
                    failed_cycles = 0

            await schedule.wait_next()
    finally:
        plc.close()
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        # The flusher may have been cancelled inside a query: start afresh.
        await store.close()
        try:
            await asyncio.wait_for(store.flush(), FINAL_FLUSH_TIMEOUT_SECONDS)
        except (psycopg.Error, TimeoutError) as exc:
            logger.warning(
                "%s: %d readings not stored at stop: %s",
                registry.name,
                len(store.buffer),
                _first_line(exc),
            )
        await store.close()


def _summary(context: service.ServiceContext, values: dict[str, Any]) -> str:
    """The measurements (not the setpoints) of one cycle, with their units."""
    parts = []
    for register in context.plc_map.reactor:
        if register.writable:
            continue
        value = values[register.name]
        shown = f"{value:.1f}" if isinstance(value, float) else str(value)
        parts.append(f"{register.name} {shown} {register.unit}".rstrip())
    return ", ".join(parts)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


main = service.service_command(
    "terminal1",
    "terminal1: read every mapped PLC value once a second and store the readings.",
    work,
)

if __name__ == "__main__":
    # Run the imported module, not this __main__ copy, so log lines carry the real
    # logger name (terminals.plc_data_service) instead of __main__.
    from terminals.plc_data_service import main as imported_main

    imported_main()
