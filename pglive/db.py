"""The database boundary: DSN resolution, connections, named queries, error translation."""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import os
import re
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.conninfo
from psycopg.rows import dict_row

from pglive import errors

CONNECT_TIMEOUT_SECONDS = 5


@functools.cache
def queries(package: str = "pglive") -> dict[str, str]:
    """The named queries of ``queries.sql`` in ``package``, comment lines removed."""
    text = importlib.resources.files(package).joinpath("queries.sql").read_text()
    named: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if line.startswith("-- name:"):
            name = line.removeprefix("-- name:").strip()
            named[name] = ""
        elif name is not None and not line.lstrip().startswith("--"):
            named[name] += line + "\n"
    return {key: value.strip() for key, value in named.items()}


def query(name: str, package: str = "pglive") -> str:
    return queries(package)[name]


def resolve_dsn(dsn: str | None = None, *, start_embedded: bool = False) -> str:
    """The DSN to use: the argument, else ``PGLIVE_DSN``, else the embedded cluster's.

    The embedded cluster is started only when ``start_embedded`` is true; otherwise it must
    already be running.
    """
    if dsn:
        return dsn
    if os.environ.get("PGLIVE_DSN"):
        return os.environ["PGLIVE_DSN"]

    from pglive.embedded import EmbeddedCluster, default_home

    home = default_home()
    no_database = errors.DatabaseUnavailableError(
        f"no database: pass --dsn, set PGLIVE_DSN, or start the embedded one with "
        f"'pglive db start' (PGLIVE_HOME={home})"
    )
    if not start_embedded and not (home / "cluster.json").exists():
        raise no_database
    cluster = EmbeddedCluster(home)
    if start_embedded:
        return cluster.start()
    if not cluster.running():
        raise no_database
    return cluster.dsn


def _password_part(dsn: str) -> str:
    """The part of ``dsn`` a password may be in: after ``password=``, or a URL's userinfo."""
    keyword = re.search(r"password\s*=", dsn, flags=re.IGNORECASE)
    if keyword:
        return dsn[keyword.end() :]
    userinfo = re.search(r"://([^/@]*)@", dsn)
    return userinfo[1] if userinfo else ""


def check_dsn(dsn: str) -> str:
    """``dsn`` if libpq can parse it; ConfigurationError (without the DSN) if not."""
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as error:
        raise _connection_error(error, dsn) from None
    return dsn


def connection_problem(dsn: str) -> str:
    """Why a connection to ``dsn`` fails right now, in one line without secrets."""
    try:
        psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT_SECONDS).close()
    except psycopg.Error as error:
        return errors.describe_connection_error(error)
    return "it answers now"


def connect(
    dsn: str, *, application_name: str = "pglive", autocommit: bool = True
) -> psycopg.Connection[dict[str, Any]]:
    """A synchronous connection; connection failures become DatabaseUnavailableError."""
    try:
        return psycopg.connect(dsn, **_options(application_name, autocommit))
    except psycopg.Error as error:
        raise _connection_error(error, dsn) from None


async def connect_async(
    dsn: str, *, application_name: str = "pglive", autocommit: bool = True
) -> psycopg.AsyncConnection[dict[str, Any]]:
    try:
        return await psycopg.AsyncConnection.connect(
            dsn, **_options(application_name, autocommit)
        )
    except psycopg.Error as error:
        raise _connection_error(error, dsn) from None


def _options(application_name: str, autocommit: bool) -> dict[str, Any]:
    return {
        "autocommit": autocommit,
        "row_factory": dict_row,
        "application_name": application_name,
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
    }


def _connection_error(error: psycopg.Error, dsn: str) -> errors.PgliveError:
    """A bad DSN is a configuration error (retrying cannot help); the rest is an outage."""
    description = errors.describe_connection_error(error)
    if isinstance(error, psycopg.ProgrammingError):
        # libpq quotes the word it could not parse, which may be part of a password (an
        # unquoted one with spaces): hide a quoted word that comes from the password.
        secret = _password_part(dsn)
        description = re.sub(
            r'"([^"]*)"',
            lambda m: '"…"' if secret and m[1] and m[1] in secret else m[0],
            description,
        )
        return errors.ConfigurationError(f"invalid DSN: {description}")
    return errors.DatabaseUnavailableError(
        f"cannot connect to PostgreSQL: {description}"
    )


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """Re-raise database errors that mean something to pglive as pglive errors."""
    try:
        yield
    except psycopg.Error as error:
        translated = errors.translate(error)
        if translated is None:
            raise
        raise translated from error
