"""The claiming statements themselves: fenced by pglive.lock_active_instance()."""

from __future__ import annotations

import secrets
import uuid

import pytest
from psycopg import sql

from pglive import db
from terminals import service


@pytest.mark.parametrize(
    ("table", "query", "insert"),
    [
        (
            "parameter_commands",
            "claim_parameter_command",
            "INSERT INTO {} (machine_id, name, value)"
            " VALUES (%s, 'heater_setpoint', 180) RETURNING id",
        ),
        (
            "recipe_commands",
            "claim_recipe_command",
            "INSERT INTO {} (machine_id, command) VALUES (%s, 'abort') RETURNING id",
        ),
    ],
)
def test_an_unknown_or_inactive_instance_claims_nothing(
    conn, machine_id, table, query, insert
):
    qualified = sql.Identifier("ald", table)
    command_id = conn.execute(
        sql.SQL(insert).format(qualified), (machine_id,)
    ).fetchone()["id"]

    claimed = conn.execute(
        service.query(query),
        {
            "machine_id": machine_id,
            "instance_id": uuid.uuid4(),
            "token": secrets.token_hex(16),
        },
    ).fetchone()

    assert claimed is None
    row = conn.execute(
        sql.SQL("SELECT status, claimed_by FROM {} WHERE id = %s").format(qualified),
        (command_id,),
    ).fetchone()
    assert (row["status"], row["claimed_by"]) == ("queued", None)


def test_every_query_in_the_file_is_named_and_not_empty():
    queries = db.queries("terminals")

    assert "claim_parameter_command" in queries
    assert all(text.strip() for text in queries.values())
    assert all(
        "pglive.lock_active_instance" in queries[name]
        for name in (
            "claim_parameter_command",
            "claim_recipe_command",
            "fail_orphaned_parameter_commands",
            "interrupt_orphaned_runs",
        )
    )
