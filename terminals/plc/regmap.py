"""The register map: PLC values by name, with their address, type, scaling and limits.

`terminals/registers.toml` is the only place that knows where a value lives. This
module loads and validates it, and turns engineering values into register contents
and back, so the simulator, the client and the parameter checks all agree.
"""

from __future__ import annotations

import math
import struct
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

TABLES = ("holding", "input", "coil", "discrete")
BIT_TABLES = ("coil", "discrete")
WRITABLE_TABLES = ("holding", "coil")
TYPE_WIDTHS = {"uint16": 1, "int16": 1, "float32": 2, "bool": 1}
RAW_LIMITS = {"uint16": (0, 0xFFFF), "int16": (-0x8000, 0x7FFF)}

# Modbus limits on how much one request may read.
MAX_REGISTERS_PER_READ = 125
MAX_BITS_PER_READ = 2000

_REGISTER_KEYS = {
    "table",
    "address",
    "type",
    "scale",
    "unit",
    "min",
    "max",
    "writable",
    "description",
    "bits",
}
_REQUIRED_KEYS = ("table", "address", "type")

Value = float | int | bool


class RegisterMapError(ValueError):
    """The register map file is missing or wrong; the message names file and key."""


class RegisterValueError(ValueError):
    """A value cannot go to this register: unknown name, read-only or out of range."""


@dataclass(frozen=True)
class Register:
    """One named PLC value."""

    name: str
    table: str
    address: int
    type: str
    scale: float = 1.0
    unit: str = ""
    minimum: float | None = None
    maximum: float | None = None
    writable: bool = False
    description: str = ""
    bits: Mapping[str, int] = field(default_factory=dict)

    @property
    def width(self) -> int:
        """Number of registers (or bits) the value occupies."""
        return TYPE_WIDTHS[self.type]

    @property
    def is_bit(self) -> bool:
        return self.table in BIT_TABLES

    @property
    def last_address(self) -> int:
        return self.address + self.width - 1

    def encode(self, value: Value) -> list[int] | list[bool]:
        """Turn an engineering value into register contents (or one bit)."""
        if self.is_bit:
            return [bool(value)]

        if self.type == "float32":
            high, low = struct.unpack(">HH", struct.pack(">f", float(value)))
            return [high, low]

        raw = round(float(value) / self.scale)
        low_limit, high_limit = RAW_LIMITS[self.type]
        if not low_limit <= raw <= high_limit:
            raise RegisterValueError(
                f"{self.name}: {value} {self.unit} does not fit a {self.type} register"
                f" with scale {self.scale}"
            )
        return [raw & 0xFFFF]

    def decode(self, raw: Sequence[int] | Sequence[bool]) -> Value:
        """Turn register contents (or one bit) into the engineering value."""
        if self.is_bit:
            return bool(raw[0])

        if self.type == "float32":
            (value,) = struct.unpack(">f", struct.pack(">HH", raw[0], raw[1]))
            # A float32 holds about 7 significant digits: 123.4, not 123.4000015258789.
            return float(f"{value:.7g}")

        number = int(raw[0]) & 0xFFFF
        if self.type == "int16" and number >= 0x8000:
            number -= 0x10000
        if self.scale == 1:
            return number
        return round(number * self.scale, _decimals(self.scale))

    def quantize(self, value: Value) -> Value:
        """The value as the PLC will hold it, after scaling and rounding."""
        return self.decode(self.encode(value))

    def check_write(self, value: Any) -> Value:
        """Return the value ready to write, or raise with the reason it is refused.

        This is the parameter service's gate: a value it refuses never reaches the PLC.
        """
        if not self.writable:
            raise RegisterValueError(f"{self.name} is read-only in the register map")

        if isinstance(value, int | float | Decimal):  # bool is an int too
            number = float(value)
        else:
            raise RegisterValueError(f"{self.name}: {value!r} is not a number")
        if not math.isfinite(number):
            raise RegisterValueError(f"{self.name}: {value!r} is not a finite number")

        if self.is_bit:
            if number not in (0.0, 1.0):
                raise RegisterValueError(
                    f"{self.name} is on/off: value must be 0 or 1, got {value}"
                )
            return number == 1.0

        if self.minimum is not None and number < self.minimum:
            raise RegisterValueError(
                f"{self.name}: {value} {self.unit} is below the minimum"
                f" {self.minimum} {self.unit}"
            )
        if self.maximum is not None and number > self.maximum:
            raise RegisterValueError(
                f"{self.name}: {value} {self.unit} is above the maximum"
                f" {self.maximum} {self.unit}"
            )
        return self.quantize(number)

    def same_value(self, written: Value, read_back: Value) -> bool:
        """Whether a read-back value confirms a write (within one raw step)."""
        if self.is_bit:
            return bool(written) == bool(read_back)
        if self.type == "float32":
            return math.isclose(float(written), float(read_back), rel_tol=1e-6)
        return abs(float(written) - float(read_back)) < self.scale / 2


@dataclass(frozen=True)
class Span:
    """Contiguous registers of one table that one Modbus request reads."""

    table: str
    start: int
    count: int
    registers: tuple[Register, ...]

    def decode(self, raw: Sequence[int] | Sequence[bool]) -> dict[str, Value]:
        values = {}
        for register in self.registers:
            offset = register.address - self.start
            values[register.name] = register.decode(
                raw[offset : offset + register.width]
            )
        return values


class RegisterMap:
    """A validated set of registers, looked up by name."""

    def __init__(self, registers: Mapping[str, Register], source: str) -> None:
        self.source = source
        self.registers = dict(registers)

    def __iter__(self):
        return iter(self.registers.values())

    def __len__(self) -> int:
        return len(self.registers)

    def __contains__(self, name: object) -> bool:
        return name in self.registers

    def __getitem__(self, name: str) -> Register:
        try:
            return self.registers[name]
        except KeyError:
            raise RegisterValueError(
                f"{name!r} is not in the register map {self.source}"
            ) from None

    def in_table(self, table: str) -> list[Register]:
        found = [r for r in self.registers.values() if r.table == table]
        return sorted(found, key=lambda r: r.address)

    def table_size(self, table: str) -> int:
        """Addresses the table needs, from 0 to its last mapped address."""
        return max((r.last_address + 1 for r in self.in_table(table)), default=0)

    def spans(self, table: str) -> list[Span]:
        """Group the table's registers into as few contiguous reads as possible.

        Gaps are never read: a real PLC may answer an unmapped address with an
        exception, so a gap starts a new request.
        """
        limit = MAX_BITS_PER_READ if table in BIT_TABLES else MAX_REGISTERS_PER_READ
        spans: list[Span] = []
        group: list[Register] = []
        for register in self.in_table(table):
            if group:
                start = group[0].address
                contiguous = register.address == group[-1].last_address + 1
                fits = register.last_address - start + 1 <= limit
                if not (contiguous and fits):
                    spans.append(_make_span(table, group))
                    group = []
            group.append(register)
        if group:
            spans.append(_make_span(table, group))
        return spans

    def owner_of(self, table: str, address: int) -> Register | None:
        """The register that covers this address, if any."""
        for register in self.in_table(table):
            if register.address <= address <= register.last_address:
                return register
        return None


@dataclass(frozen=True)
class PlcMap:
    """Everything registers.toml says: the reactor's map and the simulator's own."""

    reactor: RegisterMap
    safe_state_close: tuple[str, ...]
    control: RegisterMap
    control_unit: int
    source: str


def default_map_path() -> Path:
    return Path(str(resources.files("terminals").joinpath("registers.toml")))


def load(path: str | Path | None = None) -> PlcMap:
    """Load and validate the register map; errors name the file, key and problem."""
    source = str(path or default_map_path())

    try:
        with open(source, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise RegisterMapError(
            f"{source}: cannot read register map: {exc.strerror}"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise RegisterMapError(f"{source}: not valid TOML: {exc}") from None

    reactor = _parse_registers(source, "registers", document.get("registers"))

    safe_state = document.get("safe_state", {})
    close = safe_state.get("close", []) if isinstance(safe_state, dict) else None
    if not isinstance(close, list) or not all(isinstance(n, str) for n in close):
        raise RegisterMapError(f"{source}: safe_state.close: must be a list of names")
    for name in close:
        if name not in reactor or reactor[name].table != "coil":
            raise RegisterMapError(
                f"{source}: safe_state.close: {name!r} is not a coil in [registers]"
            )

    simulator = document.get("simulator")
    if not isinstance(simulator, dict):
        raise RegisterMapError(f"{source}: simulator: missing table")
    control_unit = simulator.get("control_unit")
    if not isinstance(control_unit, int) or not 1 <= control_unit <= 247:
        raise RegisterMapError(
            f"{source}: simulator.control_unit: must be a unit id 1..247,"
            f" got {control_unit!r}"
        )
    control = _parse_registers(
        source, "simulator.registers", simulator.get("registers")
    )

    return PlcMap(
        reactor=reactor,
        safe_state_close=tuple(close),
        control=control,
        control_unit=control_unit,
        source=source,
    )


def _parse_registers(source: str, section: str, table: Any) -> RegisterMap:
    if not isinstance(table, dict) or not table:
        raise RegisterMapError(f"{source}: {section}: missing or empty table")

    registers = {}
    for name, entry in table.items():
        registers[name] = _parse_register(source, f"{section}.{name}", name, entry)

    by_table: dict[str, list[Register]] = {}
    for register in registers.values():
        by_table.setdefault(register.table, []).append(register)
    for members in by_table.values():
        members.sort(key=lambda r: r.address)
        for before, after in zip(members, members[1:], strict=False):
            if after.address <= before.last_address:
                raise RegisterMapError(
                    f"{source}: {section}.{after.name}: address {after.address} in"
                    f" {after.table} overlaps {section}.{before.name}"
                    f" ({before.address}..{before.last_address})"
                )

    return RegisterMap(registers, source)


def _parse_register(source: str, key: str, name: str, entry: Any) -> Register:
    def fail(problem: str) -> RegisterMapError:
        return RegisterMapError(f"{source}: {key}: {problem}")

    if not isinstance(entry, dict):
        raise fail("must be a table")
    unknown = sorted(set(entry) - _REGISTER_KEYS)
    if unknown:
        raise fail(
            f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_REGISTER_KEYS))})"
        )
    for required in _REQUIRED_KEYS:
        if required not in entry:
            raise fail(f"missing key {required!r}")

    table = entry["table"]
    if table not in TABLES:
        raise fail(f"table {table!r} is not one of {', '.join(TABLES)}")

    address = entry["address"]
    if isinstance(address, bool) or not isinstance(address, int):
        raise fail(f"address {address!r} is not an integer")
    if not 0 <= address <= 0xFFFF:
        raise fail(f"address {address} is outside 0..65535")

    type_ = entry["type"]
    if type_ not in TYPE_WIDTHS:
        raise fail(f"type {type_!r} is not one of {', '.join(TYPE_WIDTHS)}")
    if (table in BIT_TABLES) != (type_ == "bool"):
        raise fail(f"type {type_!r} does not fit table {table!r} (bool is for bits)")
    if address + TYPE_WIDTHS[type_] - 1 > 0xFFFF:
        raise fail(f"a {type_} at address {address} runs past 65535")

    scale = entry.get("scale", 1)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or scale <= 0:
        raise fail(f"scale {scale!r} must be a positive number")
    if scale != 1 and type_ not in RAW_LIMITS:
        raise fail(f"scale applies to int16 and uint16 only, not {type_}")

    minimum, maximum = entry.get("min"), entry.get("max")
    for limit_key, limit in (("min", minimum), ("max", maximum)):
        if limit is None:
            continue
        if type_ == "bool":
            raise fail(f"{limit_key} makes no sense for a bool")
        if isinstance(limit, bool) or not isinstance(limit, int | float):
            raise fail(f"{limit_key} {limit!r} is not a number")
    if minimum is not None and maximum is not None and minimum > maximum:
        raise fail(f"min {minimum} is above max {maximum}")
    if type_ in RAW_LIMITS:
        low, high = (limit * scale for limit in RAW_LIMITS[type_])
        for limit_key, limit in (("min", minimum), ("max", maximum)):
            if limit is not None and not low <= limit <= high:
                raise fail(
                    f"{limit_key} {limit} cannot be held by a {type_} with scale"
                    f" {scale} ({low:g}..{high:g})"
                )

    writable = entry.get("writable", False)
    if not isinstance(writable, bool):
        raise fail(f"writable {writable!r} must be true or false")
    if writable and table not in WRITABLE_TABLES:
        raise fail(f"writable is impossible for the read-only table {table!r}")

    unit = entry.get("unit", "")
    description = entry.get("description", "")
    if not isinstance(unit, str) or not isinstance(description, str):
        raise fail("unit and description must be strings")

    bits = entry.get("bits", {})
    if bits and type_ != "uint16":
        raise fail("bits are only for uint16 registers")
    if not isinstance(bits, dict):
        raise fail("bits must be a table of name = bit number")
    for bit_name, bit in bits.items():
        if isinstance(bit, bool) or not isinstance(bit, int) or not 0 <= bit <= 15:
            raise fail(f"bits.{bit_name}: {bit!r} is not a bit number 0..15")
    if len(set(bits.values())) != len(bits):
        raise fail("bits: two names share one bit")

    return Register(
        name=name,
        table=table,
        address=address,
        type=type_,
        scale=float(scale),
        unit=unit,
        minimum=None if minimum is None else float(minimum),
        maximum=None if maximum is None else float(maximum),
        writable=writable,
        description=description,
        bits=dict(bits),
    )


def _make_span(table: str, group: list[Register]) -> Span:
    start = group[0].address
    return Span(
        table=table,
        start=start,
        count=group[-1].last_address - start + 1,
        registers=tuple(group),
    )


def _decimals(scale: float) -> int:
    exponent = Decimal(str(scale)).normalize().as_tuple().exponent
    return max(0, -int(exponent))
