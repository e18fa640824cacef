"""The three terminals end to end: simulator, services and PostgreSQL, all real."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from itertools import pairwise
from pathlib import Path

import psycopg
import pytest

from tests.helpers import end_process, spawn_python, wait_for
from tests.terminals.conftest import Simulator

HEARTBEAT = "1"


class Services:
    """Terminal processes of one test; stopped, and their logs printed, at teardown."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, module: str, *args: str) -> subprocess.Popen:
        name = f"{module}-{len(self.started)}"
        process = spawn_python(
            ["-m", f"terminals.{module}", "--heartbeat-interval", HEARTBEAT, *args],
            self.env,
            self.log_dir / f"{name}.log",
        )
        self.started.append((name, process))
        return process

    def stop_all(self) -> None:
        for name, process in self.started:
            end_process(process)
            log = self.log_dir / f"{name}.log"
            if log.exists():
                print(f"----- {name} -----\n{log.read_text(errors='replace')}")


@pytest.fixture
def services(
    subprocess_env: dict[str, str], simulator: Simulator, tmp_path: Path
) -> Iterator[Services]:
    env = subprocess_env | simulator.env() | {"PGLIVE_ENVIRONMENT": "testing"}
    started = Services(env, tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


def instance(conn, machine_id, terminal_type):
    return conn.execute(
        "SELECT * FROM pglive.terminal_instances"
        " WHERE machine_id = %s AND terminal_type = %s"
        " ORDER BY started_at DESC LIMIT 1",
        (machine_id, terminal_type),
    ).fetchone()


def status_after_sweep(conn, machine_id, terminal_type):
    conn.execute("SELECT * FROM pglive.sweep(p_machine_id => %s)", (machine_id,))
    row = instance(conn, machine_id, terminal_type)
    return row["status"] if row else None


def run_of(conn, machine_id):
    return conn.execute(
        "SELECT * FROM ald.recipe_runs WHERE machine_id = %s ORDER BY id DESC LIMIT 1",
        (machine_id,),
    ).fetchone()


def queue_hold_recipe(conn, machine_id) -> int:
    """A recipe that opens precursor A and then waits a minute: a valve held open."""
    recipe_id = conn.execute(
        "INSERT INTO ald.recipes (name, description) VALUES (%s, 'test: hold A open')"
        " RETURNING id",
        (f"hold-a-{machine_id}",),
    ).fetchone()["id"]
    conn.execute(
        "INSERT INTO ald.recipe_steps (recipe_id, position, kind, target, duration_ms)"
        " VALUES (%s, 1, 'open_valve', 'precursor_a_valve', NULL),"
        "        (%s, 2, 'wait', NULL, 60000)",
        (recipe_id, recipe_id),
    )
    return conn.execute(
        "INSERT INTO ald.recipe_commands (machine_id, command, recipe_id)"
        " VALUES (%s, 'start', %s) RETURNING id",
        (machine_id, recipe_id),
    ).fetchone()["id"]


def test_readings_are_stored_every_second(conn, machine_id, services, simulator):
    services.start("plc_data_service")

    rows = wait_for(
        lambda: (
            (
                found := conn.execute(
                    "SELECT * FROM ald.readings WHERE machine_id = %s ORDER BY cycle",
                    (machine_id,),
                ).fetchall()
            )
            and len(found) >= 5
            and found
        ),
        timeout=30,
        message="a first batch of five readings",
    )

    cycles = [row["cycle"] for row in rows]
    assert cycles == list(range(cycles[0], cycles[0] + len(rows)))
    gaps = {b["scheduled_at"] - a["scheduled_at"] for a, b in pairwise(rows)}
    assert gaps == {timedelta(seconds=1)}
    assert set(rows[-1]["data"]) == set(simulator.plc_map.reactor.registers)
    wait_for(
        lambda: instance(conn, machine_id, "terminal1")["commands_processed"] >= 5,
        timeout=10,
        message="a command counted per read cycle",
    )


def test_plc_outage_degrades_the_data_service_then_it_recovers(
    conn, machine_id, services, simulator
):
    for key, value in (("error_window_seconds", 4), ("error_min_operations", 3)):
        conn.execute(
            "SELECT pglive.set_machine_setting(%s, %s, %s)", (machine_id, key, value)
        )
    process = services.start("plc_data_service")
    wait_for(
        lambda: status_after_sweep(conn, machine_id, "terminal1") == "healthy",
        timeout=30,
        message="terminal1 healthy",
    )

    simulator.kill()
    wait_for(
        lambda: status_after_sweep(conn, machine_id, "terminal1") == "degraded",
        timeout=30,
        interval=0.3,
        message="terminal1 degraded while the PLC is down",
    )
    row = instance(conn, machine_id, "terminal1")
    assert "PLC simulator at 127.0.0.1" in row["last_error"]
    assert process.poll() is None

    simulator.restart()
    wait_for(
        lambda: status_after_sweep(conn, machine_id, "terminal1") == "healthy",
        timeout=45,
        interval=0.3,
        message="terminal1 healthy again after the PLC is back",
    )
    assert process.poll() is None


def test_demo_recipe_runs_to_completion_with_its_valve_writes_on_the_plc(
    conn, machine_id, services, simulator
):
    writes_before = simulator.status()["write_requests"]
    seen_open: set[str] = set()
    valves = ("precursor_a_valve", "precursor_b_valve", "purge_valve")

    services.start("recipe_service", "--demo")

    def finished():
        values = simulator.read_all()
        seen_open.update(valve for valve in valves if values[valve])
        run = run_of(conn, machine_id)
        return run if run and run["state"] == "finished" else None

    run = wait_for(finished, timeout=60, interval=0.01, message="the demo run to end")

    assert run["outcome"] == "completed", run["error"]
    assert (run["current_cycle"], run["total_cycles"]) == (20, 20)
    assert run["steps_done"] == 2 + 20 * 12
    assert seen_open == set(valves)
    # 2 setpoints and 20 cycles of 8 valve moves, then the safe state's 2 closes.
    assert simulator.status()["write_requests"] - writes_before >= 2 + 20 * 8 + 2
    values = simulator.read_all()
    assert not any(values[valve] for valve in valves)
    assert values["purge_flow_setpoint"] == 300.0
    command = conn.execute(
        "SELECT * FROM ald.recipe_commands WHERE id = %s", (run["start_command_id"],)
    ).fetchone()
    assert (command["status"], command["requested_by"]) == ("done", "terminal2 --demo")


def test_sigterm_during_a_recipe_leaves_the_precursor_valves_closed(
    conn, machine_id, services, simulator
):
    queue_hold_recipe(conn, machine_id)
    process = services.start("recipe_service")
    wait_for(
        lambda: simulator.read("precursor_a_valve") is True,
        timeout=30,
        message="the recipe to open precursor A",
    )

    process.send_signal(signal.SIGTERM)

    assert process.wait(30) == 0
    assert simulator.read("precursor_a_valve") is False
    assert simulator.read("precursor_b_valve") is False
    run = run_of(conn, machine_id)
    assert run["outcome"] == "interrupted"
    assert run["error"] == "service stopped at step 2"


def test_a_crashed_run_is_marked_interrupted_and_never_run_again(
    conn, machine_id, services, simulator
):
    queue_hold_recipe(conn, machine_id)
    first = services.start("recipe_service")
    wait_for(
        lambda: simulator.read("precursor_a_valve") is True,
        timeout=30,
        message="the recipe to open precursor A",
    )
    crashed = instance(conn, machine_id, "terminal2")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    conn.execute(
        "SELECT pglive.mark_terminal_crashed(%s, 'killed by the test')",
        (crashed["id"],),
    )
    assert simulator.read("precursor_a_valve") is True

    services.start("recipe_service")

    wait_for(
        lambda: run_of(conn, machine_id)["state"] == "finished",
        timeout=30,
        message="the next instance to settle the orphaned run",
    )
    run = run_of(conn, machine_id)
    assert run["outcome"] == "interrupted"
    assert str(crashed["id"]) in run["error"]
    wait_for(
        lambda: simulator.read("precursor_a_valve") is False,
        timeout=10,
        message="precursor A closed by the next instance",
    )
    runs = conn.execute(
        "SELECT count(*) AS n FROM ald.recipe_runs WHERE machine_id = %s", (machine_id,)
    ).fetchone()
    assert runs["n"] == 1


def test_a_parameter_write_is_read_back_and_an_out_of_range_one_never_sent(
    conn, machine_id, services, simulator
):
    services.start("parameter_service")

    def queue(name, value):
        return conn.execute(
            "INSERT INTO ald.parameter_commands (machine_id, name, value, requested_by)"
            " VALUES (%s, %s, %s, 'test') RETURNING id",
            (machine_id, name, value),
        ).fetchone()["id"]

    def settled(command_id):
        row = conn.execute(
            "SELECT * FROM ald.parameter_commands WHERE id = %s", (command_id,)
        ).fetchone()
        return row if row["status"] in ("done", "failed") else None

    good_id = queue("substrate_setpoint", 212.34)
    good = wait_for(lambda: settled(good_id), timeout=30, message="the setpoint write")

    assert good["status"] == "done", good["error"]
    assert (good["written_value"], good["read_back"]) == (212.3, 212.3)
    assert simulator.read("substrate_setpoint") == 212.3

    writes_before = simulator.status()["write_requests"]
    bad_id = queue("substrate_setpoint", 999)
    bad = wait_for(lambda: settled(bad_id), timeout=30, message="the refusal")

    assert bad["status"] == "failed"
    assert bad["error"] == (
        "refused: substrate_setpoint: 999.0 degC is above the maximum 350.0 degC"
    )
    assert simulator.status()["write_requests"] == writes_before
    assert simulator.read("substrate_setpoint") == 212.3


def test_a_fenced_instance_claims_no_command(conn, machine_id, services, simulator):
    process = services.start("parameter_service")
    zombie = wait_for(
        lambda: (
            (row := instance(conn, machine_id, "terminal3"))
            and row["status"] == "healthy"
            and row
        ),
        timeout=30,
        message="terminal3 healthy",
    )
    writes_before = simulator.status()["write_requests"]

    os.kill(process.pid, signal.SIGSTOP)
    conn.execute(
        "SELECT pglive.mark_terminal_crashed(%s, 'replaced in the test')",
        (zombie["id"],),
    )
    command_id = conn.execute(
        "INSERT INTO ald.parameter_commands (machine_id, name, value)"
        " VALUES (%s, 'heater_setpoint', 199) RETURNING id",
        (machine_id,),
    ).fetchone()["id"]
    os.kill(process.pid, signal.SIGCONT)

    assert process.wait(30) == 4
    row = conn.execute(
        "SELECT * FROM ald.parameter_commands WHERE id = %s", (command_id,)
    ).fetchone()
    assert (row["status"], row["claimed_by"]) == ("queued", None)
    assert simulator.status()["write_requests"] == writes_before

    services.start("parameter_service")
    wait_for(
        lambda: (
            conn.execute(
                "SELECT status FROM ald.parameter_commands WHERE id = %s", (command_id,)
            ).fetchone()["status"]
            == "done"
        ),
        timeout=30,
        message="the next instance to take the command",
    )


def test_pause_closes_the_precursors_resume_goes_on_abort_ends_the_run(
    conn, machine_id, services, simulator
):
    queue_hold_recipe(conn, machine_id)
    services.start("recipe_service")
    wait_for(
        lambda: simulator.read("precursor_a_valve") is True,
        timeout=30,
        message="the recipe to open precursor A",
    )

    def command(name):
        command_id = conn.execute(
            "INSERT INTO ald.recipe_commands (machine_id, command) VALUES (%s, %s)"
            " RETURNING id",
            (machine_id, name),
        ).fetchone()["id"]
        return wait_for(
            lambda: (
                (
                    row := conn.execute(
                        "SELECT * FROM ald.recipe_commands WHERE id = %s", (command_id,)
                    ).fetchone()
                )["status"]
                != "queued"
                and row
            ),
            timeout=30,
            message=f"the {name} command to be settled",
        )

    assert command("pause")["status"] == "done"
    wait_for(
        lambda: run_of(conn, machine_id)["state"] == "paused",
        timeout=10,
        message="the run to pause",
    )
    assert simulator.read("precursor_a_valve") is False

    refused = command("pause")
    assert (refused["status"], refused["error"]) == (
        "failed",
        f"run {run_of(conn, machine_id)['id']} is already paused",
    )
    assert command("resume")["status"] == "done"
    wait_for(
        lambda: run_of(conn, machine_id)["state"] == "running",
        timeout=10,
        message="the run to resume",
    )
    assert command("abort")["status"] == "done"

    run = wait_for(
        lambda: (row := run_of(conn, machine_id))["state"] == "finished" and row,
        timeout=10,
        message="the run to end",
    )
    assert (run["outcome"], run["error"]) == ("aborted", "aborted by command")
    assert simulator.read("precursor_a_valve") is False
    assert command("abort")["error"] == "no run in progress to abort"


def test_readings_taken_while_the_database_is_down_are_stored_later(
    database, dsn, machine_id, services, simulator
):
    def cycles():
        with psycopg.connect(dsn, autocommit=True) as fresh:
            rows = fresh.execute(
                "SELECT cycle FROM ald.readings WHERE machine_id = %s ORDER BY cycle",
                (machine_id,),
            ).fetchall()
        return [row[0] for row in rows]

    process = services.start("plc_data_service")
    wait_for(lambda: cycles(), timeout=30, message="a first batch of readings")

    database.stop()
    try:
        reads = simulator.status()["read_requests"]
        # Four requests per cycle: three more cycles read while nothing can be stored.
        wait_for(
            lambda: simulator.status()["read_requests"] >= reads + 12,
            timeout=30,
            message="read cycles during the database outage",
        )
    finally:
        database.start()

    stored = wait_for(
        lambda: (found := cycles()) and len(found) >= 12 and found,
        timeout=45,
        message="the buffered readings to reach the database",
    )
    assert stored == list(range(stored[0], stored[0] + len(stored)))
    assert process.poll() is None
