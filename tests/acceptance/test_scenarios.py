"""The five scenarios that pglive's users test by hand, with the real terminals.

Each runs the PLC simulator and real terminal processes (and the launcher in scenario 5)
against the real PostgreSQL with pg_cron.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.helpers import REPO, end_process, spawn_python, wait_for
from tests.terminals.conftest import Simulator

SERVICES = {
    "terminal1": "terminals.plc_data_service",
    "terminal2": "terminals.recipe_service",
    "terminal3": "terminals.parameter_service",
}


@pytest.fixture
def plc(tmp_path: Path):
    simulator = Simulator(tmp_path)
    simulator.start()
    yield simulator
    simulator.stop()


@pytest.fixture
def env(subprocess_env, plc):
    return subprocess_env | plc.env() | {"PLC_TIMEOUT": "0.5"}


@pytest.fixture
def started(env, tmp_path):
    processes: list[subprocess.Popen] = []

    def start(terminal_type: str, *args: str, machine_id=None, interval="0.5"):
        process_env = env | {"PGLIVE_HEARTBEAT_INTERVAL": interval}
        if machine_id is not None:
            process_env["MACHINE_ID"] = str(machine_id)
        name = f"{terminal_type}-{len(processes)}"
        process = spawn_python(
            ["-m", SERVICES[terminal_type], *args],
            process_env,
            tmp_path / f"{name}.log",
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        end_process(process)


def healthy(conn, machine_id, terminal_type, other_than=None):
    row = conn.execute(
        "SELECT * FROM pglive.active_terminals WHERE machine_id = %s AND terminal_type = %s "
        "AND status = 'healthy'",
        (machine_id, terminal_type),
    ).fetchone()
    return row if row and row["instance_id"] != other_than else None


def test_1_duplicate_prevention(conn, machine_id, started, env):
    started("terminal2")
    running = wait_for(
        lambda: healthy(conn, machine_id, "terminal2"), message="terminal2"
    )

    duplicate = subprocess.run(
        [sys.executable, "-m", SERVICES["terminal2"]],
        env=env | {"PGLIVE_HEARTBEAT_INTERVAL": "0.5"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    other_machine = uuid.uuid4()
    started("terminal2", machine_id=other_machine)

    assert duplicate.returncode == 3
    assert str(running["instance_id"]) in duplicate.stderr
    assert f"pid {running['pid']}" in duplicate.stderr
    assert "Traceback" not in duplicate.stderr
    wait_for(lambda: healthy(conn, other_machine, "terminal2"), message="other machine")


def test_2_heartbeats_advance_every_interval(conn, machine_id, started):
    started("terminal1")
    row = wait_for(lambda: healthy(conn, machine_id, "terminal1"), message="terminal1")
    beats: list = []

    def five_more_beats():
        beat = conn.execute(
            "SELECT last_heartbeat FROM pglive.terminal_instances WHERE id = %s",
            (row["instance_id"],),
        ).fetchone()["last_heartbeat"]
        if not beats or beat != beats[-1]:
            beats.append(beat)
        return len(beats) >= 6

    wait_for(five_more_beats, timeout=30, interval=0.02, message="heartbeats")

    gaps = [(b - a).total_seconds() for a, b in zip(beats[1:], beats[2:], strict=False)]
    assert all(b > a for a, b in zip(beats, beats[1:], strict=False))
    assert 0.4 <= sum(gaps) / len(gaps) <= 0.6, gaps


def test_3_graceful_shutdown(conn, machine_id, started):
    process = started("terminal3")
    row = wait_for(lambda: healthy(conn, machine_id, "terminal3"), message="terminal3")

    process.send_signal(signal.SIGTERM)

    assert process.wait(30) == 0
    stopped = conn.execute(
        "SELECT status, stopped_at FROM pglive.terminal_instances WHERE id = %s",
        (row["instance_id"],),
    ).fetchone()
    assert stopped["status"] == "stopped" and stopped["stopped_at"] is not None
    last = conn.execute(
        "SELECT previous_status, new_status, reason FROM pglive.terminal_health_history "
        "WHERE terminal_instance_id = %s ORDER BY id DESC LIMIT 1",
        (row["instance_id"],),
    ).fetchone()
    assert last == {
        "previous_status": "stopping",
        "new_status": "stopped",
        "reason": "received SIGTERM",
    }


def test_4_crash_detection_without_a_launcher(conn, machine_id, started):
    if not conn.execute(
        "SELECT count(*) AS n FROM cron.job WHERE jobname = 'pglive-sweep'"
    ).fetchone()["n"]:
        pytest.skip("the pg_cron sweep is not scheduled in the test database")
    conn.execute(
        "SELECT pglive.set_machine_setting(%s, 'heartbeat_timeout_seconds', 2)",
        (machine_id,),
    )
    process = started("terminal1")
    row = wait_for(lambda: healthy(conn, machine_id, "terminal1"), message="terminal1")

    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)

    crashed = wait_for(
        lambda: conn.execute(
            "SELECT * FROM pglive.terminal_instances WHERE id = %s AND status = 'crashed'",
            (row["instance_id"],),
        ).fetchone(),
        timeout=90,  # the first pg_cron run waits for a minute boundary
        interval=0.2,
        message="the pg_cron sweep to mark it crashed",
    )
    sweep_interval = conn.execute(
        "SELECT value FROM pglive.settings WHERE key = 'sweep_interval_seconds'"
    ).fetchone()["value"]
    silence = (crashed["crash_detected_at"] - crashed["last_heartbeat"]).total_seconds()
    assert crashed["crash_detected_at"] is not None
    assert "no heartbeat for" in crashed["status_reason"]
    running_sweeper = conn.execute(
        "SELECT backend_start FROM pg_stat_activity WHERE query = 'CALL pglive.run_sweeper()'"
    ).fetchone()
    if running_sweeper and running_sweeper["backend_start"] < crashed["last_heartbeat"]:
        # The job was already sweeping when the beats stopped: timeout + sweep period,
        # on the server's clock (+2 s for the job's hand-over at a minute boundary).
        assert silence <= 2 + float(sweep_interval) + 2


def test_5_auto_recovery_with_the_launcher(conn, machine_id, env, plc, tmp_path):
    config = tmp_path / "launcher.toml"
    config.write_text(
        f'[terminals.terminal2]\ncommand = ["{{python}}", "-m", "{SERVICES["terminal2"]}"]\n'
        f'working_directory = "{REPO}"\nenvironment = "testing"\n'
        f'log_file = "logs/terminal2.log"\nheartbeat_interval = 0.5\n'
        f'env = {{ PLC_TYPE = "simulation", PLC_PORT = "{plc.port}" }}\n'
    )
    launcher = spawn_python(
        [
            "-m",
            "launcher",
            "--config",
            str(config),
            "--restart-delay",
            "0.2",
            "--heartbeat-timeout",
            "3",
            "--check-interval",
            "2",
        ],
        env,
        tmp_path / "launcher.log",
    )
    try:
        first = wait_for(
            lambda: healthy(conn, machine_id, "terminal2"), message="terminal2"
        )

        os.kill(first["pid"], signal.SIGKILL)

        replacement = wait_for(
            lambda: healthy(
                conn, machine_id, "terminal2", other_than=first["instance_id"]
            ),
            message="a healthy replacement",
        )
        log = (tmp_path / "launcher.log").read_text()
    finally:
        end_process(launcher, timeout=30)

    order = [
        "dead terminal 'terminal2'",
        "marked crashed",
        "recovery initiated",
        "restarted: pid",
    ]
    positions = [log.find(line) for line in order]
    assert -1 not in positions and positions == sorted(positions), log
    story = conn.execute(
        "SELECT h.terminal_instance_id, h.new_status FROM pglive.terminal_health_history h "
        "JOIN pglive.terminal_instances i ON i.id = h.terminal_instance_id "
        "WHERE i.machine_id = %s AND i.terminal_type = 'terminal2' ORDER BY h.id",
        (machine_id,),
    ).fetchall()
    old, new = first["instance_id"], replacement["instance_id"]
    assert [(s["terminal_instance_id"], s["new_status"]) for s in story][:5] == [
        (old, "starting"),
        (old, "healthy"),
        (old, "crashed"),
        (new, "starting"),
        (new, "healthy"),
    ]
    assert (
        conn.execute(
            "SELECT replaces_instance_id FROM pglive.terminal_instances WHERE id = %s",
            (new,),
        ).fetchone()["replaces_instance_id"]
        == old
    )
