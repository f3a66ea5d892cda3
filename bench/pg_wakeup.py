"""Wake-up latency across processes on PostgreSQL: submit in one process,
seen by another, with LISTEN/NOTIFY against polling.

Method. A throw-away PostgreSQL 15 (tests/pgcluster.py: fsync off, Unix
socket). One process submits ``--n`` commands one by one, a few
milliseconds apart, each an ``Insert`` committed through ``PostgresStore``,
and notes the wall-clock time just before each commit. A second process
waits for them and notes when it saw each: with ``wait_for_change`` (what
``flows.wakeups.relay`` runs in an engine), or by polling
``ready_to_send`` every ``--poll`` seconds (what an engine does without
wake-ups, at its ``poll_interval``; the default 1 s engine would be far
worse), reading the pending rows each time it is woken. Latency = seen -
submitted, so it includes the commit and the read. Both
processes are on this host, so their clocks are one.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from bench._common import Row, headline

WATCHER = """
import sys, time
from flows.pgstore import PostgresStore
store = PostgresStore(sys.argv[1])
mode, n, poll = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
store.listen()
print("ready", flush=True)
known = set()
while len(known) < n:
    if mode == "notify":
        if not store.wait_for_change(5.0).ready:
            continue
    else:
        time.sleep(poll)
    now = time.time()
    for command in store.ready_to_send("bench", now, 100_000):
        if command.id not in known:
            known.add(command.id)
            print(command.id, now, flush=True)
"""


def measure(url: str, mode: str, n: int, poll: float, gap: float) -> list[float]:
    from adapters.base import Request
    from flows.operations import Insert
    from flows.pgstore import PostgresStore
    from flows.records import Command, new_id

    store = PostgresStore(url)
    watcher = subprocess.Popen(
        [sys.executable, "-c", WATCHER, url, mode, str(n), str(poll)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert watcher.stdout is not None
    assert watcher.stdout.readline().strip() == "ready"
    request = Request.from_json({"messages": [{"role": "user", "content": "hi"}]})
    sent = {}
    for _ in range(n):
        command = Command(
            id=new_id(),
            adapter="bench",
            request=request,
            state="pending",
            created_at=time.time(),
            timeout=30.0,
        )
        sent[command.id] = time.time()
        store.commit_one(Insert(command))
        time.sleep(gap)
    seen = dict(watcher.stdout.readline().split() for _ in range(n))
    watcher.wait(timeout=30)
    store.close()
    return [(float(seen[i]) - t) * 1000 for i, t in sent.items()]


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_wakeup", description=__doc__)
    parser.add_argument("--n", type=int, default=300, help="commands (300)")
    parser.add_argument("--poll", type=float, default=0.05, help="polling baseline's interval")
    parser.add_argument("--gap", type=float, default=0.005, help="seconds between submits")
    args = parser.parse_args(argv)
    from tests.pgcluster import Cluster

    cluster = Cluster()
    cluster.start()
    try:
        results = {}
        for mode in ("notify", "poll"):
            url = cluster.create_database(f"wake_{mode}")
            ms = sorted(measure(url, mode, args.n, args.poll, args.gap))
            results[mode] = ms
            p50 = statistics.median(ms)
            p99 = ms[int(len(ms) * 0.99) - 1]
            print(f"{mode:7} n={len(ms)}: p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {ms[-1]:.2f}")
    finally:
        cluster.stop()
    notify50 = statistics.median(results["notify"])
    poll50 = statistics.median(results["poll"])
    return [
        headline(
            "PostgreSQL wake-up across processes, p50",
            f"{notify50:.2f} ms",
            baseline=f"polling every {args.poll * 1000:.0f} ms: {poll50:.1f} ms",
            ratio=f"{poll50 / notify50:.1f}x faster",
            target="p50 < 5 ms",
            met=notify50 < 5,
        )
    ]


if __name__ == "__main__":
    main()
