"""What a heartbeat costs, next to the cheapest write that could stand in for it.

    .venv/bin/python bench/heartbeat_cost.py [--beats 2000]

Runs on a throwaway local cluster. Each round times N calls of ``pglive.heartbeat()``
(token check, counters, status, a sample row) and N bare ``UPDATE ... SET last_heartbeat =
now()`` statements on one connection, interleaved, and prints the ratio of the medians.
It also prints how a sweep's cost grows from 10 to 1,000 active instances. Only ratios
measured side by side in one run are printed: absolute times on a shared machine mean
little.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from pathlib import Path

import click
import psycopg

from pglive.embedded import EmbeddedCluster
from pglive.migrate import migrate


def timed(call, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        call()
    return time.perf_counter() - started


def register(conn, machine_id, terminal_type="terminal1"):
    return conn.execute(
        "SELECT * FROM pglive.register_terminal(%s, %s, 'testing', 1, 'bench', 2)",
        (terminal_type, machine_id),
    ).fetchone()


@click.command()
@click.option("--beats", default=2000, show_default=True)
@click.option("--rounds", default=5, show_default=True)
def main(beats: int, rounds: int) -> None:
    home = Path(tempfile.mkdtemp(prefix="pglive-bench-", dir="/tmp"))
    home.chmod(0o755)
    cluster = EmbeddedCluster(home, fast_unsafe=True)
    try:
        dsn = cluster.start()
        migrate(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            instance_id, token = register(conn, uuid.uuid4())
            heartbeat = (
                "SELECT pglive.heartbeat(%s, %s, 3::bigint, 0::bigint, NULL, NULL)",
                (instance_id, token),
            )
            bare = (
                "UPDATE pglive.terminal_instances SET last_heartbeat = now() WHERE id = %s",
                (instance_id,),
            )
            ratios = []
            for _ in range(rounds):
                api = timed(lambda: conn.execute(*heartbeat), beats)
                raw = timed(lambda: conn.execute(*bare), beats)
                ratios.append(api / raw)
            click.echo(
                f"heartbeat() / bare UPDATE: {statistics.median(ratios):.2f}x "
                f"(median of {rounds} rounds of {beats} calls each)"
            )

            sweep_times = {}
            for target in (10, 1000):
                while (
                    conn.execute(
                        "SELECT count(*) FROM pglive.active_terminals"
                    ).fetchone()[0]
                    < target
                ):
                    register(conn, uuid.uuid4())
                sweep_times[target] = statistics.median(
                    timed(
                        lambda: conn.execute("SELECT count(*) FROM pglive.sweep()"), 20
                    )
                    for _ in range(rounds)
                )
            click.echo(
                f"sweep() over 1,000 active instances / over 10: "
                f"{sweep_times[1000] / sweep_times[10]:.1f}x"
            )
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
