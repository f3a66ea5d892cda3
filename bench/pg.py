"""dovecote on PostgreSQL: lifecycle against procrastinate and pgqueuer,
scaling over engine processes, and wake-up latency across processes.

    python -m bench.pg [--n 5000] [--runs 3]

A throw-away PostgreSQL 15 server is started as the tests start theirs
(tests/pgcluster.py), then made durable (``fsync = on``,
``full_page_writes = on``; the tests' server runs without fsync) and left
at ``synchronous_commit = on``, as all three systems ship. Every run gets a
database of its own. Each system runs in a process of its own
(bench/pg_roles.py): the peers under asyncio, dovecote under trio.

1. **Lifecycle**: enqueue N jobs in batches of 1,000, then until all are
   done (dovecote journals each command's 4 transitions; the peers record
   their own job states). Runs interleaved, median of ``--runs``; the ratio
   is dovecote over the better peer (target >= 1.5).
2. **Scaling**: 1, 2 and 4 engine processes on one database; 4 x N commands
   submitted while they run; throughput from the first submit to the last
   finish, and the share of claims that lost the race to another engine
   (``FOR UPDATE SKIP LOCKED``: a locked row is skipped, not waited for).
3. **Wake-up latency**: one process submits a command every 10 ms, an engine
   in another process claims it; latency = ``sent_at - created_at`` from the
   rows (one host, one clock). With LISTEN/NOTIFY (target p50 < 5 ms)
   against the same engine polling (wake-ups off) every 1 s and every 50 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psycopg

from bench._common import headline, percentile
from tests.pgcluster import Cluster

ROLES = [sys.executable, "-m", "bench.pg_roles"]


@contextlib.contextmanager
def durable_server() -> Iterator[Cluster]:
    """The tests' throw-away server, with fsync on: a benchmark's commit
    must reach the disk."""
    cluster = Cluster()
    cluster.start()
    try:
        cluster.psql("ALTER SYSTEM SET fsync = on")
        cluster.psql("ALTER SYSTEM SET full_page_writes = on")
        cluster.psql("SELECT pg_reload_conf()")
        yield cluster
    finally:
        cluster.stop()


_made = iter(range(1, 1_000_000))


def fresh(cluster: Cluster) -> str:
    return cluster.create_database(f"bench_{next(_made)}")


def role(*args: str) -> dict[str, Any]:
    done = subprocess.run([*ROLES, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{args[:2]} failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql.encode()).fetchall()


# --- 1. lifecycle -------------------------------------------------------------

SYSTEMS = ("dovecote", "procrastinate", "pgqueuer")


def lifecycle(cluster: Cluster, n: int, runs: int) -> dict[str, float]:
    rates: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    for _ in range(runs):
        for system in SYSTEMS:  # interleaved: the machine's load is shared alike
            seconds = role("lifecycle", system, fresh(cluster), str(n))["seconds"]
            rates[system].append(n / seconds)
    print(f"lifecycle, enqueue {n:,} in batches of 1,000 -> all done; jobs/s over {runs} runs")
    print(f"{'system':<14} {'median':>9} {'min':>9} {'max':>9}")
    for system, values in rates.items():
        print(
            f"{system:<14} {statistics.median(values):>9,.0f} {min(values):>9,.0f} "
            f"{max(values):>9,.0f}"
        )
    return {s: statistics.median(v) for s, v in rates.items()}


# --- 2. scaling ---------------------------------------------------------------


def submit_all(url: str, count: int) -> None:
    from bench.pg_roles import pending
    from flows.operations import Insert
    from flows.pgstore import PostgresStore

    store = PostgresStore(url)
    try:
        for first in range(0, count, 1000):
            store.commit([Insert(c) for c in pending(min(1000, count - first))])
    finally:
        store.close()


def start_engines(url: str, k: int, n: int, *extra: str) -> list[subprocess.Popen[str]]:
    engines = [
        subprocess.Popen([*ROLES, "engine", url, str(n), *extra], stdout=subprocess.PIPE, text=True)
        for _ in range(k)
    ]
    for engine in engines:
        assert engine.stdout is not None
        json.loads(engine.stdout.readline())  # started
    return engines


def results(engines: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    out = []
    for engine in engines:
        stdout, _ = engine.communicate(timeout=600)
        if engine.returncode != 0:
            raise RuntimeError("an engine process failed")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def scaling(cluster: Cluster, n: int) -> list[dict[str, Any]]:
    rows = []
    total = 4 * n
    for k in (1, 2, 4):
        url = fresh(cluster)
        engines = start_engines(url, k, total)
        started = time.time()
        submit_all(url, total)
        ended = results(engines)
        seconds = max(e["ended"] for e in ended) - started
        claims = sum(e["claims"] for e in ended)
        lost = sum(e["lost"] for e in ended)
        rows.append(
            {
                "engines": k,
                "rate": total / seconds,
                "lost": lost / claims if claims else 0.0,
                "shares": sorted(e["sent"] for e in ended),
            }
        )
    print(f"\nscaling: {total:,} commands submitted while k engine processes drain one database")
    print(f"{'engines':>7} {'commands/s':>11} {'vs 1':>6} {'claims lost':>12}  sends per engine")
    for row in rows:
        print(
            f"{row['engines']:>7} {row['rate']:>11,.0f} {row['rate'] / rows[0]['rate']:>6.2f} "
            f"{row['lost']:>11.2%}  {row['shares']}"
        )
    return rows


# --- 3. wake-up latency ---------------------------------------------------------


def latency(cluster: Cluster, count: int, *extra: str) -> tuple[float, float]:
    url = fresh(cluster)
    [engine] = start_engines(url, 1, count, *extra)
    role("submit", url, str(count), "0.01")
    results([engine])
    lags = [
        (sent - created) * 1000
        for sent, created in query(url, "SELECT sent_at, created_at FROM commands")
    ]
    return percentile(lags, 50), percentile(lags, 99)


def wakeups(cluster: Cluster, count: int) -> dict[str, tuple[float, float]]:
    rows = {
        "LISTEN/NOTIFY": latency(cluster, count),
        "polling every 1 s": latency(cluster, count // 4, "--no-wakeups", "--poll", "1.0"),
        "polling every 50 ms": latency(cluster, count, "--no-wakeups", "--poll", "0.05"),
    }
    print("\nwake-up latency across processes: submitted in one, claimed in another (ms)")
    print(f"{'engine':<22} {'p50':>8} {'p99':>8}")
    for name, (p50, p99) in rows.items():
        print(f"{name:<22} {p50:>8.2f} {p99:>8.2f}")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000, help="jobs per lifecycle run (5000)")
    parser.add_argument("--runs", type=int, default=3, help="lifecycle runs per system (3)")
    parser.add_argument("--latency-n", type=int, default=200, help="commands timed (200)")
    args = parser.parse_args(argv)
    print(f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with durable_server() as cluster:
        rates = lifecycle(cluster, args.n, args.runs)
        best = max(("procrastinate", "pgqueuer"), key=lambda s: rates[s])
        ratio = rates["dovecote"] / rates[best]
        print(f"dovecote / {best} (the better peer): {ratio:.2f}x (target >= 1.5x)")
        scale = scaling(cluster, args.n)
        wake = wakeups(cluster, args.latency_n)
    print(f"load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return [
        headline(
            "PostgreSQL lifecycle, enqueue -> done, vs procrastinate and pgqueuer",
            f"{rates['dovecote']:,.0f}/s",
            baseline=f"{best} {rates[best]:,.0f}/s",
            ratio=f"{ratio:.2f}x",
            target=">= 1.5x",
            met=ratio >= 1.5,
        ),
        headline(
            "PostgreSQL, 4 engine processes on one database",
            f"{scale[2]['rate']:,.0f}/s, {scale[2]['lost']:.2%} of claims lost to races",
            baseline=f"1 engine {scale[0]['rate']:,.0f}/s",
            ratio=f"{scale[2]['rate'] / scale[0]['rate']:.2f}x",
        ),
        headline(
            "wake-up across processes, p50 / p99 (LISTEN/NOTIFY)",
            f"{wake['LISTEN/NOTIFY'][0]:.2f} / {wake['LISTEN/NOTIFY'][1]:.2f} ms",
            baseline=f"polling 1 s: {wake['polling every 1 s'][0]:.0f} ms p50",
            target="p50 < 5 ms",
            met=wake["LISTEN/NOTIFY"][0] < 5,
        ),
    ]


if __name__ == "__main__":
    main()
