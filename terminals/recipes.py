"""Recipes as data: steps, their check against the register map, and their expansion.

A recipe is a list of steps in position order. A `repeat` step runs the
`block_length` steps after it `repeat_count` times; blocks may nest. Before a run
starts, the whole recipe is checked against the register map and expanded into the
flat list of steps it will execute, so a typo fails the start command, not cycle 17.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from terminals.plc.regmap import RegisterMap, RegisterValueError, Value

STEP_KINDS = ("open_valve", "close_valve", "set_parameter", "wait", "repeat")
# A recipe that expands beyond this is a mistake (a repeat count with extra zeros).
MAX_PLANNED_STEPS = 1_000_000


class RecipeError(ValueError):
    """The recipe cannot run; the message names the step and the problem."""


@dataclass(frozen=True)
class Step:
    position: int
    kind: str
    target: str | None = None
    value: float | None = None
    duration_ms: int | None = None
    repeat_count: int | None = None
    block_length: int | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Step:
        return cls(
            position=row["position"],
            kind=row["kind"],
            target=row["target"],
            value=row["value"],
            duration_ms=row["duration_ms"],
            repeat_count=row["repeat_count"],
            block_length=row["block_length"],
        )

    def describe(self) -> str:
        if self.kind in ("open_valve", "close_valve"):
            return f"{self.kind} {self.target}"
        if self.kind == "set_parameter":
            return f"set {self.target} = {self.value}"
        if self.kind == "wait":
            return f"wait {self.duration_ms} ms"
        return f"repeat the next {self.block_length} steps {self.repeat_count} times"


@dataclass(frozen=True)
class PlannedStep:
    """One step as it will execute; cycle is the iteration of the outermost repeat."""

    step: Step
    cycle: int | None
    value: Value | None = None  # the checked, quantized value for set_parameter


@dataclass(frozen=True)
class Plan:
    steps: tuple[PlannedStep, ...]
    total_cycles: int | None


def plan(name: str, steps: Sequence[Step], reactor: RegisterMap) -> Plan:
    """Check every step against the map and expand the repeats."""
    if not steps:
        raise RecipeError(f"recipe {name!r} has no steps")
    checked_values = {step.position: _check(name, step, reactor) for step in steps}

    planned: list[PlannedStep] = []
    cycles_before = [0]
    for step, cycle in _expand(name, list(steps), 0, len(steps), None, cycles_before):
        planned.append(PlannedStep(step, cycle, checked_values[step.position]))
        if len(planned) > MAX_PLANNED_STEPS:
            raise RecipeError(
                f"recipe {name!r} expands to more than {MAX_PLANNED_STEPS} steps"
            )

    outer_repeats = [s.repeat_count for s in _top_level(steps) if s.kind == "repeat"]
    total_cycles = sum(outer_repeats) if outer_repeats else None
    return Plan(tuple(planned), total_cycles)


def _check(name: str, step: Step, reactor: RegisterMap) -> Value | None:
    def fail(problem: str) -> RecipeError:
        return RecipeError(
            f"recipe {name!r} step {step.position} ({step.kind}): {problem}"
        )

    if step.kind not in STEP_KINDS:
        raise fail(f"unknown kind, expected one of {', '.join(STEP_KINDS)}")

    if step.kind in ("open_valve", "close_valve"):
        if step.target not in reactor:
            raise fail(f"{step.target!r} is not in the register map")
        register = reactor[step.target]
        if register.table != "coil" or not register.writable:
            raise fail(f"{step.target!r} is not a valve (a writable coil)")
        return step.kind == "open_valve"

    if step.kind == "set_parameter":
        if step.target not in reactor:
            raise fail(f"{step.target!r} is not in the register map")
        try:
            return reactor[step.target].check_write(step.value)
        except RegisterValueError as exc:
            raise fail(str(exc)) from None

    if step.kind == "wait":
        if step.duration_ms is None or step.duration_ms < 0:
            raise fail(f"duration_ms {step.duration_ms!r} must be 0 or more")
        return None

    if not step.repeat_count or step.repeat_count < 1:
        raise fail(f"repeat_count {step.repeat_count!r} must be 1 or more")
    if not step.block_length or step.block_length < 1:
        raise fail(f"block_length {step.block_length!r} must be 1 or more")
    return None


def _expand(
    name: str,
    steps: list[Step],
    start: int,
    stop: int,
    cycle: int | None,
    cycles_before: list[int],
) -> Iterator[tuple[Step, int | None]]:
    """Yield (step, cycle); top-level repeats number their cycles on from each other."""
    index = start
    while index < stop:
        step = steps[index]
        if step.kind != "repeat":
            yield step, cycle
            index += 1
            continue

        block_end = index + 1 + (step.block_length or 0)
        if block_end > stop:
            raise RecipeError(
                f"recipe {name!r} step {step.position} (repeat): the block of"
                f" {step.block_length} steps runs past the end of its enclosing block"
            )
        for iteration in range(1, (step.repeat_count or 0) + 1):
            outer = cycle if cycle is not None else cycles_before[0] + iteration
            yield from _expand(name, steps, index + 1, block_end, outer, cycles_before)
        if cycle is None:
            cycles_before[0] += step.repeat_count or 0
        index = block_end


def _top_level(steps: Sequence[Step]) -> Iterator[Step]:
    index = 0
    while index < len(steps):
        step = steps[index]
        yield step
        index += 1 + (step.block_length or 0) if step.kind == "repeat" else 1


# The demo: 20 ALD cycles of precursor A pulse, purge, precursor B pulse, purge, with
# times short enough that a whole run takes seconds.
DEMO_RECIPE_NAME = "demo-al2o3"
DEMO_RECIPE_VERSION = 1
DEMO_CYCLES = 20
DEMO_PULSE_MS = 80
DEMO_PURGE_MS = 120


def demo_steps() -> list[Step]:
    body = [
        ("open_valve", "precursor_a_valve", None),
        ("wait", None, DEMO_PULSE_MS),
        ("close_valve", "precursor_a_valve", None),
        ("open_valve", "purge_valve", None),
        ("wait", None, DEMO_PURGE_MS),
        ("close_valve", "purge_valve", None),
        ("open_valve", "precursor_b_valve", None),
        ("wait", None, DEMO_PULSE_MS),
        ("close_valve", "precursor_b_valve", None),
        ("open_valve", "purge_valve", None),
        ("wait", None, DEMO_PURGE_MS),
        ("close_valve", "purge_valve", None),
    ]
    steps = [
        Step(1, "set_parameter", "carrier_flow_setpoint", value=100.0),
        Step(2, "set_parameter", "purge_flow_setpoint", value=300.0),
        Step(3, "repeat", repeat_count=DEMO_CYCLES, block_length=len(body)),
    ]
    for offset, (kind, target, duration) in enumerate(body):
        steps.append(Step(4 + offset, kind, target, duration_ms=duration))
    return steps
