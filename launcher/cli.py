"""``pglive-launcher``: the command line of the per-machine launcher."""

from __future__ import annotations

import asyncio
import logging
import sys

import click
import psycopg
import psycopg_pool

from launcher import config as launcher_config
from launcher.supervisor import Launcher, Settings
from pglive import db, errors, identity
from pglive.runner import LOG_FORMAT


class BadConfiguration(click.ClickException):
    """A bad config file, flag or setting: one line, exit 2 (like a usage error)."""

    exit_code = 2


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="TOML file listing this machine's terminals.",
)
@click.option(
    "--machine-id", help="This machine's UUID (default: MACHINE_ID, /etc/machine-id)."
)
@click.option(
    "--check-interval",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds between reconciliations with the database.",
)
@click.option(
    "--heartbeat-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=1.0),
    help="Seconds without heartbeat before the sweep marks a terminal of this machine crashed.",
)
@click.option(
    "--no-auto-recovery",
    is_flag=True,
    help="Monitor and report only: never restart or end a terminal.",
)
@click.option(
    "--restart-delay",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Delay before restart attempt 1 (attempts 2 and 3 wait 3x and 6x as long).",
)
@click.option(
    "--dsn", help="PostgreSQL DSN (default: PGLIVE_DSN, else the embedded cluster)."
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
def main(
    config_path: str,
    machine_id: str | None,
    check_interval: float,
    heartbeat_timeout: float,
    no_auto_recovery: bool,
    restart_delay: float,
    dsn: str | None,
    log_level: str,
) -> None:
    """Start this machine's terminals, watch them, and restart them as pglive decides."""
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    # The pool warns at every failed reconnect; the launcher says once that the database
    # is unreachable, and once that it is back.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    try:
        config = launcher_config.load(config_path)
        config.check_heartbeat_timeout(heartbeat_timeout)
        settings = Settings(
            machine_id=identity.machine_id(machine_id or config.machine_id),
            dsn=db.check_dsn(db.resolve_dsn(dsn)),
            check_interval=check_interval,
            heartbeat_timeout=heartbeat_timeout,
            auto_recovery=not no_auto_recovery,
            restart_delay=restart_delay,
        )
        exit_code = asyncio.run(Launcher(config, settings).run())
    except errors.ConfigurationError as error:
        raise BadConfiguration(str(error)) from None
    except errors.PgliveError as error:
        raise click.ClickException(str(error)) from None
    except psycopg_pool.PoolTimeout:
        raise click.ClickException(
            f"cannot connect to PostgreSQL within 30s: {db.connection_problem(settings.dsn)}"
        ) from None
    except psycopg.Error as error:
        raise click.ClickException(
            f"database error: {errors.describe_connection_error(error)}"
        ) from None
    sys.exit(exit_code)
