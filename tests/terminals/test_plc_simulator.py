"""The simulator and the client, as real processes over loopback TCP; no database."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import pytest
from pymodbus.client import AsyncModbusTcpClient

from terminals.plc.client import (
    Backoff,
    PlcConfig,
    PlcConfigError,
    PlcRejected,
    PlcTimeout,
    PlcUnavailable,
    PlcValueError,
)
from tests.helpers import REPO, wait_for
from tests.terminals.conftest import Simulator, plc_env


def test_reads_every_mapped_value(simulator: Simulator) -> None:
    values = simulator.read_all()

    assert set(values) == set(simulator.plc_map.reactor.registers)
    assert values["pump_running"] is True
    assert values["heater_setpoint"] == 150.0
    assert 0 < values["chamber_pressure"] < 100


def test_heater_approaches_a_new_setpoint(simulator: Simulator) -> None:
    simulator.write("heater_setpoint", 400.0)

    # The heater starts at room temperature toward the initial 150 degC setpoint:
    # passing 160 degC shows the new setpoint at work.
    wait_for(
        lambda: simulator.read("heater_temperature") > 160.0,
        timeout=30,
        message="heater temperature to climb toward 400 degC",
    )


def test_precursor_pulse_raises_pressure_and_purge_brings_it_down(
    simulator: Simulator,
) -> None:
    base = simulator.read("chamber_pressure")

    simulator.write("precursor_a_valve", True)
    peak = wait_for(
        lambda: (p := simulator.read("chamber_pressure")) > base + 50 and p,
        timeout=10,
        message="pressure to rise with precursor A open",
    )
    simulator.write("precursor_a_valve", False)
    simulator.write("purge_valve", True)

    wait_for(
        lambda: simulator.read("chamber_pressure") < base + (peak - base) / 4,
        timeout=10,
        message="purge to bring the pressure back down",
    )


def test_unmapped_addresses_refuse_writes_on_the_wire(simulator: Simulator) -> None:
    unmapped = simulator.plc_map.reactor.table_size("holding") + 10

    async def raw_write() -> bool:
        client = AsyncModbusTcpClient("127.0.0.1", port=simulator.port, timeout=2)
        await client.connect()
        try:
            response = await client.write_register(unmapped, 1, device_id=1)
            return response.isError()
        finally:
            client.close()

    assert asyncio.run(raw_write())


def test_client_refuses_bad_writes_before_sending(simulator: Simulator) -> None:
    before = simulator.status()["write_requests"]

    with pytest.raises(PlcValueError, match="read-only"):
        simulator.write("chamber_pressure", 3.0)
    with pytest.raises(PlcValueError, match="not in the register map"):
        simulator.write("flux_capacitor", 1)

    assert simulator.status()["write_requests"] == before


def test_exception_fault_gives_modbus_exceptions_then_clears(
    simulator: Simulator,
) -> None:
    result = simulator.cli("fault", "exception")
    assert result.returncode == 0, result.stderr
    assert "fault 'exception' until cleared" in result.stdout

    with pytest.raises(PlcRejected, match="Modbus exception 4") as caught:
        simulator.read_all()
    assert caught.value.exception_code == 4

    assert simulator.cli("fault", "none").returncode == 0
    assert simulator.read("pump_running") is True


def test_silent_fault_times_out_and_expires_by_itself(simulator: Simulator) -> None:
    assert simulator.cli("fault", "silent", "--duration", "1.5").returncode == 0

    async def read_with_short_timeout() -> None:
        async with simulator.client(timeout=0.3) as plc:
            await plc.read("pump_running")

    with pytest.raises(PlcTimeout, match="did not answer"):
        asyncio.run(read_with_short_timeout())
    wait_for(
        lambda: simulator.read("pump_running") is True,
        timeout=15,
        message="the silent fault to expire",
    )
    assert simulator.status()["fault_mode"] == 0


def test_latency_fault_delays_answers_beyond_the_timeout(
    simulator: Simulator,
) -> None:
    result = simulator.cli("fault", "latency", "--latency-ms", "800")
    assert result.returncode == 0, result.stderr

    async def read(timeout: float) -> object:
        async with simulator.client(timeout=timeout) as plc:
            return await plc.read("pump_running")

    with pytest.raises(PlcTimeout):
        asyncio.run(read(0.3))
    assert asyncio.run(read(3.0)) is True


def test_client_reconnects_after_the_plc_comes_back(simulator: Simulator) -> None:
    async def scenario() -> list[str]:
        seen: list[str] = []
        plc = simulator.client()
        plc.backoff = Backoff(initial=0.1, maximum=0.5)
        try:
            assert await plc.read("pump_running") is True
            await asyncio.to_thread(simulator.kill)
            with pytest.raises(PlcUnavailable):
                await plc.read("pump_running")
            seen.append("lost")
            await asyncio.to_thread(simulator.restart)
            for _ in range(200):
                try:
                    if await plc.read("pump_running"):
                        seen.append("back")
                        break
                except PlcUnavailable:
                    await asyncio.sleep(0.05)
        finally:
            plc.close()
        return seen

    assert asyncio.run(scenario()) == ["lost", "back"]


def test_backoff_is_capped_and_jittered() -> None:
    backoff = Backoff(initial=0.5, maximum=4.0, jitter=0.2)

    delays = [backoff.next_delay() for _ in range(8)]

    assert 0.4 <= delays[0] <= 0.6
    assert all(delay <= 4.0 * 1.2 for delay in delays)
    assert delays[-1] >= 4.0 * 0.8
    backoff.reset()
    assert backoff.next_delay() <= 0.6


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"PLC_TYPE": "serial"}, "PLC_TYPE='serial' is not one of"),
        ({"PLC_TYPE": "modbus"}, "needs PLC_HOST"),
        ({"PLC_PORT": "70000"}, "PLC_PORT='70000' is not an integer in 1..65535"),
        ({"PLC_UNIT": "x"}, "PLC_UNIT='x'"),
        ({"PLC_TIMEOUT": "-1"}, "PLC_TIMEOUT='-1'"),
    ],
)
def test_bad_plc_settings_are_named(env: dict[str, str], problem: str) -> None:
    with pytest.raises(PlcConfigError, match=problem):
        PlcConfig.from_env(env)


def test_plc_settings_from_env() -> None:
    config = PlcConfig.from_env(
        {
            "PLC_TYPE": "modbus",
            "PLC_HOST": "10.0.0.5",
            "PLC_PORT": "502",
            "PLC_UNIT": "3",
        }
    )

    assert (config.kind, config.host, config.port, config.unit) == (
        "modbus",
        "10.0.0.5",
        502,
        3,
    )
    assert PlcConfig.from_env({}).host == "127.0.0.1"


def test_simulator_cli_errors_are_one_line(simulator: Simulator) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "terminals.plc.simulator", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            env=plc_env(),
        )

    busy = run("--port", str(simulator.port))
    assert busy.returncode == 1
    assert busy.stderr.strip().splitlines() == [
        f"Error: cannot listen on 127.0.0.1:{simulator.port}: Address already in use"
    ]

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        free_port = unused.getsockname()[1]
    nobody = run("fault", "silent", "--port", str(free_port))
    assert nobody.returncode == 1
    assert len(nobody.stderr.strip().splitlines()) == 1
    assert "cannot switch the fault" in nobody.stderr

    bad_mode = run("fault", "broken")
    assert bad_mode.returncode == 2
    assert "Traceback" not in bad_mode.stderr


def test_the_group_port_reaches_the_fault_subcommand(simulator: Simulator) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "terminals.plc.simulator",
            "--port",
            str(simulator.port),
            "fault",
            "exception",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 0, result.stderr
    assert f":{simulator.port}: fault 'exception'" in result.stdout
    with pytest.raises(PlcRejected):
        simulator.read_all()
    assert simulator.cli("fault", "none").returncode == 0
