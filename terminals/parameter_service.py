"""terminal3, the parameter service: queued setpoint writes, checked, written, verified.

    python -m terminals.parameter_service [--machine-id ID] [--log-file PATH] ...

A row in ald.parameter_commands (name, value, requested_by) is claimed, checked against
the register map (known, writable, within min/max), written to the PLC and read back.
It ends done (with the value written and the value read back) or failed with the
reason. A refused request never reaches the PLC. --demo queues two requests at start:
one in range (done) and one above the maximum (refused).
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from pglive import TerminalRegistry
from terminals import service
from terminals.plc.client import PlcClient, PlcError
from terminals.plc.regmap import RegisterMap, RegisterValueError

logger = logging.getLogger(__name__)


async def work(registry: TerminalRegistry, context: service.ServiceContext) -> None:
    plc = context.plc_client()
    retry = service.Retry()
    demo_queued = False
    try:
        while True:
            try:
                conn = await service.connect(registry, "parameter commands")
            except psycopg.OperationalError as exc:
                logger.warning(
                    "%s: database unreachable (%s), retrying in %.1fs (not fatal)",
                    registry.name,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else exc,
                    retry.next_delay_hint(),
                )
                await retry.sleep()
                continue

            try:
                async with conn:
                    await conn.execute(service.query("listen_parameter_commands"))
                    await _fail_orphans(conn, registry)
                    if context.demo and not demo_queued:
                        await _queue_demo(conn, registry)
                        demo_queued = True
                    retry.reset()
                    await _serve(conn, registry, plc, context.plc_map.reactor)
            except psycopg.OperationalError as exc:
                logger.warning(
                    "%s: database connection lost (%s), reconnecting in %.1fs",
                    registry.name,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else exc,
                    retry.next_delay_hint(),
                )
                await retry.sleep()
    finally:
        plc.close()


async def _serve(
    conn: psycopg.AsyncConnection[Any],
    registry: TerminalRegistry,
    plc: PlcClient,
    reactor: RegisterMap,
) -> None:
    """Drain the queue, then sleep until a NOTIFY or the next poll."""
    while True:
        while True:
            cursor = await conn.execute(
                service.query("claim_parameter_command"), service.fencing(registry)
            )
            command = await cursor.fetchone()
            if command is None:
                break
            await _execute(conn, registry, plc, reactor, command)
        await service.wait_for_notification(conn, service.POLL_INTERVAL_SECONDS)


async def _execute(
    conn: psycopg.AsyncConnection[Any],
    registry: TerminalRegistry,
    plc: PlcClient,
    reactor: RegisterMap,
    command: dict[str, Any],
) -> None:
    name, value, command_id = command["name"], command["value"], command["id"]

    try:
        register = reactor[name]
        target = register.check_write(value)
    except RegisterValueError as exc:
        # The request is wrong, not the service: this counts as work done.
        registry.increment_commands()
        logger.warning(
            "%s: parameter command %d from %s refused, not sent to the PLC: %s",
            registry.name,
            command_id,
            command["requested_by"],
            exc,
        )
        await _finish(conn, registry, command_id, "failed", f"refused: {exc}")
        return

    written = None
    try:
        written = await plc.write(name, target)
        read_back = await plc.read(name)
    except PlcError as exc:
        if written is None:
            reason = f"PLC error, not written: {exc}"
        else:
            reason = f"PLC error: written, but the read-back failed: {exc}"
        registry.record_error(f"parameter {name}: {exc}")
        logger.warning(
            "%s: parameter command %d (%s = %s) failed: %s",
            registry.name,
            command_id,
            name,
            value,
            reason,
        )
        await _finish(conn, registry, command_id, "failed", reason, written)
        return

    if not register.same_value(written, read_back):
        message = (
            f"read back {read_back} {register.unit} after writing {written}"
            f" {register.unit}"
        )
        registry.record_error(f"parameter {name}: {message}")
        logger.warning(
            "%s: parameter command %d (%s) not confirmed: %s",
            registry.name,
            command_id,
            name,
            message,
        )
        await _finish(conn, registry, command_id, "failed", message, written, read_back)
        return

    registry.increment_commands()
    logger.info(
        "%s: %s set to %s %s (command %d from %s, read back %s)",
        registry.name,
        name,
        written,
        register.unit,
        command_id,
        command["requested_by"],
        read_back,
    )
    await _finish(conn, registry, command_id, "done", None, written, read_back)


async def _finish(
    conn: psycopg.AsyncConnection[Any],
    registry: TerminalRegistry,
    command_id: int,
    status: str,
    error: str | None,
    written_value: Any = None,
    read_back: Any = None,
) -> None:
    await conn.execute(
        service.query("finish_parameter_command"),
        {
            "id": command_id,
            "instance_id": registry.instance_id,
            "status": status,
            "error": error,
            "written_value": None if written_value is None else float(written_value),
            "read_back": None if read_back is None else float(read_back),
        },
    )


DEMO_REQUESTS = (("heater_setpoint", 180.0), ("heater_setpoint", 900.0))


async def _queue_demo(
    conn: psycopg.AsyncConnection[Any], registry: TerminalRegistry
) -> None:
    for name, value in DEMO_REQUESTS:
        await conn.execute(
            service.query("queue_parameter_command"),
            {
                "machine_id": registry.machine_id,
                "name": name,
                "value": value,
                "requested_by": f"{registry.terminal_type} --demo",
            },
        )
    logger.info(
        "%s: demo parameter requests queued (one will be refused)", registry.name
    )


async def _fail_orphans(
    conn: psycopg.AsyncConnection[Any], registry: TerminalRegistry
) -> None:
    cursor = await conn.execute(
        service.query("fail_orphaned_parameter_commands"), service.fencing(registry)
    )
    for row in await cursor.fetchall():
        logger.warning(
            "%s: parameter command %d (%s) was claimed by instance %s and never"
            " confirmed: marked failed, check the PLC value",
            registry.name,
            row["id"],
            row["name"],
            row["claimed_by"],
        )


main = service.service_command(
    "terminal3",
    "terminal3: apply queued parameter writes to the PLC, verified by read-back.",
    work,
)

if __name__ == "__main__":
    # Run the imported module, not this __main__ copy, so log lines carry the real
    # logger name (terminals.parameter_service) instead of __main__.
    from terminals.parameter_service import main as imported_main

    imported_main()
