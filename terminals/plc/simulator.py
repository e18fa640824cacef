"""Modbus TCP simulator of the ALD reactor PLC, with a fault switch for tests and demos.

    python -m terminals.plc.simulator --port 5020          # or: pglive plc-sim
    python -m terminals.plc.simulator fault silent --duration 10 --port 5020
    python -m terminals.plc.simulator status --port 5020

The reactor answers on every unit id except the control unit (247 in registers.toml).
The control unit is never faulted: its holding registers hold the fault switch (mode,
latency, duration), its input registers count the requests the reactor received, so
another process can inject a fault and check whether a write reached the PLC.

Fault modes, applied to every request to the reactor unit:
  none       answer normally
  silent     accept the request and never answer (the client times out)
  exception  answer with Modbus exception 4 (device failure)
  latency    answer after the configured delay

pymodbus serves the protocol; the register contents live in our own RegisterImage and
are copied in and out by the device action on every request, so the reactor model and
the protocol side never disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from dataclasses import dataclass

import click
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from terminals.plc import regmap
from terminals.plc.client import PlcClient, PlcConfig, PlcError
from terminals.plc.physics import Reactor, RegisterImage

logger = logging.getLogger(__name__)

FAULT_MODES = ("none", "silent", "exception", "latency")
TICK_SECONDS = 0.1
# After a SIGSTOP the first tick may see a huge dt; the model stays stable below this.
MAX_STEP_SECONDS = 0.5
READY_LINE = "PLC simulator listening on {host}:{port}"

_FUNCTION_TABLES = {
    1: "coil",
    2: "discrete",
    3: "holding",
    4: "input",
    5: "coil",
    6: "holding",
    15: "coil",
    16: "holding",
    22: "holding",
    23: "holding",
}
_WRITE_FUNCTIONS = (5, 6, 15, 16, 22, 23)


@dataclass(frozen=True)
class Fault:
    mode: str = "none"
    latency_ms: int = 0
    until: float | None = None  # time.monotonic() when it clears; None: never

    def describe(self) -> str:
        if self.mode == "none":
            return "no fault"
        extra = f" {self.latency_ms} ms" if self.mode == "latency" else ""
        if self.until is None:
            return f"fault '{self.mode}'{extra} until cleared"
        remaining = max(self.until - time.monotonic(), 0.0)
        return f"fault '{self.mode}'{extra} for {remaining:.1f}s"


class FaultSwitch:
    """The fault the reactor unit currently suffers; clears itself when due."""

    def __init__(self) -> None:
        self.fault = Fault()
        self._held: set[asyncio.Task] = set()

    def set(self, mode: str, latency_ms: int = 0, duration: float = 0.0) -> None:
        until = time.monotonic() + duration if duration > 0 else None
        self.fault = Fault(mode=mode, latency_ms=latency_ms, until=until)
        logger.info("reactor unit: %s", self.fault.describe())
        if mode != "silent":
            self._release_held()

    def current(self) -> Fault:
        fault = self.fault
        if fault.until is not None and time.monotonic() >= fault.until:
            logger.info("reactor unit: fault '%s' expired, answering again", fault.mode)
            self.fault = Fault()
            self._release_held()
        return self.fault

    async def suffer(self) -> ExcCodes | None:
        """Apply the current fault to one request; returns an exception to answer."""
        fault = self.current()
        if fault.mode == "exception":
            return ExcCodes.DEVICE_FAILURE
        if fault.mode == "latency":
            await asyncio.sleep(fault.latency_ms / 1000)
        elif fault.mode == "silent":
            # Park the request until the fault clears, then cancel it: pymodbus sends
            # nothing for a cancelled request, exactly like a PLC that went dark.
            task = asyncio.current_task()
            if task is not None:
                self._held.add(task)
                try:
                    await asyncio.get_running_loop().create_future()
                finally:
                    self._held.discard(task)
        return None

    def _release_held(self) -> None:
        for task in list(self._held):
            task.cancel()
        self._held.clear()


class PlcSimulator:
    """The reactor model, the fault switch and the Modbus server around them."""

    def __init__(self, plc_map: regmap.PlcMap, seed: int | None = None) -> None:
        self.plc_map = plc_map
        self.image = RegisterImage(plc_map.reactor)
        self.reactor = Reactor(self.image, seed=seed)
        self.control = RegisterImage(plc_map.control)
        self.faults = FaultSwitch()
        self.read_requests = 0
        self.write_requests = 0
        self.port: int | None = None
        self._server: ModbusTcpServer | None = None
        self._ticker: asyncio.Task | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 5020) -> int:
        """Listen and start the reactor clock; returns the port (useful with 0)."""
        _check_can_listen(host, port)
        devices = [
            _sim_device(0, self.plc_map.reactor, self._reactor_action),
            _sim_device(
                self.plc_map.control_unit, self.plc_map.control, self._control_action
            ),
        ]
        self._server = ModbusTcpServer(devices, address=(host, port))
        try:
            await self._server.serve_forever(background=True)
        except RuntimeError:
            raise click.ClickException(
                f"cannot listen on {host}:{port} (see the log above)"
            ) from None
        self.port = self._server.transport.sockets[0].getsockname()[1]
        self._ticker = asyncio.create_task(self._tick_forever(), name="reactor-clock")
        return self.port

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        self.faults.set("none")
        if self._server is not None:
            await self._server.shutdown()

    async def _tick_forever(self) -> None:
        """Step the model on a fixed cadence; dt is measured, so it never drifts."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(TICK_SECONDS)
            now = time.monotonic()
            self.reactor.step(min(now - last, MAX_STEP_SECONDS))
            last = now
            self.faults.current()

    async def _reactor_action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current_registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if set_values is None and function_code in _WRITE_FUNCTIONS:
            # pymodbus reads the written registers back to build the answer to a
            # write; that is the same request, already counted and faulted.
            return _serve(
                self.image, function_code, address, count, current_registers, None
            )
        if set_values is None:
            self.read_requests = (self.read_requests + 1) & 0xFFFF
        else:
            self.write_requests = (self.write_requests + 1) & 0xFFFF
        self._publish_counters()

        refusal = await self.faults.suffer()
        if refusal is not None:
            return refusal
        return _serve(
            self.image, function_code, address, count, current_registers, set_values
        )

    async def _control_action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current_registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if set_values is None:
            self._publish_fault()
            return _serve(
                self.control, function_code, address, count, current_registers, None
            )

        refusal = _serve(
            self.control, function_code, address, count, current_registers, set_values
        )
        if refusal is not None:
            return refusal
        mode_number = int(self.control.get("fault_mode"))
        if not 0 <= mode_number < len(FAULT_MODES):
            self._publish_fault()
            return ExcCodes.ILLEGAL_VALUE
        self.faults.set(
            FAULT_MODES[mode_number],
            latency_ms=int(self.control.get("fault_latency")),
            duration=float(self.control.get("fault_duration")),
        )
        return None

    def _publish_counters(self) -> None:
        self.control.set("read_requests", self.read_requests)
        self.control.set("write_requests", self.write_requests)

    def _publish_fault(self) -> None:
        fault = self.faults.current()
        remaining = 0.0
        if fault.until is not None:
            remaining = max(fault.until - time.monotonic(), 0.1)
        self.control.set("fault_mode", FAULT_MODES.index(fault.mode))
        self.control.set("fault_latency", fault.latency_ms)
        self.control.set("fault_duration", remaining)
        self._publish_counters()


def _sim_device(unit: int, register_map: regmap.RegisterMap, action) -> SimDevice:
    """A pymodbus device with one block per table, at least as big as the map needs.

    The blocks only carry bytes to and from the wire; `_serve` fills them from the
    register image before every answer.
    """
    blocks = []
    for table in ("coil", "discrete", "holding", "input"):
        size = max(register_map.table_size(table), 1)
        if table in regmap.BIT_TABLES:
            block = SimData(0, values=[False] * size, datatype=DataType.BITS)
        else:
            block = SimData(0, count=size, values=0, datatype=DataType.REGISTERS)
        blocks.append([block])
    return SimDevice(unit, simdata=tuple(blocks), action=action)


def _serve(
    image: RegisterImage,
    function_code: int,
    address: int,
    count: int,
    current_registers: list[int],
    set_values: list[int] | list[bool] | None,
) -> ExcCodes | None:
    """Apply a write to the image, or copy the image out for a read."""
    table = _FUNCTION_TABLES.get(function_code)
    if table is None:
        return ExcCodes.ILLEGAL_FUNCTION
    is_bits = table in regmap.BIT_TABLES
    memory = image.bits[table] if is_bits else image.words[table]

    if set_values is not None:
        for offset in range(len(set_values)):
            owner = image.map.owner_of(table, address + offset)
            if owner is None or not owner.writable:
                return ExcCodes.ILLEGAL_ADDRESS
        memory[address : address + len(set_values)] = list(set_values)
        return None

    # For bit tables pymodbus passes the count in 16-bit words; it has already
    # checked the block bounds, so only register reads need a bounds check here.
    if not is_bits and address + count > len(memory):
        return ExcCodes.ILLEGAL_ADDRESS
    if is_bits:
        padded = list(memory) + [False] * (-len(memory) % 16)
        for word in range(len(padded) // 16):
            chunk = padded[word * 16 : word * 16 + 16]
            current_registers[word] = sum(1 << i for i, bit in enumerate(chunk) if bit)
    else:
        current_registers[: len(memory)] = memory
    return None


def _check_can_listen(host: str, port: int) -> None:
    """Fail with the operating system's reason, which pymodbus only logs."""
    if port == 0:
        return
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
    finally:
        probe.close()


async def _serve_until_signal(
    plc_map: regmap.PlcMap, host: str, port: int, seed: int | None
) -> None:
    simulator = PlcSimulator(plc_map, seed=seed)
    port = await simulator.start(host, port)
    click.echo(READY_LINE.format(host=host, port=port))
    logger.info(
        "reactor on every unit id except %d (the fault switch); register map %s",
        plc_map.control_unit,
        plc_map.source,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()

    logger.info("stopping the PLC simulator on %s:%d", host, port)
    await simulator.stop()


def _quiet_logging() -> None:
    """One-shot commands report failures as one Error: line, not as log records."""
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    logging.getLogger("terminals").setLevel(logging.CRITICAL)


def _load_map(path: str | None) -> regmap.PlcMap:
    try:
        return regmap.load(path)
    except regmap.RegisterMapError as exc:
        raise click.ClickException(str(exc)) from None


def _control_client(host: str, port: int, plc_map: regmap.PlcMap) -> PlcClient:
    config = PlcConfig(kind="simulation", host=host, port=port, timeout=2.0)
    return PlcClient(config, plc_map.control, unit=plc_map.control_unit)


_host_option = click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address of the simulator."
)
_port_option = click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=5020,
    show_default=True,
    help="TCP port; 0 picks a free one and prints it.",
)
# The subcommands take --host and --port before or after their name:
# `plc-sim --port 5021 fault exception` and `plc-sim fault exception --port 5021` agree.
_target_host_option = click.option(
    "--host", default=None, help="Address of the simulator [default: 127.0.0.1]."
)
_target_port_option = click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="TCP port of the running simulator [default: 5020].",
)


def _target(host: str | None, port: int | None) -> tuple[str, int]:
    """The simulator to talk to: the subcommand's options, else the group's."""
    parent = click.get_current_context().parent
    given = parent.params if parent is not None else {}
    return host or given.get("host") or "127.0.0.1", port or given.get("port") or 5020


_map_option = click.option(
    "--register-map",
    "register_map_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Register map TOML (default: the one shipped in terminals/).",
)


@click.group("plc-sim", invoke_without_command=True)
@_host_option
@_port_option
@_map_option
@click.option("--seed", type=int, default=None, help="Seed for the measurement noise.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning"]),
    default="info",
    show_default=True,
)
@click.pass_context
def plc_sim_cli(
    ctx: click.Context,
    host: str,
    port: int,
    register_map_path: str | None,
    seed: int | None,
    log_level: str,
) -> None:
    """Run the ALD reactor PLC simulator (Modbus TCP), or switch its faults."""
    if ctx.invoked_subcommand is not None:
        return
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pymodbus reports every dropped client at info and above; ours say enough.
    logging.getLogger("pymodbus").setLevel(logging.ERROR)
    plc_map = _load_map(register_map_path)
    asyncio.run(_serve_until_signal(plc_map, host, port, seed))


@plc_sim_cli.command("fault")
@click.argument("mode", type=click.Choice(FAULT_MODES))
@click.option(
    "--duration",
    type=click.FloatRange(min=0, max=6000),
    default=0.0,
    help="Seconds until the fault clears itself; 0 keeps it until `fault none`.",
)
@click.option(
    "--latency-ms",
    type=click.IntRange(0, 60000),
    default=1000,
    show_default=True,
    help="Delay per answer in latency mode.",
)
@_target_host_option
@_target_port_option
def fault_command(
    mode: str, duration: float, latency_ms: int, host: str | None, port: int | None
) -> None:
    """Inject a fault into a running simulator (or clear it with MODE none)."""
    host, port = _target(host, port)
    _quiet_logging()
    plc_map = _load_map(None)

    async def switch() -> None:
        async with _control_client(host, port, plc_map) as control:
            await control.write_holding_block(
                {
                    "fault_mode": FAULT_MODES.index(mode),
                    "fault_latency": latency_ms if mode == "latency" else 0,
                    "fault_duration": duration,
                }
            )

    try:
        asyncio.run(switch())
    except PlcError as exc:
        raise click.ClickException(f"cannot switch the fault: {exc}") from None
    if mode == "none":
        text = "fault cleared"
    else:
        latency = f" {latency_ms} ms" if mode == "latency" else ""
        lasting = f" for {duration:g}s" if duration else " until cleared"
        text = f"fault '{mode}'{latency}{lasting}"
    click.echo(f"PLC simulator at {host}:{port}: {text}")


@plc_sim_cli.command("status")
@_target_host_option
@_target_port_option
def status_command(host: str | None, port: int | None) -> None:
    """Print the fault switch and request counters of a running simulator."""
    host, port = _target(host, port)
    _quiet_logging()
    plc_map = _load_map(None)

    async def read() -> dict:
        async with _control_client(host, port, plc_map) as control:
            return await control.read_all()

    try:
        values = asyncio.run(read())
    except PlcError as exc:
        raise click.ClickException(f"cannot read the simulator status: {exc}") from None
    values["fault_mode"] = FAULT_MODES[int(values["fault_mode"])]
    for name, value in values.items():
        click.echo(f"{name}={value}")


def main() -> None:
    plc_sim_cli(prog_name="python -m terminals.plc.simulator")


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy, so log lines carry the real
    # logger name (terminals.plc.simulator) instead of __main__.
    from terminals.plc.simulator import main as imported_main

    imported_main()
