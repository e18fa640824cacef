"""TerminalRegistry in real processes against the real server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest

from pglive import TerminalRegistry
from pglive.identity import (
    InvalidEnvironmentError,
    InvalidHeartbeatIntervalError,
    InvalidMachineIdError,
    UnknownTerminalTypeError,
)
from pglive.identity import (
    machine_id as resolve_machine_id,
)
from tests.helpers import end_process, spawn_python, wait_for


def dummy(env, tmp_path, terminal_type="terminal2", *extra: str, name="dummy"):
    return spawn_python(
        ["-m", "tests.dummy_terminal", terminal_type, *extra],
        env,
        tmp_path / f"{name}.log",
    )


def active(conn, machine_id, terminal_type="terminal2"):
    return conn.execute(
        "SELECT * FROM pglive.terminal_instances WHERE machine_id = %s AND terminal_type = %s "
        "AND status IN ('starting', 'healthy', 'degraded', 'stopping')",
        (machine_id, terminal_type),
    ).fetchone()


def test_heartbeats_arrive_every_interval(conn, machine_id, subprocess_env, tmp_path):
    process = dummy(
        subprocess_env, tmp_path, "terminal2", "--heartbeat-interval", "0.5"
    )
    try:
        row = wait_for(lambda: active(conn, machine_id), message="registration")
        seen = []

        def six_distinct_beats():
            beat = conn.execute(
                "SELECT last_heartbeat FROM pglive.terminal_instances WHERE id = %s",
                (row["id"],),
            ).fetchone()["last_heartbeat"]
            if beat and (not seen or beat != seen[-1]):
                seen.append(beat)
            return len(seen) >= 6

        wait_for(six_distinct_beats, timeout=20, interval=0.02, message="6 heartbeats")
    finally:
        end_process(process)

    gaps = [(b - a).total_seconds() for a, b in zip(seen[1:], seen[2:], strict=False)]
    mean = sum(gaps) / len(gaps)
    assert 0.4 <= mean <= 0.6, (
        gaps
    )  # the interval ±20 %, measured on the server's clock


def test_sigterm_stops_gracefully(conn, machine_id, subprocess_env, tmp_path):
    process = dummy(
        subprocess_env, tmp_path, "terminal2", "--heartbeat-interval", "0.5"
    )
    row = wait_for(
        lambda: (r := active(conn, machine_id)) and r["status"] == "healthy" and r,
        message="healthy",
    )

    process.send_signal(signal.SIGTERM)

    assert process.wait(30) == 0
    stopped = conn.execute(
        "SELECT * FROM pglive.terminal_instances WHERE id = %s", (row["id"],)
    ).fetchone()
    assert stopped["status"] == "stopped"
    assert stopped["stopped_at"] is not None
    assert stopped["commands_processed"] > 0
    history = conn.execute(
        "SELECT new_status FROM pglive.terminal_health_history "
        "WHERE terminal_instance_id = %s ORDER BY id",
        (row["id"],),
    ).fetchall()
    assert [h["new_status"] for h in history][-2:] == ["stopping", "stopped"]


def test_second_instance_exits_with_the_running_ones_details(
    conn, machine_id, subprocess_env, tmp_path
):
    first = dummy(subprocess_env, tmp_path, "terminal2", name="first")
    try:
        row = wait_for(lambda: active(conn, machine_id), message="first registration")

        second = subprocess.run(
            [sys.executable, "-m", "tests.dummy_terminal", "terminal2"],
            env=subprocess_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        end_process(first)

    assert second.returncode == 3
    assert str(row["id"]) in second.stderr
    assert f"pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr


def test_fenced_instance_exits_non_zero_within_an_interval(
    conn, machine_id, subprocess_env, tmp_path
):
    process = dummy(
        subprocess_env, tmp_path, "terminal3", "--heartbeat-interval", "0.5"
    )
    try:
        row = wait_for(
            lambda: active(conn, machine_id, "terminal3"), message="registration"
        )

        conn.execute(
            "SELECT pglive.mark_terminal_crashed(%s, 'replaced')", (row["id"],)
        )

        assert process.wait(timeout=30) == 4
    finally:
        end_process(process)
    log = (tmp_path / "dummy.log").read_text()
    assert "fenced" in log and "must not act" in log


def test_counters_sum_exactly_across_forced_reconnects(
    conn, machine_id, subprocess_env, tmp_path
):
    """Connections are killed under the heartbeat client; no command is lost or doubled."""
    script = tmp_path / "exact_counter.py"
    script.write_text(
        "import asyncio, sys\n"
        "from pglive import TerminalRegistry, configure_logging, run_terminal\n"
        "async def work(registry):\n"
        "    for _ in range(300):\n"
        "        registry.increment_commands()\n"
        "        if _ % 7 == 0:\n"
        "            registry.record_error('every seventh')\n"
        "        await asyncio.sleep(0.01)\n"
        f"    open({str(tmp_path / 'done')!r}, 'w').close()\n"
        "    await asyncio.sleep(3600)\n"
        "registry = TerminalRegistry('terminal1', heartbeat_interval=0.2)\n"
        "configure_logging()\n"
        "sys.exit(run_terminal(registry, work))\n"
    )
    process = spawn_python([str(script)], subprocess_env, tmp_path / "counter.log")
    try:
        row = wait_for(
            lambda: active(conn, machine_id, "terminal1"), message="registration"
        )
        application_name = f"terminal1 pid {process.pid}"
        for _ in range(8):
            wait_for(
                lambda: conn.execute(
                    "SELECT pg_terminate_backend(pid) AS killed FROM pg_stat_activity "
                    "WHERE application_name = %s",
                    (application_name,),
                ).fetchone(),
                message="a heartbeat connection to kill",
            )
        wait_for(
            lambda: (tmp_path / "done").exists(), message="all 300 commands counted"
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        end_process(process)

    final = conn.execute(
        "SELECT commands_processed, errors_encountered, status FROM pglive.terminal_instances "
        "WHERE id = %s",
        (row["id"],),
    ).fetchone()
    assert final == {
        "commands_processed": 300,
        "errors_encountered": 43,
        "status": "stopped",
    }
    assert "database unreachable" in (tmp_path / "counter.log").read_text()


def test_heartbeats_survive_a_postgresql_restart(
    database, conn, machine_id, subprocess_env, tmp_path
):
    process = dummy(
        subprocess_env, tmp_path, "terminal2", "--heartbeat-interval", "0.3"
    )
    try:
        row = wait_for(lambda: active(conn, machine_id), message="registration")
        conn.close()

        database.restart()

        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(
            database.dsn, autocommit=True, row_factory=dict_row
        ) as again:
            restarted_at = again.execute(
                "SELECT pg_postmaster_start_time() AS t"
            ).fetchone()["t"]
            wait_for(
                lambda: again.execute(
                    "SELECT last_heartbeat > %s AS beat FROM pglive.terminal_instances "
                    "WHERE id = %s",
                    (restarted_at, row["id"]),
                ).fetchone()["beat"],
                timeout=60,
                message="a heartbeat after the restart",
            )
            assert process.poll() is None
            status = again.execute(
                "SELECT status FROM pglive.terminal_instances WHERE id = %s",
                (row["id"],),
            ).fetchone()["status"]
            assert status == "healthy"
    finally:
        end_process(process)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"terminal_type": "terminal7"}, UnknownTerminalTypeError),
        (
            {"terminal_type": "terminal1", "environment": "prod"},
            InvalidEnvironmentError,
        ),
        ({"terminal_type": "terminal1", "machine_id": "ald-01"}, InvalidMachineIdError),
        (
            {"terminal_type": "terminal1", "heartbeat_interval": 0},
            InvalidHeartbeatIntervalError,
        ),
        (
            {"terminal_type": "terminal1", "heartbeat_interval": -1},
            InvalidHeartbeatIntervalError,
        ),
    ],
)
def test_bad_arguments_raise_value_errors_before_any_database_work(kwargs, error):
    kwargs.setdefault("machine_id", uuid.uuid4())
    with pytest.raises(error) as raised:
        TerminalRegistry(dsn="host=/nonexistent", **kwargs)

    assert isinstance(raised.value, ValueError)
    bad = [str(v) for k, v in kwargs.items() if k != "machine_id" or v == "ald-01"]
    assert any(value in str(raised.value) for value in bad)


def test_machine_id_comes_from_the_environment_or_etc_machine_id(monkeypatch):
    explicit = uuid.uuid4()
    monkeypatch.setenv("MACHINE_ID", str(explicit))
    assert resolve_machine_id() == explicit

    monkeypatch.delenv("MACHINE_ID")
    if not os.path.exists("/etc/machine-id"):
        pytest.skip("no /etc/machine-id on this machine")
    assert resolve_machine_id() == resolve_machine_id()


STUBBORN_WORK = """
import asyncio, sys
from pglive import TerminalRegistry, run_terminal

async def work(registry):
    while True:  # swallows every cancellation, as a buggy library might
        try:
            registry.increment_commands()
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            pass

sys.exit(run_terminal(TerminalRegistry("terminal3", heartbeat_interval=0.5), work))
"""


@pytest.mark.parametrize("how", ["sigterm", "fenced"])
def test_work_that_ignores_its_cancellation_still_ends(
    conn, machine_id, subprocess_env, tmp_path, how
):
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN_WORK)
    process = spawn_python([str(script)], subprocess_env, tmp_path / "stubborn.log")
    try:
        row = wait_for(
            lambda: active(conn, machine_id, "terminal3"), message="registration"
        )

        if how == "sigterm":
            process.send_signal(signal.SIGTERM)
        else:
            conn.execute(
                "SELECT pglive.mark_terminal_crashed(%s, 'replaced')", (row["id"],)
            )

        code = process.wait(timeout=60)
    finally:
        end_process(process)

    status = conn.execute(
        "SELECT status FROM pglive.terminal_instances WHERE id = %s", (row["id"],)
    ).fetchone()["status"]
    assert (code, status) == ((0, "stopped") if how == "sigterm" else (4, "crashed"))
    assert "did not stop within" in (tmp_path / "stubborn.log").read_text()
