"""The launcher with real terminal processes: kill -9, SIGSTOP, crash loops, restarts."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psycopg
import psycopg.conninfo
import pytest
from psycopg.rows import dict_row

from tests.helpers import REPO, end_process, spawn_python, wait_for

ACTIVE = "status IN ('starting', 'healthy', 'degraded', 'stopping')"


def write_config(
    tmp_path: Path, terminals: dict[str, list[str]], stop_timeout=5
) -> Path:
    lines = []
    for terminal_type, args in terminals.items():
        command = ", ".join(
            f'"{part}"'
            for part in ["{python}", "-m", "tests.dummy_terminal", terminal_type, *args]
        )
        lines += [
            f"[terminals.{terminal_type}]",
            f"command = [{command}]",
            f'working_directory = "{REPO}"',
            'environment = "testing"',
            f'log_file = "logs/{terminal_type}.log"',
            f"stop_timeout = {stop_timeout}",
            "heartbeat_interval = 0.5",
            "",
        ]
    path = tmp_path / "launcher.toml"
    path.write_text("\n".join(lines))
    return path


def run_launcher(env, config: Path, *flags: str) -> subprocess.CompletedProcess:
    """Run a launcher that is expected to stop at once (bad config, a duplicate)."""
    return subprocess.run(
        [sys.executable, "-m", "launcher", "--config", str(config), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


class LauncherProcess:
    def __init__(self, env, tmp_path: Path, config: Path, *flags: str) -> None:
        self.log_path = tmp_path / "launcher.log"
        self.process = spawn_python(
            [
                "-m",
                "launcher",
                "--config",
                str(config),
                "--check-interval",
                "1",
                "--restart-delay",
                "0.2",
                "--heartbeat-timeout",
                "3",
                *flags,
            ],
            env,
            self.log_path,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 60) -> None:
        wait_for(
            lambda: text in self.log, timeout=timeout, message=f"launcher log {text!r}"
        )


@pytest.fixture
def launch(subprocess_env, tmp_path, dsn, machine_id):
    launched: list[LauncherProcess] = []

    def start(terminals, *flags, stop_timeout=5):
        config = write_config(tmp_path, terminals, stop_timeout)
        launcher = LauncherProcess(subprocess_env, tmp_path, config, *flags)
        launched.append(launcher)
        return launcher

    yield start
    for launcher in launched:
        end_process(launcher.process, timeout=30)
    end_orphaned_terminals(dsn, machine_id)


def end_orphaned_terminals(dsn, machine_id) -> None:
    """Kill terminals that outlived a launcher killed by a test (they are not its children)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        pids = conn.execute(
            "SELECT pid FROM pglive.terminal_instances WHERE machine_id = %s "
            "AND hostname = %s",
            (machine_id, socket.gethostname()),
        ).fetchall()
    for (pid,) in pids:
        with contextlib.suppress(OSError):
            if b"tests.dummy_terminal" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


def instances(conn, machine_id, terminal_type):
    return conn.execute(
        "SELECT * FROM pglive.terminal_instances WHERE machine_id = %s AND terminal_type = %s "
        "ORDER BY started_at",
        (machine_id, terminal_type),
    ).fetchall()


def healthy(conn, machine_id, terminal_type):
    return conn.execute(
        f"SELECT * FROM pglive.terminal_instances WHERE machine_id = %s AND terminal_type = %s "
        f"AND {ACTIVE} AND status = 'healthy'",
        (machine_id, terminal_type),
    ).fetchone()


FAST = ["--heartbeat-interval", "0.5"]


def test_kill_9_gives_a_healthy_replacement_before_the_heartbeat_timeout(
    conn, machine_id, launch
):
    launcher = launch(
        {"terminal1": FAST, "terminal2": FAST}, "--heartbeat-timeout", "60"
    )
    first = wait_for(
        lambda: healthy(conn, machine_id, "terminal2"), message="terminal2"
    )

    os.kill(first["pid"], signal.SIGKILL)

    replacement = wait_for(
        lambda: (
            (r := healthy(conn, machine_id, "terminal2"))
            and r["id"] != first["id"]
            and r
        ),
        message="a replacement",
    )
    crashed = instances(conn, machine_id, "terminal2")[0]
    assert crashed["status"] == "crashed"
    assert crashed["status_reason"] == f"process {first['pid']} killed by SIGKILL"
    assert replacement["replaces_instance_id"] == first["id"]
    # Replaced well before a 60 s heartbeat timeout could have noticed anything.
    assert (
        replacement["started_at"] - crashed["crash_detected_at"]
    ).total_seconds() < 60
    for line in (
        "detected: pid",
        "marked crashed",
        "recovery initiated",
        "restarted: pid",
    ):
        assert line in launcher.log
    assert healthy(conn, machine_id, "terminal1")["id"] is not None


def test_a_sigstopped_terminal_is_swept_ended_and_replaced(conn, machine_id, launch):
    launcher = launch({"terminal1": FAST})
    frozen = wait_for(
        lambda: healthy(conn, machine_id, "terminal1"), message="terminal1"
    )

    os.kill(frozen["pid"], signal.SIGSTOP)
    try:

        def swept_and_replaced():
            conn.execute("SELECT * FROM pglive.sweep(NULL, %s)", (machine_id,))
            replacement = healthy(conn, machine_id, "terminal1")
            return replacement and replacement["id"] != frozen["id"] and replacement

        wait_for(
            swept_and_replaced, timeout=60, interval=0.5, message="sweep + replacement"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen["pid"], signal.SIGCONT)

    first = instances(conn, machine_id, "terminal1")[0]
    assert first["status"] == "crashed"
    assert "no heartbeat for" in first["status_reason"]
    wait_for(
        lambda: not pid_exists(frozen["pid"]), message="the frozen process to be ended"
    )
    assert "detected by the database" in launcher.log
    assert f"ending pid {frozen['pid']}" in launcher.log


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers; it has ended all the same.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_a_crash_loop_gets_three_attempts_then_a_recorded_give_up(
    conn, machine_id, launch, tmp_path
):
    marker = tmp_path / "starts"
    launcher = launch({"terminal3": ["--exit-at-once", "1", "--marker", str(marker)]})

    launcher.wait_log("GAVE UP")

    starts = [float(line.split()[1]) for line in marker.read_text().splitlines()]
    assert len(starts) == 4  # the first start and exactly 3 restarts
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    # 5/15/30 s scaled by --restart-delay 0.2: 0.2, 0.6, 1.2 s at least.
    assert [
        round(g >= d * 0.95) for g, d in zip(gaps, [0.2, 0.6, 1.2], strict=True)
    ] == [
        1,
        1,
        1,
    ]
    scheduled = conn.execute(
        "SELECT attempt, delay_seconds FROM pglive.recovery_events WHERE machine_id = %s "
        "AND event = 'restart_scheduled' ORDER BY id",
        (machine_id,),
    ).fetchall()
    assert [(e["attempt"], float(e["delay_seconds"])) for e in scheduled] == [
        (1, 0.2),
        (2, 0.6),
        (3, 1.2),
    ]
    give_up = conn.execute(
        "SELECT * FROM pglive.recovery_give_ups WHERE machine_id = %s", (machine_id,)
    ).fetchone()
    assert give_up["still_given_up"] and give_up["terminal_type"] == "terminal3"
    assert launcher.process.poll() is None  # it keeps supervising


def test_no_auto_recovery_restarts_nothing(conn, machine_id, launch):
    launcher = launch({"terminal2": FAST}, "--no-auto-recovery")
    first = wait_for(
        lambda: healthy(conn, machine_id, "terminal2"), message="terminal2"
    )

    os.kill(first["pid"], signal.SIGKILL)

    launcher.wait_log("auto-recovery is off: not restarting")
    launcher.wait_log("marked crashed")
    wait_launcher_beats(conn, machine_id, 3)  # a few check intervals (1 s) later...

    assert [i["status"] for i in instances(conn, machine_id, "terminal2")] == [
        "crashed"
    ]
    assert launcher.process.poll() is None


def wait_launcher_beats(conn, machine_id, count: int) -> None:
    """Wait until the launcher has sent ``count`` more heartbeats: time passing, observed."""
    seen: list = []

    def beats() -> bool:
        beat = healthy(conn, machine_id, "launcher")["last_heartbeat"]
        if not seen or beat != seen[-1]:
            seen.append(beat)
        return len(seen) > count

    wait_for(beats, timeout=60, message=f"{count} launcher heartbeats")


def test_a_restarted_launcher_adopts_healthy_terminals(conn, machine_id, launch):
    first_launcher = launch({"terminal1": FAST, "terminal2": FAST})
    before = {
        t: wait_for(lambda t=t: healthy(conn, machine_id, t), message=t)
        for t in ("terminal1", "terminal2")
    }

    first_launcher.process.kill()
    first_launcher.process.wait(10)
    second_launcher = launch({"terminal1": FAST, "terminal2": FAST})

    second_launcher.wait_log("taking over")
    second_launcher.wait_log("already running", timeout=30)
    wait_for(
        lambda: second_launcher.log.count("already running") >= 2,
        message="both adopted",
    )
    after = {t: healthy(conn, machine_id, t) for t in ("terminal1", "terminal2")}
    assert {t: r["id"] for t, r in after.items()} == {
        t: r["id"] for t, r in before.items()
    }
    for terminal_type in ("terminal1", "terminal2"):
        assert len(instances(conn, machine_id, terminal_type)) == 1

    # An adopted terminal that dies is still noticed and replaced.
    os.kill(before["terminal2"]["pid"], signal.SIGKILL)
    wait_for(
        lambda: (
            (r := healthy(conn, machine_id, "terminal2"))
            and r["id"] != before["terminal2"]["id"]
        ),
        message="replacement of an adopted terminal",
    )


def test_sigterm_of_the_launcher_stops_every_instance(conn, machine_id, launch):
    launcher = launch({"terminal1": FAST, "terminal2": FAST, "terminal3": FAST})
    for terminal_type in ("terminal1", "terminal2", "terminal3"):
        wait_for(
            lambda t=terminal_type: healthy(conn, machine_id, t), message=terminal_type
        )

    launcher.process.send_signal(signal.SIGTERM)

    assert launcher.process.wait(60) == 0
    statuses = conn.execute(
        "SELECT terminal_type, status, stopped_at IS NOT NULL AS has_stopped_at "
        "FROM pglive.terminal_instances WHERE machine_id = %s ORDER BY terminal_type",
        (machine_id,),
    ).fetchall()
    assert statuses == [
        {"terminal_type": t, "status": "stopped", "has_stopped_at": True}
        for t in ("launcher", "terminal1", "terminal2", "terminal3")
    ]


def test_a_dead_launcher_shows_in_the_view(conn, machine_id, launch):
    launcher = launch({"terminal1": FAST})
    wait_for(lambda: healthy(conn, machine_id, "terminal1"), message="terminal1")

    launcher.process.kill()
    launcher.process.wait(10)

    def flagged():
        conn.execute("SELECT * FROM pglive.sweep(NULL, %s)", (machine_id,))
        return conn.execute(
            "SELECT * FROM pglive.machines_without_launcher WHERE machine_id = %s",
            (machine_id,),
        ).fetchone()

    row = wait_for(
        flagged, timeout=30, interval=0.5, message="machine without launcher"
    )
    assert row["launcher_status"] == "crashed"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            "[terminals.terminal1]\ncomand = ['x']\n",
            "unknown key 'terminals.terminal1.comand'",
        ),
        ("[terminals.terminal1]\nenabled = true\n", "missing key 'command'"),
        (
            "[terminals.terminal9]\ncommand = ['x']\n",
            "unknown terminal type 'terminal9'",
        ),
        ("[terminals.terminal1\n", "not valid TOML"),
    ],
)
def test_bad_config_stops_the_launcher_with_one_line(
    tmp_path, subprocess_env, content, expected
):
    config = tmp_path / "bad.toml"
    config.write_text(content)

    result = run_launcher(subprocess_env, config)

    assert result.returncode == 2
    assert expected in result.stderr
    assert str(config) in result.stderr
    assert "Traceback" not in result.stderr


def test_unreadable_config_names_the_file(tmp_path, subprocess_env):
    result = run_launcher(subprocess_env, tmp_path / "missing.toml")

    assert result.returncode == 2
    assert "missing.toml: cannot read the config file" in result.stderr


def test_a_terminal_dying_while_postgresql_is_down_is_replaced_when_it_is_back(
    database, dsn, machine_id, launch
):
    import psycopg
    from psycopg.rows import dict_row

    def connect():
        return psycopg.connect(dsn, autocommit=True, row_factory=dict_row)

    launcher = launch({"terminal1": FAST, "terminal2": FAST})
    with connect() as conn:
        survivor = wait_for(
            lambda: healthy(conn, machine_id, "terminal1"), message="t1"
        )
        victim = wait_for(lambda: healthy(conn, machine_id, "terminal2"), message="t2")

    database.stop()
    try:
        os.kill(victim["pid"], signal.SIGKILL)
        launcher.wait_log("database unreachable")
    finally:
        database.start()

    with connect() as conn:
        replacement = wait_for(
            lambda: (
                (r := healthy(conn, machine_id, "terminal2"))
                and r["id"] != victim["id"]
                and r
            ),
            timeout=90,
            message="terminal2 replaced once the database is back",
        )
        crashed = conn.execute(
            "SELECT status, status_reason FROM pglive.terminal_instances WHERE id = %s",
            (victim["id"],),
        ).fetchone()
        # The outage crashed nothing else: terminal1 kept running and beating.
        assert healthy(conn, machine_id, "terminal1")["id"] == survivor["id"]
    assert crashed == {
        "status": "crashed",
        "status_reason": f"process {victim['pid']} killed by SIGKILL",
    }
    assert replacement["replaces_instance_id"] == victim["id"]
    assert launcher.process.poll() is None
    assert "database reachable again" in launcher.log


def test_a_terminal_log_is_rotated_when_it_starts_too_big(tmp_path, monkeypatch):
    from launcher import supervisor

    log = tmp_path / "logs" / "terminal1.log"
    log.parent.mkdir()
    log.write_bytes(b"x" * 100)
    monkeypatch.setattr(supervisor, "LOG_MAX_BYTES", 50)

    supervisor._open_log(log).close()

    assert (tmp_path / "logs" / "terminal1.log.1").read_bytes() == b"x" * 100
    assert log.read_bytes() == b""


def machine_setting(conn, machine_id, key):
    row = conn.execute(
        "SELECT value FROM pglive.machine_settings WHERE machine_id = %s AND key = %s",
        (machine_id, key),
    ).fetchone()
    return row and float(row["value"])


def test_a_refused_second_launcher_changes_no_setting(
    conn, machine_id, launch, tmp_path, subprocess_env
):
    launch({"terminal1": FAST})
    wait_for(lambda: healthy(conn, machine_id, "terminal1"), message="terminal1")

    second = run_launcher(
        subprocess_env,
        tmp_path / "launcher.toml",
        "--heartbeat-timeout",
        "1",
        "--restart-delay",
        "0",
    )

    assert second.returncode == 3
    assert "another launcher runs on this machine" in second.stderr
    assert machine_setting(conn, machine_id, "heartbeat_timeout_seconds") == 3
    assert machine_setting(conn, machine_id, "restart_delay_seconds") == 0.2


def test_an_interval_not_below_the_timeout_is_refused_at_start(
    tmp_path, subprocess_env
):
    config = write_config(tmp_path, {"terminal1": FAST})
    config.write_text(
        config.read_text().replace(
            "heartbeat_interval = 0.5", "heartbeat_interval = 45"
        )
    )

    result = run_launcher(subprocess_env, config)

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"Error: {config}: terminals.terminal1.heartbeat_interval: 45 s is not below "
        "--heartbeat-timeout 30 s (the timeout should be 2-3 times the interval)"
    ]


def test_a_reused_pid_is_not_mistaken_for_the_terminal(conn, machine_id, launch):
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        # An instance whose process died long ago, and whose pid now belongs to another.
        row = conn.execute(
            "SELECT * FROM pglive.register_terminal('terminal1', %s, 'testing', %s, %s, 0.5)",
            (machine_id, bystander.pid, socket.gethostname()),
        ).fetchone()
        conn.execute(
            "UPDATE pglive.terminal_instances SET started_at = now() - interval '1 hour', "
            "last_heartbeat = now() WHERE id = %s",
            (row["instance_id"],),
        )

        launcher = launch({"terminal1": FAST})

        wait_for(
            lambda: (
                (r := healthy(conn, machine_id, "terminal1"))
                and r["id"] != row["instance_id"]
            ),
            message="a terminal1 of the launcher's own",
        )
        assert bystander.poll() is None
        assert "has no process" in launcher.log
    finally:
        bystander.kill()
        bystander.wait()


def test_a_command_that_cannot_start_is_reported_with_its_reason(
    conn, machine_id, tmp_path, subprocess_env
):
    config = write_config(tmp_path, {"terminal2": FAST})
    config.write_text(
        config.read_text().replace(
            f'working_directory = "{REPO}"', 'working_directory = "/nonexistent/dir"'
        )
    )
    launcher = LauncherProcess(subprocess_env, tmp_path, config)
    try:
        launcher.wait_log("GAVE UP")
    finally:
        end_process(launcher.process)

    reason = conn.execute(
        "SELECT last_failure_reason FROM pglive.recovery_state WHERE machine_id = %s",
        (machine_id,),
    ).fetchone()["last_failure_reason"]
    assert (
        reason
        == "could not be started: working directory /nonexistent/dir does not exist"
    )
    assert (
        "working directory /nonexistent/dir does not exist"
        in (tmp_path / "logs" / "terminal2.log").read_text()
    )


def test_reset_recovery_restarts_a_given_up_terminal_at_once(
    conn, machine_id, launch, tmp_path
):
    marker = tmp_path / "starts"
    launcher = launch(
        {"terminal3": ["--exit-at-once", "1", "--marker", str(marker)]},
        "--check-interval",
        "120",
    )
    launcher.wait_log("GAVE UP")
    starts = len(marker.read_text().splitlines())

    conn.execute("SELECT pglive.reset_recovery(%s, 'terminal3')", (machine_id,))

    # Woken by the reset's NOTIFY: far sooner than the 120 s check interval.
    wait_for(
        lambda: len(marker.read_text().splitlines()) > starts,
        timeout=30,
        message="a start after the reset",
    )


def test_a_launcher_paused_past_its_timeout_registers_again(conn, machine_id, launch):
    launcher = launch({"terminal1": FAST})
    first = wait_for(lambda: healthy(conn, machine_id, "launcher"), message="launcher")

    os.kill(launcher.process.pid, signal.SIGSTOP)
    try:

        def swept():
            conn.execute("SELECT * FROM pglive.sweep(NULL, %s)", (machine_id,))
            return instances(conn, machine_id, "launcher")[0]["status"] == "crashed"

        wait_for(swept, timeout=30, interval=0.5, message="the paused launcher swept")
    finally:
        os.kill(launcher.process.pid, signal.SIGCONT)

    again = wait_for(
        lambda: (
            (r := healthy(conn, machine_id, "launcher"))
            and r["id"] != first["id"]
            and r
        ),
        message="the launcher registered again",
    )
    assert again["pid"] == launcher.process.pid
    assert "registered again" in launcher.log
    assert launcher.process.poll() is None


def test_a_forged_registration_never_gets_a_process_killed(conn, machine_id, launch):
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        wait_for(lambda: process_start_known(bystander.pid), message="the bystander")
        forged = conn.execute(
            "SELECT * FROM pglive.register_terminal('terminal1', %s, 'testing', %s, %s, 0.5)",
            (machine_id, bystander.pid, socket.gethostname()),
        ).fetchone()

        launcher = launch({"terminal1": FAST})
        launcher.wait_log("never signalled")
        conn.execute(
            "SELECT pglive.mark_terminal_crashed(%s, 'forged')",
            (forged["instance_id"],),
        )

        wait_for(
            lambda: healthy(conn, machine_id, "terminal1"), message="the launcher's own"
        )
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def process_start_known(pid: int) -> bool:
    return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep")


def test_a_launcher_needs_only_the_launcher_role(
    conn, dsn, machine_id, launch, subprocess_env
):
    role = f"pglive_test_launcher_{machine_id.hex[:8]}"
    conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE pglive_launcher")
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn) | {"user": role}
        subprocess_env["PGLIVE_DSN"] = psycopg.conninfo.make_conninfo(**info)
        launcher = launch({"terminal2": FAST})
        first = wait_for(lambda: healthy(conn, machine_id, "terminal2"), message="t2")

        os.kill(first["pid"], signal.SIGKILL)

        wait_for(
            lambda: (
                (r := healthy(conn, machine_id, "terminal2")) and r["id"] != first["id"]
            ),
            message="a replacement, by a launcher with no table rights",
        )
        launcher.process.send_signal(signal.SIGTERM)
        assert launcher.process.wait(60) == 0
    finally:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
            (role,),
        )
        conn.execute(f"DROP ROLE {role}")


def test_a_restart_due_during_a_postgresql_restart_is_not_delayed(
    database, dsn, machine_id, launch
):
    def connect():
        return psycopg.connect(dsn, autocommit=True, row_factory=dict_row)

    launch({"terminal2": FAST}, "--restart-delay", "3", "--check-interval", "120")
    with connect() as conn:
        victim = wait_for(lambda: healthy(conn, machine_id, "terminal2"), message="t2")
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for(
            lambda: instances(conn, machine_id, "terminal2")[0]["status"] == "crashed",
            message="the crash recorded",
        )

    database.restart()

    with connect() as conn:
        # Far sooner than the 120 s check interval: the restart was due 3 s after the crash.
        wait_for(
            lambda: (
                (r := healthy(conn, machine_id, "terminal2"))
                and r["id"] != victim["id"]
            ),
            timeout=60,
            message="the pending restart carried out after the server restart",
        )
