"""``make demo``: the whole system live on the embedded PostgreSQL.

It starts the embedded cluster (migrated, pg_cron sweeping), the PLC simulator and the
launcher with the three terminals, then shows the live status until Ctrl-C, which stops
everything gracefully. With ``--chaos`` it runs a scripted fault run instead, explains each
step, measures detection and recovery, prints the metrics and exits 0 only if every step
behaved as expected.

The demo uses short timeouts so that it finishes quickly: heartbeats every 2 s, a 6 s
heartbeat timeout, a sweep every 2 s, restarts after 1 s, and a 15 s error-rate window.
Production defaults are 10 s, 30 s, 5 s, 5 s and 5 minutes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
import psycopg
from psycopg.rows import dict_row

from pglive import identity, status
from pglive.embedded import EmbeddedCluster
from pglive.migrate import migrate

logger = logging.getLogger("pglive.demo")

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "launcher" / "demo.toml"
PLC_PORT = 5020
HEARTBEAT_TIMEOUT = 6
RESTART_DELAY = 1
SWEEP_INTERVAL = 2
ERROR_WINDOW = 15
TERMINALS = ("terminal1", "terminal2", "terminal3")

T = TypeVar("T")


class DemoFailed(Exception):
    """A step of the chaos run did not behave as expected."""


def wait_until(condition: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise DemoFailed(f"{what}: not seen within {timeout:.0f}s")
        time.sleep(0.2)


@dataclasses.dataclass
class Demo:
    home: Path
    cluster: EmbeddedCluster
    dsn: str
    machine_id: uuid.UUID
    logs: Path
    processes: dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict)

    def sql(self, query: str, *params: Any) -> list[dict[str, Any]]:
        with psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row) as conn:
            cursor = conn.execute(query, params or None)
            return cursor.fetchall() if cursor.description else []

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PGLIVE_DSN=self.dsn,
            PGLIVE_HOME=str(self.home),
            MACHINE_ID=str(self.machine_id),
            PYTHONUNBUFFERED="1",
        )
        return env

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it)
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.processes[name] = process
        return process

    def active(self, terminal_type: str) -> dict[str, Any] | None:
        rows = self.sql(
            "SELECT * FROM pglive.active_terminals WHERE machine_id = %s "
            "AND terminal_type = %s",
            self.machine_id,
            terminal_type,
        )
        return rows[0] if rows else None

    def healthy(
        self, terminal_type: str, other_than: Any = None
    ) -> dict[str, Any] | None:
        row = self.active(terminal_type)
        if row and row["status"] == "healthy" and row["instance_id"] != other_than:
            return row
        return None

    def instance(self, instance_id: Any) -> dict[str, Any]:
        return self.sql(
            "SELECT * FROM pglive.terminal_instances WHERE id = %s", instance_id
        )[0]

    def plc_fault(self, mode: str, *extra: str) -> None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "terminals.plc.simulator",
                "fault",
                mode,
                "--port",
                str(PLC_PORT),
                *extra,
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
        )


def say(text: str, *, colour: str | None = None) -> None:
    stamp = time.strftime("%H:%M:%S")
    click.echo(f"{click.style(stamp, dim=True)}  {click.style(text, fg=colour)}")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def running_system(home: Path) -> Iterator[Demo]:
    """Embedded PostgreSQL, PLC simulator and launcher; everything stopped on exit."""
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    if not _port_free(PLC_PORT):
        raise click.ClickException(
            f"port {PLC_PORT} on 127.0.0.1 is taken: stop whatever uses it (a PLC "
            "simulator left running?) and run the demo again"
        )

    say("starting the embedded PostgreSQL (pg_cron included)")
    cluster = EmbeddedCluster(home)
    dsn = cluster.start()
    applied = migrate(dsn)
    say(f"migrations: {', '.join(applied) if applied else 'up to date'}")
    demo = Demo(home, cluster, dsn, identity.machine_id(), logs)
    demo.sql(
        "UPDATE pglive.settings SET value = %s WHERE key = 'sweep_interval_seconds'",
        SWEEP_INTERVAL,
    )
    for key, value in (
        ("error_window_seconds", ERROR_WINDOW),
        ("error_min_operations", 5),
    ):
        demo.sql(
            "SELECT pglive.set_machine_setting(%s, %s, %s)", demo.machine_id, key, value
        )
    # Each run starts with a clean slate: the restarts of an earlier run (the chaos run
    # causes some) must not count towards a give-up in this one.
    for terminal_type in TERMINALS:
        demo.sql("SELECT pglive.reset_recovery(%s, %s)", demo.machine_id, terminal_type)

    try:
        say(f"starting the PLC simulator on 127.0.0.1:{PLC_PORT}")
        demo.spawn(
            "plc-sim", ["-m", "terminals.plc.simulator", "--port", str(PLC_PORT)]
        )
        wait_until(lambda: not _port_free(PLC_PORT), 30, "the PLC simulator listening")

        say("starting the launcher with terminal1, terminal2 and terminal3")
        demo.spawn(
            "launcher",
            [
                "-m",
                "launcher",
                "--config",
                str(DEMO_CONFIG),
                "--heartbeat-timeout",
                str(HEARTBEAT_TIMEOUT),
                "--restart-delay",
                str(RESTART_DELAY),
                "--check-interval",
                "5",
            ],
        )
        for terminal_type in TERMINALS:
            wait_until(
                lambda t=terminal_type: demo.healthy(t), 60, f"{terminal_type} healthy"
            )
        say("all three terminals are healthy", colour="green")
        click.echo(
            f"\n  logs:  {logs}/\n  psql:  .venv/bin/pglive db psql   "
            f'(or: psql "{dsn}")\n'
        )
        yield demo
    finally:
        stop_everything(demo)


def stop_everything(demo: Demo) -> None:
    say("stopping: launcher (and its terminals), PLC simulator, PostgreSQL")
    for name in ("launcher", "plc-sim"):
        process = demo.processes.get(name)
        if process is None or process.poll() is not None:
            continue
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    demo.cluster.stop()
    say("stopped. Run `.venv/bin/pglive db start` to look at the data again.")


def live_status(demo: Demo) -> None:
    from pglive.cli import fetch_status

    click.echo("live status (refreshing every 2 s; Ctrl-C stops everything)")
    time.sleep(1)
    try:
        while True:
            rows, launchers = fetch_status(demo.dsn, demo.machine_id)
            frame = status.status_report(
                rows, launchers, demo.machine_id, colour=sys.stdout.isatty()
            )
            if sys.stdout.isatty():
                click.clear()
            click.echo(f"pglive demo, {time.strftime('%H:%M:%S')} (Ctrl-C to stop)\n")
            click.echo(frame + "\n")
            time.sleep(2)
    except KeyboardInterrupt:
        click.echo("")


# -- the chaos run --------------------------------------------------------------------------


def step_duplicate(demo: Demo) -> None:
    say("1. a second terminal2 on this machine must be refused")
    running = demo.active("terminal2")
    result = subprocess.run(
        [sys.executable, "-m", "terminals.recipe_service"],
        cwd=REPO,
        env=demo.env()
        | {
            "PLC_TYPE": "simulation",
            "PLC_PORT": str(PLC_PORT),
            "PGLIVE_HEARTBEAT_INTERVAL": "2",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    refusal = next(
        (line for line in result.stderr.splitlines() if "already running" in line), ""
    )
    if result.returncode == 0 or str(running["instance_id"]) not in refusal:
        raise DemoFailed(
            f"duplicate terminal2 was not refused (exit {result.returncode})"
        )
    say(
        f"   refused, exit {result.returncode}: {refusal.split('not starting: ', 1)[-1]}",
        colour="green",
    )


def step_kill_9(demo: Demo) -> dict[str, float]:
    say("2. kill -9 terminal2: the launcher sees the exit at once and restarts it")
    victim = demo.healthy("terminal2")
    killed_at = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)

    wait_until(
        lambda: demo.instance(victim["instance_id"])["status"] == "crashed",
        30,
        "terminal2 marked crashed",
    )
    detected = time.monotonic() - killed_at
    replacement = wait_until(
        lambda: demo.healthy("terminal2", other_than=victim["instance_id"]),
        60,
        "a healthy replacement of terminal2",
    )
    recovered = time.monotonic() - killed_at
    reason = demo.instance(victim["instance_id"])["status_reason"]
    say(f"   marked crashed after {detected:.1f}s ({reason})", colour="green")
    say(
        f"   replaced after {recovered:.1f}s: instance {replacement['instance_id']}, "
        f"pid {replacement['pid']}",
        colour="green",
    )
    return {"kill -9 detection": detected, "kill -9 recovery": recovered}


def wait_for_sweeper(demo: Demo) -> None:
    def sweeping() -> bool:
        return bool(
            demo.sql(
                "SELECT 1 FROM pg_stat_activity WHERE query = 'CALL pglive.run_sweeper()'"
            )
        )

    if not sweeping():
        say(
            "   (pg_cron runs its first job at the next minute boundary; waiting for it)"
        )
        wait_until(sweeping, 75, "the pg_cron sweeper")


def step_sigstop(demo: Demo) -> dict[str, float]:
    say(
        f"3. SIGSTOP terminal1: its process lives but is frozen; the pg_cron sweep "
        f"notices the silence ({HEARTBEAT_TIMEOUT}s timeout)"
    )
    wait_for_sweeper(demo)
    frozen = demo.healthy("terminal1")
    frozen_at = time.monotonic()
    os.kill(frozen["pid"], signal.SIGSTOP)
    try:
        wait_until(
            lambda: demo.instance(frozen["instance_id"])["status"] == "crashed",
            60,
            "terminal1 marked crashed by the sweep",
        )
        detected = time.monotonic() - frozen_at
        replacement = wait_until(
            lambda: demo.healthy("terminal1", other_than=frozen["instance_id"]),
            60,
            "a healthy replacement of terminal1",
        )
        recovered = time.monotonic() - frozen_at
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen["pid"], signal.SIGCONT)
    reason = demo.instance(frozen["instance_id"])["status_reason"]
    say(f"   marked crashed after {detected:.1f}s ({reason})", colour="green")
    say(
        f"   frozen process ended and replaced after {recovered:.1f}s: instance "
        f"{replacement['instance_id']}, pid {replacement['pid']}",
        colour="green",
    )
    return {"SIGSTOP detection": detected, "SIGSTOP recovery": recovered}


def step_plc_outage(demo: Demo) -> dict[str, float]:
    say(
        f"4. the PLC answers every request with a Modbus exception: terminal1's error "
        f"rate climbs ({ERROR_WINDOW}s window, degraded at 20%)"
    )
    instance_id = demo.healthy("terminal1")["instance_id"]
    failed_at = time.monotonic()
    demo.plc_fault("exception")
    try:
        wait_until(
            lambda: demo.instance(instance_id)["status"] == "degraded",
            90,
            "terminal1 degraded",
        )
        degraded = time.monotonic() - failed_at
        say(
            f"   degraded after {degraded:.1f}s "
            f"({demo.instance(instance_id)['status_reason']})",
            colour="green",
        )
    finally:
        demo.plc_fault("none")
    cleared_at = time.monotonic()
    say(
        "   PLC answering again; terminal1 recovers once its error rate falls under 10%"
    )
    wait_until(
        lambda: demo.instance(instance_id)["status"] == "healthy",
        90,
        "terminal1 healthy again",
    )
    healthy_again = time.monotonic() - cleared_at
    say(
        f"   healthy again {healthy_again:.1f}s after the PLC came back "
        "(same instance, never restarted)",
        colour="green",
    )
    return {"PLC outage to degraded": degraded, "PLC back to healthy": healthy_again}


def step_sigterm(demo: Demo) -> dict[str, float]:
    say("5. SIGTERM terminal3: a graceful stop, which the launcher leaves stopped")
    target = demo.healthy("terminal3")
    sent_at = time.monotonic()
    os.kill(target["pid"], signal.SIGTERM)
    wait_until(
        lambda: demo.instance(target["instance_id"])["status"] == "stopped",
        30,
        "terminal3 stopped",
    )
    stopped = time.monotonic() - sent_at
    row = demo.instance(target["instance_id"])
    if row["stopped_at"] is None or demo.active("terminal3") is not None:
        raise DemoFailed("terminal3 did not end stopped")
    say(
        f"   stopped after {stopped:.1f}s at {row['stopped_at']:%H:%M:%S} "
        f"({row['status_reason']})",
        colour="green",
    )
    return {"SIGTERM to stopped": stopped}


METRICS = {
    "commands per type (24 h)": """
        SELECT terminal_type, sum(commands_processed) AS commands
        FROM pglive.terminal_instances
        WHERE started_at > now() - interval '24 hours' AND terminal_type <> 'launcher'
        GROUP BY terminal_type ORDER BY terminal_type""",
    "error rate per type (24 h)": """
        SELECT terminal_type, round(100.0 * sum(errors_encountered)
               / nullif(sum(commands_processed + errors_encountered), 0), 2) AS error_rate_pct
        FROM pglive.terminal_instances
        WHERE started_at > now() - interval '24 hours' AND terminal_type <> 'launcher'
        GROUP BY terminal_type ORDER BY terminal_type""",
    "average uptime per type (24 h)": """
        SELECT terminal_type, round(avg(pglive.get_terminal_uptime(id)), 1) AS avg_uptime_s
        FROM pglive.terminal_instances
        WHERE started_at > now() - interval '24 hours' AND terminal_type <> 'launcher'
        GROUP BY terminal_type ORDER BY terminal_type""",
    "crash frequency per type (24 h)": """
        SELECT i.terminal_type, count(*) AS crashes,
               round(count(*) / 24.0, 3) AS crashes_per_hour
        FROM pglive.terminal_health_history h
        JOIN pglive.terminal_instances i ON i.id = h.terminal_instance_id
        WHERE h.new_status = 'crashed' AND h.created_at > now() - interval '24 hours'
        GROUP BY i.terminal_type ORDER BY i.terminal_type""",
}


def print_metrics(demo: Demo) -> None:
    for title, query in METRICS.items():
        rows = demo.sql(query)
        cells = ", ".join(
            f"{row['terminal_type']}: "
            + " ".join(
                f"{key}={'-' if value is None else value}"
                for key, value in row.items()
                if key != "terminal_type"
            )
            for row in rows
        )
        click.echo(f"  {title:34} {cells or '-'}")


def chaos(demo: Demo) -> bool:
    click.echo(
        f"\nchaos run (short timeouts for the demo: heartbeat timeout {HEARTBEAT_TIMEOUT}s, "
        f"sweep every {SWEEP_INTERVAL}s, restart after {RESTART_DELAY}s)\n"
    )
    started = time.monotonic()
    timings: dict[str, float] = {}
    try:
        step_duplicate(demo)
        timings |= step_kill_9(demo)
        timings |= step_sigstop(demo)
        timings |= step_plc_outage(demo)
        timings |= step_sigterm(demo)
    except DemoFailed as failure:
        say(f"FAILED: {failure}", colour="red")
        say(f"see the logs in {demo.logs}/", colour="red")
        return False

    click.echo("\nmeasured:")
    for name, seconds in timings.items():
        click.echo(f"  {name:34} {seconds:6.1f}s")
    click.echo(
        "\nmetrics over the last 24 hours (the README's Metrics section has more):"
    )
    print_metrics(demo)
    say(
        f"every step behaved as expected ({time.monotonic() - started:.0f}s)",
        colour="green",
    )
    return True


@click.command()
@click.option("--chaos", "run_chaos", is_flag=True, help="Run the scripted fault run.")
def main(run_chaos: bool) -> None:
    """Run pglive live on the embedded PostgreSQL (see `make demo`)."""
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    home = Path(os.environ.get("PGLIVE_HOME") or REPO / ".pglive").resolve()
    ok = True
    try:
        with running_system(home) as demo:
            if run_chaos:
                ok = chaos(demo)
            else:
                live_status(demo)
    except DemoFailed as failure:
        raise click.ClickException(f"the demo could not start: {failure}") from None
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
