"""A real terminal process for tests: counts a command every tick, nothing else.

    python -m tests.dummy_terminal TERMINAL_TYPE [--exit-at-once CODE] [--marker FILE]

``--marker`` appends one line per start (pid and monotonic time), so a test can count
the starts of a terminal that never lives long enough to register.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from pglive import TerminalRegistry, configure_logging, run_terminal


async def count_commands(registry: TerminalRegistry) -> None:
    while True:
        registry.increment_commands()
        await asyncio.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("terminal_type")
    parser.add_argument("--exit-at-once", type=int, default=None)
    parser.add_argument("--marker")
    parser.add_argument("--heartbeat-interval", type=float, default=None)
    args = parser.parse_args()

    if args.marker:
        with open(args.marker, "a") as marker:
            marker.write(f"{os.getpid()} {time.monotonic()}\n")
    if args.exit_at_once is not None:
        sys.exit(args.exit_at_once)

    registry = TerminalRegistry(
        args.terminal_type, heartbeat_interval=args.heartbeat_interval
    )
    configure_logging(registry.log_file_path)
    sys.exit(run_terminal(registry, count_commands))


if __name__ == "__main__":
    main()
