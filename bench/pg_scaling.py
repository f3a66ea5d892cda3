"""Several engine processes on one PostgreSQL database: throughput and how
the work is shared, with 1, 2 and 4 engines.

Method. A throw-away PostgreSQL 15 (tests/pgcluster.py: fsync off, Unix
socket). For each engine count, a fresh database gets ``--n`` pending
commands of an adapter that answers at once, then that many engine processes
(tests/pg_engine_worker.py) are started together; the time is from the
start of the first to the last command done (read from the table), so it
includes the engines' start-up. Printed: commands/s, and each engine's
share of the sends (the claims it won).
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench._common import Row, headline

ROOT = Path(__file__).resolve().parent.parent


def run(url: str, engines: int, n: int, workdir: Path) -> tuple[float, list[int]]:
    from adapters.base import Request
    from flows.operations import Insert
    from flows.pgstore import PostgresStore
    from flows.records import Command, new_id

    store = PostgresStore(url)
    request = Request.from_json({"messages": [{"role": "user", "content": "count me"}]})
    for at in range(0, n, 1000):
        batch = [
            Command(
                id=new_id(),
                adapter="count",
                request=request,
                state="pending",
                created_at=time.time(),
                timeout=60.0,
            )
            for _ in range(min(1000, n - at))
        ]
        store.commit([Insert(c) for c in batch])
    logs = [workdir / f"{engines}-{i}.log" for i in range(engines)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "pg_engine_worker.py"), url, str(log)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for log in logs
    ]
    while store.counts(["done"]).get(("count", "done"), 0) < n:
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    for p in procs:
        p.wait(timeout=60)
    store.close()
    shares = collections.Counter(log.name for log in logs for _ in log.read_text().splitlines())
    return elapsed, [shares[log.name] for log in logs]


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_scaling", description=__doc__)
    parser.add_argument("--n", type=int, default=5000, help="commands per run (5000)")
    args = parser.parse_args(argv)
    from tests.pgcluster import Cluster

    cluster = Cluster()
    cluster.start()
    figures = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for engines in (1, 2, 4):
                url = cluster.create_database(f"scale_{engines}")
                elapsed, shares = run(url, engines, args.n, Path(tmp))
                figures[engines] = args.n / elapsed
                print(
                    f"{engines} engine(s): {args.n / elapsed:,.0f} commands/s "
                    f"({elapsed:.2f} s, start-up included); sends by engine {shares}"
                )
    finally:
        cluster.stop()
    return [
        headline(
            "PostgreSQL, 4 engine processes on one database",
            f"{figures[4]:,.0f}/s",
            baseline=f"1 engine {figures[1]:,.0f}/s",
            ratio=f"{figures[4] / figures[1]:.2f}x",
        )
    ]


if __name__ == "__main__":
    main()
