"""The SQL control plane, called the way psql users and clients call it.

Time-dependent rules are tested with ``p_now`` rather than by waiting.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid

import psycopg
import psycopg.conninfo
import pytest
from psycopg import errors as pg_errors
from psycopg.rows import dict_row

ACTIVE = ("starting", "healthy", "degraded", "stopping")


def register(
    conn, machine_id, terminal_type="terminal2", *, pid=4242, interval=2, host="ald-01"
):
    return conn.execute(
        "SELECT * FROM pglive.register_terminal(%s, %s, 'testing', %s, %s, %s)",
        (terminal_type, machine_id, pid, host, interval),
    ).fetchone()


def heartbeat(conn, row, commands=0, errors=0, last_error=None, sequence=None):
    return conn.execute(
        "SELECT pglive.heartbeat(%s, %s, %s, %s, %s, %s) AS status",
        (row["instance_id"], row["token"], commands, errors, last_error, sequence),
    ).fetchone()["status"]


def instance(conn, instance_id):
    return conn.execute(
        "SELECT * FROM pglive.terminal_instances WHERE id = %s", (instance_id,)
    ).fetchone()


def server_now(conn) -> dt.datetime:
    return conn.execute("SELECT now() AS now").fetchone()["now"]


def history(conn, instance_id):
    return conn.execute(
        "SELECT previous_status, new_status, reason FROM pglive.terminal_health_history "
        "WHERE terminal_instance_id = %s ORDER BY id",
        (instance_id,),
    ).fetchall()


def test_register_then_first_heartbeat_makes_it_healthy(conn, machine_id):
    row = register(conn, machine_id)

    assert instance(conn, row["instance_id"])["status"] == "starting"
    assert heartbeat(conn, row, commands=3) == "healthy"

    stored = instance(conn, row["instance_id"])
    assert stored["commands_processed"] == 3
    assert stored["last_heartbeat"] is not None
    assert stored["token_hash"] != row["token"].encode()
    assert [h["new_status"] for h in history(conn, row["instance_id"])] == [
        "starting",
        "healthy",
    ]


def test_duplicate_registration_names_the_running_instance(conn, machine_id):
    first = register(conn, machine_id, pid=1111, host="ald-07")
    heartbeat(conn, first)

    with pytest.raises(pg_errors.UniqueViolation) as raised:
        register(conn, machine_id, pid=2222)

    message = raised.value.diag.message_primary
    assert str(first["instance_id"]) in message
    assert "pid 1111" in message
    assert "host ald-07" in message
    assert "started" in message and "last heartbeat 20" in message
    assert raised.value.diag.constraint_name == "terminal_instances_one_active_per_slot"


def test_same_type_on_another_machine_is_fine(conn, machine_id):
    register(conn, machine_id)
    register(conn, uuid.uuid4())


def test_concurrent_registrations_of_one_slot_have_exactly_one_winner(dsn):
    for _ in range(10):
        machine_id = uuid.uuid4()
        barrier = threading.Barrier(8)
        outcomes: list[str] = []

        def attempt(
            pid: int, machine_id=machine_id, barrier=barrier, outcomes=outcomes
        ) -> None:
            with psycopg.connect(dsn, autocommit=True) as connection:
                barrier.wait()
                try:
                    connection.execute(
                        "SELECT pglive.register_terminal('terminal1', %s, 'testing', %s, 'h')",
                        (machine_id, pid),
                    )
                    outcomes.append("won")
                except pg_errors.UniqueViolation:
                    outcomes.append("refused")

        threads = [
            threading.Thread(target=attempt, args=(pid,)) for pid in range(100, 108)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert sorted(outcomes) == ["refused"] * 7 + ["won"]


@pytest.mark.parametrize(
    ("terminal_type", "environment", "interval", "expected"),
    [
        ("terminal9", "testing", 2, 'unknown terminal type "terminal9"'),
        ("terminal1", "staging", 2, 'unknown environment "staging"'),
        ("terminal1", "testing", 0, "heartbeat interval 0 s is not positive"),
        (
            "terminal1",
            "testing",
            30,
            "heartbeat interval 30 s is not below the heartbeat",
        ),
    ],
)
def test_bad_registrations_are_refused_with_the_bad_value(
    conn, machine_id, terminal_type, environment, interval, expected
):
    with pytest.raises(pg_errors.InvalidParameterValue) as raised:
        conn.execute(
            "SELECT pglive.register_terminal(%s, %s, %s, 1, 'h', %s)",
            (terminal_type, machine_id, environment, interval),
        )

    assert expected in raised.value.diag.message_primary
    assert conn.execute(
        "SELECT count(*) AS n FROM pglive.terminal_instances WHERE machine_id = %s",
        (machine_id,),
    ).fetchone() == {"n": 0}


def test_interval_refusal_says_the_timeout_should_be_two_to_three_times(
    conn, machine_id
):
    conn.execute(
        "SELECT pglive.set_machine_setting(%s, 'heartbeat_timeout_seconds', 12)",
        (machine_id,),
    )

    with pytest.raises(pg_errors.InvalidParameterValue) as raised:
        register(conn, machine_id, interval=12)

    assert "2-3 times the interval" in raised.value.diag.message_hint
    register(conn, machine_id, interval=5)


def test_forbidden_status_move_raises(conn, machine_id):
    row = register(conn, machine_id)
    conn.execute(
        "SELECT pglive.mark_terminal_crashed(%s, 'test')", (row["instance_id"],)
    )

    with pytest.raises(psycopg.Error) as raised:
        conn.execute(
            "UPDATE pglive.terminal_instances SET status = 'healthy' WHERE id = %s",
            (row["instance_id"],),
        )

    assert raised.value.sqlstate == "PL004"
    assert "cannot move from crashed to healthy" in raised.value.diag.message_primary


def test_starting_cannot_jump_to_stopped(conn, machine_id):
    row = register(conn, machine_id)

    with pytest.raises(psycopg.Error) as raised:
        conn.execute(
            "UPDATE pglive.terminal_instances SET status = 'stopped' WHERE id = %s",
            (row["instance_id"],),
        )

    assert raised.value.sqlstate == "PL004"


def test_heartbeat_of_a_crashed_instance_is_fenced(conn, machine_id):
    row = register(conn, machine_id)
    heartbeat(conn, row)
    conn.execute(
        "SELECT pglive.mark_terminal_crashed(%s, 'replaced')", (row["instance_id"],)
    )

    with pytest.raises(psycopg.Error) as raised:
        heartbeat(conn, row, commands=5)

    assert raised.value.sqlstate == "PL001"
    assert "crashed" in raised.value.diag.message_primary
    assert instance(conn, row["instance_id"])["commands_processed"] == 0


def test_wrong_token_and_unknown_instance_are_rejected(conn, machine_id):
    row = register(conn, machine_id)

    with pytest.raises(psycopg.Error) as wrong_token:
        heartbeat(conn, {"instance_id": row["instance_id"], "token": "guess"})
    with pytest.raises(psycopg.Error) as unknown:
        heartbeat(conn, {"instance_id": uuid.uuid4(), "token": row["token"]})

    assert wrong_token.value.sqlstate == "PL002"
    assert "guess" not in str(wrong_token.value)
    assert unknown.value.sqlstate == "PL003"


def test_a_retried_heartbeat_counts_once(conn, machine_id):
    row = register(conn, machine_id)

    heartbeat(conn, row, commands=4, errors=1, sequence=1)
    heartbeat(conn, row, commands=4, errors=1, sequence=1)
    heartbeat(conn, row, commands=2, sequence=2)

    stored = instance(conn, row["instance_id"])
    assert (stored["commands_processed"], stored["errors_encountered"]) == (6, 1)


def test_graceful_stop_flushes_counters_and_sets_stopped_at(conn, machine_id):
    row = register(conn, machine_id)
    heartbeat(conn, row, commands=1)

    assert conn.execute(
        "SELECT pglive.begin_terminal_stop(%s, %s, 'operator stop') AS s",
        (row["instance_id"], row["token"]),
    ).fetchone() == {"s": "stopping"}
    assert conn.execute(
        "SELECT pglive.finish_terminal_stop(%s, %s, 7, 2, 'last one', NULL, 'operator stop') "
        "AS s",
        (row["instance_id"], row["token"]),
    ).fetchone() == {"s": "stopped"}

    stored = instance(conn, row["instance_id"])
    assert stored["stopped_at"] is not None
    assert (stored["commands_processed"], stored["errors_encountered"]) == (8, 2)
    assert stored["last_error"] == "last one"
    assert [
        (h["previous_status"], h["new_status"])
        for h in history(conn, row["instance_id"])
    ] == [
        (None, "starting"),
        ("starting", "healthy"),
        ("healthy", "stopping"),
        ("stopping", "stopped"),
    ]
    register(conn, machine_id)  # the slot is free again


def test_detect_dead_terminals_is_read_only_and_uses_the_timeout(conn, machine_id):
    row = register(conn, machine_id)
    heartbeat(conn, row)
    later = server_now(conn) + dt.timedelta(seconds=31)

    dead = conn.execute(
        "SELECT * FROM pglive.detect_dead_terminals(NULL, %s, %s)", (later, machine_id)
    ).fetchall()
    assert [d["instance_id"] for d in dead] == [row["instance_id"]]
    assert dead[0]["seconds_since_heartbeat"] >= 31
    assert dead[0]["timeout_seconds"] == 30

    assert conn.execute(
        "SELECT count(*) AS n FROM pglive.detect_dead_terminals(60, %s, %s)",
        (later, machine_id),
    ).fetchone() == {"n": 0}
    assert instance(conn, row["instance_id"])["status"] == "healthy"


def test_sweep_marks_a_silent_instance_crashed_and_counts_missed_beats(
    conn, machine_id
):
    row = register(conn, machine_id, interval=2)
    heartbeat(conn, row)
    soon = server_now(conn) + dt.timedelta(seconds=9)
    later = server_now(conn) + dt.timedelta(seconds=31)

    assert (
        conn.execute(
            "SELECT * FROM pglive.sweep(%s, %s)", (soon, machine_id)
        ).fetchall()
        == []
    )
    assert instance(conn, row["instance_id"])["missed_heartbeats"] == 4

    changes = conn.execute(
        "SELECT * FROM pglive.sweep(%s, %s)", (later, machine_id)
    ).fetchall()

    assert [(c["instance_id"], c["action"]) for c in changes] == [
        (row["instance_id"], "crashed")
    ]
    stored = instance(conn, row["instance_id"])
    assert stored["status"] == "crashed"
    assert stored["crash_detected_at"] is not None
    assert "no heartbeat for" in stored["status_reason"]


def test_silence_is_not_counted_while_the_server_was_down(conn, machine_id):
    row = register(conn, machine_id)
    started = conn.execute("SELECT pg_postmaster_start_time() AS t").fetchone()["t"]
    # As if the last heartbeat came an hour before the server (re)started.
    conn.execute(
        "UPDATE pglive.terminal_instances SET last_heartbeat = %s, started_at = %s WHERE id = %s",
        (
            started - dt.timedelta(hours=1),
            started - dt.timedelta(hours=1),
            row["instance_id"],
        ),
    )

    soon_after_start = started + dt.timedelta(seconds=20)
    long_after_start = started + dt.timedelta(seconds=31)
    assert (
        conn.execute(
            "SELECT * FROM pglive.sweep(%s, %s)", (soon_after_start, machine_id)
        ).fetchall()
        == []
    )
    assert [
        c["action"]
        for c in conn.execute(
            "SELECT * FROM pglive.sweep(%s, %s)", (long_after_start, machine_id)
        ).fetchall()
    ] == ["crashed"]


def test_error_rate_turns_degraded_then_healthy(conn, machine_id):
    row = register(conn, machine_id)
    heartbeat(conn, row)
    heartbeat(conn, row, commands=7, errors=3)  # 30 % of 10 operations
    now = server_now(conn)

    changes = conn.execute(
        "SELECT * FROM pglive.sweep(%s, %s)", (now, machine_id)
    ).fetchall()
    assert [c["action"] for c in changes] == ["degraded"]
    assert "error rate 30.0%" in instance(conn, row["instance_id"])["status_reason"]
    assert heartbeat(conn, row) == "degraded"

    heartbeat(
        conn, row, commands=20
    )  # 3 errors in 30 operations: 10 %, not under it yet
    assert (
        conn.execute(
            "SELECT * FROM pglive.sweep(%s, %s)", (server_now(conn), machine_id)
        ).fetchall()
        == []
    )

    heartbeat(conn, row, commands=10)  # 3 in 40: 7.5 %
    changes = conn.execute(
        "SELECT * FROM pglive.sweep(%s, %s)", (server_now(conn), machine_id)
    ).fetchall()
    assert [c["action"] for c in changes] == ["recovered"]
    assert instance(conn, row["instance_id"])["status"] == "healthy"


def test_few_operations_never_make_it_degraded(conn, machine_id):
    row = register(conn, machine_id)
    heartbeat(conn, row, commands=0, errors=9)

    assert (
        conn.execute(
            "SELECT * FROM pglive.sweep(%s, %s)", (server_now(conn), machine_id)
        ).fetchall()
        == []
    )


def test_errors_leave_the_window(conn, machine_id):
    conn.execute(
        "SELECT pglive.set_machine_setting(%s, 'error_window_seconds', 60)",
        (machine_id,),
    )
    row = register(conn, machine_id)
    heartbeat(conn, row, commands=5, errors=5)
    in_window = server_now(conn) + dt.timedelta(seconds=30)
    after_window = server_now(conn) + dt.timedelta(seconds=61)
    # Keep it alive at those instants, so only the error rate can change its status.
    conn.execute(
        "SELECT pglive.set_machine_setting(%s, 'heartbeat_timeout_seconds', 3600)",
        (machine_id,),
    )

    assert [
        c["action"]
        for c in conn.execute(
            "SELECT * FROM pglive.sweep(%s, %s)", (in_window, machine_id)
        ).fetchall()
    ] == ["degraded"]
    assert [
        c["action"]
        for c in conn.execute(
            "SELECT * FROM pglive.sweep(%s, %s)", (after_window, machine_id)
        ).fetchall()
    ] == ["recovered"]


def test_mark_crashed_unknown_and_final_instances(conn, machine_id):
    row = register(conn, machine_id)
    first = conn.execute(
        "SELECT pglive.mark_terminal_crashed(%s, 'by hand') AS o", (row["instance_id"],)
    ).fetchone()
    second = conn.execute(
        "SELECT pglive.mark_terminal_crashed(%s, 'again') AS o", (row["instance_id"],)
    ).fetchone()

    assert (first["o"], second["o"]) == ("crashed", "already_crashed")
    assert instance(conn, row["instance_id"])["status_reason"] == "by hand"
    with pytest.raises(psycopg.Error) as unknown:
        conn.execute("SELECT pglive.mark_terminal_crashed(%s, 'x')", (uuid.uuid4(),))
    assert unknown.value.sqlstate == "PL003"


def test_uptime_runs_until_the_crash(conn, machine_id):
    row = register(conn, machine_id)
    conn.execute(
        "UPDATE pglive.terminal_instances SET started_at = now() - interval '90 seconds' "
        "WHERE id = %s",
        (row["instance_id"],),
    )
    conn.execute("SELECT pglive.mark_terminal_crashed(%s, 'x')", (row["instance_id"],))
    tomorrow = server_now(conn) + dt.timedelta(days=1)

    uptime = conn.execute(
        "SELECT pglive.get_terminal_uptime(%s, %s) AS u", (row["instance_id"], tomorrow)
    ).fetchone()["u"]

    assert 90 <= uptime < 95


def decision(conn, machine_id, terminal_type="terminal2", now=None):
    return conn.execute(
        "SELECT * FROM pglive.recovery_decision(%s, %s, %s)",
        (machine_id, terminal_type, now),
    ).fetchone()


def test_recovery_waits_5_15_30_seconds_then_gives_up(conn, machine_id):
    delays = []
    assert decision(conn, machine_id)["action"] == "start"

    for _ in range(3):
        row = register(conn, machine_id)
        assert decision(conn, machine_id)["action"] == "running"
        conn.execute(
            "SELECT pglive.mark_terminal_crashed(%s, 'boom')", (row["instance_id"],)
        )
        restart = decision(conn, machine_id)
        assert restart["action"] == "restart"
        assert 0 < restart["delay_seconds"] <= 30
        delays.append(restart["attempt"])

    row = register(conn, machine_id)
    conn.execute(
        "SELECT pglive.mark_terminal_crashed(%s, 'boom')", (row["instance_id"],)
    )

    assert delays == [1, 2, 3]
    scheduled = conn.execute(
        "SELECT attempt, delay_seconds FROM pglive.recovery_events "
        "WHERE machine_id = %s AND event = 'restart_scheduled' ORDER BY id",
        (machine_id,),
    ).fetchall()
    assert [(e["attempt"], e["delay_seconds"]) for e in scheduled] == [
        (1, 5),
        (2, 15),
        (3, 30),
    ]
    assert decision(conn, machine_id)["action"] == "gave_up"
    give_ups = conn.execute(
        "SELECT * FROM pglive.recovery_give_ups WHERE machine_id = %s", (machine_id,)
    ).fetchall()
    assert len(give_ups) == 1 and give_ups[0]["still_given_up"]
    assert give_ups[0]["attempts"] == 3

    conn.execute("SELECT pglive.reset_recovery(%s, 'terminal2')", (machine_id,))
    assert decision(conn, machine_id)["action"] == "start"


def test_restart_delay_setting_scales_the_delays_and_counts_down(conn, machine_id):
    conn.execute(
        "SELECT pglive.set_machine_setting(%s, 'restart_delay_seconds', 0.5)",
        (machine_id,),
    )
    row = register(conn, machine_id)
    conn.execute("SELECT pglive.mark_terminal_crashed(%s, 'x')", (row["instance_id"],))

    first = decision(conn, machine_id)
    later = decision(
        conn, machine_id, now=first["restart_at"] + dt.timedelta(seconds=1)
    )

    assert 0.4 < first["delay_seconds"] <= 0.5
    assert later["delay_seconds"] == 0


def test_ten_stable_minutes_reset_the_attempts(conn, machine_id):
    for _ in range(2):
        row = register(conn, machine_id)
        conn.execute(
            "SELECT pglive.mark_terminal_crashed(%s, 'x')", (row["instance_id"],)
        )
    assert decision(conn, machine_id)["attempt"] == 2

    row = register(conn, machine_id)
    conn.execute(
        "UPDATE pglive.terminal_instances SET started_at = now() - interval '11 minutes' "
        "WHERE id = %s",
        (row["instance_id"],),
    )
    conn.execute("SELECT pglive.mark_terminal_crashed(%s, 'x')", (row["instance_id"],))

    restart = decision(conn, machine_id)
    assert restart["attempt"] == 1
    assert 4 < restart["delay_seconds"] <= 5


def test_process_exit_reports(conn, machine_id):
    spawned = server_now(conn)
    row = register(conn, machine_id, pid=777)

    crashed = conn.execute(
        "SELECT * FROM pglive.report_process_exit(%s, 'terminal2', 777, 'ald-01', %s, NULL, 9)",
        (machine_id, spawned),
    ).fetchone()
    again = conn.execute(
        "SELECT * FROM pglive.report_process_exit(%s, 'terminal2', 777, 'ald-01', %s, NULL, 9)",
        (machine_id, spawned),
    ).fetchone()
    never = conn.execute(
        "SELECT * FROM pglive.report_process_exit(%s, 'terminal3', 778, 'ald-01', %s, 2, NULL)",
        (machine_id, spawned),
    ).fetchone()

    assert crashed == {"instance_id": row["instance_id"], "outcome": "crashed"}
    assert (
        instance(conn, row["instance_id"])["status_reason"]
        == "process 777 killed by SIGKILL"
    )
    assert again["outcome"] == "already_crashed"
    assert (
        decision(conn, machine_id)["attempt"] == 1
    )  # the second report counted nothing
    assert never == {"instance_id": None, "outcome": "never_registered"}
    assert decision(conn, machine_id, "terminal3")["action"] == "restart"


def test_crash_notifies_the_machine_channel_only(dsn, conn, machine_id):
    other_machine = uuid.uuid4()
    row = register(conn, machine_id)
    other = register(conn, other_machine)

    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN pglive_{machine_id.hex}")
        conn.execute(
            "SELECT pglive.mark_terminal_crashed(%s, 'x')", (other["instance_id"],)
        )
        conn.execute(
            "SELECT pglive.mark_terminal_crashed(%s, 'kill -9')", (row["instance_id"],)
        )
        received = [
            json.loads(n.payload) for n in listener.notifies(timeout=5, stop_after=1)
        ]

    assert len(received) == 1
    assert received[0]["event"] == "crashed"
    assert received[0]["instance_id"] == str(row["instance_id"])
    assert received[0]["machine_id"] == str(machine_id)
    assert received[0]["terminal_type"] == "terminal2"
    assert received[0]["reason"] == "kill -9"


def test_degradation_recovery_and_give_up_notify(dsn, conn, machine_id):
    conn.execute(
        "SELECT pglive.set_machine_setting(%s, 'max_restart_attempts', 0)",
        (machine_id,),
    )
    row = register(conn, machine_id)
    heartbeat(conn, row, commands=5, errors=5)

    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN pglive_{machine_id.hex}")
        conn.execute("SELECT * FROM pglive.sweep(NULL, %s)", (machine_id,))
        heartbeat(conn, row, commands=200)
        conn.execute("SELECT * FROM pglive.sweep(NULL, %s)", (machine_id,))
        conn.execute(
            "SELECT pglive.mark_terminal_crashed(%s, 'x')", (row["instance_id"],)
        )
        events = [
            json.loads(n.payload)["event"]
            for n in listener.notifies(timeout=5, stop_after=4)
        ]

    assert events == ["degraded", "recovered", "crashed", "gave_up"]


def test_settings_reject_unknown_keys_and_out_of_range_values(conn, machine_id):
    with pytest.raises(
        pg_errors.InvalidParameterValue, match='unknown pglive setting "nope"'
    ):
        conn.execute("SELECT pglive.set_machine_setting(%s, 'nope', 1)", (machine_id,))
    with pytest.raises(pg_errors.InvalidParameterValue, match="out of range"):
        conn.execute(
            "SELECT pglive.set_machine_setting(%s, 'degraded_error_rate', 2)",
            (machine_id,),
        )
    with pytest.raises(pg_errors.InvalidParameterValue, match="global"):
        conn.execute(
            "SELECT pglive.set_machine_setting(%s, 'sweep_interval_seconds', 2)",
            (machine_id,),
        )


def test_views_show_active_terminals_and_the_summary(conn, machine_id):
    row = register(conn, machine_id, "terminal1")
    heartbeat(conn, row, commands=9, errors=1)
    crashed = register(conn, machine_id, "terminal3")
    conn.execute(
        "SELECT pglive.mark_terminal_crashed(%s, 'x')", (crashed["instance_id"],)
    )
    register(conn, machine_id, "terminal3")

    active = conn.execute(
        "SELECT terminal_type, status, uptime_seconds, seconds_since_heartbeat "
        "FROM active_terminals WHERE machine_id = %s ORDER BY terminal_type",
        (machine_id,),
    ).fetchall()
    summary = {
        s["terminal_type"]: s
        for s in conn.execute(
            "SELECT * FROM terminal_health_summary WHERE machine_id = %s", (machine_id,)
        ).fetchall()
    }

    assert [(a["terminal_type"], a["status"]) for a in active] == [
        ("terminal1", "healthy"),
        ("terminal3", "starting"),
    ]
    assert all(
        a["uptime_seconds"] >= 0 and a["seconds_since_heartbeat"] >= 0 for a in active
    )
    assert summary["terminal1"]["error_rate_pct"] == 10
    assert summary["terminal1"]["commands"] == 9
    assert (summary["terminal3"]["crashes"], summary["terminal3"]["restarts"]) == (1, 1)


@pytest.fixture
def role_conn(dsn, conn):
    """A connection whose role is one of pglive's group roles (SET ROLE)."""
    connections = []

    def connect(role: str):
        connection = psycopg.connect(dsn, autocommit=True, row_factory=dict_row)
        connection.execute(f"SET ROLE {role}")
        connections.append(connection)
        return connection

    yield connect
    for connection in connections:
        connection.close()


def test_terminal_role_may_register_and_beat_but_not_write_tables(
    role_conn, machine_id
):
    terminal = role_conn("pglive_terminal")
    row = register(terminal, machine_id)
    assert heartbeat(terminal, row) == "healthy"

    for statement in (
        "UPDATE pglive.terminal_instances SET status = 'healthy'",
        "SELECT * FROM pglive.terminal_instances",
        "DELETE FROM pglive.terminal_health_history",
    ):
        with pytest.raises(pg_errors.InsufficientPrivilege, match="permission denied"):
            terminal.execute(statement)
    with pytest.raises(pg_errors.InsufficientPrivilege):
        terminal.execute(
            "SELECT pglive.mark_terminal_crashed(%s, 'x')", (row["instance_id"],)
        )


def test_operator_role_reads_views_but_writes_nothing(role_conn, conn, machine_id):
    register(conn, machine_id)
    operator = role_conn("pglive_operator")

    assert operator.execute(
        "SELECT count(*) AS n FROM pglive.active_terminals WHERE machine_id = %s",
        (machine_id,),
    ).fetchone() == {"n": 1}
    operator.execute("SELECT * FROM pglive.terminal_health_summary LIMIT 1")
    with pytest.raises(pg_errors.InsufficientPrivilege):
        operator.execute("SELECT token_hash FROM pglive.terminal_instances")
    with pytest.raises(pg_errors.InsufficientPrivilege):
        operator.execute("UPDATE pglive.settings SET value = 1")
    with pytest.raises(pg_errors.InsufficientPrivilege):
        register(operator, uuid.uuid4())


def test_launcher_role_reports_exits_and_reads_decisions(role_conn, conn, machine_id):
    launcher = role_conn("pglive_launcher")
    row = register(conn, machine_id, pid=31)

    launcher.execute(
        "SELECT * FROM pglive.report_process_exit(%s, 'terminal2', 31, 'ald-01', now() - "
        "interval '1 minute', 1, NULL)",
        (machine_id,),
    )

    assert instance(conn, row["instance_id"])["status"] == "crashed"
    assert decision(launcher, machine_id)["action"] == "restart"
    with pytest.raises(pg_errors.InsufficientPrivilege):
        launcher.execute("DELETE FROM pglive.recovery_state")


def test_fenced_instance_cannot_claim_work(conn, machine_id):
    row = register(conn, machine_id)
    claim = "SELECT pglive.lock_active_instance(%s, %s) AS ok"

    assert conn.execute(claim, (row["instance_id"], row["token"])).fetchone() == {
        "ok": True
    }
    assert conn.execute(claim, (row["instance_id"], "wrong")).fetchone() == {
        "ok": False
    }
    conn.execute("SELECT pglive.mark_terminal_crashed(%s, 'x')", (row["instance_id"],))
    assert conn.execute(claim, (row["instance_id"], row["token"])).fetchone() == {
        "ok": False
    }


def test_claim_lock_holds_off_a_concurrent_crash(dsn, conn, machine_id):
    row = register(conn, machine_id)

    with (
        psycopg.connect(dsn) as claimer,
        psycopg.connect(dsn, autocommit=True) as sweeper,
    ):
        claimer.execute(
            "SELECT pglive.lock_active_instance(%s, %s)",
            (row["instance_id"], row["token"]),
        )
        sweeper.execute("SET lock_timeout = '200ms'")
        with pytest.raises(pg_errors.LockNotAvailable):
            sweeper.execute(
                "SELECT pglive.mark_terminal_crashed(%s, 'x')", (row["instance_id"],)
            )
        claimer.commit()


@pytest.fixture
def login_as(dsn, conn):
    """Connect as a fresh login role that is a member of one pglive group role."""
    created: list[str] = []
    connections = []

    def connect(group: str):
        name = f"pglive_test_{uuid.uuid4().hex[:8]}"
        conn.execute(f"CREATE ROLE {name} LOGIN IN ROLE {group}")
        created.append(name)
        info = psycopg.conninfo.conninfo_to_dict(dsn) | {"user": name}
        connection = psycopg.connect(
            psycopg.conninfo.make_conninfo(**info),
            autocommit=True,
            row_factory=dict_row,
        )
        connections.append(connection)
        return connection

    yield connect
    for connection in connections:
        connection.close()
    for name in created:
        conn.execute(f"DROP ROLE {name}")


def test_only_a_superuser_may_move_the_clock_of_a_sweep(login_as, conn, machine_id):
    launcher = login_as("pglive_launcher")
    row = register(conn, machine_id)

    with pytest.raises(pg_errors.InsufficientPrivilege, match="only a superuser"):
        launcher.execute(
            "SELECT * FROM pglive.sweep(now() + interval '1 day', %s)", (machine_id,)
        )
    launcher.execute("SELECT * FROM pglive.sweep(NULL, %s)", (machine_id,))

    assert instance(conn, row["instance_id"])["status"] == "starting"


def test_a_terminal_role_cannot_take_the_launcher_slot(login_as, machine_id):
    terminal = login_as("pglive_terminal")
    launcher = login_as("pglive_launcher")

    with pytest.raises(pg_errors.InsufficientPrivilege, match="needs pglive_launcher"):
        register(terminal, machine_id, "launcher")
    register(launcher, machine_id, "launcher")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("max_restart_attempts", 2.7, "must be a whole number"),
        ("recovered_error_rate", 0.5, "above degraded_error_rate"),
        ("degraded_error_rate", 0.05, "above degraded_error_rate"),
    ],
)
def test_settings_that_make_no_sense_are_refused(
    conn, machine_id, key, value, expected
):
    with pytest.raises(pg_errors.InvalidParameterValue, match=expected):
        conn.execute(
            "SELECT pglive.set_machine_setting(%s, %s, %s::numeric)",
            (machine_id, key, value),
        )


def test_a_machine_setting_needs_a_machine(conn):
    with pytest.raises(
        pg_errors.InvalidParameterValue, match="a machine id is required"
    ):
        conn.execute(
            "SELECT pglive.set_machine_setting(NULL, 'heartbeat_timeout_seconds', 20)"
        )


def test_reset_recovery_wakes_the_launcher(dsn, conn, machine_id):
    row = register(conn, machine_id)
    conn.execute("SELECT pglive.mark_terminal_crashed(%s, 'x')", (row["instance_id"],))

    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN pglive_{machine_id.hex}")
        conn.execute("SELECT pglive.reset_recovery(%s, 'terminal2')", (machine_id,))
        events = [
            json.loads(n.payload) for n in listener.notifies(timeout=5, stop_after=1)
        ]

    assert [(e["event"], e["terminal_type"]) for e in events] == [
        ("reset", "terminal2")
    ]


def test_a_process_that_could_not_start_is_a_failed_start(conn, machine_id):
    outcome = conn.execute(
        "SELECT * FROM pglive.report_process_exit(%s, 'terminal1', NULL, 'h', now(), NULL, "
        "NULL, 'working directory /nowhere does not exist')",
        (machine_id,),
    ).fetchone()

    assert outcome["outcome"] == "never_started"
    state = conn.execute(
        "SELECT attempts, last_failure_reason FROM pglive.recovery_state "
        "WHERE machine_id = %s",
        (machine_id,),
    ).fetchone()
    assert state == {
        "attempts": 1,
        "last_failure_reason": "could not be started: working directory /nowhere does "
        "not exist",
    }
