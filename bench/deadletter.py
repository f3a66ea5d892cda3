"""Dead-letter lateness with 100,000 pending deadlines, and peak memory.

Run from the repository root::

    .venv/bin/python -m bench.deadletter [--mode both] [--n 100000] [--runs 3] [--lead 20]
        [--window 5] [--ns 2000,10000,100000] [--one-by-one-runs 1]
    .venv/bin/python -m bench.deadletter --profile    # one run in-process, under pyinstrument
    .venv/bin/python -m bench.deadletter --profile --mode one-by-one --ns 30000
    .venv/bin/python -m bench.deadletter --memory --n 20000  # tracemalloc's top sites (slow)
    .venv/bin/python -m bench.deadletter --gc thawed  # diagnosis: flows.collector switched off

What is measured
----------------
Two modes (``--mode``; both by default, one-by-one first).

**In flight** (``in-flight``): how late the real engine dead-letters calls whose
deadline passed, when it holds ``--n`` (100,000) deadlines at once, on the real clock
(no ``MockClock``).

* **Set-up (not timed)**: a dovecote file with N ``pending`` commands, put there through
  ``engine.submit_many`` (batches of 10, from 20 tasks) while their adapter is parked
  (``max_in_flight`` 0, so nothing is sent), then closed. Command ``i`` has ``timeout =
  lead + window * i / N`` (rounded down to a step of 10 commands, 0.5 ms by default;
  default 20 s + 0..5 s) and ``max_attempts`` 1. The file is made once and copied for
  every run.
* **A run**, in its own Python process (so that each run's peak memory is its own):
  ``flows.open_engine`` on the copy with the adapter ``blackhole`` parked, whose
  ``send`` never returns (``await trio.sleep_forever()``). The adapter is then given
  ``max_in_flight`` N: the dispatcher (on its next poll, <= 1 s) claims all N at once,
  so every command goes ``sent`` with ``deadline = claim time + timeout``, and the
  engine holds N deadlines (one timer heap). Two kinds of black hole, every run of one
  interleaved with a run of the other: one with only ``send`` (one send task per
  command) and one that also offers ``send_many`` (adapters.base.BatchAdapter: one
  task per claimed batch of up to 1,024, which never answers either). The deadlines
  fall over the ``--window`` after ``--lead`` seconds: N/window expiries per second
  (20,000/s by default). The engine's timer dead-letters each one (``sent -> dead``,
  reason ``timeout``) and cancels its send. The lead must cover the claim of N commands
  (8-13 s for 100,000 on a busy 2-core machine); the table shows the slack.
* **Lateness** of a command = when its ``dead`` transition was committed - its
  stored ``deadline``. "Committed" is observed by an ``engine.subscribe()`` subscriber
  (subscribed once every command is ``sent``), which takes each batch of notices as
  it is woken and stamps the batch with ``engine.now()`` (the engine's own clock, the
  one deadlines are written in): an upper bound, by one scheduling round, on the
  commit time. The stored ``finished_at - deadline`` is printed too: ``finished_at``
  (and the journal row's ``at``, the same instant) is taken when the timer fires,
  before the transaction commits, so it is a lower bound.
* **Peak memory**: the run process's peak resident set (``VmHWM``, else ``ru_maxrss``)
  once every command is dead (before the checks read the table back): the whole
  process, the interpreter and its imports included. "RSS before the engine opens" is
  the same figure just before ``open_engine``.
* **Checks** per run: N rows, every one ``dead`` with reason ``timeout``; N ``timeout``
  rows in the journal; every command seen dead by the subscriber. A run whose claim
  ended after the first deadline is flagged (lateness then includes the claim: rerun
  with a longer ``--lead``).

* **Memory per in-flight command**: (peak RSS - RSS before the engine opens) / N, for
  each kind of adapter; and, in a process of its own with no engine, what N bare trio
  tasks cost that each await the black hole's ``send`` inside a cancel scope of their
  own with a ``SendContext`` (the floor of a send in a task of its own).

**One by one** (``one-by-one``), as a script makes its calls: N commands (2,000, 10,000
and 100,000, ``--ns``) submitted one after another with ``await engine.submit``, paced
at 1,600 a second (the issue's script ran at 1,300-1,800/s), each with a timeout of
2-3 s (spread evenly over every 1,000 submits) and ``max_attempts`` 1, to the black
hole opened to ``max_in_flight`` N from the start: about 4,000 commands are live at any
time, whatever N is. A fresh file per run, each run in its own process. Lateness is
``finished_at - deadline`` read from the rows once every command is dead; "most live"
is the most commands between ``sent_at`` and ``finished_at`` at one instant, from the
same rows. If lateness grows with N at a constant number live, something costs
O(everything ever submitted).

In both modes ``gc.callbacks`` time every cyclic-GC pass: the longest pause and the
number of full (generation 2) collections are printed, since a full collection walks
every tracked object while every timer waits.

Percentiles are nearest-rank over the N commands of a run; the table gives the median,
min and max over the runs. ``--runs`` defaults to 3, not 5: one run at N = 100,000
takes 30-45 s (the lead, the window, the backlog, and opening and closing an engine
that holds 100,000 commands); ``--runs 5`` for the record.

Targets (issue 15): p99 lateness < 50 ms with 100,000 deadlines in flight, and < 50 ms
at every N one by one; memory per in-flight command <= 2.5 kB (issue 8: peak memory
< 200 MB). No peer: the figures are absolute.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import time
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import trio
import trio.testing

import flows
from adapters.base import AdapterSettings, Answer, Reply, Request, SendContext
from bench._common import (
    REQUEST,
    Row,
    fmt_str,
    fresh_dir,
    headline,
    percentile,
    prefill,
    print_spread,
    print_table,
    verdict,
)

BENCH = "deadletter"
ADAPTER = "blackhole"
N = 100_000
LEAD = 20.0  # seconds from the claim to the first deadline: room to claim N commands
WINDOW = 5.0  # seconds over which the N deadlines fall
RUNS = 3
STEP = 10  # commands per distinct timeout
TARGET_P99 = 0.050  # seconds
TARGET_PEAK = 200 * 1024 * 1024  # bytes
TARGET_PER_COMMAND = 2500  # bytes of peak RSS per in-flight command (issue 15: 2.5 kB)
THAWED: Final = "thawed"
IN_FLIGHT: Final = "in-flight"
ONE_BY_ONE: Final = "one-by-one"
TASK_FLOOR: Final = "task-floor"
ONE_BY_ONE_NS = (2_000, 10_000, 100_000)
SHORT_TIMEOUT = 2.0  # one-by-one: every timeout is 2-3 s
SHORT_SPREAD = 1.0
SUBMIT_RATE = 1600.0  # one-by-one submits offered per second (issue 15: 1,300-1,800/s)
ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024


class Blackhole:
    """A provider that never answers. Parked (``max_in_flight`` 0) until ``open_up``."""

    def __init__(self) -> None:
        self.settings = AdapterSettings(name=ADAPTER, max_in_flight=0)

    def open_up(self, max_in_flight: int) -> None:
        # The engine reads ``max_in_flight`` from the settings at every dispatch round.
        self.settings = attrs.evolve(self.settings, max_in_flight=max_in_flight)

    async def send(self, request: Request, context: SendContext) -> Reply:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        return None


class BatchBlackhole(Blackhole):
    """The same provider, taking each claimed batch in one ``send_many`` call (that
    never answers either): one task for the batch instead of one per command."""

    async def send_many(self, sends: Sequence[tuple[Request, SendContext]], answer: Answer) -> None:
        await trio.sleep_forever()


SENDS: Final = {"send": Blackhole, "send_many": BatchBlackhole}
SENDS_SHOWN: Final = {"send": "a task per send", "send_many": "one send_many per batch"}


def _max_rss() -> int:
    """This process's peak resident set, in bytes: ``VmHWM`` where Linux has it (the
    high-water mark of this program's memory since ``exec``), else ``ru_maxrss`` (which on
    Linux also counts the parent's memory at ``fork``, before ``exec``)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_template(path: Path, n: int, lead: float, window: float) -> float:
    """The file every run starts from: N pending commands; returns submits/s."""
    # Timeouts in steps of STEP commands (window * STEP / n apart: 0.5 ms by default), so
    # that the set-up can submit a step's commands in one ``submit_many``.
    jobs = [
        {"request": REQUEST, "timeout": lead + window * (i - i % STEP) / n, "max_attempts": 1}
        for i in range(n)
    ]
    return prefill(path, ADAPTER, jobs, batch=STEP)


# --- one run (in its own process) -------------------------------------------------


def _end_state(db: Any) -> tuple[dict[str, int], int]:
    """How many commands end in each ``state/reason``, and how many ``timeout``
    rows the journal holds."""
    counts = db.execute("SELECT state, reason, count(*) FROM commands GROUP BY state, reason")
    journal = db.execute(
        "SELECT count(*) FROM events WHERE event = 'timeout' AND to_state = 'dead'"
    ).fetchone()[0]
    return {f"{state}/{reason}": count for state, reason, count in counts}, int(journal)


async def _run_async(
    path: Path, n: int, gc_mode: str = "default", sends: str = "send"
) -> dict[str, Any]:
    rss_before = _max_rss()
    hole = SENDS[sends]()
    observed = array("d")
    reasons: dict[str, int] = {}
    async with flows.open_engine(path, adapters=[hole]) as engine:
        db = engine.store.db
        opened_at = engine.now()
        hole.open_up(n)
        # Until every command is claimed (on a machine so busy that the claim outlasts
        # the lead, the first are dead before the last are sent: ``slack`` says so).
        while db.execute("SELECT count(*) FROM commands WHERE state = 'pending'").fetchone()[0]:
            await trio.sleep(0.02)
        claimed_at = engine.now()
        first_sent, first_deadline = db.execute(
            "SELECT min(sent_at), min(deadline) FROM commands"
        ).fetchone()
        with engine.subscribe(buffer=n + 64) as notices:
            # By id: a transition committed just before subscribing may yet be
            # published (its task resumes after the commit), so it is in both.
            dead = {r[0] for r in db.execute("SELECT id FROM commands WHERE state = 'dead'")}
            dead_before = len(dead)
            last_dead = math.nan
            while len(dead) < n:
                batch = [await notices.receive()]
                stamp = engine.now()
                while True:
                    try:
                        batch.append(notices.receive_nowait())
                    except trio.WouldBlock:
                        break
                for notice in batch:
                    if isinstance(notice, flows.StateChange) and notice.command.state == "dead":
                        command = notice.command
                        if command.id in dead:
                            continue
                        assert command.deadline is not None
                        observed.append(stamp - command.deadline)
                        reasons[command.reason or ""] = reasons.get(command.reason or "", 0) + 1
                        dead.add(command.id)
                        last_dead = stamp
        peak = _max_rss()
        counts, journal = _end_state(db)
        stored = sorted(
            r[0] for r in db.execute("SELECT finished_at - deadline FROM commands").fetchall()
        )
    lateness = sorted(observed)
    return {
        "n": n,
        "counts": counts,
        "journal_timeouts": journal,
        "seen_by_subscriber": len(lateness),
        "dead_before_subscribing": dead_before,
        "reasons_seen": reasons,
        "observed_p50": percentile(lateness, 50),
        "observed_p99": percentile(lateness, 99),
        "observed_max": lateness[-1] if lateness else math.nan,
        "stored_p50": percentile(stored, 50),
        "stored_p99": percentile(stored, 99),
        "stored_max": stored[-1],
        "claim_seconds": claimed_at - first_sent,
        "wait_for_dispatch": first_sent - opened_at,
        "slack": first_deadline - claimed_at,
        "rate": n / (last_dead - first_deadline) if last_dead > first_deadline else math.nan,
        "rss_before": rss_before,
        "peak_rss": peak,
        "per_command": (peak - rss_before) / n,
    }


@contextlib.contextmanager
def _gc_pauses() -> Iterator[dict[str, Any]]:
    """Count the cyclic collector's passes per generation and time them (``gc.callbacks``):
    a full collection walks every tracked object, so its pause grows with what the
    process holds, and every timer waits for it."""
    counts = [0, 0, 0]
    seconds = [0.0, 0.0, 0.0]
    longest = [0.0]
    began = [0.0]

    def watch(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
            return
        pause = time.perf_counter() - began[0]
        counts[info["generation"]] += 1
        seconds[info["generation"]] += pause
        longest[0] = max(longest[0], pause)

    found: dict[str, Any] = {}
    gc.callbacks.append(watch)
    try:
        yield found
    finally:
        gc.callbacks.remove(watch)
        found.update(
            gc_collections=counts, gc_seconds=seconds, gc_longest=longest[0],
            gc_tracked_at_end=len(gc.get_objects()),
        )  # fmt: skip


async def _task_floor_async(n: int) -> dict[str, Any]:
    """What a send in a task of its own costs, with no engine: N trio tasks, each
    inside its own cancel scope awaiting the black hole's ``send`` with a
    ``SendContext`` (what the engine's per-command path holds at the least)."""
    hole, request = Blackhole(), Request.from_json(REQUEST)
    rss_before = _max_rss()
    scopes: list[trio.CancelScope] = []

    async def one(index: int) -> None:
        with trio.CancelScope() as scope:
            scopes.append(scope)
            await hole.send(request, SendContext(f"floor-{index}", 1, 0.0, lambda text: None))

    async with trio.open_nursery() as nursery:
        for index in range(n):
            nursery.start_soon(one, index)
        await trio.testing.wait_all_tasks_blocked()  # every one of them awaits its send
        peak = _max_rss()
        for scope in scopes:
            scope.cancel()
    per_command = (peak - rss_before) / n
    return {"n": n, "rss_before": rss_before, "peak_rss": peak, "per_command": per_command}


def task_floor(n: int) -> float:
    """Bytes per send in a task of its own, measured in a fresh process."""
    result = _spawn(TASK_FLOOR, Path("-"), n, "default", 600)
    return float(result["per_command"])


def child(argv: Sequence[str]) -> None:
    """Entry point of a run's process: ``child([mode, path, n, gc_mode, sends])``,
    ``mode`` ``in-flight`` or ``one-by-one``, ``sends`` ``send`` or ``send_many`` (the
    adapter's kind, in-flight mode); prints the result as JSON."""
    mode, path, n, gc_mode, sends = argv[0], Path(argv[1]), int(argv[2]), argv[3], argv[4]
    if gc_mode == THAWED:
        # Diagnosis only: the engine as if flows.collector never froze anything, so
        # that every full collection walks every send in flight.
        from flows import collector

        collector.MANY = 2**62  # type: ignore[misc]
    with _gc_pauses() as pauses:
        if mode == TASK_FLOOR:
            result = trio.run(_task_floor_async, n)
        elif mode == IN_FLIGHT:
            result = trio.run(_run_async, path, n, gc_mode, sends)
        else:
            result = trio.run(_one_by_one_async, path, n, gc_mode)
    print(json.dumps({**result, **pauses}), flush=True)


def _spawn(
    mode: str, path: Path, n: int, gc_mode: str, timeout: float, sends: str = "send"
) -> dict[str, Any]:
    """``child`` in a new Python process; its result."""
    process = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from bench.deadletter import child; child(sys.argv[1:])",
            mode,
            str(path),
            str(n),
            gc_mode,
            sends,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if process.returncode != 0:
        raise RuntimeError(f"deadletter run failed ({process.returncode}):\n{process.stderr}")
    result: dict[str, Any] = json.loads(process.stdout.strip().splitlines()[-1])
    return result


def run_once(
    template: Path,
    directory: Path,
    n: int,
    lead: float,
    window: float,
    gc_mode: str = "default",
    sends: str = "send",
) -> dict[str, Any]:
    """Copy the template and measure one in-flight run in a new process."""
    path = directory / "dovecote.db"
    shutil.copyfile(template, path)
    result = _spawn(IN_FLIGHT, path, n, gc_mode, lead + window + 600, sends)
    problems = []
    if result["counts"] != {"dead/timeout": n}:
        problems.append(f"end states {result['counts']}")
    if result["journal_timeouts"] != n:
        problems.append(f"{result['journal_timeouts']} timeout rows in the journal")
    if result["seen_by_subscriber"] + result["dead_before_subscribing"] != n:
        problems.append(f"the subscriber saw {result['seen_by_subscriber']} dead")
    if problems:
        raise RuntimeError("deadletter: lost commands: " + "; ".join(problems))
    return result


# --- one by one: a script's steady stream of short timeouts ------------------------


def _short_timeout(index: int) -> float:
    """Command ``index``'s timeout: 2-3 s, spread evenly over every 1,000 submits."""
    return SHORT_TIMEOUT + SHORT_SPREAD * (index % 1000) / 1000


def _most_live(rows: Sequence[tuple[float, float]]) -> int:
    """The most commands in flight at one instant, from their (sent_at, finished_at)."""
    marks = sorted([(sent, 1) for sent, _ in rows] + [(done, -1) for _, done in rows])
    live = most = 0
    for _, step in marks:
        live += step
        most = max(most, live)
    return most


async def _one_by_one_async(path: Path, n: int, gc_mode: str = "default") -> dict[str, Any]:
    """N commands submitted one after another (``await engine.submit``, paced at
    ``SUBMIT_RATE``), each with a 2-3 s timeout, to the black hole opened to
    ``max_in_flight`` N: about 2.5 s of submits (4,000) are live at any time. Lateness
    is read from the rows once every command is dead."""
    rss_before = _max_rss()
    hole = Blackhole()
    hole.open_up(n)
    async with flows.open_engine(path, adapters=[hole]) as engine:
        db = engine.store.db
        started = time.perf_counter()
        begun = trio.current_time()
        for index in range(n):
            # Paced as the script went (1,600 a second): about 4,000 live.
            await trio.sleep_until(begun + index / SUBMIT_RATE)
            await engine.submit(ADAPTER, REQUEST, timeout=_short_timeout(index), max_attempts=1)
        submitting = time.perf_counter() - started
        live = "SELECT count(*) FROM commands WHERE state IN ('pending', 'sent')"
        while db.execute(live).fetchone()[0]:
            await trio.sleep(0.1)
        peak = _max_rss()
        counts, journal = _end_state(db)
        rows = db.execute("SELECT sent_at, deadline, finished_at FROM commands").fetchall()
    stored = sorted(finished - deadline for _, deadline, finished in rows)
    most_live = _most_live([(sent, finished) for sent, _, finished in rows])
    return {
        "n": n,
        "counts": counts,
        "journal_timeouts": journal,
        "stored_p50": percentile(stored, 50),
        "stored_p99": percentile(stored, 99),
        "stored_max": stored[-1],
        "submit_rate": n / submitting,
        "most_live": most_live,
        "rss_before": rss_before,
        "peak_rss": peak,
        "per_command": (peak - rss_before) / most_live,
    }


def one_by_one_once(directory: Path, n: int, gc_mode: str = "default") -> dict[str, Any]:
    """One one-by-one run of ``n`` commands on a fresh file, in a new process."""
    result = _spawn(ONE_BY_ONE, directory / "dovecote.db", n, gc_mode, n / 100 + 600)
    if result["counts"] != {"dead/timeout": n} or result["journal_timeouts"] != n:
        raise RuntimeError(
            f"deadletter one-by-one: end states {result['counts']}, "
            f"{result['journal_timeouts']} timeouts journaled"
        )
    return result


# --- the benchmark -----------------------------------------------------------------

# (key in a run's result, label, unit): unit "s" is shown in ms, "B" in MB.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("observed_p50", "lateness p50 (committed, seen by a subscriber)", "s"),
    ("observed_p99", "lateness p99 (committed, seen by a subscriber)", "s"),
    ("observed_max", "lateness max (committed, seen by a subscriber)", "s"),
    ("stored_p50", "lateness p50 (stored: finished_at - deadline)", "s"),
    ("stored_p99", "lateness p99 (stored: finished_at - deadline)", "s"),
    ("stored_max", "lateness max (stored: finished_at - deadline)", "s"),
    ("peak_rss", "peak RSS of the run's process", "B"),
    ("rss_before", "RSS before the engine opens", "B"),
    ("per_command", "memory per in-flight command ((peak - before) / N)", "kB"),
    ("gc_longest", "longest cyclic-GC pause", "s"),
    ("claim_seconds", "claim of all N (first sent_at -> all sent)", "s"),
    ("slack", "first deadline - claim end (must be > 0)", "s"),
    ("rate", "dead-lettered/s (first deadline -> last dead)", "/s"),
)


def _shown(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return "-"
    if unit == "s":
        return f"{value * 1000:,.1f} ms"
    if unit == "B":
        return f"{value / MB:,.0f} MB"
    if unit == "kB":
        return f"{value / 1000:,.2f} kB"
    return f"{value:,.0f}/s"


def run(
    n: int = N,
    runs: int = RUNS,
    lead: float = LEAD,
    window: float = WINDOW,
    gc_mode: str = "default",
    kinds: Sequence[str] = tuple(SENDS),
) -> tuple[list[Row], float]:
    """Make the template, measure ``runs`` runs of each adapter kind (interleaved:
    every kind once, then again); one row per metric and kind, and submits/s."""
    with fresh_dir(BENCH) as directory:
        template = directory / "template.db"
        submit_rate = make_template(template, n, lead, window)
        results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
        for index in range(runs):
            for kind in kinds:
                run_dir = directory / f"run-{index}-{kind}"
                run_dir.mkdir()
                results[kind].append(run_once(template, run_dir, n, lead, window, gc_mode, kind))
                shutil.rmtree(run_dir)
    floors = [task_floor(n) for _ in range(runs)]
    rows: list[Row] = [
        {
            "bench": BENCH, "system": "trio", "metric": "task_floor", "sends": "floor",
            "variant": "no engine, a trio task per send (its cancel scope, its SendContext): "
            "memory per send ((peak - before) / N)", "unit": "kB", "n": n,
            "runs": runs, "gc": gc_mode, "median": statistics.median(floors),
            "min": min(floors), "max": max(floors), "values": floors,
        }
    ]  # fmt: skip
    for kind in kinds:
        for key, label, unit in METRICS:
            values = [r[key] for r in results[kind]]
            finite = [v for v in values if math.isfinite(v)] or [math.nan]
            rows.append(
                {
                    "bench": BENCH,
                    "system": "dovecote",
                    "metric": key,
                    "sends": kind,
                    "variant": f"{SENDS_SHOWN[kind]}: {label}",
                    "unit": unit,
                    "n": n,
                    "runs": runs,
                    "gc": gc_mode,
                    "median": statistics.median(finite),
                    "min": min(finite),
                    "max": max(finite),
                    "values": values,
                }
            )
    return rows, submit_rate


def _row(rows: Sequence[Row], key: str, kind: str) -> Row:
    return next(r for r in rows if r["metric"] == key and r["sends"] == kind)


def headlines(rows: Sequence[Row]) -> list[Row]:
    lines = []
    floor = next(r for r in rows if r["metric"] == "task_floor")
    for kind in dict.fromkeys(r["sends"] for r in rows if r["metric"] != "task_floor"):
        p99, p50 = _row(rows, "observed_p99", kind), _row(rows, "observed_p50", kind)
        peak, per = _row(rows, "peak_rss", kind), _row(rows, "per_command", kind)
        n, shown = p99["n"], SENDS_SHOWN[kind]
        lines += [
            headline(
                f"dead-letter lateness p99, {n:,} deadlines, {shown}",
                f"{p99['median'] * 1000:,.1f} ms (p50 {p50['median'] * 1000:,.1f} ms)",
                target=f"< {TARGET_P99 * 1000:.0f} ms",
                met=p99["median"] < TARGET_P99,
            ),
            headline(
                f"dead-letter peak memory, {n:,} deadlines, {shown}",
                f"{peak['median'] / MB:,.0f} MB",
                target=f"< {TARGET_PEAK / MB:.0f} MB",
                met=peak["median"] < TARGET_PEAK,
            ),
            headline(
                f"memory per in-flight command, {n:,} in flight, {shown} (peak RSS - before) / N",
                f"{per['median'] / 1000:,.2f} kB"
                + (
                    f" (a bare trio task per send: {floor['median'] / 1000:,.2f} kB)"
                    if kind == "send"
                    else ""
                ),
                target=f"<= {TARGET_PER_COMMAND / 1000:g} kB",
                met=per["median"] <= TARGET_PER_COMMAND,
            ),
        ]
    return lines


# --- the one-by-one benchmark ---------------------------------------------------------


def run_one_by_one(ns: Sequence[int], runs: int) -> list[dict[str, Any]]:
    """``runs`` one-by-one runs at each N, interleaved (every N once, then again)."""
    results: list[dict[str, Any]] = []
    for _ in range(runs):
        for n in ns:
            with fresh_dir(f"{BENCH}-one-by-one") as directory:
                results.append(one_by_one_once(directory, n))
    return results


def _by_n(results: Sequence[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    grouped: dict[int, list[dict[str, Any]]] = {}
    for result in results:
        grouped.setdefault(result["n"], []).append(result)
    return grouped


def _median(results: Sequence[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in results))


def report_one_by_one(results: Sequence[dict[str, Any]]) -> None:
    print(
        f"dead-letter lateness, submitted one by one (await engine.submit), timeouts "
        f"{SHORT_TIMEOUT:g}-{SHORT_TIMEOUT + SHORT_SPREAD:g} s, to a provider that never "
        "answers (max_in_flight N); lateness = finished_at - deadline from the rows; "
        "each run in its own process, median over runs"
    )
    shown = []
    for n, group in sorted(_by_n(results).items()):
        shown.append(
            {
                "n": f"{n:,}",
                "runs": str(len(group)),
                "submits": f"{_median(group, 'submit_rate'):,.0f}/s",
                "live": f"{_median(group, 'most_live'):,.0f}",
                **{
                    key: f"{_median(group, key) * 1000:,.1f} ms"
                    for key in ("stored_p50", "stored_p99", "stored_max", "gc_longest")
                },
                "gc2": f"{statistics.median(r['gc_collections'][2] for r in group):,.0f}",
                "peak": f"{_median(group, 'peak_rss') / MB:,.0f} MB",
                "per": f"{_median(group, 'per_command') / 1000:,.2f} kB",
            }
        )
    print_table(
        shown,
        (
            ("n", "N", fmt_str),
            ("runs", "runs", fmt_str),
            ("submits", "submits", fmt_str),
            ("live", "most live", fmt_str),
            ("stored_p50", "p50", fmt_str),
            ("stored_p99", "p99", fmt_str),
            ("stored_max", "max", fmt_str),
            ("gc_longest", "longest GC pause", fmt_str),
            ("gc2", "full GCs", fmt_str),
            ("peak", "peak RSS", fmt_str),
            ("per", "(peak - before) / most live", fmt_str),
        ),
    )
    print("checked in every run: every command dead with reason timeout, and journaled")
    for line in headlines_one_by_one(results):
        print(f"target: {line['benchmark']} {line['target']}: {verdict(line['met'])} "
              f"({line['dovecote']})")  # fmt: skip


def headlines_one_by_one(results: Sequence[dict[str, Any]]) -> list[Row]:
    lines = []
    for n, group in sorted(_by_n(results).items()):
        p99 = _median(group, "stored_p99")
        lines.append(
            headline(
                f"dead-letter lateness p99, {n:,} submitted one by one, 2-3 s timeouts "
                f"(about {_median(group, 'most_live'):,.0f} live)",
                f"{p99 * 1000:,.1f} ms (p50 {_median(group, 'stored_p50') * 1000:,.1f} ms)",
                target=f"< {TARGET_P99 * 1000:.0f} ms",
                met=p99 < TARGET_P99,
            )
        )
    return lines


def report(rows: Sequence[Row], submit_rate: float, lead: float, window: float) -> None:
    n, runs = rows[0]["n"], rows[0]["runs"]
    print(
        f"dead-letter lateness: {n:,} commands in flight to a provider that never answers, "
        f"deadlines {lead:g} s + 0..{window:g} s after the claim ({n / window:,.0f} expiries/s "
        f"offered); {runs} run(s), each in its own process; median (min, max) over runs"
    )
    if rows[0]["gc"] == THAWED:
        print("DIAGNOSIS RUN: flows.collector switched off (nothing frozen); not as shipped")
    print_spread(rows, (("variant", "measure", fmt_str),), lambda r, k: _shown(r[k], r["unit"]))
    print(f"set-up: {n:,} submits at {submit_rate:,.0f}/s (submit_many, 20 tasks, adapter parked)")
    if min(r["min"] for r in rows if r["metric"] == "slack") <= 0:
        print(
            "WARNING: in some run the claim ended after the first deadline; lateness includes "
            "the claim: rerun with a longer --lead"
        )
    checked = "every command dead with reason timeout, journaled, and seen by the subscriber"
    print(f"checked in every run: {checked}")
    for line in headlines(rows):
        figure, met = line["dovecote"], verdict(line["met"])
        print(f"target: {line['benchmark']} {line['target']}: {met} ({figure})")


# --- profiling ---------------------------------------------------------------------


def _in_process(
    n: int, lead: float, window: float, mode: str, which: str, sends: str = "send"
) -> None:
    """One run in this process, under pyinstrument (``profile``) or tracemalloc
    (``memory``: the top allocation sites once every command is in flight, in-flight
    mode only). ``which``: ``in-flight`` or ``one-by-one``."""
    with fresh_dir(f"{BENCH}-{mode}") as directory:
        path = directory / "dovecote.db"
        if which == IN_FLIGHT:
            make_template(path, n, lead, window)
        measure: Any = (
            functools.partial(_run_async, sends=sends) if which == IN_FLIGHT else _one_by_one_async
        )
        if mode == "profile":
            try:
                from pyinstrument import Profiler
            except ImportError:
                sys.exit("--profile needs pyinstrument: .venv/bin/pip install pyinstrument")
            profiler = Profiler(interval=0.001, async_mode="disabled")
            with _gc_pauses() as pauses:
                profiler.start()
                result = trio.run(measure, path, n)
                profiler.stop()
            shown = {**result, **pauses}
            print(json.dumps({k: v for k, v in shown.items() if not isinstance(v, dict)}))
            print(profiler.output_text(unicode=False, color=False))
            return
        import tracemalloc

        tracemalloc.start(8)
        snapshots: list[tracemalloc.Snapshot] = []

        async def measured() -> dict[str, Any]:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    store = flows.Store(path)
                    while (
                        store.db.execute(
                            "SELECT count(*) FROM commands WHERE state = 'sent'"
                        ).fetchone()[0]
                        < n
                    ):
                        await trio.sleep(0.05)
                    store.close()
                    snapshots.append(tracemalloc.take_snapshot())

                nursery.start_soon(watch)
                return await _run_async(path, n, sends=sends)

        result = trio.run(measured)
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
        if snapshots:
            print(f"tracemalloc, once all {n:,} commands were sent, top sites:")
            for stat in snapshots[0].statistics("lineno")[:25]:
                print(f"  {stat.size / MB:8.1f} MB  {stat.count:>9,}  {stat.traceback[0]}")


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m bench.deadletter", description=__doc__)
    parser.add_argument(
        "--mode",
        choices=(IN_FLIGHT, ONE_BY_ONE, "both"),
        default="both",
        help="in-flight (N claimed at once), one-by-one (a stream of submits), or both",
    )
    parser.add_argument("--n", type=int, default=N, help=f"in-flight: deadlines held ({N})")
    parser.add_argument(
        "--ns",
        default=",".join(str(n) for n in ONE_BY_ONE_NS),
        help="one-by-one: the Ns, comma-separated (2000,10000,100000)",
    )
    parser.add_argument("--runs", type=int, default=RUNS, help=f"in-flight runs ({RUNS})")
    parser.add_argument("--one-by-one-runs", type=int, default=1, help="runs per N (1)")
    parser.add_argument(
        "--lead", type=float, default=LEAD, help=f"claim -> first deadline ({LEAD} s)"
    )
    parser.add_argument(
        "--window", type=float, default=WINDOW, help=f"deadlines' spread ({WINDOW} s)"
    )
    parser.add_argument(
        "--gc",
        choices=("default", THAWED),
        default="default",
        help="diagnosis: 'thawed' switches flows.collector off (in-flight mode; not as shipped)",
    )
    parser.add_argument(
        "--sends",
        choices=(*SENDS, "both"),
        default="both",
        help="in-flight: the black hole's kind, a task per send or send_many (both)",
    )
    parser.add_argument("--profile", action="store_true", help="one run in-process, pyinstrument")
    parser.add_argument("--memory", action="store_true", help="one run in-process, tracemalloc")
    args = parser.parse_args(argv)
    ns = [int(n) for n in args.ns.split(",")]
    if args.profile or args.memory:
        which = IN_FLIGHT if args.mode == IN_FLIGHT or args.memory else ONE_BY_ONE
        n = args.n if which == IN_FLIGHT else ns[-1]
        kind = "send" if args.sends == "both" else args.sends
        mode = "profile" if args.profile else "memory"
        _in_process(n, args.lead, args.window, mode, which, kind)
        return []
    started = time.perf_counter()
    lines: list[Row] = []
    if args.mode in (ONE_BY_ONE, "both"):
        results = run_one_by_one(ns, args.one_by_one_runs)
        report_one_by_one(results)
        lines += headlines_one_by_one(results)
    if args.mode in (IN_FLIGHT, "both"):
        kinds = tuple(SENDS) if args.sends == "both" else (args.sends,)
        rows, submit_rate = run(args.n, args.runs, args.lead, args.window, args.gc, kinds)
        report(rows, submit_rate, args.lead, args.window)
        lines += headlines(rows)
    print(f"wall time {time.perf_counter() - started:.1f} s")
    return lines


if __name__ == "__main__":
    main()
