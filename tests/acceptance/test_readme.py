"""Every command and query of the README, run as a user would run them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pglive.embedded import EmbeddedCluster
from tests.helpers import REPO, end_process, wait_for

README = (REPO / "README.md").read_text()
VENV_BIN = Path(sys.executable).parent


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def shell_lines() -> list[str]:
    return [
        line.strip()
        for block in blocks("sh")
        for line in block.splitlines()
        if line.strip()
    ]


# How each shell line of the README is exercised. "ci" lines are what CI itself runs.
EMBEDDED_CLUSTER_LINES = [
    ".venv/bin/pglive db start",
    ".venv/bin/pglive db status",
    ".venv/bin/pglive db dsn",
    ".venv/bin/pglive migrate",
    ".venv/bin/pglive status --all",
    ".venv/bin/pglive status --json",
    ".venv/bin/pglive sweep",
    ".venv/bin/pglive db stop",
]
EXTERNAL_DATABASE_LINES = [
    'export PGLIVE_DSN="host=db.example.com dbname=pglive user=pglive_admin"',
    ".venv/bin/pglive migrate",
    ".venv/bin/pglive-launcher --config /etc/pglive/launcher.toml",
]
HANDLED = {
    "make test": "ci",
    "make demo": "test_make_demo_runs_until_ctrl_c",
    "make demo CHAOS=1": "test_make_demo_chaos",
    ".venv/bin/pglive-launcher --config launcher/demo.toml --heartbeat-timeout 30": (
        "test_launcher_line_with_the_demo_config"
    ),
    **dict.fromkeys(
        EMBEDDED_CLUSTER_LINES, "test_cli_lines_on_a_fresh_embedded_cluster"
    ),
    **dict.fromkeys(EXTERNAL_DATABASE_LINES, "test_existing_postgresql_lines"),
}


def test_every_shell_line_of_the_readme_is_run_by_a_test():
    assert set(shell_lines()) == set(HANDLED)


def run(
    line: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        line,
        shell=True,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def destroy_embedded_cluster(pglive_home: Path) -> None:
    """Remove a cluster a test made, wherever its data went (see pglive/embedded.py)."""
    if (pglive_home / "cluster.json").exists():
        EmbeddedCluster(pglive_home).destroy()


@pytest.fixture
def fresh_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    home.chmod(0o755)
    yield home
    destroy_embedded_cluster(home / "pglive")


@pytest.fixture
def user_env(fresh_home):
    """A user's shell: no test DSN, the repository's venv, a fresh PGLIVE_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGLIVE_")}
    env["PGLIVE_HOME"] = str(fresh_home / "pglive")
    return env


def test_cli_lines_on_a_fresh_embedded_cluster(user_env):
    try:
        outputs = {line: run(line, user_env) for line in EMBEDDED_CLUSTER_LINES}
    finally:
        subprocess.run(
            [str(VENV_BIN / "pglive"), "db", "stop"],
            env=user_env,
            cwd=REPO,
            check=False,
        )

    assert "host=" in outputs[".venv/bin/pglive db dsn"].stdout
    assert outputs[".venv/bin/pglive status --json"].stdout.strip().startswith("[")


def test_sql_blocks_run_in_psql(dsn, conn, machine_id):
    row = conn.execute(
        "SELECT * FROM pglive.register_terminal('terminal2', %s, 'testing', 77, 'h', 2)",
        (machine_id,),
    ).fetchone()
    conn.execute(
        "SELECT pglive.heartbeat(%s, %s, 5, 1)", (row["instance_id"], row["token"])
    )
    sql_blocks = blocks("sql")
    assert (
        sql_blocks[0].strip().startswith("\\set")
    )  # the example values, replaced here

    script = "\n".join(sql_blocks[1:])
    result = subprocess.run(
        [
            "psql",
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            f"machine_id={machine_id}",
            "-v",
            f"instance_id={row['instance_id']}",
            dsn,
        ],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert (
        "operator: PLC cable unplugged"
        in conn.execute(
            "SELECT status_reason FROM pglive.terminal_instances WHERE id = %s",
            (row["instance_id"],),
        ).fetchone()["status_reason"]
    )


def test_existing_postgresql_lines(dsn, subprocess_env, tmp_path):
    """The lines for an existing server, with its DSN and a config file of ours."""
    config = tmp_path / "launcher.toml"
    config.write_text(
        '[terminals.terminal3]\ncommand = ["{python}", "-m", "tests.dummy_terminal", '
        '"terminal3"]\nheartbeat_interval = 1\n'
        f'working_directory = "{REPO}"\n'
    )
    env = subprocess_env | {"PGLIVE_DSN": dsn}
    export, migrate, launch = EXTERNAL_DATABASE_LINES
    assert export.startswith("export PGLIVE_DSN=")

    run(migrate, env)
    launcher = subprocess.Popen(
        "exec " + launch.replace("/etc/pglive/launcher.toml", str(config)),
        shell=True,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "launcher.log", "wb"),  # noqa: SIM115
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: (
                "terminal 'terminal3'" in (tmp_path / "launcher.log").read_text()
                and "running: instance" in (tmp_path / "launcher.log").read_text()
            ),
            message="the launcher running terminal3",
        )
    finally:
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0


def test_launcher_line_with_the_demo_config(subprocess_env, tmp_path):
    line = (
        ".venv/bin/pglive-launcher --config launcher/demo.toml --heartbeat-timeout 30"
    )
    log = tmp_path / "launcher.log"
    launcher = subprocess.Popen(
        f"exec {line}",
        shell=True,
        cwd=REPO,
        env=subprocess_env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),  # noqa: SIM115
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: log.read_text().count("running: instance") >= 3,
            timeout=60,
            message="three terminals running",
        )
    finally:
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0
    assert "launcher stopped; every terminal stopped" in log.read_text()


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory):
    """Like user_env, with one PGLIVE_HOME for both demo runs of this module."""
    home = tmp_path_factory.mktemp("demo-home")
    home.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGLIVE_")}
    env["PGLIVE_HOME"] = str(home / "pglive")
    yield env
    destroy_embedded_cluster(home / "pglive")


def make_demo(env, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["make", "--no-print-directory", "demo", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_make_demo_runs_until_ctrl_c(demo_env):
    demo = make_demo(demo_env)
    seen: list[str] = []
    try:
        for line in demo.stdout:
            seen.append(line)
            if "live status" in line:
                break
        assert any("all three terminals are healthy" in line for line in seen), seen

        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
        rest = demo.stdout.read()
        demo.wait(120)
    finally:
        end_process(demo)

    assert "stopped. Run" in rest, rest
    assert "Traceback" not in "".join(seen) + rest


def test_make_demo_chaos(demo_env):
    """Runs over the PGLIVE_HOME of the plain demo before it: set-up is idempotent."""
    demo = make_demo(demo_env, "CHAOS=1")
    try:
        output, _ = demo.communicate(timeout=600)
    finally:
        end_process(demo)

    assert demo.returncode == 0, output
    for expected in (
        "refused, exit 3",
        "replaced after",
        "marked crashed after",
        "degraded after",
        "healthy again",
        "stopped after",
        "every step behaved as expected",
    ):
        assert expected in output, output


def test_the_terminal_example_runs(conn, machine_id, subprocess_env, tmp_path):
    (example,) = blocks("python")
    log_file = tmp_path / "terminal2.log"
    script = tmp_path / "example_terminal.py"
    script.write_text(example.replace("/var/log/pglive/terminal2.log", str(log_file)))
    process = subprocess.Popen(
        [sys.executable, str(script)],
        env=subprocess_env | {"PGLIVE_HEARTBEAT_INTERVAL": "1"},
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: conn.execute(
                "SELECT 1 FROM pglive.active_terminals WHERE machine_id = %s "
                "AND terminal_type = 'terminal2' AND status = 'healthy'",
                (machine_id,),
            ).fetchone(),
            message="the example terminal healthy",
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        end_process(process)
    assert "registered as instance" in log_file.read_text()
