"""Exceptions of pglive. Each one's docstring is its default message."""

from __future__ import annotations

import re

import psycopg


class PgliveError(Exception):
    """pglive failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigurationError(PgliveError, ValueError):
    """An argument or setting of pglive is invalid."""


class EmbeddedClusterError(PgliveError):
    """The embedded PostgreSQL cluster could not be set up or started."""


class DatabaseUnavailableError(PgliveError):
    """PostgreSQL cannot be reached."""


class TerminalAlreadyRunningError(PgliveError):
    """Another instance of this terminal is already running on this machine."""


class TerminalFencedError(PgliveError):
    """This instance was declared crashed or stopped and replaced: it must stop acting."""


class UnknownInstanceError(PgliveError):
    """No terminal instance has that id."""


class InvalidTokenError(PgliveError):
    """The token does not belong to that terminal instance."""


class StatusTransitionError(PgliveError):
    """The status lifecycle does not allow that move."""


# Custom SQLSTATEs raised by sql/0002_functions.sql.
SQLSTATE_FENCED = "PL001"
SQLSTATE_INVALID_TOKEN = "PL002"
SQLSTATE_UNKNOWN_INSTANCE = "PL003"
SQLSTATE_FORBIDDEN_TRANSITION = "PL004"

_BY_SQLSTATE: dict[str, type[PgliveError]] = {
    SQLSTATE_FENCED: TerminalFencedError,
    SQLSTATE_INVALID_TOKEN: InvalidTokenError,
    SQLSTATE_UNKNOWN_INSTANCE: UnknownInstanceError,
    SQLSTATE_FORBIDDEN_TRANSITION: StatusTransitionError,
    "22023": ConfigurationError,
}


def translate(error: psycopg.Error) -> PgliveError | None:
    """The pglive error that a database error means, or None when it means none."""
    sqlstate = error.sqlstate
    primary = error.diag.message_primary if error.diag else None
    if sqlstate == "23505" and (
        error.diag.constraint_name == "terminal_instances_one_active_per_slot"
    ):
        return TerminalAlreadyRunningError(primary)
    if sqlstate in _BY_SQLSTATE:
        return _BY_SQLSTATE[sqlstate](primary)
    if isinstance(error, psycopg.OperationalError):
        return DatabaseUnavailableError(describe_connection_error(error))
    return None


_PASSWORD = re.compile(
    r"(password\s*=\s*)(\S+)|(://[^:/@\s]*:)([^@\s]*)(@)", re.IGNORECASE
)


def redact(text: str) -> str:
    """``text`` with any password of a DSN or URL in it replaced by ``***``."""
    return _PASSWORD.sub(lambda m: f"{m[1]}***" if m[1] else f"{m[3]}***{m[5]}", text)


def describe_connection_error(error: BaseException) -> str:
    """One line about a connection failure, with no password in it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    for prefix in ("connection is bad: ", "connection failed: "):
        text = text.removeprefix(prefix)
    return redact(text)
