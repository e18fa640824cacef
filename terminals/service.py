"""What the three ALD terminals share: command line, start-up checks, database access.

Each terminal is `python -m terminals.<module>` with the same options; values left out
come from the environment (MACHINE_ID, PGLIVE_ENVIRONMENT, PGLIVE_HEARTBEAT_INTERVAL,
PGLIVE_LOG_FILE, PGLIVE_DSN, and PLC_TYPE, PLC_HOST, PLC_PORT, PLC_UNIT, PLC_TIMEOUT for
the PLC; PLC_REGISTER_MAP names another register map file).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import click
import psycopg
from psycopg.rows import dict_row

from pglive import PgliveError, TerminalRegistry, configure_logging, db, run_terminal
from terminals.plc import regmap
from terminals.plc.client import PlcClient, PlcConfig, PlcConfigError

logger = logging.getLogger(__name__)

EXIT_USAGE = 2
# Polling is the fallback for a NOTIFY lost while disconnected; LISTEN does the waking.
POLL_INTERVAL_SECONDS = 2.0


@dataclass(frozen=True)
class ServiceContext:
    """Everything a terminal's work needs besides the registry."""

    plc_config: PlcConfig
    plc_map: regmap.PlcMap
    demo: bool

    def plc_client(self) -> PlcClient:
        return PlcClient(self.plc_config, self.plc_map.reactor)


Work = Callable[[TerminalRegistry, ServiceContext], Awaitable[None]]


def query(name: str) -> str:
    """A named block of terminals/queries.sql."""
    return db.query(name, package="terminals")


async def connect(
    registry: TerminalRegistry, purpose: str
) -> psycopg.AsyncConnection[dict[str, Any]]:
    """An autocommit connection of this terminal; transactions are explicit."""
    return await psycopg.AsyncConnection.connect(
        registry.dsn,
        autocommit=True,
        row_factory=dict_row,
        application_name=f"{registry.terminal_type} {purpose}"[:63],
        connect_timeout=5,
    )


def fencing(registry: TerminalRegistry) -> dict[str, Any]:
    """The parameters every claiming statement needs."""
    return {
        "machine_id": registry.machine_id,
        "instance_id": registry.instance_id,
        "token": registry.token,
    }


class Retry:
    """Capped exponential backoff with jitter for reconnecting to the database."""

    def __init__(self, first: float = 0.5, cap: float = 15.0) -> None:
        self.first = first
        self.cap = cap
        self.failures = 0

    async def sleep(self) -> float:
        delay = min(self.cap, self.first * 2**self.failures)
        delay *= random.uniform(0.8, 1.2)
        self.failures += 1
        await asyncio.sleep(delay)
        return delay

    def next_delay_hint(self) -> float:
        return min(self.cap, self.first * 2**self.failures)

    def reset(self) -> None:
        self.failures = 0


async def wait_for_notification(
    conn: psycopg.AsyncConnection[Any], timeout: float
) -> None:
    """Return on the first notification on a LISTENed channel, or after timeout."""
    async for _notify in conn.notifies(timeout=timeout, stop_after=1):
        break


def service_command(terminal_type: str, help_text: str, work: Work) -> click.Command:
    """The click command of one terminal, wired to pglive's registry and runner."""

    @click.command(help=help_text)
    @click.option(
        "--demo", is_flag=True, help="Set up demo work (see the terminal's help)."
    )
    @click.option(
        "--log-file",
        type=click.Path(dir_okay=False),
        default=None,
        help="Log file (default: PGLIVE_LOG_FILE; stderr always).",
    )
    @click.option(
        "--machine-id", default=None, help="Machine UUID (default: MACHINE_ID)."
    )
    @click.option(
        "--environment",
        default=None,
        help="production, development or testing (default: PGLIVE_ENVIRONMENT).",
    )
    @click.option(
        "--heartbeat-interval",
        type=float,
        default=None,
        help="Seconds between heartbeats (default: PGLIVE_HEARTBEAT_INTERVAL).",
    )
    @click.option("--dsn", default=None, help="PostgreSQL DSN (default: PGLIVE_DSN).")
    @click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning"]),
        default="info",
        show_default=True,
    )
    def command(
        demo: bool,
        log_file: str | None,
        machine_id: str | None,
        environment: str | None,
        heartbeat_interval: float | None,
        dsn: str | None,
        log_level: str,
    ) -> None:
        log_file = log_file or os.environ.get("PGLIVE_LOG_FILE") or None
        configure_logging(log_file, level=log_level.upper())
        # pymodbus logs every timeout at error level; our client reports failures,
        # one readable line each.
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

        try:
            context = ServiceContext(
                plc_config=PlcConfig.from_env(),
                plc_map=regmap.load(os.environ.get("PLC_REGISTER_MAP") or None),
                demo=demo,
            )
            registry = TerminalRegistry(
                terminal_type,
                machine_id=machine_id,
                environment=environment,
                heartbeat_interval=heartbeat_interval,
                log_file_path=log_file,
                dsn=dsn,
            )
        except (PlcConfigError, regmap.RegisterMapError, PgliveError) as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_USAGE)

        logger.info(
            "%s starting on machine %s, %s",
            terminal_type,
            registry.machine_id,
            context.plc_config.describe(),
        )
        sys.exit(run_terminal(registry, functools.partial(_run_work, work, context)))

    return command


async def _run_work(
    work: Work, context: ServiceContext, registry: TerminalRegistry
) -> None:
    await work(registry, context)
