"""The ``pglive`` CLI, run as real processes against the real server.

Rows are made through the SQL API with this test's own machine id; the CLI runs as
``python -m pglive`` with ``PGLIVE_DSN`` and ``MACHINE_ID`` from ``subprocess_env``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, end_process, wait_for

CLI_TIMEOUT_SECONDS = 60


def run_cli(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pglive", *args],
        env=env,
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=CLI_TIMEOUT_SECONDS,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, exit_code: int) -> str:
    """The CLI failed the way users should see it: one Error line, no traceback."""
    assert result.returncode == exit_code, result
    assert "Traceback" not in result.stderr + result.stdout
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert error_lines[-1].startswith("Error: "), result.stderr
    return error_lines[-1]


def register(conn, machine_id, terminal_type="terminal1", *, pid=4242, interval=2):
    return conn.execute(
        "SELECT * FROM pglive.register_terminal("
        "%s, %s, 'testing', %s::int, 'ald-01', %s::numeric)",
        (terminal_type, machine_id, pid, interval),
    ).fetchone()


def heartbeat(conn, row, commands=0, errors=0, last_error=None):
    return conn.execute(
        "SELECT pglive.heartbeat(%s, %s, %s, %s, %s) AS status",
        (row["instance_id"], row["token"], commands, errors, last_error),
    ).fetchone()["status"]


def set_machine_setting(conn, machine_id, key, value):
    conn.execute(
        "SELECT pglive.set_machine_setting(%s, %s, %s::numeric)",
        (machine_id, key, value),
    )


def instance_status(conn, instance_id) -> str:
    return conn.execute(
        "SELECT status FROM pglive.terminal_instances WHERE id = %s", (instance_id,)
    ).fetchone()["status"]


def table_line(output: str, terminal_type: str) -> str:
    lines = [line for line in output.splitlines() if f"  {terminal_type}  " in line]
    assert len(lines) == 1, output
    return lines[0]


# --- status -----------------------------------------------------------------------------


def test_status_shows_this_machines_terminals(conn, machine_id, subprocess_env):
    row = register(conn, machine_id, pid=31337)
    heartbeat(conn, row, commands=7, errors=2, last_error="PLC read timed out")

    result = run_cli(subprocess_env, "status")

    assert result.returncode == 0, result
    header = result.stdout.splitlines()[0]
    assert header.split() == [
        "MACHINE",
        "TYPE",
        "STATUS",
        "PID",
        "UPTIME",
        "HEARTBEAT",
        "COMMANDS",
        "ERRORS",
        "RESTARTS",
        "LAST",
        "ERROR",
    ]
    line = table_line(result.stdout, "terminal1")
    assert line.startswith(str(machine_id)[:8])
    assert line.split()[2:4] == ["healthy", "31337"]
    assert "ago" in line
    assert line.split()[7:10] == ["7", "2", "0"]
    assert line.endswith("PLC read timed out")
    assert "\x1b[" not in result.stdout  # no colour when stdout is not a terminal


def test_status_json_is_a_list_of_view_rows(conn, machine_id, subprocess_env):
    row = register(conn, machine_id)
    heartbeat(conn, row, commands=3)

    result = run_cli(subprocess_env, "status", "--json")

    assert result.returncode == 0, result
    rows = json.loads(result.stdout)
    assert [(r["instance_id"], r["status"]) for r in rows] == [
        (str(row["instance_id"]), "healthy")
    ]
    assert rows[0]["machine_id"] == str(machine_id)
    assert rows[0]["commands_processed"] == 3
    assert isinstance(rows[0]["uptime_seconds"], int | float)
    assert rows[0]["started_at"].startswith("20")


def test_status_of_one_machine_or_all(conn, machine_id, subprocess_env):
    other_machine = uuid.uuid4()
    register(conn, machine_id, "terminal1")
    register(conn, other_machine, "terminal3")

    own = run_cli(subprocess_env, "status")
    other = run_cli(subprocess_env, "status", "--machine-id", str(other_machine))
    every = run_cli(subprocess_env, "status", "--all")

    assert "terminal1" in own.stdout and "terminal3" not in own.stdout
    assert "terminal3" in other.stdout and "terminal1" not in other.stdout
    assert str(machine_id)[:8] in every.stdout
    assert str(other_machine)[:8] in every.stdout


def test_status_with_no_terminals_says_so(machine_id, subprocess_env):
    result = run_cli(subprocess_env, "status")

    assert result.returncode == 0, result
    assert result.stdout.strip() == f"no terminals registered on machine {machine_id}"


def test_status_shows_the_launcher_as_a_line(conn, machine_id, subprocess_env):
    register(conn, machine_id, "terminal1")
    register(conn, machine_id, "launcher", pid=999)

    result = run_cli(subprocess_env, "status")

    assert result.returncode == 0, result
    assert "  launcher  " not in result.stdout  # not a row of the table
    assert f"launcher on {str(machine_id)[:8]}: starting, pid 999" in result.stdout


def test_status_shows_a_give_up_and_reset_recovery_clears_it(
    conn, machine_id, subprocess_env
):
    set_machine_setting(conn, machine_id, "max_restart_attempts", 0)
    row = register(conn, machine_id, "terminal2")
    conn.execute(
        "SELECT pglive.mark_terminal_crashed(%s, 'test crash')", (row["instance_id"],)
    )

    given_up = run_cli(subprocess_env, "status")
    reset = run_cli(subprocess_env, "reset-recovery", "terminal2")
    after = run_cli(subprocess_env, "status")

    assert "crashed (gave up)" in table_line(given_up.stdout, "terminal2")
    assert reset.returncode == 0, reset
    assert reset.stdout.startswith(f"reset terminal2 on machine {machine_id}")
    assert "given up" in reset.stdout
    assert "gave up" not in table_line(after.stdout, "terminal2")


def test_reset_recovery_of_an_unknown_type_fails(subprocess_env):
    result = run_cli(subprocess_env, "reset-recovery", "no-such-type")

    line = assert_one_line_error(result, 2)
    assert "no-such-type" in line


def test_status_watch_refreshes_until_ctrl_c(
    conn, machine_id, subprocess_env, tmp_path
):
    register(conn, machine_id)
    output = tmp_path / "watch.out"

    with open(output, "wb") as sink:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "pglive", "status", "--watch", "0.2"],
            env=subprocess_env,
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for(
            lambda: output.read_text().count("Every 0.2s: pglive status") >= 2,
            message="two frames of pglive status --watch",
        )
        watcher.send_signal(signal.SIGINT)
        exit_code = watcher.wait(timeout=CLI_TIMEOUT_SECONDS)
    finally:
        end_process(watcher)

    assert exit_code == 0
    assert "Traceback" not in output.read_text()
    assert "terminal1" in output.read_text()


def test_status_colours_the_status_on_a_terminal(conn, machine_id, subprocess_env):
    heartbeat(conn, register(conn, machine_id))
    env = {k: v for k, v in subprocess_env.items() if k != "NO_COLOR"}
    leader, follower = pty.openpty()

    process = subprocess.Popen(
        [sys.executable, "-m", "pglive", "status"],
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=subprocess.PIPE,
    )
    os.close(follower)
    output = read_until_closed(leader)
    exit_code = process.wait(timeout=CLI_TIMEOUT_SECONDS)

    assert exit_code == 0, process.stderr.read()
    assert "\x1b[32mhealthy\x1b[0m" in output


def read_until_closed(fd: int) -> str:
    """Everything written to a pty until its other end closes (EIO on Linux)."""
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode()


def test_status_watch_survives_a_server_restart(
    conn, database, machine_id, subprocess_env, tmp_path
):
    register(conn, machine_id)
    output = tmp_path / "watch.out"
    frames = "Every 0.2s: pglive status"

    with open(output, "wb") as sink:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "pglive", "status", "--watch", "0.2"],
            env=subprocess_env,
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for(lambda: frames in output.read_text(), message="a first frame")
        database.stop()
        try:
            wait_for(
                lambda: "(retrying)" in output.read_text(), message="an error frame"
            )
        finally:
            database.start()
        wait_for(
            lambda: "terminal1" in output.read_text().rsplit("(retrying)", 1)[1],
            message="a frame with the table after the restart",
        )
        assert watcher.poll() is None
    finally:
        end_process(watcher)

    assert "Traceback" not in output.read_text()


# --- history, crash, sweep, migrate -----------------------------------------------------


def test_history_lists_the_status_changes_oldest_first(
    conn, machine_id, subprocess_env
):
    row = register(conn, machine_id)
    heartbeat(conn, row)
    conn.execute(
        "SELECT pglive.mark_terminal_crashed(%s, 'operator test')",
        (row["instance_id"],),
    )

    result = run_cli(subprocess_env, "history", str(row["instance_id"]))

    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"instance {row['instance_id']}: terminal1 on machine")
    assert lines[1].split() == ["TIME", "FROM", "TO", "UPTIME", "REASON"]
    assert [line.split()[2:4] for line in lines[2:]] == [
        ["-", "starting"],
        ["starting", "healthy"],
        ["healthy", "crashed"],
    ]
    assert lines[-1].endswith("operator test")


def test_history_of_an_unknown_instance_fails_with_one_line(subprocess_env):
    unknown = uuid.uuid4()

    result = run_cli(subprocess_env, "history", str(unknown))

    line = assert_one_line_error(result, 1)
    assert str(unknown) in line


@pytest.mark.parametrize("command", [["history"], ["crash", "--reason", "x"]])
def test_an_instance_id_that_is_no_uuid_is_a_usage_error(subprocess_env, command):
    result = run_cli(subprocess_env, *command, "not-a-uuid")

    line = assert_one_line_error(result, 2)
    assert "not-a-uuid" in line


def test_crash_marks_an_active_instance_once(conn, machine_id, subprocess_env):
    row = register(conn, machine_id)
    instance_id = str(row["instance_id"])

    first = run_cli(subprocess_env, "crash", instance_id, "--reason", "stuck")
    second = run_cli(subprocess_env, "crash", instance_id, "--reason", "stuck")

    assert first.returncode == 0, first
    assert first.stdout.strip() == f"marked crashed: instance {instance_id}"
    assert instance_status(conn, row["instance_id"]) == "crashed"
    assert second.returncode == 0, second
    assert "already crashed, nothing changed" in second.stdout


def test_crash_needs_a_reason(conn, machine_id, subprocess_env):
    row = register(conn, machine_id)

    result = run_cli(subprocess_env, "crash", str(row["instance_id"]), "--reason", " ")

    assert_one_line_error(result, 2)
    assert instance_status(conn, row["instance_id"]) == "starting"


def test_sweep_reports_a_silent_instance_as_crashed(conn, machine_id, subprocess_env):
    set_machine_setting(conn, machine_id, "heartbeat_timeout_seconds", 0.5)
    row = register(conn, machine_id, interval=0.2)

    def sweep_output() -> str:
        result = run_cli(subprocess_env, "sweep", "--machine-id", str(machine_id))
        assert result.returncode == 0, result
        # pg_cron's own sweep may win the race; then this one finds nothing to change.
        if instance_status(conn, row["instance_id"]) == "crashed":
            return result.stdout or "crashed elsewhere"
        return ""

    output = wait_for(sweep_output, message="a sweep that marks the instance crashed")

    assert instance_status(conn, row["instance_id"]) == "crashed"
    if output.startswith("crashed:"):
        assert str(row["instance_id"]) in output
        assert "no heartbeat" in output


def test_sweep_with_nothing_to_do_says_so(machine_id, subprocess_env):
    result = run_cli(subprocess_env, "sweep", "--machine-id", str(machine_id))

    assert result.returncode == 0, result
    assert result.stdout.strip() == "sweep: nothing changed"


def test_migrate_on_a_migrated_database_is_up_to_date(subprocess_env):
    result = run_cli(subprocess_env, "migrate")

    assert result.returncode == 0, result
    assert result.stdout.strip() == "schema is up to date"


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "unreachable_dsn",
    [
        "host=/nonexistent password=hunter2",
        "postgresql://operator:hunter2@127.0.0.1:1/pglive",
    ],
)
def test_an_unreachable_server_gives_one_line_without_the_password(
    subprocess_env, unreachable_dsn
):
    result = run_cli(subprocess_env, "status", "--dsn", unreachable_dsn)

    line = assert_one_line_error(result, 1)
    assert "cannot connect to PostgreSQL" in line
    assert "hunter2" not in result.stdout + result.stderr


def test_a_malformed_dsn_is_a_usage_error_without_the_password(subprocess_env):
    result = run_cli(subprocess_env, "status", "--dsn", "no-equals password=hunter2")

    line = assert_one_line_error(result, 2)
    assert "invalid DSN" in line and "no-equals" in line
    assert "hunter2" not in result.stdout + result.stderr


def test_a_bad_dsn_in_the_environment_is_redacted_too(subprocess_env):
    env = subprocess_env | {"PGLIVE_DSN": "host=/nonexistent password=hunter2"}

    result = run_cli(env, "migrate")

    assert_one_line_error(result, 1)
    assert "hunter2" not in result.stdout + result.stderr


def test_no_database_at_all_says_how_to_get_one(subprocess_env, tmp_path):
    env = {k: v for k, v in subprocess_env.items() if k != "PGLIVE_DSN"}
    env["PGLIVE_HOME"] = str(tmp_path / "nothing-here")

    result = run_cli(env, "status")

    line = assert_one_line_error(result, 1)
    assert "pglive db start" in line


def test_a_bad_machine_id_is_a_usage_error(subprocess_env):
    from_option = run_cli(subprocess_env, "status", "--machine-id", "ald-01")
    from_env = run_cli(subprocess_env | {"MACHINE_ID": "ald-02"}, "status")

    assert "'ald-01'" in assert_one_line_error(from_option, 2)
    assert "MACHINE_ID='ald-02'" in assert_one_line_error(from_env, 2)


def test_db_start_without_pg_cron_names_the_package(subprocess_env, tmp_path):
    env = subprocess_env | {
        "PGLIVE_HOME": str(tmp_path / "home"),
        "PGLIVE_PG_BINDIR": str(
            tmp_path / "99" / "bin"
        ),  # a PostgreSQL with no pg_cron
    }

    result = run_cli(env, "db", "start")

    line = assert_one_line_error(result, 1)
    assert "postgresql-99-cron" in line


def test_plc_simulator_is_mounted(subprocess_env):
    result = run_cli(subprocess_env, "plc-sim", "--help")

    assert result.returncode == 0, result
    assert "simulator" in result.stdout


# --- the embedded cluster ---------------------------------------------------------------


@contextlib.contextmanager
def fresh_pglive_home() -> Iterator[Path]:
    """An empty $PGLIVE_HOME the postgres user can reach (see pglive/embedded.py)."""
    home = Path(tempfile.mkdtemp(prefix="pglive-cli-", dir="/tmp"))
    home.chmod(0o755)
    try:
        yield home
    finally:
        note = home / "cluster.json"
        if note.exists():
            saved = json.loads(note.read_text())
            shutil.rmtree(Path(saved["data_dir"]).parent, ignore_errors=True)
            shutil.rmtree(saved["socket_dir"], ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def db_status(env: dict[str, str]) -> tuple[int, dict[str, str]]:
    result = run_cli(env, "db", "status")
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines())
    return result.returncode, {key: value.strip() for key, value in fields.items()}


def test_embedded_cluster_starts_is_reused_stops_and_restarts(subprocess_env):
    with fresh_pglive_home() as home:
        env = subprocess_env | {"PGLIVE_HOME": str(home)}
        env.pop("PGLIVE_DSN")
        try:
            check_embedded_lifecycle(env, home)
        finally:
            run_cli(env, "db", "stop")


def check_embedded_lifecycle(env: dict[str, str], home: Path) -> None:
    first = run_cli(env, "db", "start")
    assert first.returncode == 0, first
    assert "created a PostgreSQL cluster" in first.stdout
    assert "applied 0001_schema" in first.stdout
    running_code, running = db_status(env)
    assert running_code == 0 and running["running"] == "True"
    assert f"DSN: {running['dsn']}" in first.stdout
    assert run_cli(env, "db", "dsn").stdout.strip() == running["dsn"]
    marker = run_cli(env, "db", "psql", "-c", "CREATE TABLE cli_marker ()")
    assert marker.returncode == 0, marker

    second = run_cli(env, "db", "start")
    assert second.returncode == 0, second
    assert "created" not in second.stdout
    assert "was already running" in second.stdout
    assert "schema is up to date" in second.stdout
    assert db_status(env) == (0, running)

    stopped = run_cli(env, "db", "stop")
    assert stopped.returncode == 0, stopped
    assert stopped.stdout.startswith("stopped PostgreSQL")
    stopped_code, while_stopped = db_status(env)
    assert stopped_code == 3 and while_stopped["running"] == "False"
    assert_one_line_error(run_cli(env, "status"), 1)

    restarted = run_cli(env, "db", "start")
    assert restarted.returncode == 0, restarted
    assert "created" not in restarted.stdout
    assert "is now running" in restarted.stdout
    assert db_status(env) == (0, running)  # same data dir, port and DSN
    kept = run_cli(env, "db", "psql", "-tA", "-c", "SELECT to_regclass('cli_marker')")
    assert kept.stdout.strip() == "cli_marker"
    assert run_cli(env, "status").returncode == 0
    assert os.path.isdir(home / "logs")
