"""Applies the numbered SQL files of ``sql/`` in order, once each, under an advisory lock."""

from __future__ import annotations

import importlib.resources
import logging
from dataclasses import dataclass
from pathlib import Path

import psycopg

from pglive import db, errors

logger = logging.getLogger(__name__)


def sql_directory() -> Path:
    """``pglive/sql`` in an installed wheel, ``sql/`` beside the package in a checkout."""
    packaged = Path(str(importlib.resources.files("pglive"))) / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "sql"


@dataclass(frozen=True)
class Migration:
    name: str
    path: Path


def migrations() -> list[Migration]:
    files = sorted(sql_directory().glob("[0-9][0-9][0-9][0-9]_*.sql"))
    return [Migration(name=path.stem, path=path) for path in files]


def migrate(dsn: str) -> list[str]:
    """Apply every migration not yet applied; return the names applied.

    Each file runs in a transaction of its own, which first takes a transaction-level
    advisory lock: a second migrator waits, then finds the file recorded and skips it.
    """
    applied_now = []
    with db.connect(dsn, application_name="pglive migrate", autocommit=False) as conn:
        for migration in migrations():
            with conn.transaction():
                conn.execute(db.query("migration_lock"))
                if _already_applied(conn, migration.name):
                    continue
                logger.info("applying migration %s", migration.name)
                try:
                    conn.execute(migration.path.read_text())
                except psycopg.Error as error:
                    raise MigrationError(migration.name, error) from error
                conn.execute(db.query("record_migration"), {"name": migration.name})
                applied_now.append(migration.name)
    return applied_now


def _already_applied(conn: psycopg.Connection, name: str) -> bool:
    exists = conn.execute(db.query("migration_table_exists")).fetchone()
    if not next(iter(exists.values())):
        return False
    rows = conn.execute(db.query("applied_migrations")).fetchall()
    return name in {row["name"] for row in rows}


class MigrationError(errors.PgliveError):
    def __init__(self, name: str, error: psycopg.Error) -> None:
        primary = error.diag.message_primary if error.diag else str(error)
        super().__init__(
            f"migration {name} failed: {primary} (SQLSTATE {error.sqlstate})"
        )
        self.name = name
