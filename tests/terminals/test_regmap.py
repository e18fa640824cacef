"""The register map: the shipped file is valid, mistakes named, values round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from terminals.plc import regmap
from terminals.plc.regmap import RegisterMapError, RegisterValueError

SHIPPED = regmap.default_map_path().read_text()


def write_map(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "registers.toml"
    path.write_text(text)
    return path


def test_shipped_map_loads_and_covers_the_reactor() -> None:
    plc_map = regmap.load()

    names = set(plc_map.reactor.registers)
    assert {"chamber_pressure", "heater_setpoint", "precursor_a_valve"} <= names
    assert plc_map.safe_state_close == ("precursor_a_valve", "precursor_b_valve")
    assert plc_map.control_unit == 247
    assert [r.name for r in plc_map.reactor if r.writable and r.table == "input"] == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        (
            'table = "input"\naddress = 2',
            'table = "inputs"\naddress = 2',
            "table 'inputs'",
        ),
        ("address = 2\n", "address = 1\n", "overlaps registers.chamber_pressure"),
        ('address = 2\ntype = "int16"', 'adress = 2\ntype = "int16"', "unknown key"),
        ("min = 20.0\nmax = 400.0", "min = 500.0\nmax = 400.0", "min 500.0 is above"),
        (
            'writable = false\ndescription = "Chamber wall heater temperature"',
            'writable = true\ndescription = "x"',
            "writable is impossible",
        ),
        (
            'scale = 0.1\nunit = "degC"\nmin = -50.0',
            'scale = 0.001\nunit = "degC"\nmin = -50.0',
            "cannot be held by a int16",
        ),
    ],
)
def test_mistakes_name_file_key_and_problem(
    tmp_path: Path, old: str, new: str, problem: str
) -> None:
    assert old in SHIPPED
    path = write_map(tmp_path, SHIPPED.replace(old, new, 1))

    with pytest.raises(RegisterMapError, match=problem) as caught:
        regmap.load(path)

    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message


def test_missing_file_and_bad_toml_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(RegisterMapError, match="cannot read register map"):
        regmap.load(tmp_path / "nope.toml")

    with pytest.raises(RegisterMapError, match="not valid TOML"):
        regmap.load(write_map(tmp_path, "[registers\n"))


def test_values_round_trip_through_registers() -> None:
    reactor = regmap.load().reactor

    heater = reactor["heater_temperature"]
    assert heater.decode(heater.encode(-12.3)) == -12.3
    assert heater.encode(-0.1) == [0xFFFF]
    pressure = reactor["chamber_pressure"]
    assert pressure.decode(pressure.encode(101325.0)) == 101325.0
    assert len(pressure.encode(1.5)) == 2
    valve = reactor["precursor_a_valve"]
    assert valve.decode(valve.encode(True)) is True


def test_write_checks_refuse_with_the_reason() -> None:
    reactor = regmap.load().reactor

    assert reactor["heater_setpoint"].check_write(212.34) == 212.3
    assert reactor["purge_valve"].check_write(1) is True
    with pytest.raises(RegisterValueError, match="above the maximum 400.0 degC"):
        reactor["heater_setpoint"].check_write(401)
    with pytest.raises(RegisterValueError, match="below the minimum"):
        reactor["carrier_flow_setpoint"].check_write(-1)
    with pytest.raises(RegisterValueError, match="read-only"):
        reactor["chamber_pressure"].check_write(5)
    with pytest.raises(RegisterValueError, match="must be 0 or 1"):
        reactor["purge_valve"].check_write(0.5)
    with pytest.raises(RegisterValueError, match="not a finite number"):
        reactor["heater_setpoint"].check_write(float("nan"))
    with pytest.raises(RegisterValueError, match="not in the register map"):
        reactor["no_such_thing"]


def test_spans_read_contiguous_registers_together() -> None:
    reactor = regmap.load().reactor

    spans = reactor.spans("input")

    assert [(span.start, span.count) for span in spans] == [(0, 7)]
