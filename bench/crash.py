"""Crash: kill -9 a worker after k claims under load, restart it, count what was lost.

Run from the repository root::

    .venv/bin/python -m bench.crash [--n 2000] [--k 500] [--runs 5] [--work 0.001] [--jitter 0.02]

What is measured
----------------
For each system, one queue of N jobs (default 2,000) in a fresh SQLite file. A worker
process takes jobs with 4 consumers (threads for the peers; ``max_in_flight`` 4 for
dovecote), and for each job waits ``--work`` (1 ms, standing in for the call) and then
performs its **effect**: it appends the job's number to an effects file (one
``os.write`` to a file opened ``O_APPEND``: no fsync, but the kernel has it, so a
``kill -9`` loses nothing already written). When the worker's k-th claim happens
(default 500) it says so on stdout, and this process sends it ``SIGKILL`` after a
random delay of 0..``--jitter`` (20 ms: several jobs' time; the same delay for every
system within a run, a different one in each run), so that the kill lands at a
random point of the 4 consumers' cycles (claim, work, effect, acknowledgement), not
always just after a claim. A new worker is started on the same files and runs until
its queue is empty. Then:

* **lost**: jobs whose number is not in the effects file;
* **duplicated**: effects beyond the first, i.e. jobs performed more than once;
* **restart -> first effect** and **restart -> all done**: from starting the new
  process (its interpreter start-up and imports included) to its first effect, and to
  the moment it has finished every remaining job.

What a claim, an effect and "done" are for each system:

* **huey** 3 (``SqliteHuey``, result store on): a claim is ``huey.dequeue()``, which
  deletes the task's row in the same transaction; ``huey.execute(task)`` runs the task
  function (the work, then the effect) and stores its result. A task dequeued but not
  yet performed when the worker dies is gone: huey loses in-flight work by design
  (at-most-once). Nothing can run twice.
* **persist-queue** (``SQLiteAckQueue``, ``multithreading=True``, ``auto_resume=True``):
  a claim is ``get`` (the row goes ``unack``); after the effect, ``ack``. The new worker
  puts every ``unack`` row back to ``ready`` on opening, so a job claimed but not yet
  acked runs again (at-least-once): it is duplicated when the kill fell between its
  effect and its ack, and lost never.
* **dovecote, effect in send**: the jobs are commands for an in-process adapter whose
  ``send`` does the work and then the effect, and returns a reply; the engine commits
  ``sent -> replied -> done``. A claim is the ``pending -> sent`` compare-and-set (the
  adapter counts its sends). On restart the new engine's recovery finds the dead
  engine's ``sent`` commands (its pid is gone) and puts them back to ``pending`` with
  attempt + 1 (the adapter's ``on_interrupt`` is the default, ``retry``): sending is
  at-least-once, so an effect performed inside ``send`` whose reply was not yet
  committed is performed again. Only an effect recorded in the same transaction as the
  command's state could be exactly-once; this one is not, on purpose, like any real
  call to a provider.
* **dovecote, effect in handler**: the adapter's ``send`` does only the work; the
  effect is done by the command's reply handler (``handler="bench_effect"``), which
  the engine runs once ``replied`` is committed and before ``done`` is. Recovery runs
  the handler again for a ``replied`` command left by the dead engine (handlers must
  be idempotent, and get the command id to make that easy; this one does not dedupe),
  and re-sends ``sent`` ones, whose effect had not happened yet.
* **dovecote, effect journaled**: the way dovecote offers exactly-once effects. The
  reply handler (``handler="bench_journaled"``) touches nothing outside; it returns the
  job's number, and the engine journals that result in the same transaction that
  moves the command to ``done``. The effects are the ``finish`` rows of the journal
  (read back from the file after the restart), not the effects file: a handler run
  twice (after a crash between ``replied`` and ``done``) journals once, because only
  one ``finish`` can commit.

Fairness: every system works in a fresh directory per run, on SQLite in WAL mode with
``synchronous=NORMAL`` (set by dovecote itself; set on huey's and persist-queue's
connections right after they open them), with the same 4 consumers, the same work
per job and the same effect. The queue is filled before the first worker starts
(dovecote: through ``engine.submit`` with the adapter parked). Runs are interleaved
(run 1 of every system, then run 2, ...); the table gives the median with min and max
over the runs, and the total over all runs for lost and duplicated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

import flows
from adapters.base import AdapterSettings, Reply, Request, SendContext
from bench._common import Row, fmt_str, fresh_dir, headline, prefill, print_table, verdict

BENCH = "crash"
N = 2000
K = 500
RUNS = 5
WORK = 0.001
JITTER = 0.02  # the kill comes 0..20 ms after the k-th claim is reported
CONSUMERS = 4
ROOT = Path(__file__).resolve().parent.parent
EFFECTS = "effects.log"
HUEY_TASK = "bench_crash_job"
HANDLER = "bench_effect"
ADAPTER = "effect"
SYSTEMS = (
    "huey",
    "persist-queue",
    "dovecote, effect in send",
    "dovecote, effect in handler",
    "dovecote, effect journaled",
)
JOURNALED = "bench_journaled"


# --- in the worker process -------------------------------------------------------------


class Worker:
    """What every worker shares: the effects file, the claim count, the first effect."""

    def __init__(self, directory: Path, announce: int, work: float) -> None:
        self.fd = os.open(directory / EFFECTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.announce = announce
        self.work = work
        self.claims = 0
        self.first_effect: float | None = None
        self._lock = threading.Lock()

    def claimed(self) -> None:
        with self._lock:
            self.claims += 1
            if self.claims == self.announce:
                print(f"claimed {self.claims}", flush=True)

    def effect(self, job: int) -> None:
        os.write(self.fd, b"%d\n" % job)
        if self.first_effect is None:
            self.first_effect = time.time()


def _threads(count: int, target: Callable[[], None]) -> None:
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            target()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _huey(directory: Path, perform: Callable[[int], None] | None) -> Any:
    from huey import SqliteHuey  # type: ignore[import-untyped]

    huey = SqliteHuey("bench", filename=str(directory / "huey.db"), results=True)
    huey.storage.conn.execute("PRAGMA synchronous = NORMAL")

    def job(number: int) -> int:
        if perform is not None:
            perform(number)
        return number

    # huey names a task after its function's module too: the same in every process,
    # whether this module runs as ``__main__`` or is imported.
    job.__module__ = "bench.crash"
    task = huey.task(name=HUEY_TASK)(job)
    return huey, task


def huey_fill(directory: Path, n: int) -> None:
    huey, task = _huey(directory, None)
    for number in range(n):
        task(number)
    huey.storage.close()


def huey_work(directory: Path, worker: Worker) -> dict[str, Any]:
    def perform(number: int) -> None:
        time.sleep(worker.work)
        worker.effect(number)

    huey, _ = _huey(directory, perform)

    def consume() -> None:
        while True:
            task = huey.dequeue()
            if task is None:
                return
            worker.claimed()
            huey.execute(task)

    _threads(CONSUMERS, consume)
    done = time.time()
    left = huey.storage.queue_size()
    huey.storage.close()
    return {"done_at": done, "end": f"{left} left in the queue"}


def _persist_queue(directory: Path, auto_resume: bool) -> Any:
    from persistqueue import SQLiteAckQueue

    queue = SQLiteAckQueue(str(directory / "pq"), multithreading=True, auto_resume=auto_resume)
    connections: list[Any] = [queue._conn, queue._putter]  # no public way to set it
    for conn in connections:
        conn.execute("PRAGMA synchronous = NORMAL")
    return queue


def persist_queue_fill(directory: Path, n: int) -> None:
    queue = _persist_queue(directory, auto_resume=False)
    for number in range(n):
        queue.put(number)
    queue.close()


def persist_queue_work(directory: Path, worker: Worker) -> dict[str, Any]:
    from persistqueue.exceptions import Empty

    queue = _persist_queue(directory, auto_resume=True)

    def consume() -> None:
        while True:
            try:
                item = queue.get(block=False, raw=True)
            except Empty:
                return
            worker.claimed()
            time.sleep(worker.work)
            worker.effect(int(item["data"]))
            queue.ack(id=item["pqid"])

    _threads(CONSUMERS, consume)
    done = time.time()
    end = f"{queue.acked_count()} acked, {queue.ready_count() + queue.unack_count()} not"
    queue.close()
    return {"done_at": done, "end": end}


class EffectAdapter:
    """Does the work, and the effect too unless a handler does it."""

    def __init__(self, worker: Worker, in_send: bool) -> None:
        self.settings = AdapterSettings(name=ADAPTER, max_in_flight=CONSUMERS)
        self.worker = worker
        self.in_send = in_send

    async def send(self, request: Request, context: SendContext) -> Reply:
        self.worker.claimed()
        await trio.sleep(self.worker.work)
        if self.in_send:
            self.worker.effect(_job(request))
        return Reply("ok")

    async def aclose(self) -> None:
        return None


def _job(request: Request) -> int:
    return int(request.messages[0].content.split()[1])


def _handlers(worker: Worker | None) -> dict[str, Any]:
    def bench_effect(engine: flows.Engine, command: flows.Command) -> None:
        if worker is not None:
            worker.effect(_job(command.request))

    def bench_journaled(engine: flows.Engine, command: flows.Command) -> int:
        if worker is not None and worker.first_effect is None:
            worker.first_effect = time.time()
        return _job(command.request)

    return {HANDLER: bench_effect, JOURNALED: bench_journaled}


def _handler_of(system: str) -> dict[str, str]:
    if system.endswith("in send"):
        return {}
    return {"handler": JOURNALED if system.endswith("journaled") else HANDLER}


def dovecote_fill(directory: Path, n: int, system: str) -> None:
    handler = _handler_of(system)
    jobs = [
        {"request": {"messages": [{"role": "user", "content": f"job {number}"}]}, **handler}
        for number in range(n)
    ]
    prefill(directory / "dovecote.db", ADAPTER, jobs, handlers=_handlers(None))


def dovecote_work(directory: Path, worker: Worker, system: str) -> dict[str, Any]:
    in_send = system.endswith("in send")
    n_terminal = "SELECT count(*) FROM commands WHERE state IN ('done', 'dead', 'cancelled')"

    async def work() -> dict[str, Any]:
        adapter = EffectAdapter(worker, in_send)
        async with flows.open_engine(
            directory / "dovecote.db", adapters=[adapter], handlers=_handlers(worker)
        ) as engine:
            total = engine.store.db.execute("SELECT count(*) FROM commands").fetchone()[0]
            while engine.store.db.execute(n_terminal).fetchone()[0] < total:
                await trio.sleep(0.005)
            done = time.time()
            counts = engine.store.counts()
        end = ", ".join(f"{count} {state}" for (_, state), count in sorted(counts.items()))
        return {"done_at": done, "end": end}

    result: dict[str, Any] = trio.run(work)
    return result


def worker_main(argv: Sequence[str]) -> None:
    """A worker process: ``worker_main([system, directory, announce, work])``."""
    system, directory, announce, work = argv[0], Path(argv[1]), int(argv[2]), float(argv[3])
    worker = Worker(directory, announce, work)
    if system == "huey":
        result = huey_work(directory, worker)
    elif system == "persist-queue":
        result = persist_queue_work(directory, worker)
    else:
        result = dovecote_work(directory, worker, system)
    if announce:  # the first worker waits to be killed, having finished early
        time.sleep(3600)
    result.update(first_effect=worker.first_effect, claims=worker.claims)
    print("result " + json.dumps(result), flush=True)


# --- in this process -------------------------------------------------------------------


def fill(system: str, directory: Path, n: int) -> None:
    if system == "huey":
        huey_fill(directory, n)
    elif system == "persist-queue":
        persist_queue_fill(directory, n)
    else:
        dovecote_fill(directory, n, system)


def _start(system: str, directory: Path, announce: int, work: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from bench.crash import worker_main; worker_main(sys.argv[1:])",
            system,
            str(directory),
            str(announce),
            str(work),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _line(process: subprocess.Popen[str], prefix: str) -> str:
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    process.wait()
    stderr = process.stderr.read() if process.stderr else ""
    raise RuntimeError(f"worker exited ({process.returncode}) before {prefix!r}:\n{stderr}")


def _effects(directory: Path, system: str) -> Counter[int]:
    if system.endswith("journaled"):
        path = directory / "dovecote.db"
        if not path.exists():
            return Counter()
        store = flows.Store.existing(path)
        try:
            rows = store.db.execute("SELECT detail FROM events WHERE event = 'finish'")
            return Counter(json.loads(detail)["result"] for (detail,) in rows.fetchall())
        finally:
            store.close()
    path = directory / EFFECTS
    text = path.read_text() if path.exists() else ""
    return Counter(int(line) for line in text.splitlines())


def trial(
    system: str, directory: Path, n: int, k: int, work: float, delay: float
) -> dict[str, Any]:
    """Fill, start a worker, kill -9 it ``delay`` s after its k-th claim, restart, count."""
    fill(system, directory, n)
    first = _start(system, directory, k, work)
    try:
        _line(first, "claimed ")
        time.sleep(delay)
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.kill()
        first.communicate()
    at_kill = sum(_effects(directory, system).values())
    restarted = time.time()
    second = _start(system, directory, 0, work)
    try:
        result = json.loads(_line(second, "result "))
    finally:
        second.communicate(timeout=120)
    if second.returncode != 0:
        raise RuntimeError(f"{system}: the restarted worker exited with {second.returncode}")
    effects = _effects(directory, system)
    return {
        "lost": sum(1 for number in range(n) if effects[number] == 0),
        "duplicated": sum(count - 1 for count in effects.values() if count > 1),
        "strays": sum(1 for number in effects if not 0 <= number < n),
        "effects_at_kill": at_kill,
        "to_first": (result["first_effect"] or float("nan")) - restarted,
        "to_done": result["done_at"] - restarted,
        "end": result["end"],
    }


def run(
    n: int = N, k: int = K, runs: int = RUNS, work: float = WORK, jitter: float = JITTER
) -> list[Row]:
    results: dict[str, list[dict[str, Any]]] = {system: [] for system in SYSTEMS}
    for index in range(runs):
        # The same delay for every system in a run, a different one in each run.
        delay = random.Random(index).uniform(0, jitter)
        for system in SYSTEMS:
            with fresh_dir(f"{BENCH}-{index}") as directory:
                results[system].append(trial(system, directory, n, k, work, delay))
    rows: list[Row] = []
    for system in SYSTEMS:
        trials = results[system]
        if any(t["strays"] for t in trials):
            raise RuntimeError(f"{system}: effects for jobs that do not exist")
        row: Row = {
            "bench": BENCH,
            "system": system,
            "n": n,
            "k": k,
            "runs": runs,
            "work": work,
            "jitter": jitter,
        }
        for key in ("lost", "duplicated", "effects_at_kill", "to_first", "to_done"):
            values = [t[key] for t in trials]
            row[key] = values
            row[f"{key}_median"] = statistics.median(values)
            row[f"{key}_min"], row[f"{key}_max"] = min(values), max(values)
        row["lost_total"] = sum(row["lost"])
        row["duplicated_total"] = sum(row["duplicated"])
        row["end"] = "; ".join(sorted({t["end"] for t in trials}))
        rows.append(row)
    return rows


def _spread(row: Row, key: str, scale: float = 1.0, digits: int = 0) -> str:
    def shown(value: float) -> str:
        return f"{value * scale:,.{digits}f}"

    low, mid, high = row[f"{key}_min"], row[f"{key}_median"], row[f"{key}_max"]
    return f"{shown(mid)} ({shown(low)}..{shown(high)})"


COLUMNS_SHOWN = (
    ("system", "system", fmt_str),
    ("lost_shown", "lost: median (min..max), total", fmt_str),
    ("duplicated_shown", "duplicated: median (min..max), total", fmt_str),
    ("at_kill_shown", "effects before the kill", fmt_str),
    ("to_first_shown", "restart -> 1st effect ms", fmt_str),
    ("to_done_shown", "restart -> all done ms", fmt_str),
)


def headlines(rows: Sequence[Row]) -> list[Row]:
    ours = [r for r in rows if r["system"].startswith("dovecote")]
    peers = [r for r in rows if not r["system"].startswith("dovecote")]
    n, k, runs = rows[0]["n"], rows[0]["k"], rows[0]["runs"]
    where = f"crash, kill -9 at claim {k} of {n:,}"

    def both(key: str, scale: float = 1, unit: str = "") -> str:
        # e.g. "in send 0, in handler 4"
        return ", ".join(
            f"{r['system'].split('effect ')[1]} {r[key] * scale:,.0f}{unit}" for r in ours
        )

    least_lost = min(peers, key=lambda r: r["lost_total"])
    least_dup = min(peers, key=lambda r: r["duplicated_total"])
    fastest = min(peers, key=lambda r: r["to_done_median"])
    send = ours[0]
    return [
        headline(
            f"{where}: jobs lost (total of {runs} runs)",
            both("lost_total"),
            baseline=f"{least_lost['system']} {least_lost['lost_total']}",
            target="0 lost",
            met=all(r["lost_total"] == 0 for r in ours),
        ),
        headline(
            f"{where}: effects duplicated (total of {runs} runs)",
            both("duplicated_total"),
            baseline=f"{least_dup['system']} {least_dup['duplicated_total']}",
            # Effects outside the file (in send, in a handler) are at-least-once by
            # design; the exactly-once path is the journaled one.
            target="0 duplicated, journaled effects",
            met=all(r["duplicated_total"] == 0 for r in ours if r["system"].endswith("journaled")),
        ),
        headline(
            f"{where}: restart -> all done (median)",
            both("to_done_median", 1000, " ms"),
            baseline=f"{fastest['system']} {fastest['to_done_median'] * 1000:,.0f} ms",
            ratio=f"{send['to_done_median'] / fastest['to_done_median']:.2f}x (in send)",
        ),
    ]


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m bench.crash", description=__doc__)
    parser.add_argument("--n", type=int, default=N, help=f"jobs in the queue ({N})")
    parser.add_argument("--k", type=int, default=K, help=f"claims before the kill ({K})")
    parser.add_argument("--runs", type=int, default=RUNS, help=f"runs per system ({RUNS})")
    parser.add_argument("--work", type=float, default=WORK, help=f"seconds per job ({WORK})")
    parser.add_argument(
        "--jitter", type=float, default=JITTER, help=f"kill 0..this s after claim k ({JITTER})"
    )
    args = parser.parse_args(argv)
    if not 0 < args.k < args.n:
        parser.error("--k must be between 0 and --n")
    started = time.perf_counter()
    rows = run(args.n, args.k, args.runs, args.work, args.jitter)
    print(
        f"crash: {args.n:,} jobs, {CONSUMERS} consumers, {args.work * 1000:g} ms of work then "
        f"an append per job; SIGKILL 0..{args.jitter * 1000:g} ms after the worker's "
        f"{args.k}th claim, then a new worker finishes; {args.runs} run(s) per system"
    )
    shown = [
        {
            **r,
            "lost_shown": f"{_spread(r, 'lost')}, {r['lost_total']}",
            "duplicated_shown": f"{_spread(r, 'duplicated')}, {r['duplicated_total']}",
            "at_kill_shown": _spread(r, "effects_at_kill"),
            "to_first_shown": _spread(r, "to_first", 1000),
            "to_done_shown": _spread(r, "to_done", 1000),
        }
        for r in rows
    ]
    print_table(shown, COLUMNS_SHOWN)
    for row in rows:
        print(f"{row['system']}: end state after the restart: {row['end']}")
    for line in headlines(rows):
        met = f": {verdict(line['met'])}" if line["met"] is not None else ""
        print(f"{line['benchmark']}: {line['dovecote']}; best peer {line['baseline']}{met}")
    print(f"wall time {time.perf_counter() - started:.1f} s")
    return headlines(rows)


if __name__ == "__main__":
    main()
