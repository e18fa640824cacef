"""Formatting for the ``pglive`` CLI: tables, durations, colours and JSON.

Nothing here touches the database: every function takes rows as the views return them
(dicts) and returns text, so the look of ``pglive status`` can change without its queries.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import click

Row = dict[str, Any]

LAST_ERROR_WIDTH = 50
COLUMN_GAP = "  "

STATUS_COLOURS: dict[str, dict[str, Any]] = {
    "healthy": {"fg": "green"},
    "starting": {"fg": "yellow"},
    "degraded": {"fg": "yellow"},
    "stopping": {"fg": "yellow"},
    "crashed": {"fg": "red", "bold": True},
    "stopped": {"dim": True},
}

TERMINAL_HEADERS = (
    "MACHINE",
    "TYPE",
    "STATUS",
    "PID",
    "UPTIME",
    "HEARTBEAT",
    "COMMANDS",
    "ERRORS",
    "RESTARTS",
    "LAST ERROR",
)

HISTORY_HEADERS = ("TIME", "FROM", "TO", "UPTIME", "REASON")


def human_duration(seconds: float | decimal.Decimal | None) -> str:
    """Seconds as an operator reads them: ``5s``, ``3m12s``, ``2h05m``, ``3d04h``."""
    if seconds is None:
        return "-"

    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)

    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def short_machine(machine_id: uuid.UUID | str) -> str:
    """The first block of a machine id, like a short git hash."""
    return str(machine_id)[:8]


def one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def truncate(text: str | None, width: int = LAST_ERROR_WIDTH) -> str:
    flat = one_line(text)
    if len(flat) <= width:
        return flat
    return flat[: width - 1] + "…"


def status_label(row: Row) -> str:
    """The status, marked when the launcher gave up restarting this slot."""
    if row.get("gave_up_at") is not None:
        return f"{row['status']} (gave up)"
    return row["status"]


def heartbeat_age(row: Row) -> str:
    """Time since the last heartbeat of an active instance; ``-`` for one that ended."""
    if row.get("seconds_since_heartbeat") is None:
        return "-"
    if row.get("last_heartbeat") is None:
        return "never"
    return f"{human_duration(row['seconds_since_heartbeat'])} ago"


def styled_status(text: str, status: str, colour: bool) -> str:
    if not colour:
        return text
    return click.style(text, **STATUS_COLOURS.get(status, {}))


def render_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    styles: Iterable[dict[int, str]] | None = None,
) -> str:
    """Left-aligned columns, kubectl style.

    Widths are measured on the plain text; ``styles`` gives, per row, coloured versions of
    some cells, which are padded as if they were plain. The last column is not padded.
    """
    plain_rows = [list(row) for row in rows]
    styled_rows = list(styles) if styles is not None else [{} for _ in plain_rows]
    widths = [
        max(len(cells[i]) for cells in [list(headers), *plain_rows])
        for i in range(len(headers))
    ]

    lines = [_render_line(list(headers), {}, widths)]
    for cells, styled in zip(plain_rows, styled_rows, strict=True):
        lines.append(_render_line(cells, styled, widths))
    return "\n".join(lines)


def _render_line(cells: list[str], styled: dict[int, str], widths: list[int]) -> str:
    parts = []
    for index, cell in enumerate(cells):
        shown = styled.get(index, cell)
        is_last = index == len(cells) - 1
        padding = "" if is_last else " " * (widths[index] - len(cell))
        parts.append(shown + padding)
    return COLUMN_GAP.join(parts).rstrip()


def terminal_cells(row: Row) -> list[str]:
    return [
        short_machine(row["machine_id"]),
        row["terminal_type"],
        status_label(row),
        str(row["pid"]),
        human_duration(row["uptime_seconds"]),
        heartbeat_age(row),
        str(row["commands_processed"]),
        str(row["errors_encountered"]),
        str(row["restarts_24h"]),
        truncate(row["last_error"]),
    ]


def terminal_table(rows: Sequence[Row], *, colour: bool) -> str:
    """The ``pglive status`` table of rows of view ``pglive.terminal_status``."""
    cells = [terminal_cells(row) for row in rows]
    styles = [
        {2: styled_status(row_cells[2], row["status"], colour)}
        for row, row_cells in zip(rows, cells, strict=True)
    ]
    return render_table(TERMINAL_HEADERS, cells, styles)


def launcher_line(launcher: Row, *, colour: bool) -> str:
    """One line about a machine's launcher (a row of view ``pglive.launchers``)."""
    machine = short_machine(launcher["machine_id"])
    status = styled_status(launcher["status"], launcher["status"], colour)
    if launcher["alive"]:
        return f"launcher on {machine}: {status}, pid {launcher['pid']}"

    reason = one_line(launcher.get("status_reason"))
    because = f" ({reason})" if reason else ""
    return (
        f"launcher on {machine}: {status}{because}; "
        f"nothing restarts its terminals until it runs again"
    )


def no_terminals_line(machine_id: uuid.UUID | None) -> str:
    if machine_id is None:
        return "no terminals registered on any machine"
    return f"no terminals registered on machine {machine_id}"


def history_table(rows: Sequence[Row]) -> str:
    """The status changes of one instance (view ``pglive.terminal_health_history``)."""
    cells = [
        [
            local_time(row["created_at"]),
            row["previous_status"] or "-",
            row["new_status"],
            human_duration(row["uptime_seconds"]),
            one_line(row["reason"]),
        ]
        for row in rows
    ]
    return render_table(HISTORY_HEADERS, cells)


def instance_heading(instance: Row) -> str:
    return (
        f"instance {instance['id']}: {instance['terminal_type']} on machine "
        f"{instance['machine_id']} (host {instance['hostname']}, pid {instance['pid']}), "
        f"now {instance['status']}"
    )


def local_time(moment: dt.datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def sweep_line(change: Row) -> str:
    """One change made by ``pglive.sweep()``."""
    return (
        f"{change['action']}: {change['terminal_type']} on "
        f"{short_machine(change['machine_id'])} (instance {change['instance_id']}): "
        f"{one_line(change['detail'])}"
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def to_json(rows: Sequence[Row]) -> str:
    """Rows as a JSON list: ids as strings, times in ISO 8601, numbers as numbers."""
    return json.dumps(list(rows), default=_json_default, indent=2)


def status_report(
    rows: Sequence[Row],
    launchers: Sequence[Row],
    machine_id: uuid.UUID | None,
    *,
    colour: bool,
) -> str:
    """The table of terminals, then one line per launcher.

    A launcher registers as a terminal of type ``launcher``: its row is left out of the
    table and shown as a line of its own, with what its absence means.
    """
    terminals = [row for row in rows if row["terminal_type"] != "launcher"]
    if terminals:
        parts = [terminal_table(terminals, colour=colour)]
    else:
        parts = [no_terminals_line(machine_id)]

    if launchers:
        parts.append("\n".join(launcher_line(row, colour=colour) for row in launchers))
    return "\n\n".join(parts)


def reset_line(terminal_type: str, machine_id: uuid.UUID, before: Row) -> str:
    """What ``pglive reset-recovery`` did, from the recovery decision taken before it."""
    slot = f"{terminal_type} on machine {machine_id}"
    if before["action"] == "gave_up":
        return (
            f"reset {slot}: it had given up after "
            f"{plural(before['attempt'], 'restart attempt')}; "
            "its launcher starts it again"
        )
    if before["attempt"]:
        return f"reset {slot}: forgot {plural(before['attempt'], 'restart attempt')}"
    return f"{slot} had no failed restarts, nothing to reset"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
