"""Claim latency under 4 producers and 4 consumers: dovecote against SQLite task queues.

Run from the repository root::

    .venv/bin/pip install huey persist-queue litequeue pyinstrument
    .venv/bin/python -m bench.claims [--n 2000] [--rate 1000] [--runs 5]

What is measured
----------------
The time from handing a job to the queue until a consumer holds it, at a fixed offered
load below every system's capacity (default 1,000 jobs/s in all, 250/s from each of 4
producers, paced on an absolute schedule, producers staggered by a quarter period), for N
jobs per system (default 2,000: about 2 s each). The jobs carry the same ~100-byte
message as ``bench.lifecycle``.

* **dovecote**: one engine (``flows.open_engine``) on a fresh file, with an in-process
  adapter that answers at once and has ``max_in_flight`` 4 (the 4 consumers; a second
  set of rows uses 1024, as ``bench.lifecycle`` does). 4 producer
  tasks ``submit``; the engine's dispatcher claims. Two latencies per command: the one
  stored in the row, ``sent_at - created_at`` (from just before the insert's commit to
  just before the claim's commit), and ``submit -> send()``: from the producer's call
  to ``submit`` until the adapter's ``send`` starts, which is after the claim is
  committed: the same span as the peers' put -> get.
* **persist-queue** (``SQLiteAckQueue``, ``multithreading=True``: a connection for puts
  and one for gets): 4 producer threads ``put``; 4 consumer threads ``get(block=True)``
  (woken by the queue's own event) and ``ack``. Latency: put called -> get returned.
* **huey** (``SqliteHuey``): 4 producer threads enqueue a task; 4 consumer threads
  ``huey.dequeue()`` and ``huey.execute(task)``, sleeping 1 ms when the queue is empty
  (huey has no wake-up: its own consumer polls every 0.1 s and backs off, which would
  be far slower). Latency: enqueue called -> dequeue returned.

Fairness: fresh database file per run in a new temporary directory; WAL with
``synchronous=NORMAL`` everywhere (set by dovecote itself; set on huey's and
persist-queue's connections right after opening; the values are read back and
printed). Percentiles are nearest-rank over the jobs of one run; each row shows the
median of the runs' p50 (and p99, and max) with the lowest and highest run's.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

import flows
from adapters.base import Reply, Request, SendContext
from bench._common import (
    REPLY_TEXT,
    REQUEST,
    InstantAdapter,
    Row,
    fmt_int,
    fmt_str,
    fresh_dir,
    headline,
    percentile,
    pragmas,
    print_table,
)

BENCH = "claims"
PRODUCERS = 4
CONSUMERS = 4


class RecordingAdapter(InstantAdapter):
    """Answers at once and notes when each command's send started (perf_counter)."""

    def __init__(self, max_in_flight: int) -> None:
        super().__init__(max_in_flight=max_in_flight)
        self.sent: dict[str, float] = {}

    async def send(self, request: Request, context: SendContext) -> Reply:
        self.sent[context.command_id] = time.perf_counter()
        return await super().send(request, context)


Result = tuple[dict[str, list[float]], float, str, str]  # latencies by label, seconds, pragmas


# --- dovecote ----------------------------------------------------------------------


async def _dovecote_async(path: Path, n: int, rate: float, max_in_flight: int) -> Result:
    adapter = RecordingAdapter(max_in_flight=max_in_flight)
    submitted: dict[str, float] = {}
    period = PRODUCERS / rate

    async def produce(index: int, count: int, start: float) -> None:
        for i in range(count):
            await trio.sleep_until(start + (i + index / PRODUCERS) * period)
            called = time.perf_counter()
            submitted[await engine.submit("instant", REQUEST)] = called

    async with flows.open_engine(path, adapters=[adapter]) as engine:
        with engine.subscribe(buffer=4 * n + 64) as notices:
            began = time.perf_counter()
            finished = 0
            async with trio.open_nursery() as nursery:
                start = trio.current_time() + 0.01
                for index in range(PRODUCERS):
                    count = n // PRODUCERS + (index < n % PRODUCERS)
                    nursery.start_soon(produce, index, count, start)
                async for notice in notices:
                    if isinstance(notice, flows.StateChange) and notice.command.is_terminal:
                        finished += 1
                        if finished == n:
                            break
            elapsed = time.perf_counter() - began
        commands = engine.list()
        if finished != n or len(commands) != n or any(c.state != "done" for c in commands):
            raise RuntimeError(f"dovecote: {finished} of {n} finished")
        stored = [c.sent_at - c.created_at for c in commands if c.sent_at is not None]
        observed = [adapter.sent[c.id] - submitted[c.id] for c in commands]
        journal, synchronous = pragmas(engine.store.db.conn)
    return {"row": stored, "send": observed}, elapsed, journal, synchronous


def dovecote_once(directory: Path, n: int, rate: float, max_in_flight: int) -> Result:
    return trio.run(_dovecote_async, directory / "dovecote.db", n, rate, max_in_flight)


# --- threaded peers ----------------------------------------------------------------


def _threads(
    n: int,
    rate: float,
    put: Callable[[float], None],
    take: Callable[[], float | None],
) -> tuple[list[float], float]:
    """Run 4 paced producer threads calling ``put(t_called)`` and 4 consumer threads
    calling ``take()`` (the latency of the job it got, or None when none came) until
    ``n`` jobs were taken; return the latencies and the elapsed seconds."""
    latencies: list[float] = []
    lock = threading.Lock()
    period = PRODUCERS / rate
    start = time.perf_counter() + 0.01
    errors: list[BaseException] = []

    def produce(index: int, count: int) -> None:
        try:
            for i in range(count):
                delay = start + (i + index / PRODUCERS) * period - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                put(time.perf_counter())
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def consume() -> None:
        try:
            while True:
                with lock:
                    if len(latencies) >= n or errors:
                        return
                latency = take()
                if latency is not None:
                    with lock:
                        latencies.append(latency)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=produce, args=(i, n // PRODUCERS + (i < n % PRODUCERS)))
        for i in range(PRODUCERS)
    ]
    threads += [threading.Thread(target=consume) for _ in range(CONSUMERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return latencies, time.perf_counter() - start


def persist_queue_once(directory: Path, n: int, rate: float) -> Result:
    from persistqueue import SQLiteAckQueue
    from persistqueue.exceptions import Empty

    queue = SQLiteAckQueue(str(directory / "pq"), multithreading=True, auto_resume=False)
    connections: list[Any] = [queue._conn, queue._putter]  # no public way to set it
    for conn in connections:
        conn.execute("PRAGMA synchronous = NORMAL")

    def put(called: float) -> None:
        queue.put({"put_at": called, "request": REQUEST})

    def take() -> float | None:
        try:
            item = queue.get(block=True, timeout=0.05, raw=True)
        except Empty:
            return None
        latency = time.perf_counter() - float(item["data"]["put_at"])
        queue.ack(id=item["pqid"])
        return latency

    latencies, elapsed = _threads(n, rate, put, take)
    if queue.acked_count() != n:
        raise RuntimeError(f"persist-queue: {queue.acked_count()} acked, expected {n}")
    journal, synchronous = pragmas(connections[1])
    queue.close()
    return {"get": latencies}, elapsed, journal, synchronous


def huey_once(directory: Path, n: int, rate: float) -> Result:
    from huey import SqliteHuey  # type: ignore[import-untyped]

    huey = SqliteHuey("bench", filename=str(directory / "huey.db"), results=True)
    storage: Any = huey.storage
    storage.conn.execute("PRAGMA synchronous = NORMAL")

    @huey.task()  # type: ignore[untyped-decorator]
    def answer(put_at: float, request: dict[str, Any]) -> str:
        return REPLY_TEXT

    def put(called: float) -> None:
        answer(called, REQUEST)

    def take() -> float | None:
        task = huey.dequeue()
        if task is None:
            time.sleep(0.001)
            return None
        latency = time.perf_counter() - float(task.args[0])
        huey.execute(task)
        return latency

    latencies, elapsed = _threads(n, rate, put, take)
    if storage.result_store_size() != n:
        raise RuntimeError(f"huey: {storage.result_store_size()} results, expected {n}")
    journal, synchronous = pragmas(storage.conn)
    storage.close()
    return {"get": latencies}, elapsed, journal, synchronous


# --- the benchmark -----------------------------------------------------------------

Measure = Callable[[Path, int, float], Result]
DOVECOTE_LABELS = {
    "row": "claim: sent_at - created_at (stored rows)",
    "send": "submit called -> adapter send() starts",
}
SYSTEMS: list[tuple[str, Measure, dict[str, str]]] = [
    (
        f"dovecote, max_in_flight {CONSUMERS}",
        lambda d, n, rate: dovecote_once(d, n, rate, CONSUMERS),
        DOVECOTE_LABELS,
    ),
    (
        "dovecote, max_in_flight 1024",
        lambda d, n, rate: dovecote_once(d, n, rate, 1024),
        DOVECOTE_LABELS,
    ),
    ("persist-queue", persist_queue_once, {"get": "SQLiteAckQueue put -> get(block) returns"}),
    ("huey", huey_once, {"get": "SqliteHuey enqueue -> dequeue returns (1 ms poll)"}),
]


def run(n: int = 2000, runs: int = 5, rate: float = 1000.0) -> list[Row]:
    """Measure every system ``runs`` times at ``rate`` jobs/s offered; one row per latency."""
    per_run: dict[tuple[str, str], list[list[float]]] = {}
    achieved: dict[str, list[float]] = {}
    read_back: dict[str, tuple[str, str]] = {}
    for _ in range(runs):
        for system, measure, _ in SYSTEMS:
            with fresh_dir(system.split(",")[0]) as directory:
                latencies, elapsed, journal, synchronous = measure(directory, n, rate)
            for label, values in latencies.items():
                per_run.setdefault((system, label), []).append(values)
            achieved.setdefault(system, []).append(n / elapsed)
            read_back[system] = (journal, synchronous)
    rows: list[Row] = []
    for system, _, labels in SYSTEMS:
        for label, variant in labels.items():
            runs_of = per_run[(system, label)]
            spread = {
                key: [statistic(values) for values in runs_of]
                for key, statistic in (
                    ("p50", lambda v: percentile(v, 50)),
                    ("p99", lambda v: percentile(v, 99)),
                    ("max", max),
                )
            }
            rows.append(
                {
                    "bench": BENCH,
                    "system": system,
                    "variant": variant,
                    "n": n,
                    "runs": runs,
                    "offered": rate,
                    "achieved": min(achieved[system]),
                    "unit": "seconds",
                    **{key: statistics.median(v) for key, v in spread.items()},
                    **{f"{key}_min": min(v) for key, v in spread.items()},
                    **{f"{key}_max": max(v) for key, v in spread.items()},
                    "journal_mode": read_back[system][0],
                    "synchronous": read_back[system][1],
                }
            )
    return rows


COLUMNS_SHOWN = (
    ("system", "system", fmt_str),
    ("variant", "latency measured", fmt_str),
    ("n", "jobs/run", fmt_int),
    ("achieved", "jobs/s", fmt_int),
    ("p50_shown", "p50 ms (runs)", fmt_str),
    ("p99_shown", "p99 ms (runs)", fmt_str),
    ("max_shown", "max ms (runs)", fmt_str),
    ("journal_mode", "journal", fmt_str),
    ("synchronous", "synchronous", fmt_str),
)


def headlines(rows: Sequence[Row]) -> list[Row]:
    """The summary-table rows: dovecote (``max_in_flight`` 4, submit -> send) against the
    peer with the lowest p50 and p99 put -> get (lower is better; no target is set)."""
    mine = next(
        r
        for r in rows
        if r["system"] == f"dovecote, max_in_flight {CONSUMERS}" and r["variant"][0] == "s"
    )
    peers = [r for r in rows if not r["system"].startswith("dovecote")]
    out = []
    for key in ("p50", "p99"):
        best = min(peers, key=lambda r: r[key])
        out.append(
            headline(
                f"claim latency {key}, {PRODUCERS}x{CONSUMERS}, {mine['offered']:,.0f} jobs/s "
                "(lower is better)",
                f"{mine[key] * 1000:.2f} ms",
                baseline=f"{best['system']} {best[key] * 1000:.2f} ms",
                ratio=f"{mine[key] / best[key]:.2f}x",
            )
        )
    return out


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m bench.claims", description=__doc__)
    parser.add_argument("--n", type=int, default=2000, help="jobs per system per run (2000)")
    parser.add_argument("--runs", type=int, default=5, help="runs per system (5)")
    parser.add_argument("--rate", type=float, default=1000.0, help="offered jobs/s in all (1000)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = run(args.n, args.runs, args.rate)
    print(
        f"claim latency, {PRODUCERS} producers / {CONSUMERS} consumers, offered "
        f"{args.rate:,.0f} jobs/s, {args.n:,} jobs x {args.runs} run(s) per system"
    )
    shown = [
        {
            **r,
            **{
                f"{key}_shown": f"{r[key] * 1000:.2f} "
                f"({r[key + '_min'] * 1000:.2f}..{r[key + '_max'] * 1000:.2f})"
                for key in ("p50", "p99", "max")
            },
        }
        for r in rows
    ]
    print_table(shown, COLUMNS_SHOWN)
    ours = [r for r in rows if r["system"].startswith("dovecote") and r["variant"][0] == "s"]
    for mine in ours:
        for peer in (r for r in rows if not r["system"].startswith("dovecote")):
            print(
                f"{mine['system']} submit->send / {peer['system']} put->get: "
                f"p50 {mine['p50'] / peer['p50']:.2f}x, p99 {mine['p99'] / peer['p99']:.2f}x "
                "(lower is better)"
            )
    print(f"wall time {time.perf_counter() - started:.1f} s")
    return headlines(rows)


if __name__ == "__main__":
    main()
