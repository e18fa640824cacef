"""A small ALD reactor, simulated well enough that the terminals see plausible values.

The model is deliberately crude: first-order lags toward targets. What matters is the
direction of every effect an operator would check: an open precursor valve raises
the chamber pressure, a purge sweeps it back down, heaters creep toward their
setpoints, mass-flow controllers follow theirs, the pump takes a moment to spin up.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from terminals.plc.regmap import TABLES, RegisterMap, Value

# Register names the reactor model reads or drives; the map must define all of them.
REQUIRED_REGISTERS = (
    "chamber_pressure",
    "heater_temperature",
    "substrate_temperature",
    "carrier_flow",
    "purge_flow",
    "alarm_word",
    "heater_setpoint",
    "substrate_setpoint",
    "carrier_flow_setpoint",
    "purge_flow_setpoint",
    "pressure_limit",
    "precursor_a_valve",
    "precursor_b_valve",
    "purge_valve",
    "pump_enable",
    "pump_running",
)

INITIAL_SETPOINTS: dict[str, Value] = {
    "heater_setpoint": 150.0,
    "substrate_setpoint": 150.0,
    "carrier_flow_setpoint": 100.0,
    "purge_flow_setpoint": 200.0,
    "pressure_limit": 1500.0,
    "pump_enable": True,
}

ROOM_TEMPERATURE = 25.0
ATMOSPHERE_PA = 101325.0
HEATER_ALARM_CELSIUS = 450.0

# Time constants (seconds) and gains of the model; shortened so tests see effects fast.
HEATER_TAU = 8.0
SUBSTRATE_TAU = 15.0
MFC_TAU = 0.3
PUMP_SPINUP_TAU = 1.0
GAS_TAU = 0.3
PRECURSOR_A_RATE = 400.0  # Pa/s while the valve is open
PRECURSOR_B_RATE = 300.0
PUMP_REMOVAL = 1.5  # 1/s: how fast the pump alone removes precursor vapour
PURGE_REMOVAL = 6.0  # 1/s: extra removal while the purge gas sweeps the chamber


class RegisterImage:
    """The PLC's memory: raw contents of the four tables, read and written by name."""

    def __init__(self, register_map: RegisterMap) -> None:
        self.map = register_map
        self.words: dict[str, list[int]] = {}
        self.bits: dict[str, list[bool]] = {}
        for table in TABLES:
            size = register_map.table_size(table)
            if table in ("coil", "discrete"):
                self.bits[table] = [False] * size
            else:
                self.words[table] = [0] * size

    def get(self, name: str) -> Value:
        register = self.map[name]
        if register.is_bit:
            return self.bits[register.table][register.address]
        raw = self.words[register.table][register.address : register.last_address + 1]
        return register.decode(raw)

    def set(self, name: str, value: Value) -> None:
        register = self.map[name]
        if register.is_bit:
            self.bits[register.table][register.address] = bool(value)
            return
        if register.minimum is not None and register.maximum is not None:
            value = min(max(float(value), register.minimum), register.maximum)
        encoded = register.encode(value)
        self.words[register.table][register.address : register.last_address + 1] = (
            encoded
        )


@dataclass
class ReactorState:
    """The model's own continuous state, kept apart from the quantized registers."""

    gas_pressure: float = 2.0
    precursor_pressure: float = 0.0
    heater_temperature: float = ROOM_TEMPERATURE
    substrate_temperature: float = ROOM_TEMPERATURE
    carrier_flow: float = 0.0
    purge_flow: float = 0.0
    pump_speed: float = 1.0


class Reactor:
    """Evolves the reactor one time step at a time, through the register image."""

    def __init__(self, image: RegisterImage, seed: int | None = None) -> None:
        missing = [name for name in REQUIRED_REGISTERS if name not in image.map]
        if missing:
            raise ValueError(
                f"register map {image.map.source} lacks {', '.join(missing)},"
                " which the reactor simulator needs"
            )
        self.image = image
        self.state = ReactorState()
        self.noise = random.Random(seed)
        self.alarm_bits = dict(image.map["alarm_word"].bits)
        for name, value in INITIAL_SETPOINTS.items():
            image.set(name, value)
        self.step(0.0)

    def step(self, dt: float) -> None:
        """Advance the model by dt seconds and publish the measurements."""
        image, state = self.image, self.state
        valve_a = bool(image.get("precursor_a_valve"))
        valve_b = bool(image.get("precursor_b_valve"))
        purging = bool(image.get("purge_valve"))

        pump_target = 1.0 if image.get("pump_enable") else 0.0
        state.pump_speed += (pump_target - state.pump_speed) * _lag(dt, PUMP_SPINUP_TAU)

        state.carrier_flow += (
            float(image.get("carrier_flow_setpoint")) - state.carrier_flow
        ) * _lag(dt, MFC_TAU)
        purge_target = float(image.get("purge_flow_setpoint")) if purging else 0.0
        state.purge_flow += (purge_target - state.purge_flow) * _lag(dt, MFC_TAU)

        gas_target = 2.0 + 0.1 * state.carrier_flow + 0.05 * state.purge_flow
        gas_target = min(gas_target / max(state.pump_speed, 0.02), ATMOSPHERE_PA)
        state.gas_pressure += (gas_target - state.gas_pressure) * _lag(dt, GAS_TAU)

        inflow = PRECURSOR_A_RATE * valve_a + PRECURSOR_B_RATE * valve_b
        removal = 0.01 + state.pump_speed * (PUMP_REMOVAL + PURGE_REMOVAL * purging)
        state.precursor_pressure += (inflow - removal * state.precursor_pressure) * dt
        state.precursor_pressure = max(state.precursor_pressure, 0.0)

        heater_target = float(image.get("heater_setpoint"))
        state.heater_temperature += (heater_target - state.heater_temperature) * _lag(
            dt, HEATER_TAU
        )
        substrate_target = float(image.get("substrate_setpoint"))
        state.substrate_temperature += (
            substrate_target - state.substrate_temperature
        ) * _lag(dt, SUBSTRATE_TAU)

        pressure = state.gas_pressure + state.precursor_pressure
        pressure *= 1.0 + self.noise.gauss(0.0, 0.002)
        pump_running = state.pump_speed > 0.9
        image.set("chamber_pressure", max(pressure, 0.0))
        image.set(
            "heater_temperature",
            state.heater_temperature + self.noise.gauss(0.0, 0.05),
        )
        image.set(
            "substrate_temperature",
            state.substrate_temperature + self.noise.gauss(0.0, 0.05),
        )
        image.set("carrier_flow", max(state.carrier_flow, 0.0))
        image.set("purge_flow", max(state.purge_flow, 0.0))
        image.set("pump_running", pump_running)

        alarms = {
            "over_pressure": pressure > float(image.get("pressure_limit")),
            "heater_over_temperature": state.heater_temperature > HEATER_ALARM_CELSIUS,
            "precursor_without_pump": (valve_a or valve_b) and not pump_running,
            "both_precursors_open": valve_a and valve_b,
        }
        word = 0
        for name, active in alarms.items():
            if active and name in self.alarm_bits:
                word |= 1 << self.alarm_bits[name]
        image.set("alarm_word", word)


def _lag(dt: float, tau: float) -> float:
    """Fraction of the distance to its target a first-order lag covers in dt."""
    return min(dt / tau, 1.0)
