"""terminal2, the recipe service: runs ALD recipes on the PLC from a command queue.

    python -m terminals.recipe_service [--demo] [--machine-id ID] [--log-file PATH] ...

Commands (start, pause, resume, abort) are queued in ald.recipe_commands. Each is
claimed with FOR UPDATE SKIP LOCKED, fenced by pglive.lock_active_instance(), and
settled in the same transaction, so a crash leaves it queued rather than half done.
LISTEN wakes the service; it polls as well, for notifications lost while disconnected.

A run executes in a task of its own and records its progress in ald.recipe_runs.
Whatever ends it (completion, abort, a PLC failure, SIGTERM) closes the precursor
valves first. A run that another instance left unfinished (it crashed) is marked
interrupted at start-up and never resumed, because nobody knows what the chamber did
in between.

--demo loads the demo recipe (20 cycles: precursor A pulse, purge, precursor B pulse,
purge) if it is missing, and queues a run of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from typing import Any

import psycopg

from pglive import TerminalRegistry
from terminals import recipes, service
from terminals.plc.client import PlcClient, PlcError

logger = logging.getLogger(__name__)

# Progress is written at most this often (and at every new cycle, pause and end).
PROGRESS_INTERVAL_SECONDS = 0.5
SAFE_STATE_DEADLINE_SECONDS = 5.0
FINISH_DEADLINE_SECONDS = 5.0


class Outcome(enum.StrEnum):
    COMPLETED = "completed"
    ABORTED = "aborted"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class RunAborted(Exception):
    """An abort command arrived."""


async def close_precursors(
    registry: TerminalRegistry, plc: PlcClient, valves: tuple[str, ...], why: str
) -> bool:
    """Close the safe-state valves and read them back; retries until a deadline.

    Returns whether the PLC confirmed them closed.
    """
    deadline = time.monotonic() + SAFE_STATE_DEADLINE_SECONDS
    last_error: PlcError | None = None
    while True:
        try:
            for valve in valves:
                await plc.write(valve, False)
            still_open = [valve for valve in valves if await plc.read(valve)]
            if not still_open:
                logger.info("%s: %s closed (%s)", registry.name, ", ".join(valves), why)
                return True
            last_error = PlcError(f"{', '.join(still_open)} read back open")
        except PlcError as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.2)

    registry.record_error(f"safe state failed: {last_error}")
    logger.error(
        "%s: could NOT close %s (%s): %s; check the reactor by hand",
        registry.name,
        ", ".join(valves),
        why,
        last_error,
    )
    return False


class ProgressReporter:
    """Writes a run's latest progress from a task of its own.

    Valve timing must never wait on the database: a step only hands over its
    progress, and a slow or absent database just means fewer, later updates.
    """

    def __init__(self, registry: TerminalRegistry, run_id: int) -> None:
        self.registry = registry
        self.run_id = run_id
        self._latest: dict[str, Any] | None = None
        self._wanted = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(
            self._write_forever(), name=f"run {self.run_id} progress"
        )

    def report(self, params: dict[str, Any]) -> None:
        self._latest = params
        self._wanted.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _write_forever(self) -> None:
        retry = service.Retry()
        conn: psycopg.AsyncConnection | None = None
        try:
            while True:
                await self._wanted.wait()
                self._wanted.clear()
                try:
                    if conn is None or conn.closed:
                        conn = await service.connect(
                            self.registry, f"run {self.run_id}"
                        )
                    await conn.execute(
                        service.query("update_run_progress"), self._latest
                    )
                except psycopg.Error as exc:
                    if retry.failures == 0:
                        logger.warning(
                            "%s: run %d: progress not recorded (%s); the run goes on",
                            self.registry.name,
                            self.run_id,
                            _first_line(exc),
                        )
                    conn = None
                    self._wanted.set()
                    await retry.sleep()
                    continue
                retry.reset()
        finally:
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    await conn.close()


class RecipeRun:
    """One execution of a planned recipe, with its pause and abort controls."""

    def __init__(
        self,
        registry: TerminalRegistry,
        plc: PlcClient,
        safe_valves: tuple[str, ...],
        run_id: int,
        recipe_label: str,
        plan: recipes.Plan,
    ) -> None:
        self.registry = registry
        self.plc = plc
        self.safe_valves = safe_valves
        self.run_id = run_id
        self.label = recipe_label
        self.plan = plan
        self.paused = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._abort = asyncio.Event()
        # Set by pause and abort, so a long wait step notices them at once.
        self._interrupt = asyncio.Event()
        self._reporter = ProgressReporter(registry, run_id)
        self._last_progress = 0.0
        self._last_cycle: int | None = None
        self.current: recipes.PlannedStep | None = None
        self.steps_done = 0

    @property
    def state(self) -> str:
        return "paused" if self.paused else "running"

    def pause(self) -> None:
        self.paused = True
        self._resumed.clear()
        self._interrupt.set()

    def resume(self) -> None:
        self.paused = False
        self._resumed.set()

    def abort(self) -> None:
        self._abort.set()
        self._resumed.set()
        self._interrupt.set()

    async def execute(self) -> None:
        outcome, error = Outcome.COMPLETED, None
        logger.info(
            "%s: run %d of %s started (%d steps, %s cycles)",
            self.registry.name,
            self.run_id,
            self.label,
            len(self.plan.steps),
            self.plan.total_cycles or "no",
        )
        self._reporter.start()
        try:
            for planned in self.plan.steps:
                await self._checkpoint()
                self.current = planned
                self._progress()
                await self._perform(planned)
                self.steps_done += 1
                self.registry.increment_commands()
        except RunAborted:
            outcome, error = Outcome.ABORTED, "aborted by command"
        except PlcError as exc:
            outcome, error = Outcome.FAILED, f"{self._where()}: {exc}"
            self.registry.record_error(f"recipe run {self.run_id}: {exc}")
        except asyncio.CancelledError:
            outcome, error = Outcome.INTERRUPTED, f"service stopped at {self._where()}"
            raise
        finally:
            await self._end(outcome, error)

    async def _checkpoint(self) -> None:
        if self._abort.is_set():
            raise RunAborted
        if not self.paused:
            return
        await close_precursors(
            self.registry, self.plc, self.safe_valves, f"run {self.run_id} paused"
        )
        self._progress(force=True)
        logger.info(
            "%s: run %d paused at %s", self.registry.name, self.run_id, self._where()
        )
        await self._resumed.wait()
        self._interrupt.clear()
        if self._abort.is_set():
            raise RunAborted
        logger.info("%s: run %d resumed", self.registry.name, self.run_id)
        self._progress(force=True)

    async def _perform(self, planned: recipes.PlannedStep) -> None:
        step = planned.step
        if step.kind in ("open_valve", "close_valve", "set_parameter"):
            assert step.target is not None and planned.value is not None
            await self._write_with_one_retry(step.target, planned.value)
        elif step.kind == "wait":
            await self._wait(step.duration_ms or 0)

    async def _wait(self, duration_ms: int) -> None:
        """Wait the step's time; a pause inside it holds the clock, an abort ends it.

        TODO: a pause in the middle of a precursor pulse closes the valve and resume
        does not reopen it, so that pulse gives a short dose. Restarting the cycle on
        resume would be better ALD practice, but needs the recipe to say where a
        cycle starts.
        """
        loop = asyncio.get_running_loop()
        remaining = duration_ms / 1000
        while remaining > 0:
            started = loop.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._interrupt.wait(), remaining)
            remaining -= loop.time() - started
            if self._abort.is_set():
                raise RunAborted
            if self.paused:
                await self._checkpoint()

    async def _write_with_one_retry(self, name: str, value: Any) -> None:
        """A single lost packet should not ruin a run; a second failure does."""
        try:
            await self.plc.write(name, value)
        except PlcError as exc:
            logger.warning(
                "%s: run %d: writing %s failed (%s), retrying once",
                self.registry.name,
                self.run_id,
                name,
                exc,
            )
            await asyncio.sleep(0.6)
            await self.plc.write(name, value)

    def _where(self) -> str:
        if self.current is None:
            return "the start"
        cycle = f", cycle {self.current.cycle}" if self.current.cycle else ""
        return f"step {self.current.step.position}{cycle}"

    def _progress_params(self) -> dict[str, Any]:
        return {
            "id": self.run_id,
            "state": self.state,
            "current_step": self.current.step.position if self.current else None,
            "current_cycle": self.current.cycle if self.current else None,
            "steps_done": self.steps_done,
        }

    def _progress(self, force: bool = False) -> None:
        """Hand progress to the reporter now and then: every new cycle, or 0.5 s."""
        cycle = self.current.cycle if self.current else None
        now = time.monotonic()
        due = now - self._last_progress >= PROGRESS_INTERVAL_SECONDS
        if not (force or due or cycle != self._last_cycle):
            return
        self._last_progress, self._last_cycle = now, cycle
        self._reporter.report(self._progress_params())

    async def _end(self, outcome: Outcome, error: str | None) -> None:
        await self._reporter.stop()
        if self.registry.fenced:
            # Replaced: the new instance owns the reactor now (it closes the precursor
            # valves and marks this run interrupted). Touching the PLC here could
            # disturb a run it has already started.
            logger.error(
                "%s: run %d left to the instance that replaced this one",
                self.registry.name,
                self.run_id,
            )
            return

        await close_precursors(
            self.registry, self.plc, self.safe_valves, f"run {self.run_id} {outcome}"
        )
        params = self._progress_params() | {"outcome": str(outcome), "error": error}
        try:
            await asyncio.wait_for(self._record_end(params), FINISH_DEADLINE_SECONDS)
        except (psycopg.Error, TimeoutError) as exc:
            logger.error(
                "%s: run %d ended %s but the database did not record it (%s); the next"
                " instance will mark it interrupted",
                self.registry.name,
                self.run_id,
                outcome,
                exc,
            )

        log = logger.info if outcome == Outcome.COMPLETED else logger.warning
        log(
            "%s: run %d of %s %s after %d steps%s",
            self.registry.name,
            self.run_id,
            self.label,
            outcome,
            self.steps_done,
            f": {error}" if error else "",
        )

    async def _record_end(self, params: dict[str, Any]) -> None:
        async with await service.connect(self.registry, f"run {self.run_id}") as conn:
            await conn.execute(service.query("finish_run"), params)


class RecipeService:
    """Claims recipe commands and owns the one run a chamber can have at a time."""

    def __init__(self, registry: TerminalRegistry, context: service.ServiceContext):
        self.registry = registry
        self.context = context
        self.plc = context.plc_client()
        self.safe_valves = context.plc_map.safe_state_close
        self.run: RecipeRun | None = None
        self.run_task: asyncio.Task | None = None

    @property
    def active_run(self) -> RecipeRun | None:
        if self.run_task is None or self.run_task.done():
            return None
        return self.run

    async def serve(self) -> None:
        retry = service.Retry()
        first_connection = True
        while True:
            try:
                conn = await service.connect(self.registry, "recipe commands")
            except psycopg.OperationalError as exc:
                logger.warning(
                    "%s: database unreachable (%s), retrying in %.1fs (not fatal)",
                    self.registry.name,
                    _first_line(exc),
                    retry.next_delay_hint(),
                )
                await retry.sleep()
                continue

            try:
                async with conn:
                    await conn.execute(service.query("listen_recipe_commands"))
                    if first_connection:
                        await self._recover(conn)
                        if self.context.demo:
                            await self._queue_demo(conn)
                        first_connection = False
                    retry.reset()
                    await self._drain_forever(conn)
            except psycopg.OperationalError as exc:
                logger.warning(
                    "%s: database connection lost (%s), reconnecting in %.1fs;"
                    " a run in progress goes on",
                    self.registry.name,
                    _first_line(exc),
                    retry.next_delay_hint(),
                )
                await retry.sleep()

    async def stop(self) -> None:
        """Stop a run in progress (its safe state runs in its own `finally`)."""
        if self.run_task is not None and not self.run_task.done():
            self.run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.run_task
        self.plc.close()

    async def _recover(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cursor = await conn.execute(
            service.query("interrupt_orphaned_runs"), service.fencing(self.registry)
        )
        orphans = await cursor.fetchall()
        for row in orphans:
            logger.warning(
                "%s: run %d was left unfinished by instance %s (step %s, cycle %s):"
                " marked interrupted, not resumed",
                self.registry.name,
                row["id"],
                row["instance_id"],
                row["current_step"],
                row["current_cycle"],
            )
        if orphans:
            await close_precursors(
                self.registry, self.plc, self.safe_valves, "after an interrupted run"
            )

    async def _queue_demo(self, conn: psycopg.AsyncConnection[Any]) -> None:
        names = {
            "name": recipes.DEMO_RECIPE_NAME,
            "version": recipes.DEMO_RECIPE_VERSION,
        }
        async with conn.transaction():
            cursor = await conn.execute(
                service.query("insert_demo_recipe"),
                names | {"description": "demo: A pulse, purge, B pulse, purge"},
            )
            created = await cursor.fetchone()
            if created is not None:
                for step in recipes.demo_steps():
                    await conn.execute(
                        service.query("insert_recipe_step"),
                        {
                            "recipe_id": created["id"],
                            "position": step.position,
                            "kind": step.kind,
                            "target": step.target,
                            "value": step.value,
                            "duration_ms": step.duration_ms,
                            "repeat_count": step.repeat_count,
                            "block_length": step.block_length,
                            "comment": "",
                        },
                    )
            cursor = await conn.execute(service.query("recipe_by_name"), names)
            recipe = await cursor.fetchone()
            assert recipe is not None
            cursor = await conn.execute(
                service.query("queue_recipe_start"),
                {
                    "machine_id": self.registry.machine_id,
                    "recipe_id": recipe["id"],
                    "requested_by": f"{self.registry.terminal_type} --demo",
                },
            )
            command = await cursor.fetchone()
        logger.info(
            "%s: demo recipe %s queued (command %d)",
            self.registry.name,
            recipes.DEMO_RECIPE_NAME,
            command["id"] if command else -1,
        )

    async def _drain_forever(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            while await self._take_one(conn):
                pass
            await service.wait_for_notification(conn, service.POLL_INTERVAL_SECONDS)

    async def _take_one(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Claim, apply and settle one command in one transaction; False if none."""
        start: RecipeRun | None = None
        async with conn.transaction():
            cursor = await conn.execute(
                service.query("claim_recipe_command"), service.fencing(self.registry)
            )
            command = await cursor.fetchone()
            if command is None:
                return False

            if command["command"] == "start":
                start, error = await self._prepare_start(conn, command)
            else:
                error = self._control(command["command"])
            await conn.execute(
                service.query("finish_recipe_command"),
                {
                    "id": command["id"],
                    "status": "failed" if error else "done",
                    "error": error,
                },
            )

        self.registry.increment_commands()
        if error:
            logger.warning(
                "%s: recipe command %d (%s from %s) failed: %s",
                self.registry.name,
                command["id"],
                command["command"],
                command["requested_by"],
                error,
            )
        else:
            logger.info(
                "%s: recipe command %d (%s from %s) done",
                self.registry.name,
                command["id"],
                command["command"],
                command["requested_by"],
            )
        if start is not None:
            # Only after the commit: the run row exists before the first valve moves.
            self.run = start
            self.run_task = asyncio.create_task(
                start.execute(), name=f"recipe run {start.run_id}"
            )
            self.run_task.add_done_callback(self._run_ended)
        return True

    def _run_ended(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        self.registry.record_error(f"recipe run crashed: {error!r}")
        logger.error(
            "%s: recipe run task crashed: %r", self.registry.name, error, exc_info=error
        )

    async def _prepare_start(
        self, conn: psycopg.AsyncConnection[Any], command: dict[str, Any]
    ) -> tuple[RecipeRun | None, str | None]:
        active = self.active_run
        if active is not None:
            return None, f"run {active.run_id} is still {active.state}; abort it first"
        cursor = await conn.execute(
            service.query("unfinished_run"), {"machine_id": self.registry.machine_id}
        )
        unfinished = await cursor.fetchone()
        if unfinished is not None:
            return None, f"run {unfinished['id']} of this machine is not finished"

        cursor = await conn.execute(
            service.query("recipe"), {"recipe_id": command["recipe_id"]}
        )
        recipe = await cursor.fetchone()
        if recipe is None:
            return None, f"recipe {command['recipe_id']} does not exist"
        label = f"recipe {recipe['name']!r} v{recipe['version']}"
        cursor = await conn.execute(
            service.query("recipe_steps"), {"recipe_id": recipe["id"]}
        )
        steps = [recipes.Step.from_row(row) for row in await cursor.fetchall()]
        try:
            plan = recipes.plan(recipe["name"], steps, self.context.plc_map.reactor)
        except recipes.RecipeError as exc:
            return None, str(exc)

        cursor = await conn.execute(
            service.query("insert_run"),
            {
                "machine_id": self.registry.machine_id,
                "recipe_id": recipe["id"],
                "command_id": command["id"],
                "instance_id": self.registry.instance_id,
                "total_cycles": plan.total_cycles,
            },
        )
        run_row = await cursor.fetchone()
        assert run_row is not None
        run = RecipeRun(
            self.registry, self.plc, self.safe_valves, run_row["id"], label, plan
        )
        return run, None

    def _control(self, command: str) -> str | None:
        run = self.active_run
        if run is None:
            return f"no run in progress to {command}"
        if command == "pause":
            if run.paused:
                return f"run {run.run_id} is already paused"
            run.pause()
        elif command == "resume":
            if not run.paused:
                return f"run {run.run_id} is not paused"
            run.resume()
        elif command == "abort":
            run.abort()
        return None


async def work(registry: TerminalRegistry, context: service.ServiceContext) -> None:
    recipe_service = RecipeService(registry, context)
    try:
        await recipe_service.serve()
    finally:
        await recipe_service.stop()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


main = service.service_command(
    "terminal2",
    "terminal2: run ALD recipes on the PLC from the recipe command queue."
    " --demo loads the demo recipe and queues a run of it.",
    work,
)

if __name__ == "__main__":
    # Run the imported module, not this __main__ copy, so log lines carry the real
    # logger name (terminals.recipe_service) instead of __main__.
    from terminals.recipe_service import main as imported_main

    imported_main()
