"""Command lifecycle throughput: dovecote against SQLite task queues and raw ``sqlite3``.

Run from the repository root::

    .venv/bin/pip install huey persist-queue litequeue pyinstrument
    .venv/bin/python -m bench.lifecycle [--n 20000] [--runs 5] [--budget 1.5] [--profile]

(``litequeue`` resolves to 0.9 on Python 3.11: later releases need 3.12. ``pyinstrument`` is
only needed for ``--profile``.)

What is measured
----------------
Commands per second through a whole life, every step durable before the next:

* **dovecote**: inside ``trio.run``, ``flows.open_engine`` on a fresh file with one
  in-process adapter that answers at once (``InstantAdapter``: ``max_in_flight`` 1024,
  no checkpoint). N commands go ``submit -> sent -> replied -> done``: per command one
  insert of the command row, two compare-and-set updates (the claim; the reply and
  the finish, which the engine writes together when there is no handler) and four
  journal rows, in the engine's group-commit transactions. Three ways of submitting:
  ``engine.submit_many`` with 1,000 requests a call from one task (``batch``), 200
  submitter tasks each calling ``engine.submit`` (``concurrent``), and one task
  submitting one command after another (``sequential``); none waits for replies. The
  clock runs from the first submit to the N-th terminal ``StateChange`` seen by an
  ``engine.subscribe()`` subscriber (which drains its channel without waiting while
  notices are queued); opening and closing the engine are not timed. After each run the file
  is checked: N ``done`` rows and 4N journal rows.
* **huey** 3 (``SqliteHuey``, result store on): enqueue N tasks (one ``INSERT`` each),
  then an in-process consumer loop ``huey.dequeue()`` + ``huey.execute(task)``. Per
  task, four transactions: the enqueue, the dequeue (``BEGIN EXCLUSIVE``; select and
  ``DELETE`` of the task row), the revoke-flag check inside ``execute`` (``BEGIN
  EXCLUSIVE``, no row written) and the result (``INSERT OR REPLACE`` into ``kv``: the
  durable "done" write). Checked: N results stored. No journal; a dequeued task is
  deleted, so there is no durable "sent" state.
* **persist-queue** (``SQLiteAckQueue``): ``put`` N, then ``get`` + ``ack`` each. Per
  item three transactions: insert, status -> unack, status -> acked. Checked: N acked.
* **litequeue**: ``put`` N, then ``pop`` + ``done`` each. Per item three
  transactions: insert, ``UPDATE ... RETURNING`` (ready -> locked), locked -> done.
  Checked: N rows done.
* **raw sqlite3**: the floor. dovecote's own schema (created by ``flows.Store``), and
  the same statements the engine's store runs: one full-row ``INSERT`` of the command
  plus its journal row, then two compare-and-set ``UPDATE``s of the columns that change
  (dispatch; reply and finish) with their journal rows; the parameters are built per
  command in Python, the unchanging JSON (request, reply, detail) is encoded once.
  Three variants: one transaction per step (3 per command: each row change with its
  journal rows, the unit dovecote commits atomically; autocommitting each of the 8
  statements alone measured the same within noise, so it is not a row); grouped: 1024
  commands at a time, one transaction per lifecycle step (3 per 1024 commands, the best
  group commit can do); and statements only: grouped, with every parameter built
  before the clock starts and each step's rows written by one ``executemany`` of the
  command statement and one of the journal rows. That is what these writes cost
  SQLite and the ``sqlite3`` module with no Python of ours in the loop: no engine doing
  the same writes can beat it, so
  it bounds what any target here can ask. And **statements + records**: the same
  executemany writes, each command's parameters made inside the clock from the records
  that dovecote's contract makes per command (the request checked at the boundary, an
  id, the pending ``Command`` and its three moves by the state table, four journal
  ``Event`` rows and four ``StateChange`` notices for a subscriber, the rows encoded as the
  store encodes them) and nothing else: no task, no committer, no dispatcher. No engine
  that makes these records can beat it: it is the reachable ceiling, and dovecote's
  ratio to it is what the engine's scheduling costs.

Fairness
--------
Every system writes a fresh database file in a new temporary directory per run, in WAL
mode with ``synchronous=NORMAL``: dovecote and litequeue set it themselves; huey (which
only offers FULL or OFF) and persist-queue (which leaves SQLite's default, FULL) get
``PRAGMA synchronous = NORMAL`` on their connection right after they open it. The
table prints the values read back from each connection after the run. Every system
carries the same ~100-byte user message (dovecote and litequeue store it as JSON, huey
and persist-queue pickle it) and, where a result is stored, a ~100-byte answer. All
run single-process on the same machine; the peers' loops are synchronous Python and do
no work per task. Runs are interleaved round-robin (run 1 of every system, then run 2,
...) after the warm-up runs described below, and each row reports the median and the
min/max over the runs.

N per system: dovecote ``batch`` and ``concurrent`` and raw ``grouped`` plan N commands
per run; the peers, dovecote ``sequential`` and raw per-step plan N/10 (2,000 by default).
Every system first does one untimed warm-up run of 1,000 commands, whose rate also
decides N: a row whose run would take longer than ``--budget`` seconds (1.5; 3 for
dovecote ``batch`` and ``concurrent``, which so run the full 20,000 from about 6,700
commands/s on)
does fewer commands (marked ``*``), so that the whole benchmark stays under a minute on
2 cores.
Rates are per second, so rows stay comparable; but persist-queue's ``get`` scans past
every acked row and litequeue's ``pop`` sorts every ready row, so both slow down as the
table grows: measured at N/10 they look faster than they would at N. The smaller N
favours the peers.

Flat as it grows
----------------
One more row: dovecote ``batch`` on a file that already holds 1,000,000 finished
commands (``--prefilled``), with as many commands per run as the empty-file ``batch``
row. The file is made once per invocation (1 GB): ``flows.Store`` creates the schema,
then one transaction inserts the ``done`` rows and their four journal rows each, the
same rows a life through the engine leaves (``_states``, ``_life``), each under its own
id; every run starts from a copy of it (the copy is not timed). Its ratio to the empty-file row
is printed.

Targets (issue 15): the best dovecote mode >= 1.5x the best peer at equal durability
(the report says whether every system's connection read back ``wal``/``NORMAL``) and
>= 0.5x the statements-only floor of the same run; with 1,000,000 finished rows in the
file >= 0.9x the empty file.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import trio

import flows
from adapters.base import Reply, Request
from bench._common import (
    REPLY_TEXT,
    REQUEST,
    InstantAdapter,
    Row,
    fmt_int,
    fmt_str,
    fresh_dir,
    headline,
    pragmas,
    print_table,
    rate_row,
    verdict,
)
from flows.core import moved
from flows.records import Command, Event, StateChange, new_id, storable
from flows.states import DISPATCH, FINISH, REPLY
from flows.store import COLUMNS, command_row

BENCH = "lifecycle"
SUBMITTERS = 200
GROUP = 1024  # commands per transaction in the grouped raw variant (= max_in_flight)
SMALL_FRACTION = 10  # the slower systems do n // SMALL_FRACTION commands per run
WARM_UP_N = 1000  # untimed first run of each system, also the rate estimate for the budget
BUDGET = 1.5  # seconds a measured run may take before its row does fewer commands
HEADLINE_FACTOR = 2.0  # dovecote batch and concurrent may take twice that: N=20,000 from 6,700/s on
MIN_N = 500
TARGET_PEER_RATIO = 1.5  # issue 15: >= 1.5x the best peer at equal durability
TARGET_FLOOR_RATIO = 0.5  # and >= 0.5x the statements-only floor of the same run
TARGET_PREFILLED_RATIO = 0.9  # with PREFILLED finished rows, >= 0.9x the empty file
PREFILLED = 1_000_000  # finished commands already in the file, for the flat-as-it-grows row
PREFILLED_VARIANT = "batch"  # the dovecote mode measured on the prefilled file too
PREFILLED_MARK = "finished rows in the file"


# --- dovecote ----------------------------------------------------------------------


BATCH = 1000  # requests per engine.submit_many call in the ``batch`` variant


async def _submit_each(engine: flows.Engine, count: int) -> None:
    for _ in range(count):
        await engine.submit("instant", REQUEST)


async def _submit_batches(engine: flows.Engine, count: int) -> None:
    for first in range(0, count, BATCH):
        await engine.submit_many("instant", [REQUEST] * min(BATCH, count - first))


async def _dovecote_async(
    path: Path, n: int, submitters: int, finished_before: int
) -> tuple[float, str, str]:
    async with flows.open_engine(path, adapters=[InstantAdapter()]) as engine:
        # Room for every notice (4 per command): a subscriber that falls behind is dropped.
        with engine.subscribe(buffer=4 * n + 64) as notices:
            started = time.perf_counter()
            finished = 0
            async with trio.open_nursery() as nursery:
                if submitters == 0:
                    nursery.start_soon(_submit_batches, engine, n)
                share, extra = divmod(n, submitters or 1)
                for i in range(submitters):
                    nursery.start_soon(_submit_each, engine, share + (i < extra))
                while finished < n:
                    notice = await notices.receive()
                    while True:
                        if isinstance(notice, flows.StateChange) and notice.command.is_terminal:
                            finished += 1
                        try:
                            notice = notices.receive_nowait()
                        except trio.WouldBlock:
                            break
            elapsed = time.perf_counter() - started
        if finished != n:
            raise RuntimeError(f"dovecote: saw {finished} of {n} commands finish")
        counts = engine.store.counts()
        events = engine.store.db.execute("SELECT count(*) FROM events").fetchone()[0]
        total = finished_before + n
        if counts != {("instant", "done"): total} or events != 4 * total:
            raise RuntimeError(f"dovecote: wrong end state {counts}, {events} events")
        journal, synchronous = pragmas(engine.store.db.conn)
    return elapsed, journal, synchronous


class Prefilled(NamedTuple):
    """A file made by ``prefill_finished``: where, and how many finished commands."""

    path: Path
    rows: int


def dovecote_once(
    directory: Path, n: int, submitters: int, prefilled: Prefilled | None = None
) -> tuple[float, str, str]:
    """One measured dovecote run: (seconds, journal_mode, synchronous). With
    ``prefilled``, the run starts from a copy of that file (not timed)."""
    path = directory / "dovecote.db"
    before = 0
    if prefilled is not None:
        shutil.copyfile(prefilled.path, path)
        # On disk before the clock starts: else the engine's first checkpoint (which
        # syncs the file) waits for a gigabyte of the copy's dirty pages.
        with path.open("rb+") as copy:
            os.fsync(copy.fileno())
        before = prefilled.rows
    return trio.run(_dovecote_async, path, n, submitters, before)


def prefill_finished(path: Path, count: int) -> float:
    """A dovecote file holding ``count`` finished commands (``done``, with their four
    journal rows each, as a life through the engine leaves them), made with the store's
    own schema (``flows.Store``) and filled by SQL in one transaction: minutes through
    the engine, seconds this way. Returns the seconds it took."""
    import sqlite3

    started = time.perf_counter()
    flows.Store(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    # A one-off bulk load: no WAL to grow to the file's size, no syncs; the engine's own
    # WAL mode is set again before the file is used.
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -262144")
    now = time.time() - 86_400.0  # yesterday's work
    # One life made as the raw rows make it; every prefilled command is that life
    # under its own id (ids in creation order, so every index grows at its end).
    life = _states(now)
    done = tuple(life[-1][c] for c in COLUMNS)
    at = COLUMNS.index("id")
    journal = [row[1:] for _, _, rows in _life(now, life) for row in rows]  # less command_id
    conn.execute("BEGIN")
    for first in range(0, count, 10_000):
        ids = [new_id() for _ in range(min(10_000, count - first))]
        conn.executemany(_INSERT, ((*done[:at], cid, *done[at + 1 :]) for cid in ids))
        conn.executemany(_EVENT, ((cid, *row) for cid in ids for row in journal))
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    return time.perf_counter() - started


# --- peers -------------------------------------------------------------------------


def huey_once(directory: Path, n: int) -> tuple[float, str, str]:
    from huey import SqliteHuey  # type: ignore[import-untyped]

    huey = SqliteHuey("bench", filename=str(directory / "huey.db"), results=True)
    storage: Any = huey.storage
    storage.conn.execute("PRAGMA synchronous = NORMAL")

    @huey.task()  # type: ignore[untyped-decorator]
    def answer(request: dict[str, Any]) -> str:
        return REPLY_TEXT

    started = time.perf_counter()
    for _ in range(n):
        answer(REQUEST)
    for _ in range(n):
        huey.execute(huey.dequeue())
    elapsed = time.perf_counter() - started
    stored = storage.result_store_size()
    if stored != n:
        raise RuntimeError(f"huey: {stored} results stored, expected {n}")
    journal, synchronous = pragmas(storage.conn)
    storage.close()
    return elapsed, journal, synchronous


def persist_queue_once(directory: Path, n: int) -> tuple[float, str, str]:
    from persistqueue import SQLiteAckQueue

    queue = SQLiteAckQueue(str(directory / "pq"), auto_resume=False)
    conn: Any = queue._conn  # persist-queue offers no way to choose `synchronous`
    conn.execute("PRAGMA synchronous = NORMAL")
    started = time.perf_counter()
    for _ in range(n):
        queue.put(REQUEST)
    for _ in range(n):
        item = queue.get(block=False, raw=True)
        queue.ack(id=item["pqid"])
    elapsed = time.perf_counter() - started
    acked = queue.acked_count()
    if acked != n:
        raise RuntimeError(f"persist-queue: {acked} acked, expected {n}")
    journal, synchronous = pragmas(conn)
    queue.close()
    return elapsed, journal, synchronous


def litequeue_once(directory: Path, n: int) -> tuple[float, str, str]:
    from litequeue import LiteQueue  # type: ignore[import-untyped]

    queue = LiteQueue(str(directory / "litequeue.db"))
    payload = json.dumps(REQUEST)
    started = time.perf_counter()
    for _ in range(n):
        queue.put(payload)
    for _ in range(n):
        message = queue.pop()
        queue.done(message.message_id)
    elapsed = time.perf_counter() - started
    done = queue.conn.execute("SELECT count(*) FROM Queue WHERE status = 2").fetchone()[0]
    if done != n:
        raise RuntimeError(f"litequeue: {done} done, expected {n}")
    journal, synchronous = pragmas(queue.conn)
    queue.close()
    return elapsed, journal, synchronous


# --- raw sqlite3 -------------------------------------------------------------------

_MUTABLE = tuple(c for c in COLUMNS if c not in ("id", "adapter", "request", "created_at"))
_INSERT = f"INSERT INTO commands ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"


@functools.lru_cache(maxsize=8)
def _update(columns: tuple[str, ...]) -> str:
    """The compare-and-set the store writes: only the columns that change."""
    return (
        f"UPDATE commands SET {', '.join(f'{c} = ?' for c in columns)} "
        "WHERE id = ? AND state = ? AND attempt = ? AND owner IS ?"
    )


_EVENT = (
    "INSERT INTO events (command_id, flow_id, at, from_state, to_state, event, detail) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_OWNER = "bench-host:1:raw"


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


_REQUEST_JSON = _compact(REQUEST)
_REPLY_JSON = _compact({"text": REPLY_TEXT, "usage": None, "raw": None})
_REPLY = Reply(REPLY_TEXT)
_OWNER_JSON = _compact({"owner": _OWNER})
_BASE: dict[str, Any] = dict.fromkeys(COLUMNS)
_BASE.update(
    adapter="instant", request=_REQUEST_JSON, state="pending", timeout=60.0, attempt=1,
    max_attempts=3, priority=0,
)  # fmt: skip

# One step of a command's life: (command SQL, its parameters, its journal rows' parameters).
Step = tuple[str, tuple[Any, ...], list[tuple[Any, ...]]]


Life = tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]


def _states(now: float) -> Life:
    """One new command's row as it is pending, sent, replied and done."""
    pending = {**_BASE, "id": new_id(), "created_at": now}
    sent = {**pending, "state": "sent", "sent_at": now, "deadline": now + 60.0,
            "owner": _OWNER, "lease_until": now + 30.0}  # fmt: skip
    replied = {**sent, "state": "replied", "reply": _REPLY_JSON, "replied_at": now}
    done = {**replied, "state": "done", "finished_at": now, "owner": None, "lease_until": None}
    return pending, sent, replied, done


def _life(now: float, states: Life | None = None) -> list[Step]:
    """The four transitions of one command, as dovecote's store writes them: the last
    two (reply, finish) as one update with two journal rows, as the engine commits a
    reply that has no handler."""
    pending, sent, replied, done = states or _states(now)
    cid = pending["id"]
    steps: list[Step] = [
        (
            _INSERT,
            tuple(pending[c] for c in COLUMNS),
            [(cid, None, now, None, "pending", "submit", None)],
        )
    ]
    for before, after, journal in (
        (pending, sent, [(pending, sent, "dispatch", _OWNER_JSON)]),
        (sent, done, [(sent, replied, "reply", None), (replied, done, "finish", None)]),
    ):
        changed = tuple(c for c in _MUTABLE if after[c] != before[c])
        params = (*(after[c] for c in changed), cid, before["state"], 1, before["owner"])
        rows = [(cid, None, now, b["state"], a["state"], e, d) for b, a, e, d in journal]
        steps.append((_update(changed), params, rows))
    return steps


def _recorded_life(now: float) -> list[Step]:
    """One command's life as ``_life`` writes it, its parameters made from the records
    every engine with dovecote's contract makes per command, and nothing else: the
    request checked at the boundary (``Request.from_json``, ``storable``), an id, the
    pending ``Command``, three moves by the state table (``flows.core.moved``: sent,
    replied, done), four journal ``Event``s and four ``StateChange`` notices for a
    subscriber, the rows encoded as the store encodes them (``command_row``). No
    scheduling, no committer, no dispatcher: the floor of the records' Python."""
    request = storable(Request.from_json(REQUEST), "the request")
    pending = Command(
        id=new_id(), adapter="instant", request=request, state="pending", created_at=now,
        timeout=60.0, max_attempts=3,
    )  # fmt: skip
    claim = {"sent_at": now, "deadline": now + 60.0, "not_before": None, "owner": _OWNER,
             "lease_until": now + 30.0}  # fmt: skip
    sent = moved(pending, DISPATCH, now, claim)
    reply = storable(_REPLY, "the reply")
    replied = moved(sent, REPLY, now, {"reply": reply, "replied_at": now, "cost": None})
    done = moved(replied, FINISH, now, {})
    cid, journal = pending.id, []
    for before, after, event, detail in (
        (None, pending, "submit", None),
        (pending, sent, "dispatch", _OWNER_JSON),
        (sent, replied, "reply", None),
        (replied, done, "finish", None),
    ):
        from_state = before.state if before else None
        record = Event(len(journal), cid, None, now, from_state, after.state, event, detail)
        StateChange(after, record)
        journal.append((cid, None, now, from_state, after.state, event, detail))
    steps: list[Step] = [(_INSERT, command_row(pending), journal[:1])]
    for before, after, rows in ((pending, sent, journal[1:2]), (sent, done, journal[2:])):
        changed = tuple(c for c in _MUTABLE if getattr(after, c) is not getattr(before, c))
        params = (*command_row(after, changed), cid, before.state, 1, before.owner)
        steps.append((_update(changed), params, rows))
    return steps


def _apply(cursor: Any, step: Step) -> None:
    sql, params, journal = step
    cursor.execute(sql, params)
    if cursor.rowcount != 1:
        raise RuntimeError("raw sqlite3: lost a compare-and-set")
    for row in journal:
        cursor.execute(_EVENT, row)


def _apply_group(cursor: Any, steps: list[Step]) -> None:
    """One step of ``GROUP`` commands' lives as one ``executemany`` of the command
    statement and one of the journal rows (every step of a group has the same SQL)."""
    cursor.executemany(steps[0][0], [params for _, params, _ in steps])
    if cursor.rowcount != len(steps):
        raise RuntimeError("raw sqlite3: lost a compare-and-set")
    cursor.executemany(_EVENT, [row for _, _, journal in steps for row in journal])


def raw_once(directory: Path, n: int, mode: str) -> tuple[float, str, str]:
    """``mode``: ``transition`` (a transaction per transition: the update or insert and
    its journal row), ``grouped`` (``GROUP`` commands per transaction, one per step),
    ``statements`` (``grouped``, with every parameter built before the clock starts and
    each step written by ``executemany``: what the SQL alone costs) or ``records``
    (``statements``, with the parameters made, inside the clock, from the records
    dovecote's contract makes per command: ``_recorded_life``)."""
    import sqlite3

    path = directory / "raw.db"
    flows.Store(path).close()  # dovecote's schema, tables and indexes
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    cursor = conn.cursor()
    prepared = [_life(time.time()) for _ in range(n)] if mode == "statements" else []
    started = time.perf_counter()
    if mode == "records":
        for first in range(0, n, GROUP):
            lives = [_recorded_life(time.time()) for _ in range(min(GROUP, n - first))]
            for stage in range(len(lives[0])):
                cursor.execute("BEGIN IMMEDIATE")
                _apply_group(cursor, [life[stage] for life in lives])
                cursor.execute("COMMIT")
    elif mode == "statements":
        for first in range(0, n, GROUP):
            lives = prepared[first : first + GROUP]
            for stage in range(len(lives[0])):
                cursor.execute("BEGIN IMMEDIATE")
                _apply_group(cursor, [life[stage] for life in lives])
                cursor.execute("COMMIT")
    elif mode == "grouped":
        for first in range(0, n, GROUP):
            lives = [_life(time.time()) for _ in range(min(GROUP, n - first))]
            for stage in range(len(lives[0])):
                cursor.execute("BEGIN IMMEDIATE")
                for life in lives:
                    _apply(cursor, life[stage])
                cursor.execute("COMMIT")
    else:
        for _ in range(n):
            for step in _life(time.time()):
                cursor.execute("BEGIN IMMEDIATE")
                _apply(cursor, step)
                cursor.execute("COMMIT")
    elapsed = time.perf_counter() - started
    done = conn.execute("SELECT count(*) FROM commands WHERE state = 'done'").fetchone()[0]
    events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    if done != n or events != 4 * n:
        raise RuntimeError(f"raw sqlite3 ({mode}): {done} done, {events} events")
    journal, synchronous = pragmas(conn)
    conn.close()
    return elapsed, journal, synchronous


# --- the benchmark -----------------------------------------------------------------

Measure = Callable[[Path, int], tuple[float, str, str]]


class System(NamedTuple):
    name: str
    variant: str
    planned: int  # commands per run, before the time budget
    measure: Measure
    txns: str
    writes: str
    budget_factor: float = 1.0  # times the budget a run of this row may take


def _systems(n: int, prefilled: Prefilled | None) -> list[System]:
    small = max(1, n // SMALL_FRACTION)
    dovecote_writes = "1 ins + 2 CAS upd + 4 journal"
    raw_writes = "dovecote's SQL, no engine"

    def dovecote(submitters: int, start: Prefilled | None = None) -> Measure:
        return lambda d, k: dovecote_once(d, k, submitters, start)

    full: list[System] = []
    if prefilled is not None:
        full.append(
            System("dovecote", f"{PREFILLED_VARIANT}, {prefilled.rows:,} {PREFILLED_MARK}", n,
                   dovecote(0, prefilled), "group commit", dovecote_writes, HEADLINE_FACTOR)
        )  # fmt: skip

    def raw(mode: str) -> Measure:
        return lambda d, k: raw_once(d, k, mode)

    return [
        System("dovecote", f"batch (submit_many, {BATCH} a call)", n, dovecote(0),
               "group commit", dovecote_writes, HEADLINE_FACTOR),
        System("dovecote", f"concurrent ({SUBMITTERS} submitters)", n, dovecote(SUBMITTERS),
               "group commit", dovecote_writes, HEADLINE_FACTOR),
        System("dovecote", "sequential (1 submitter)", small, dovecote(1),
               "group commit", dovecote_writes),
        System("huey", "SqliteHuey enqueue; dequeue+execute", small, huey_once,
               "4 per task", "ins; sel+del; revoke chk; result"),
        System("persist-queue", "SQLiteAckQueue put; get+ack", small, persist_queue_once,
               "3 per item", "ins; upd; upd"),
        System("litequeue", "put; pop+done", small, litequeue_once, "3 per item", "ins; upd; upd"),
        System("raw sqlite3", "txn per step", small, raw("transition"),
               "3 per command", raw_writes),
        System("raw sqlite3", f"grouped ({GROUP} cmds/txn)", n, raw("grouped"),
               f"3 per {GROUP} cmds", raw_writes),
        System("raw sqlite3", f"statements only ({GROUP} cmds/txn)", n, raw("statements"),
               f"3 per {GROUP} cmds", "same SQL, params pre-built, executemany"),
        System("raw sqlite3", f"statements + records ({GROUP} cmds/txn)", n, raw("records"),
               f"3 per {GROUP} cmds", "same SQL, executemany, params from the records"),
        *full,
    ]  # fmt: skip


def run(
    n: int = 20_000, runs: int = 5, budget: float = BUDGET, prefilled: Prefilled | None = None
) -> list[Row]:
    """Measure every system ``runs`` times (interleaved) and return one row per system.

    A row whose warm-up rate says a run would take longer than ``budget`` seconds
    (``HEADLINE_FACTOR`` times that for dovecote ``batch`` and ``concurrent``) does fewer
    commands per run (a multiple of 500, at least 500); its row says so. With
    ``prefilled`` (a file from ``prefill_finished``), one more row: dovecote ``batch``
    starting from a copy of it, with as many commands per run as the empty-file row."""
    systems = _systems(n, prefilled)
    counts: list[int] = []
    for system in systems:
        warm = min(WARM_UP_N, system.planned)
        with fresh_dir(f"{system.name.replace(' ', '-')}-warm") as directory:
            elapsed, _, _ = system.measure(directory, warm)
        fits = int(warm / elapsed * budget * system.budget_factor) // 500 * 500
        counts.append(min(system.planned, max(MIN_N, fits)))
    if prefilled is not None:
        counts[-1] = counts[0]  # the same work as the empty-file batch row, for the ratio
    seconds: list[list[float]] = [[] for _ in systems]
    read_back: list[tuple[str, str]] = [("", "")] * len(systems)
    for _ in range(runs):
        for index, system in enumerate(systems):
            with fresh_dir(system.name.replace(" ", "-")) as directory:
                elapsed, journal, synchronous = system.measure(directory, counts[index])
            seconds[index].append(elapsed)
            read_back[index] = (journal, synchronous)
    rows = []
    for index, system in enumerate(systems):
        row = rate_row(
            BENCH, system.name, system.variant, counts[index], seconds[index],
            journal=read_back[index][0], synchronous=read_back[index][1], txns=system.txns,
            notes=system.writes,
        )  # fmt: skip
        row["planned_n"] = system.planned
        row["prefilled"] = prefilled.rows if prefilled and PREFILLED_MARK in system.variant else 0
        row["reduced"] = counts[index] < system.planned
        rows.append(row)
    return rows


def _ours(rows: Sequence[Row]) -> Row:
    """dovecote's best row on an empty file."""
    fresh = [r for r in rows if r["system"] == "dovecote" and not _is_prefilled(r)]
    return max(fresh, key=lambda r: r["median"])


def _is_prefilled(row: Row) -> bool:
    return PREFILLED_MARK in str(row["variant"])


def _floor(rows: Sequence[Row]) -> Row:
    return next(r for r in rows if r["variant"].startswith("statements only"))


def _records_floor(rows: Sequence[Row]) -> Row:
    return next(r for r in rows if r["variant"].startswith("statements + records"))


def _best_peer(rows: Sequence[Row]) -> Row:
    peers = [r for r in rows if r["system"] not in ("dovecote", "raw sqlite3")]
    return max(peers, key=lambda r: r["median"])


def durability(rows: Sequence[Row]) -> str:
    """One line saying whether every system ran at the same durability, as read back."""
    other = [
        f"{r['system']} {r['variant']}: {r['journal_mode']}/{r['synchronous']}"
        for r in rows
        if (r["journal_mode"], r["synchronous"]) != ("wal", "NORMAL")
    ]
    if other:
        return "WARNING: not every system ran at WAL + synchronous=NORMAL: " + "; ".join(other)
    return (
        "equal durability: every system (dovecote, huey, persist-queue, litequeue, raw "
        "sqlite3) ran with journal_mode=wal, synchronous=NORMAL, as read back from its own "
        "connection after each run"
    )


def _prefilled_ratio(rows: Sequence[Row]) -> tuple[Row, Row, float] | None:
    """(the prefilled row, the empty-file row of the same mode, their ratio)."""
    full = next((r for r in rows if _is_prefilled(r)), None)
    if full is None:
        return None
    empty = next(r for r in rows if r["variant"].startswith(PREFILLED_VARIANT) and r is not full)
    return full, empty, full["median"] / empty["median"]


def summary(rows: Sequence[Row]) -> list[str]:
    """Ratio and target lines for the printed report."""
    ours = _ours(rows)
    best = _best_peer(rows)
    lines = [durability(rows)]
    lines.append(f"dovecote, best mode: {ours['variant']}, median {ours['median']:,.0f} commands/s")
    lines.append(
        f"ratio dovecote / best peer ({best['system']}, {best['median']:,.0f}/s): "
        f"{ours['median'] / best['median']:.2f}x"
    )
    for raw in (r for r in rows if r["system"] == "raw sqlite3"):
        lines.append(
            f"ratio dovecote / raw sqlite3 {raw['variant']} ({raw['median']:,.0f}/s): "
            f"{ours['median'] / raw['median']:.2f}x"
        )
    floor = _floor(rows)
    peer_ok = ours["median"] >= TARGET_PEER_RATIO * best["median"]
    floor_ok = ours["median"] >= TARGET_FLOOR_RATIO * floor["median"]
    lines.append(
        f"targets (issue 15): >= {TARGET_PEER_RATIO}x best peer {verdict(peer_ok)} "
        f"({ours['median'] / best['median']:.2f}x); >= {TARGET_FLOOR_RATIO}x statements-only "
        f"floor {verdict(floor_ok)} ({ours['median'] / floor['median']:.2f}x)"
    )
    records = _records_floor(rows)
    lines.append(
        f"reachable? the SQL and the records alone, no engine: {records['median']:,.0f}/s, "
        f"{records['median'] / best['median']:.2f}x the best peer and "
        f"{records['median'] / floor['median']:.2f}x the statements-only floor; dovecote "
        f"{ours['median'] / records['median']:.2f}x of that"
    )
    prefilled = _prefilled_ratio(rows)
    if prefilled is not None:
        full, empty, ratio = prefilled
        lines.append(
            f"with {full['prefilled']:,} finished rows already in the file: "
            f"{full['median']:,.0f}/s, "
            f"{ratio:.2f}x the empty file's {empty['median']:,.0f}/s (same mode, same N); "
            f"target >= {TARGET_PREFILLED_RATIO}x {verdict(ratio >= TARGET_PREFILLED_RATIO)}"
        )
    return lines


def headlines(rows: Sequence[Row]) -> list[Row]:
    """The summary-table rows: the same figures and targets as ``summary``."""
    ours = _ours(rows)
    best = _best_peer(rows)
    floor = _floor(rows)
    records = _records_floor(rows)
    ratio = ours["median"] / best["median"]
    lines = [
        headline(
            "lifecycle throughput, submit -> done (commands/s), WAL + synchronous=NORMAL",
            f"{ours['median']:,.0f}/s",
            baseline=f"{best['system']} {best['median']:,.0f}/s",
            ratio=f"{ratio:.2f}x",
            target=f">= {TARGET_PEER_RATIO}x best peer",
            met=ratio >= TARGET_PEER_RATIO,
        ),
        headline(
            "lifecycle throughput against the statements-only floor",
            f"{ours['median']:,.0f}/s",
            baseline=f"raw sqlite3 statements only {floor['median']:,.0f}/s",
            ratio=f"{ours['median'] / floor['median']:.2f}x",
            target=f">= {TARGET_FLOOR_RATIO}x the floor",
            met=ours["median"] >= TARGET_FLOOR_RATIO * floor["median"],
        ),
        headline(
            "lifecycle: the SQL and the records alone, no engine (the reachable ceiling)",
            f"{records['median']:,.0f}/s",
            baseline=f"{best['system']} {best['median']:,.0f}/s",
            ratio=f"{records['median'] / best['median']:.2f}x",
        ),
        headline(
            "lifecycle against the SQL and the records alone",
            f"{ours['median']:,.0f}/s",
            baseline=f"statements + records {records['median']:,.0f}/s",
            ratio=f"{ours['median'] / records['median']:.2f}x",
        ),
    ]
    prefilled = _prefilled_ratio(rows)
    if prefilled is not None:
        full, empty, full_ratio = prefilled
        lines.append(
            headline(
                f"lifecycle with {full['prefilled']:,} finished rows already in the file",
                f"{full['median']:,.0f}/s",
                baseline=f"empty file {empty['median']:,.0f}/s",
                ratio=f"{full_ratio:.2f}x",
                target=f">= {TARGET_PREFILLED_RATIO}x the empty file",
                met=full_ratio >= TARGET_PREFILLED_RATIO,
            )
        )
    return lines


COLUMNS_SHOWN = (
    ("system", "system", fmt_str),
    ("variant", "variant", fmt_str),
    ("n_shown", "N/run", fmt_str),
    ("median", "median/s", fmt_int),
    ("min", "min/s", fmt_int),
    ("max", "max/s", fmt_int),
    ("journal_mode", "journal", fmt_str),
    ("synchronous", "synchronous", fmt_str),
    ("txns", "transactions", fmt_str),
    ("notes", "writes", fmt_str),
)


def profile(n: int) -> None:
    """One dovecote ``concurrent`` run of ``n`` commands under pyinstrument."""
    try:
        from pyinstrument import Profiler
    except ImportError:
        sys.exit("--profile needs pyinstrument: .venv/bin/pip install pyinstrument")
    with fresh_dir("profile") as directory:
        profiler = Profiler(interval=0.001)
        profiler.start()
        elapsed, _, _ = dovecote_once(directory, n, SUBMITTERS)
        profiler.stop()
    print(f"profiled run: {n:,} commands in {elapsed:.2f} s (slowed by the profiler)")
    print(profiler.output_text(unicode=False, color=False))


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m bench.lifecycle", description=__doc__)
    parser.add_argument("--n", type=int, default=20_000, help="commands per run (default 20000)")
    parser.add_argument("--runs", type=int, default=5, help="measured runs per system (default 5)")
    parser.add_argument(
        "--budget", type=float, default=BUDGET, help=f"seconds per measured run ({BUDGET})"
    )
    parser.add_argument(
        "--prefilled",
        type=int,
        default=PREFILLED,
        help=f"finished commands in the file of the flat-as-it-grows row ({PREFILLED:,}; "
        "a minute or less to make); 0: no such row",
    )
    parser.add_argument("--profile", action="store_true", help="profile one dovecote run instead")
    args = parser.parse_args(argv)
    if args.profile:
        profile(args.n)
        return []
    started = time.perf_counter()
    with fresh_dir("prefilled") as directory:
        prefilled = None
        if args.prefilled:
            prefilled = Prefilled(directory / "prefilled.db", args.prefilled)
            built = prefill_finished(prefilled.path, prefilled.rows)
            size = prefilled.path.stat().st_size / 1024 / 1024
            made = f"{prefilled.rows:,} finished commands: {built:.1f} s, {size:,.0f} MB"
            print(f"made the prefilled file of {made}")
        rows = run(args.n, args.runs, args.budget, prefilled)
    print(
        f"command lifecycle, submit -> sent -> replied -> done; {args.runs} runs per row, "
        f"commands/s (median, min, max); N={args.n:,}, slower rows N/{SMALL_FRACTION}"
    )
    shown = [{**r, "n_shown": f"{r['n']:,}{'*' if r['reduced'] else ''}"} for r in rows]
    print_table(shown, COLUMNS_SHOWN)
    if any(r["reduced"] for r in rows):
        print(
            f"* fewer commands per run than planned, to keep a run under {args.budget} s "
            f"({args.budget * HEADLINE_FACTOR} s for dovecote batch and concurrent)"
        )
    for line in summary(rows):
        print(line)
    spread = statistics.median(r["max"] / r["min"] for r in rows)
    wall = time.perf_counter() - started
    print(f"median max/min spread across rows: {spread:.2f}; wall time {wall:.1f} s")
    return headlines(rows)


if __name__ == "__main__":
    main()
