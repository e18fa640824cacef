"""Async PLC client that reads and writes values by register-map name over Modbus TCP.

Connection handling is ours, not pymodbus's: its automatic reconnect is off, and a
lost connection is retried with capped exponential backoff and jitter. Between
attempts a call fails at once with `PlcUnavailable` instead of blocking, so a 1 Hz
read loop keeps its schedule (and counts its errors) while the PLC is away.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusIOException

from terminals.plc.regmap import RegisterMap, RegisterValueError, Span, Value

logger = logging.getLogger(__name__)

PLC_TYPES = ("simulation", "modbus")
SIMULATION_HOST = "127.0.0.1"
DEFAULT_PORT = 5020
DEFAULT_UNIT = 1
DEFAULT_TIMEOUT = 0.5


class PlcError(Exception):
    """The PLC request failed."""


class PlcConfigError(PlcError):
    """PLC_* settings are missing or wrong."""


class PlcUnavailable(PlcError):
    """The PLC cannot be reached, or the connection broke."""


class PlcTimeout(PlcUnavailable):
    """The PLC did not answer in time."""


class PlcRejected(PlcError):
    """The PLC answered with a Modbus exception."""

    def __init__(self, message: str, exception_code: int) -> None:
        super().__init__(message)
        self.exception_code = exception_code


class PlcValueError(PlcError):
    """The name or value is not acceptable; nothing was sent to the PLC."""


@dataclass(frozen=True)
class PlcConfig:
    """Where the PLC is: the simulator on loopback, or a real Modbus TCP device."""

    kind: str = "simulation"
    host: str = SIMULATION_HOST
    port: int = DEFAULT_PORT
    unit: int = DEFAULT_UNIT
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PlcConfig:
        """Read PLC_TYPE, PLC_HOST, PLC_PORT, PLC_UNIT and PLC_TIMEOUT."""
        env = os.environ if env is None else env
        kind = env.get("PLC_TYPE", "simulation").strip() or "simulation"
        if kind not in PLC_TYPES:
            raise PlcConfigError(
                f"PLC_TYPE={kind!r} is not one of {', '.join(PLC_TYPES)}"
            )

        if kind == "simulation":
            host = SIMULATION_HOST
        else:
            host = env.get("PLC_HOST", "").strip()
            if not host:
                raise PlcConfigError("PLC_TYPE=modbus needs PLC_HOST (the PLC address)")

        port = _int_setting(env, "PLC_PORT", DEFAULT_PORT, 1, 65535)
        unit = _int_setting(env, "PLC_UNIT", DEFAULT_UNIT, 0, 247)
        raw_timeout = env.get("PLC_TIMEOUT", "").strip()
        try:
            timeout = float(raw_timeout) if raw_timeout else DEFAULT_TIMEOUT
        except ValueError:
            timeout = -1.0
        if not 0 < timeout <= 60:
            raise PlcConfigError(
                f"PLC_TIMEOUT={raw_timeout!r} is not a number of seconds in (0, 60]"
            )
        return cls(kind=kind, host=host, port=port, unit=unit, timeout=timeout)

    def describe(self, unit: int | None = None) -> str:
        what = "PLC simulator" if self.kind == "simulation" else "PLC"
        unit = self.unit if unit is None else unit
        return f"{what} at {self.host}:{self.port} unit {unit}"


class Backoff:
    """Capped exponential backoff with jitter, so many clients do not retry in step."""

    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 10.0,
        jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self.rng = rng or random.Random()
        self.failures = 0

    def next_delay(self) -> float:
        """Record one more failure and return how long to wait before the next try."""
        self.failures += 1
        delay = min(self.initial * 2 ** (self.failures - 1), self.maximum)
        return delay * (1.0 + self.rng.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self.failures = 0


_READERS = {
    "holding": "read_holding_registers",
    "input": "read_input_registers",
    "coil": "read_coils",
    "discrete": "read_discrete_inputs",
}


class PlcClient:
    """Read and write PLC values by name; reconnects on its own."""

    def __init__(
        self,
        config: PlcConfig,
        register_map: RegisterMap,
        *,
        unit: int | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.config = config
        self.map = register_map
        self.unit = config.unit if unit is None else unit
        self.backoff = backoff or Backoff()
        self.description = config.describe(self.unit)
        self._modbus: AsyncModbusTcpClient | None = None
        self._next_attempt = 0.0
        self._was_lost = False

    async def __aenter__(self) -> PlcClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._modbus is not None:
            self._modbus.close()
            self._modbus = None

    @property
    def connected(self) -> bool:
        return self._modbus is not None and self._modbus.connected

    async def read_all(self) -> dict[str, Value]:
        """Every mapped value, in as few requests as the map allows."""
        values: dict[str, Value] = {}
        for table in _READERS:
            for span in self.map.spans(table):
                values.update(await self._read_span(span))
        return values

    async def read(self, name: str) -> Value:
        register = self._register(name)
        span = Span(register.table, register.address, register.width, (register,))
        values = await self._read_span(span)
        return values[name]

    async def write(self, name: str, value: Value) -> Value:
        """Write one value; returns it as the PLC holds it (after scaling)."""
        register = self._register(name)
        if not register.writable:
            raise PlcValueError(f"{name} is read-only in the register map")
        try:
            encoded = register.encode(value)
        except RegisterValueError as exc:
            raise PlcValueError(str(exc)) from None

        what = f"write {name}={value}"
        if register.table == "coil":
            await self._call(
                what,
                lambda m: m.write_coil(
                    register.address, bool(encoded[0]), device_id=self.unit
                ),
            )
        elif register.width == 1:
            await self._call(
                what,
                lambda m: m.write_register(
                    register.address, int(encoded[0]), device_id=self.unit
                ),
            )
        else:
            await self._call(
                what,
                lambda m: m.write_registers(
                    register.address, [int(w) for w in encoded], device_id=self.unit
                ),
            )
        return register.decode(encoded)

    async def write_holding_block(self, values: Mapping[str, Value]) -> None:
        """Write contiguous holding registers in one request, so they change together.

        The simulator's fault switch relies on this: mode, latency and duration must
        arrive as one write.
        """
        registers = sorted(
            (self._register(name) for name in values), key=lambda r: r.address
        )
        words: list[int] = []
        for before, register in zip([None, *registers], registers, strict=False):
            if register.table != "holding" or not register.writable:
                raise PlcValueError(
                    f"{register.name} is not a writable holding register"
                )
            if before is not None and register.address != before.last_address + 1:
                raise PlcValueError(
                    f"{before.name} and {register.name} are not contiguous"
                )
            try:
                words.extend(int(w) for w in register.encode(values[register.name]))
            except RegisterValueError as exc:
                raise PlcValueError(str(exc)) from None

        start = registers[0].address
        names = ", ".join(r.name for r in registers)
        await self._call(
            f"write {names}",
            lambda m: m.write_registers(start, words, device_id=self.unit),
        )

    def _register(self, name: str):
        try:
            return self.map[name]
        except RegisterValueError as exc:
            raise PlcValueError(str(exc)) from None

    async def _read_span(self, span: Span) -> dict[str, Value]:
        reader = _READERS[span.table]
        response = await self._call(
            f"read {span.table} {span.start}..{span.start + span.count - 1}",
            lambda m: getattr(m, reader)(
                span.start, count=span.count, device_id=self.unit
            ),
        )
        raw = (
            response.bits if span.table in ("coil", "discrete") else response.registers
        )
        if len(raw) < span.count:
            raise PlcError(
                f"{self.description} returned {len(raw)} values for {span.count}"
                f" {span.table} addresses from {span.start}"
            )
        return span.decode(raw[: span.count])

    async def _call(
        self, what: str, request: Callable[[AsyncModbusTcpClient], Awaitable[Any]]
    ) -> Any:
        modbus = await self._connection()
        try:
            response = await request(modbus)
        except ModbusIOException:
            # A late answer to this request would be taken for the answer to the
            # next one: start the next request on a fresh connection.
            self._lose("no answer")
            raise PlcTimeout(
                f"{self.description} did not answer {what} within"
                f" {self.config.timeout:g}s"
            ) from None
        except ConnectionException:
            self._lose("connection lost")
            raise PlcUnavailable(
                f"{self.description}: connection lost during {what}"
            ) from None

        if response.isError():
            code = getattr(response, "exception_code", 0)
            raise PlcRejected(
                f"{self.description} refused {what}: Modbus exception {code}"
                f" ({_EXCEPTION_NAMES.get(code, 'unknown')})",
                code,
            )
        return response

    async def _connection(self) -> AsyncModbusTcpClient:
        if self._modbus is not None and self._modbus.connected:
            return self._modbus
        if self._modbus is not None:
            self._lose("connection lost")

        wait = self._next_attempt - time.monotonic()
        if wait > 0:
            raise PlcUnavailable(
                f"{self.description} unreachable, next reconnect attempt in {wait:.1f}s"
            )

        modbus = AsyncModbusTcpClient(
            self.config.host,
            port=self.config.port,
            timeout=self.config.timeout,
            retries=0,
            reconnect_delay=0,
        )
        if not await modbus.connect():
            modbus.close()
            delay = self.backoff.next_delay()
            self._next_attempt = time.monotonic() + delay
            self._was_lost = True
            logger.warning(
                "%s unreachable (attempt %d), retrying in %.1fs (not fatal)",
                self.description,
                self.backoff.failures,
                delay,
            )
            raise PlcUnavailable(f"{self.description} unreachable (connect failed)")

        if self._was_lost:
            logger.info(
                "%s connected again after %d failed attempts",
                self.description,
                self.backoff.failures,
            )
        self._was_lost = False
        self.backoff.reset()
        self._modbus = modbus
        return modbus

    def _lose(self, reason: str) -> None:
        # The caller reports the failure; this line is only for following the cause.
        if self._modbus is not None:
            logger.debug("%s: %s, dropping the connection", self.description, reason)
            self._modbus.close()
            self._modbus = None


_EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    5: "acknowledge",
    6: "device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


def _int_setting(
    env: Mapping[str, str], key: str, default: int, low: int, high: int
) -> int:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise PlcConfigError(f"{key}={raw!r} is not an integer in {low}..{high}")
    return value
