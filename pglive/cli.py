"""The ``pglive`` command: migrate, the embedded cluster, status, history and repairs.

Every command that talks to PostgreSQL takes ``--dsn``, else ``$PGLIVE_DSN``, else the
embedded cluster of ``$PGLIVE_HOME``. Failures print one ``Error:`` line and exit 1, or 2
for a bad argument or setting; no traceback and no password ever reaches the terminal.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import click
import psycopg

from pglive import db, errors, identity, migrate, status
from pglive.embedded import EmbeddedCluster

DEFAULT_WATCH_SECONDS = 2.0
EXIT_NOT_RUNNING = 3  # what `pg_ctl status` returns for a stopped server

# The PLC simulator lives in another package, written separately: it is imported only when
# `pglive plc-sim` runs, so a broken or missing simulator never breaks the other commands.
PLC_SIM_COMMAND = "plc-sim"
PLC_SIM_MODULE = "terminals.plc.simulator"


class ConfigurationProblem(click.ClickException):
    """A bad argument or setting found after parsing: one line, exit 2 like a usage error."""

    exit_code = 2


class PgliveGroup(click.Group):
    """The top-level group: the boundary where pglive and psycopg errors become one line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except errors.ConfigurationError as error:
            raise ConfigurationProblem(_one_line(error)) from None
        except errors.PgliveError as error:
            raise click.ClickException(_one_line(error)) from None
        except psycopg.Error as error:
            raise click.ClickException(describe_database_error(error)) from None
        except subprocess.CalledProcessError as error:
            raise click.ClickException(describe_failed_command(error)) from None
        except BrokenPipeError:
            raise
        except OSError as error:
            raise click.ClickException(_one_line(error)) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        if _plc_sim_available():
            names = sorted([*names, PLC_SIM_COMMAND])
        return names

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == PLC_SIM_COMMAND and _plc_sim_available():
            return _load_plc_sim()
        return super().get_command(ctx, cmd_name)


def _plc_sim_available() -> bool:
    try:
        return importlib.util.find_spec(PLC_SIM_MODULE) is not None
    except ImportError:  # the parent package `terminals` is missing
        return False


def _load_plc_sim() -> click.Command:
    try:
        from terminals.plc.simulator import plc_sim_cli
    except ImportError as error:
        raise click.ClickException(
            f"{PLC_SIM_COMMAND} is unavailable: {error}"
        ) from None
    return plc_sim_cli


def _one_line(error: BaseException) -> str:
    return errors.redact(status.one_line(str(error)) or type(error).__name__)


def describe_database_error(error: psycopg.Error) -> str:
    """One line for a database error that means nothing more specific to pglive."""
    primary = error.diag.message_primary if error.diag else None
    text = primary or str(error)
    code = f" (SQLSTATE {error.sqlstate})" if error.sqlstate else ""
    return f"database error: {errors.redact(status.one_line(text))}{code}"


def describe_failed_command(error: subprocess.CalledProcessError) -> str:
    output = error.stderr or error.stdout or ""
    last_line = output.strip().splitlines()[-1:] if isinstance(output, str) else []
    command = " ".join(str(part) for part in error.cmd)
    detail = f": {last_line[0]}" if last_line else ""
    return errors.redact(f"{command} failed (exit {error.returncode}){detail}")


# --- options shared by the commands ---------------------------------------------------


def dsn_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--dsn",
        metavar="DSN",
        default=None,
        help="PostgreSQL to use; else $PGLIVE_DSN, else the embedded cluster.",
    )(command)


def _parse_machine_id(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return identity.parse_machine_id(value)
    except errors.ConfigurationError as error:
        raise click.BadParameter(str(error)) from None


def machine_id_option(help_text: str) -> Callable[..., Any]:
    return click.option(
        "--machine-id",
        metavar="UUID",
        default=None,
        callback=_parse_machine_id,
        help=help_text,
    )


def this_machine(explicit: uuid.UUID | None) -> uuid.UUID:
    """``--machine-id``, else ``$MACHINE_ID``, else the one derived from /etc/machine-id."""
    try:
        return identity.machine_id(explicit)
    except identity.InvalidMachineIdError:
        if explicit is None and os.environ.get("MACHINE_ID"):
            raise identity.InvalidMachineIdError(
                f"MACHINE_ID={os.environ['MACHINE_ID']!r} is not a UUID"
            ) from None
        raise


def _require_text(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value.strip():
        raise click.BadParameter("must not be empty")
    return value.strip()


# --- database access --------------------------------------------------------------------


@contextlib.contextmanager
def connected(dsn: str | None) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    with db.connect(db.resolve_dsn(dsn), application_name="pglive cli") as conn:
        yield conn


def fetch_all(conn: psycopg.Connection, name: str, **params: Any) -> list[dict]:
    with db.translated_errors():
        return conn.execute(db.query(name), params).fetchall()


def fetch_one(conn: psycopg.Connection, name: str, **params: Any) -> dict | None:
    with db.translated_errors():
        return conn.execute(db.query(name), params).fetchone()


def stdout_is_colour_terminal() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


# --- the commands -----------------------------------------------------------------------


@click.group(cls=PgliveGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="warning",
    show_default=True,
    envvar="PGLIVE_LOG_LEVEL",
    help="Log level for messages on stderr (also $PGLIVE_LOG_LEVEL).",
)
@click.version_option(package_name="pglive")
@click.pass_context
def cli(ctx: click.Context, log_level: str) -> None:
    """Liveness of long-running terminals, with PostgreSQL as the control plane."""
    # plc-sim sets up logging with its own --log-level, which logging.basicConfig would
    # ignore if the root logger already had a handler.
    if ctx.invoked_subcommand == PLC_SIM_COMMAND:
        return

    from pglive.runner import configure_logging

    configure_logging(level=log_level.upper())


@cli.command("migrate")
@dsn_option
def migrate_command(dsn: str | None) -> None:
    """Apply the SQL migrations not yet applied (under an advisory lock)."""
    applied = migrate.migrate(db.resolve_dsn(dsn))

    click.echo(migration_summary(applied))


def migration_summary(applied: list[str]) -> str:
    if not applied:
        return "schema is up to date"
    return "applied " + ", ".join(applied)


@cli.command("status")
@dsn_option
@machine_id_option(
    "Machine to show (default: this one: $MACHINE_ID or /etc/machine-id)."
)
@click.option("--all", "all_machines", is_flag=True, help="Show every machine.")
@click.option(
    "--watch",
    "watch_seconds",
    type=click.FloatRange(min=0.1),
    is_flag=False,
    flag_value=DEFAULT_WATCH_SECONDS,
    default=None,
    metavar="[SECONDS]",
    help=f"Refresh every SECONDS (default {DEFAULT_WATCH_SECONDS:g}) until Ctrl-C.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as a JSON list.")
def status_command(
    dsn: str | None,
    machine_id: uuid.UUID | None,
    all_machines: bool,
    watch_seconds: float | None,
    as_json: bool,
) -> None:
    """Show the newest instance of every terminal, like `kubectl get pods`.

    The table leaves out the launcher's own instance and shows it as a line below; --json
    prints every row of view pglive.terminal_status, the launcher's included.
    """
    if all_machines and machine_id is not None:
        raise click.UsageError("--all and --machine-id exclude each other")
    if as_json and watch_seconds is not None:
        raise click.UsageError("--json and --watch exclude each other")

    scope = None if all_machines else this_machine(machine_id)
    resolved_dsn = db.resolve_dsn(dsn)

    if as_json:
        click.echo(status.to_json(fetch_status(resolved_dsn, scope)[0]))
    elif watch_seconds is None:
        click.echo(render_status(resolved_dsn, scope))
    else:
        watch(lambda: render_status(resolved_dsn, scope), watch_seconds)


def fetch_status(
    dsn: str, machine_id: uuid.UUID | None
) -> tuple[list[dict], list[dict]]:
    """The rows of views terminal_status and launchers for one machine, or all."""
    with db.connect(dsn, application_name="pglive status") as conn:
        rows = fetch_all(conn, "terminal_status", machine_id=machine_id)
        launchers = fetch_all(conn, "cli_launchers", machine_id=machine_id)
    return rows, launchers


def render_status(dsn: str, machine_id: uuid.UUID | None) -> str:
    rows, launchers = fetch_status(dsn, machine_id)

    return status.status_report(
        rows, launchers, machine_id, colour=stdout_is_colour_terminal()
    )


def watch(render: Callable[[], str], interval: float) -> None:
    """Redraw ``render()`` every ``interval`` seconds until Ctrl-C, like watch(1).

    The first frame fails like the plain command (a bad DSN ends it at once); later, a
    lost server is shown in the frame and retried, so a watch survives a restart.
    """
    frame = render()
    try:
        while True:
            show_frame(frame, interval)
            time.sleep(interval)
            frame = render_or_error(render)
    except KeyboardInterrupt:
        click.echo("")


def render_or_error(render: Callable[[], str]) -> str:
    try:
        return render()
    except errors.DatabaseUnavailableError as error:
        return f"Error: {_one_line(error)} (retrying)"


def show_frame(frame: str, interval: float) -> None:
    if sys.stdout.isatty():
        click.clear()
    else:
        click.echo("")
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S")
    click.echo(f"Every {interval:g}s: pglive status    {now}")
    click.echo("")
    click.echo(frame)


@cli.command("history")
@dsn_option
@click.argument("instance_id", type=click.UUID)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the changes as a JSON list."
)
def history_command(dsn: str | None, instance_id: uuid.UUID, as_json: bool) -> None:
    """Show the status changes of one instance, oldest first."""
    with connected(dsn) as conn:
        instance = fetch_one(conn, "cli_instance", instance_id=instance_id)
        if instance is None:
            raise errors.UnknownInstanceError(
                f"unknown terminal instance {instance_id}"
            )
        changes = fetch_all(conn, "instance_history", instance_id=instance_id)

    if as_json:
        click.echo(status.to_json(changes))
        return
    click.echo(status.instance_heading(instance))
    click.echo(status.history_table(changes))


@cli.command("crash")
@dsn_option
@click.argument("instance_id", type=click.UUID)
@click.option(
    "--reason",
    required=True,
    callback=_require_text,
    help="Why, for the history and the launcher's log.",
)
def crash_command(dsn: str | None, instance_id: uuid.UUID, reason: str) -> None:
    """Mark an active instance crashed, so that its launcher restarts it."""
    with connected(dsn) as conn:
        outcome = fetch_one(
            conn, "mark_terminal_crashed", instance_id=instance_id, reason=reason
        )["outcome"]

    if outcome == "crashed":
        click.echo(f"marked crashed: instance {instance_id}")
    else:
        was = outcome.removeprefix("already_")
        click.echo(f"instance {instance_id} is already {was}, nothing changed")


@cli.command("sweep")
@dsn_option
@machine_id_option("Sweep only this machine (default: every machine, as pg_cron does).")
def sweep_command(dsn: str | None, machine_id: uuid.UUID | None) -> None:
    """Run one sweep now: missed heartbeats, silent instances, error rates."""
    with connected(dsn) as conn:
        changes = fetch_all(conn, "sweep", machine_id=machine_id)

    if not changes:
        click.echo("sweep: nothing changed")
    for change in changes:
        click.echo(status.sweep_line(change))


@cli.command("reset-recovery")
@dsn_option
@machine_id_option("Machine of the terminal (default: this one).")
@click.argument("terminal_type")
def reset_recovery_command(
    dsn: str | None, machine_id: uuid.UUID | None, terminal_type: str
) -> None:
    """Forget a terminal's restart attempts and give-up (like systemctl reset-failed)."""
    machine = this_machine(machine_id)
    slot = {"machine_id": machine, "terminal_type": terminal_type}

    with connected(dsn) as conn:
        before = fetch_one(conn, "cli_recovery_decision", **slot)
        fetch_one(conn, "cli_reset_recovery", **slot)

    click.echo(status.reset_line(terminal_type, machine, before))


# --- the embedded cluster ---------------------------------------------------------------


@cli.group("db")
def db_group() -> None:
    """The embedded PostgreSQL cluster in $PGLIVE_HOME (default .pglive/)."""


@db_group.command("start")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the server to accept connections.",
)
def db_start_command(timeout: float) -> None:
    """Start the cluster (creating it on first use) and apply the migrations."""
    cluster = EmbeddedCluster()
    was_initialized = cluster.initialized()
    was_running = cluster.running()

    dsn = cluster.start(timeout=timeout)
    applied = migrate.migrate(dsn)

    where = f"data {cluster.layout.data_dir}, port {cluster.layout.port}"
    if not was_initialized:
        click.echo(f"created a PostgreSQL cluster in {cluster.layout.data_dir}")
    click.echo(
        f"PostgreSQL {'was already' if was_running else 'is now'} running ({where})"
    )
    click.echo(migration_summary(applied))
    click.echo(f"DSN: {dsn}")
    click.echo('psql: pglive db psql   (or: psql "$(pglive db dsn)")')


@db_group.command("stop")
def db_stop_command() -> None:
    """Stop the cluster (fast mode: open sessions are disconnected)."""
    cluster = EmbeddedCluster()

    if cluster.stop():
        click.echo(f"stopped PostgreSQL (data {cluster.layout.data_dir})")
    else:
        click.echo(f"PostgreSQL is not running (data {cluster.layout.data_dir})")


@db_group.command("status")
@click.pass_context
def db_status_command(ctx: click.Context) -> None:
    """Show where the cluster lives and whether it runs (exit 3 when it does not)."""
    details = EmbeddedCluster().status()

    for key, value in details.items():
        click.echo(f"{key + ':':<13}{value}")
    if not details["running"]:
        ctx.exit(EXIT_NOT_RUNNING)


@db_group.command("dsn")
def db_dsn_command() -> None:
    """Print the DSN only, for scripts: psql "$(pglive db dsn)"."""
    cluster = EmbeddedCluster()

    click.echo(cluster.dsn)
    if not cluster.running():
        click.echo(
            "note: the cluster is not running; start it with 'pglive db start'",
            err=True,
        )


@db_group.command(
    "psql",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.argument("psql_args", nargs=-1, type=click.UNPROCESSED)
def db_psql_command(psql_args: tuple[str, ...]) -> None:
    """Open psql on the embedded database; extra arguments go to psql."""
    cluster = EmbeddedCluster()
    if not cluster.running():
        raise click.ClickException(
            f"the embedded cluster in {cluster.layout.home} is not running: "
            "start it with 'pglive db start'"
        )

    command = [*cluster.psql_command(), *psql_args]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(command[0], command)


def main() -> None:
    cli(prog_name="pglive")
