"""Migrations (runner and psql agree, re-applying is a no-op) and the real pg_cron job."""

from __future__ import annotations

import subprocess
import uuid

import psycopg
import pytest

from pglive.migrate import migrate, migrations
from tests.helpers import wait_for


def schema_dump(dsn: str) -> str:
    from pglive.embedded import find_bindir

    result = subprocess.run(
        [
            str(find_bindir() / "pg_dump"),
            "--schema-only",
            "--schema=pglive",
            "--schema=ald",
            "--no-owner",
            dsn,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return "\n".join(
        line
        for line in result.stdout.splitlines()
        if not line.startswith(("-- Dumped", "\\restrict", "\\unrestrict"))
    )


@pytest.fixture
def scratch_database(dsn):
    """A new empty database in the same cluster, dropped afterwards."""
    name = f"pglive_scratch_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["dbname"] = name
    yield psycopg.conninfo.make_conninfo(**info)
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_reapplying_migrations_is_a_no_op(dsn):
    before = schema_dump(dsn)

    assert migrate(dsn) == []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for migration in migrations():
            conn.execute(migration.path.read_text())

    assert schema_dump(dsn) == before


def test_psql_in_order_gives_what_the_runner_gives(dsn, scratch_database):
    for migration in migrations():
        for _ in range(2):  # applying a file twice changes nothing either
            subprocess.run(
                [
                    "psql",
                    "-X",
                    "-q",
                    "-1",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-f",
                    str(migration.path),
                    scratch_database,
                ],
                check=True,
                capture_output=True,
            )

    assert schema_dump(scratch_database) == schema_dump(dsn)
    assert migrate(scratch_database) == []


def test_migrating_without_pg_cron_succeeds_and_says_how_to_sweep(scratch_database):
    """The scratch database is not pg_cron's: the migration must still pass and explain."""
    notices: list[str] = []
    with psycopg.connect(scratch_database, autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        for migration in migrations():
            conn.execute(migration.path.read_text())

    assert any("schedule the sweep from there" in notice for notice in notices)


def test_the_pg_cron_job_marks_a_stale_instance_crashed(conn, machine_id):
    if not conn.execute(
        "SELECT count(*) AS n FROM pg_extension WHERE extname = 'pg_cron'"
    ).fetchone()["n"]:
        pytest.skip("pg_cron is not installed in the test database")
    job = conn.execute(
        "SELECT command, schedule FROM cron.job WHERE jobname = 'pglive-sweep'"
    ).fetchone()
    assert job["command"] == "CALL pglive.run_sweeper()"
    # pg_cron starts the job at the next minute boundary after the server (re)started.
    wait_for(
        lambda: conn.execute(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE query = 'CALL pglive.run_sweeper()'"
        ).fetchone()["n"],
        timeout=75,
        interval=0.5,
        message="the pg_cron sweeper to run",
    )
    conn.execute(
        "SELECT pglive.set_machine_setting(%s, 'heartbeat_timeout_seconds', 2)",
        (machine_id,),
    )
    row = conn.execute(
        "SELECT * FROM pglive.register_terminal('terminal1', %s, 'testing', 99, 'h', 1)",
        (machine_id,),
    ).fetchone()
    registered_at = conn.execute("SELECT clock_timestamp() AS t").fetchone()["t"]

    crashed = wait_for(
        lambda: conn.execute(
            "SELECT crash_detected_at, status_reason FROM pglive.terminal_instances "
            "WHERE id = %s AND status = 'crashed'",
            (row["instance_id"],),
        ).fetchone(),
        timeout=75,
        interval=0.2,
        message="the sweep to mark it crashed",
    )

    seconds = (crashed["crash_detected_at"] - registered_at).total_seconds()
    sweep_interval = conn.execute(
        "SELECT value FROM pglive.settings WHERE key = 'sweep_interval_seconds'"
    ).fetchone()["value"]
    # Within timeout + one sweep period (+2 s for the minute hand-over of the job),
    # measured on the server's own clock.
    assert seconds <= 2 + float(sweep_interval) + 2
    assert "detected by the sweep" in crashed["status_reason"]


def test_each_sweep_of_the_sweeper_uses_the_time_it_runs_at(conn, machine_id):
    """run_sweeper commits after sleeping: a sweep's now() is not the sleep's start."""
    interval = float(
        conn.execute(
            "SELECT value FROM pglive.settings WHERE key = 'sweep_interval_seconds'"
        ).fetchone()["value"]
    )
    conn.execute(
        "SELECT pglive.set_machine_setting(%s, 'heartbeat_timeout_seconds', 1)",
        (machine_id,),
    )
    with psycopg.connect(conn.info.dsn, autocommit=True) as sweeper:
        thread_result: list[BaseException] = []

        def sweep_twice() -> None:
            try:
                # Sweeps at 0 s and after one interval, then returns.
                # Simple query protocol: a procedure that COMMITs needs it to be top level.
                sweeper.execute(f"CALL pglive.run_sweeper({interval * 1.5:.1f})")
            except BaseException as error:  # noqa: BLE001 (reported below)
                thread_result.append(error)

        import threading

        thread = threading.Thread(target=sweep_twice)
        thread.start()
        wait_for(
            lambda: conn.execute(
                "SELECT count(*) AS n FROM pg_stat_activity WHERE query LIKE 'CALL pglive.run_sweeper(%%.%%'"
                " AND state = 'active'"
            ).fetchone()["n"],
            message="the sweeper running",
        )
        row = conn.execute(
            "SELECT * FROM pglive.register_terminal('terminal1', %s, 'testing', 7, 'h', 0.3)",
            (machine_id,),
        ).fetchone()
        thread.join(timeout=60)

    assert not thread_result
    # Registered during the first sleep and silent for more than 1 s: the second sweep,
    # one interval later, must see it (it would not with the time the sleep began).
    status = conn.execute(
        "SELECT status FROM pglive.terminal_instances WHERE id = %s",
        (row["instance_id"],),
    ).fetchone()["status"]
    assert status == "crashed"
