"""The pending table: one SQLite file that any person can open with
``sqlite3`` and read. The only module that writes SQL.

``Store`` is the SQLite implementation of ``flows.storage.StoreProtocol``:
it commits the records of ``flows.operations`` (each kind's statements are
one function here, found through ``_APPLY``) and answers the protocol's
reads. Live rows (pending, leased, live flows) are indexed apart from
finished ones (schema 6, ``_LIVE_INDEXES``), so that what an engine watches
costs the same however many finished rows the file holds.

Tables
------

``commands``      one row per call to a model: the pending table itself.
``events``        the journal: one row per transition, never updated or
                  deleted by the engine. Replaying it gives every command's
                  current state.
``late_replies``  replies that arrived after their command stopped waiting.
``snapshots``     the text of an editor region when a call about it was made.
``dead_letters``  a view: dead commands, with the replay that retried each.
``flows``         one row per multi-step flow, with its own state machine.
``flow_steps``    each flow's journaled steps: which command served a call,
                  which value a ``now()`` or ``random()`` returned.
``cache``         the response cache (flows.cache): which command's reply
                  answers a call with a given key, and how often it has.

Why writes come in batches
--------------------------

A transition is a compare-and-set (``UPDATE ... WHERE id = ? AND state = ?``)
plus its journal row, and both must commit together before anyone acts on
the transition. Committing each one alone costs a WAL frame write and a
lock round-trip per transition; committing the transitions that arrive
together in one transaction ("group commit") costs one. ``Store.commit``
takes a batch of operations and applies each independently inside one
transaction: an operation that fails (a lost compare-and-set, a value SQLite
cannot hold) is rolled back alone, by its own savepoint, and reported to its
caller (a lost race as ``LostRace``); the others commit. Operations that
only make sense together are one ``Group``, rolled back whole. Hundreds of
like operations in a row (a claimed batch, a round of replies) are written
by one ``executemany`` under one savepoint, and one by one again if that
run cannot be written whole, so that each gets the result it gets alone
("Runs" below). The engine's
committer task feeds it; nothing is visible before ``commit`` returns.

Durability: WAL with ``synchronous=NORMAL``. A committed transition survives
the process being killed (``kill -9``); after a power cut the last few
transactions may be rolled back, never half-applied.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import itertools
import json
import operator
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar

import attrs
import sqlite_utils
from sqlite_utils.db import DescIndex

from adapters.base import Reply, Request
from flows.errors import SchemaTooNew, StoreError, UnknownCommand
from flows.operations import (
    TAKE_OVER,
    AddCacheEntry,
    AddLateReply,
    Chain,
    CopySteps,
    CountCacheHit,
    Group,
    Insert,
    InsertFlow,
    Move,
    MoveFlow,
    Note,
    Operation,
    RecordStep,
    ReleaseLeases,
    RenewFlowLeases,
    RenewLeases,
    TakeOver,
    TakeOverFlow,
    UseLateReply,
)
from flows.records import (
    Command,
    CommandError,
    Event,
    Flow,
    FlowStep,
    LateReply,
    storable_text,
)
from flows.schema import state_in
from flows.snapshots import Snapshot
from flows.states import (
    DEAD,
    FLOW_STATES,
    FLOW_TERMINAL_STATES,
    LEASED_STATES,
    PENDING,
    TERMINAL_STATES,
    IllegalTransition,
    LostRace,
)

if TYPE_CHECKING:
    from flows.storage import StoreProtocol

_T = TypeVar("_T")
_A = TypeVar("_A")

# The operations are flows.operations' records; they are importable from
# here too, where the engine, the runtime and the tests have always found them.
__all__ = [
    "COLUMNS",
    "SCHEMA_VERSION",
    "AddCacheEntry",
    "AddLateReply",
    "Chain",
    "CopySteps",
    "CountCacheHit",
    "Group",
    "Insert",
    "InsertFlow",
    "Move",
    "MoveFlow",
    "Note",
    "Operation",
    "RecordStep",
    "ReleaseLeases",
    "RenewFlowLeases",
    "RenewLeases",
    "Store",
    "TakeOver",
    "TakeOverFlow",
    "UseLateReply",
    "command_from_row",
    "command_row",
    "flow_from_row",
    "make_owner",
    "owner_is_gone",
    "state_in",
]

SCHEMA_VERSION: Final = 6
BUSY_TIMEOUT_MS: Final = 10_000

# Column order of ``commands``: the names of ``Command``'s fields, as-is.
COLUMNS: Final = tuple(f.name for f in attrs.fields(Command))
# Columns a transition may change: everything but identity and the call itself.
_MUTABLE: Final = tuple(c for c in COLUMNS if c not in ("id", "adapter", "request", "created_at"))
_JSON_COLUMNS: Final = frozenset({"request", "reply", "error", "handler_args"})


_PENDING: Final = state_in([PENDING])
_LEASED: Final = state_in(LEASED_STATES)
_TIMED: Final = f"{_PENDING} AND (expires_at IS NOT NULL OR not_before IS NOT NULL)"
_LIVE_FLOWS: Final = state_in(set(FLOW_STATES) - FLOW_TERMINAL_STATES)

_LIVE_INDEXES: Final = (
    # Claims: ready_to_send, per adapter, priority then age.
    f"CREATE INDEX commands_ready ON commands (adapter, priority DESC, id) WHERE {_PENDING}",
    # What the timers watch after a restart: timed_pending.
    f"CREATE INDEX commands_timed ON commands (id) WHERE {_TIMED}",
    # Leases and take-over: abandoned, renewals and releases, by holder.
    f"CREATE INDEX commands_leased ON commands (owner, lease_until) WHERE {_LEASED}",
    # The dead letters waiting for a person (the dead_letters view).
    f"CREATE INDEX commands_dead ON commands (id) WHERE {state_in([DEAD])}",
    # Flows in progress, by holder: abandoned_flows, renewals, releases.
    f"CREATE INDEX flows_live ON flows (owner, lease_until) WHERE {_LIVE_FLOWS}",
)

_INSERT_COMMAND: Final = (
    f"INSERT INTO commands ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
)


@functools.lru_cache(maxsize=64)
def _move_sql(columns: tuple[str, ...]) -> str:
    """The compare-and-set UPDATE of these columns (a transition touches a
    few: writing only those spares re-encoding the reply's JSON each time)."""
    return (
        f"UPDATE commands SET {', '.join(f'{c} = ?' for c in columns)} "
        "WHERE id = ? AND state = ? AND attempt = ? AND owner IS ?"
    )


_INSERT_EVENT: Final = (
    "INSERT INTO events (id, command_id, flow_id, at, from_state, to_state, event, detail) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


# One encoder for every write: ``json.dumps`` with options builds a new one
# per call, which costs more than encoding a small request.
_encode: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _dumps(value: Any) -> str | None:
    return None if value is None else _encode(value)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _json_column(value: Any) -> str | None:
    return _dumps(value.to_json() if hasattr(value, "to_json") else value)


def command_row(command: Command, columns: Sequence[str] = COLUMNS) -> tuple[Any, ...]:
    read, json_at = _reader(tuple(columns))
    values = list(read(command))
    for i in json_at:
        values[i] = _json_column(values[i])
    return tuple(values)


@functools.lru_cache(maxsize=64)
def _reader(
    columns: tuple[str, ...],
) -> tuple[Callable[[Command], tuple[Any, ...]], tuple[int, ...]]:
    """How ``command_row`` reads ``columns``: every value at once, and where
    the JSON ones are (a transition writes a few columns, the same few for
    every command of a run: this is worked out once per set of columns)."""
    get = operator.attrgetter(*columns)
    read = get if len(columns) > 1 else lambda command: (get(command),)
    return read, tuple(i for i, name in enumerate(columns) if name in _JSON_COLUMNS)


_AT: Final = {name: i for i, name in enumerate(COLUMNS)}


def command_from_row(row: sqlite3.Row) -> Command:
    keys = row.keys()
    if tuple(keys[: len(COLUMNS)]) == COLUMNS:  # ``commands.*`` leads: take it as is
        values = list(row[: len(COLUMNS)])
    else:
        fields = dict(zip(keys, row, strict=True))
        values = [fields[name] for name in COLUMNS]
    values[_AT["request"]] = Request.from_json(json.loads(values[_AT["request"]]))
    for name, decode in _DECODERS:
        if values[_AT[name]] is not None:
            values[_AT[name]] = decode(json.loads(values[_AT[name]]))
    return Command(*values)


_DECODERS: Final[tuple[tuple[str, Callable[[Any], Any]], ...]] = (
    ("reply", Reply.from_json),
    ("error", CommandError.from_json),
    ("handler_args", lambda value: value),
)


def _event_from_row(row: sqlite3.Row) -> Event:
    return Event(
        seq=row["id"],
        command_id=row["command_id"],
        flow_id=row["flow_id"],
        at=row["at"],
        from_state=row["from_state"],
        to_state=row["to_state"],
        event=row["event"],
        detail=_loads(row["detail"]),
    )


# --- How each operation is written in SQLite ----------------------------------
#
# The operations themselves are flows.operations' plain records; the SQL of
# each kind is a function here, found by the operation's type (``_APPLY``).
# Each takes the batch's cursor and returns what the caller is told.

_mutable_values: Final = operator.attrgetter(*_MUTABLE)


class _Batch(sqlite3.Cursor):
    """The cursor of one ``commit``: journal rows wait in ``rows`` and are
    written by one ``executemany`` before the commit. Their ids are given
    here, from the highest id at the start of the transaction (we hold the
    write lock, so these are the ids SQLite would give), because a caller
    sees its journal row's ``seq`` before the batch is written."""

    next_seq = 0
    rows: list[tuple[Any, ...]]
    # A batch of claims shares one detail object: it is encoded once.
    last_detail: Any = None
    last_detail_json: str | None = None


def _journal(
    cursor: _Batch,
    command_id: str | None,
    flow_id: str | None,
    at: float,
    from_state: str | None,
    to_state: str,
    event: str,
    detail: Any,
) -> Event:
    cursor.next_seq += 1
    if detail is not cursor.last_detail:
        encoded = _dumps(detail)
        if encoded is not None:
            storable_text(encoded, "a journal detail")
        cursor.last_detail, cursor.last_detail_json = detail, encoded
    cursor.rows.append(
        (
            cursor.next_seq,
            command_id,
            flow_id,
            at,
            from_state,
            to_state,
            event,
            cursor.last_detail_json,
        )
    )
    return Event(
        seq=cursor.next_seq,
        command_id=command_id,
        flow_id=flow_id,
        at=at,
        from_state=from_state,
        to_state=to_state,
        event=event,
        detail=detail,
    )


def _lost_race(cursor: sqlite3.Cursor, expected: Command, event: str) -> LostRace:
    row = cursor.execute(
        "SELECT state, attempt, owner FROM commands WHERE id = ?", (expected.id,)
    ).fetchone()
    found = "no such command" if row is None else f"{row[0]!r} (attempt {row[1]}, owner {row[2]})"
    return LostRace(
        f"command {expected.id}: cannot {event}: expected {expected.state!r} "
        f"(attempt {expected.attempt}, owner {expected.owner}), found {found}",
        command_id=expected.id,
        state=row[0] if row else "",
        event=event,
    )


def _flow_lost_race(cursor: sqlite3.Cursor, expected: Flow, event: str) -> LostRace:
    row = cursor.execute("SELECT state, owner FROM flows WHERE id = ?", (expected.id,)).fetchone()
    found = f"{row[0]!r} (owner {row[1]})" if row else "no such flow"
    return LostRace(
        f"flow {expected.id}: cannot {event}: expected {expected.state!r} "
        f"(owner {expected.owner}), found {found}",
        command_id=expected.id,
        state=row[0] if row else "",
        event=event,
    )


def _changed(before: Command, after: Command) -> tuple[str, ...]:
    """The columns a transition changes: its UPDATE writes only those."""
    # Command.evolve keeps every field it was not given: identity tells
    # (compared in C: this runs for every transition of every command).
    return tuple(
        itertools.compress(
            _MUTABLE, map(operator.is_not, _mutable_values(after), _mutable_values(before))
        )
    )


def _cas_params(before: Command, after: Command, changed: tuple[str, ...]) -> tuple[Any, ...]:
    """The parameters of ``_move_sql(changed)`` that write ``after`` over
    ``before`` if the row is still ``before``'s (state, attempt, owner)."""
    return (*command_row(after, changed), before.id, before.state, before.attempt, before.owner)


def _compare_and_set(cursor: sqlite3.Cursor, before: Command, after: Command, event: str) -> None:
    """Write ``after`` over ``before``; the lost race if the row moved."""
    changed = _changed(before, after)
    cursor.execute(_move_sql(changed), _cas_params(before, after, changed))
    if cursor.rowcount != 1:
        raise _lost_race(cursor, before, event)


def _insert_snapshot(cursor: sqlite3.Cursor, s: Snapshot) -> None:
    cursor.execute(
        "INSERT INTO snapshots "
        '(id, uri, version, start, "end", text, created_at, document, document_start) '
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            s.id,
            s.uri,
            s.version,
            s.start,
            s.end,
            s.text,
            s.created_at,
            s.document,
            s.document_start,
        ),
    )


def _journal_insert(cursor: _Batch, op: Insert) -> Event:
    cmd = op.command
    return _journal(
        cursor, cmd.id, cmd.flow_id, cmd.created_at, None, cmd.state, "submit", op.detail
    )


def _insert(cursor: _Batch, op: Insert) -> Event:
    cmd = op.command
    # Journaled first (the row waits in the batch): a detail that cannot be
    # stored raises before anything is written.
    event = _journal_insert(cursor, op)
    if op.snapshot is not None:
        _insert_snapshot(cursor, op.snapshot)
    cursor.execute(_INSERT_COMMAND, command_row(cmd))
    if cmd.flow_id is not None and cmd.step is not None:
        if cmd.replay_of is None:
            # A flow's call and the step that records it commit together: a
            # crash can never leave a call its flow does not know of.
            cursor.execute(
                "INSERT INTO flow_steps (flow_id, step, kind, command_id, value, created_at) "
                "VALUES (?, ?, 'call', ?, NULL, ?)",
                (cmd.flow_id, cmd.step, cmd.id, cmd.created_at),
            )
        else:
            # A replay takes its dead original's step over: the flow resumes.
            # Only one replay can: a second one would be a call its flow
            # never reads.
            cursor.execute(
                "UPDATE flow_steps SET command_id = ? "
                "WHERE flow_id = ? AND step = ? AND command_id = ?",
                (cmd.id, cmd.flow_id, cmd.step, cmd.replay_of),
            )
            if cursor.rowcount != 1:
                raise LostRace(
                    f"command {cmd.replay_of}: another replay took step {cmd.step} "
                    f"of flow {cmd.flow_id} over",
                    command_id=cmd.replay_of,
                    state="dead",
                    event="replay",
                )
    return event


def _journal_move(cursor: _Batch, move: Move) -> Event:
    b, a = move.before, move.after
    return _journal(cursor, a.id, a.flow_id, move.at, b.state, a.state, move.event, move.detail)


def _move(cursor: _Batch, op: Move) -> Event:
    op.check()
    event = _journal_move(cursor, op)  # first, as in _insert
    _compare_and_set(cursor, op.before, op.after, op.event)
    return event


def _journal_chain(cursor: _Batch, op: Chain) -> builtins.list[Event]:
    return [_journal_move(cursor, move) for move in op.moves]


def _chain(cursor: _Batch, op: Chain) -> builtins.list[Event]:
    op.check()
    first, last = op.moves[0], op.moves[-1]
    events = _journal_chain(cursor, op)  # first, as in _insert
    _compare_and_set(cursor, first.before, last.after, first.event)
    return events


def _note(cursor: _Batch, op: Note) -> Event:
    row = cursor.execute(
        "SELECT state, flow_id FROM commands WHERE id = ?", (op.command_id,)
    ).fetchone()
    if row is None:
        raise UnknownCommand(op.command_id)
    return _journal(cursor, op.command_id, row[1], op.at, row[0], row[0], op.event, op.detail)


def _journal_take_over(cursor: _Batch, op: TakeOver | TakeOverFlow) -> Event:
    """A take-over's journal row: a note (the state stays), naming the
    previous and the new owner."""
    b = op.before
    command_id, flow_id = (None, b.id) if isinstance(b, Flow) else (b.id, b.flow_id)
    who = {"previous_owner": b.owner, "owner": op.owner}
    return _journal(cursor, command_id, flow_id, op.at, b.state, b.state, TAKE_OVER, who)


def _take_over(cursor: _Batch, op: TakeOver) -> Event:
    b = op.before
    event = _journal_take_over(cursor, op)
    cursor.execute(
        "UPDATE commands SET owner = ?, lease_until = ? "
        "WHERE id = ? AND state = ? AND attempt = ? AND owner IS ?",
        (op.owner, op.lease_until, b.id, b.state, b.attempt, b.owner),
    )
    if cursor.rowcount != 1:
        raise _lost_race(cursor, b, TAKE_OVER)
    return event


def _take_over_flow(cursor: _Batch, op: TakeOverFlow) -> Event:
    b = op.before
    event = _journal_take_over(cursor, op)
    cursor.execute(
        "UPDATE flows SET owner = ?, lease_until = ?, updated_at = ? "
        "WHERE id = ? AND state = ? AND owner IS ?",
        (op.owner, op.lease_until, op.at, b.id, b.state, b.owner),
    )
    if cursor.rowcount != 1:
        raise _flow_lost_race(cursor, b, TAKE_OVER)
    return event


def _add_late_reply(cursor: _Batch, op: AddLateReply) -> int:
    cursor.execute(
        "INSERT INTO late_replies (command_id, reply, received_at) VALUES (?, ?, ?)",
        (op.command_id, _dumps(op.reply.to_json()), op.at),
    )
    return int(cursor.lastrowid or 0)


def _use_late_reply(cursor: _Batch, op: UseLateReply) -> None:
    cursor.execute(
        "UPDATE late_replies SET used_by = ? WHERE id = ? AND used_by IS NULL",
        (op.used_by, op.late_reply_id),
    )
    if cursor.rowcount != 1:
        raise LostRace(f"late reply {op.late_reply_id} was already used")


def _renew_leases(cursor: _Batch, op: RenewLeases) -> frozenset[str]:
    if not op.ids:
        return frozenset()
    # ``+owner``: by the ids, not by the lease index. Its planner guesses ten rows an
    # owner, so with a slice of 1,024 ids it walked every row this engine leases
    # for each slice (80 ms a slice at 100,000 in flight: every renewal pass cost
    # O(in flight squared) and held the loop); by the ids it is 1,024 lookups, 4 ms.
    held = f"+owner = ? AND {_LEASED} AND id IN ({', '.join('?' for _ in op.ids)})"
    cursor.execute(
        f"UPDATE commands SET lease_until = ? WHERE {held}", (op.until, op.owner, *op.ids)
    )
    cursor.execute(f"SELECT id FROM commands WHERE {held}", (op.owner, *op.ids))
    return frozenset(row[0] for row in cursor.fetchall())


def _renew_flow_leases(cursor: _Batch, op: RenewFlowLeases) -> None:
    if op.ids:
        cursor.execute(
            "UPDATE flows SET lease_until = ? "
            f"WHERE owner = ? AND id IN ({', '.join('?' for _ in op.ids)})",
            (op.until, op.owner, *op.ids),
        )


def _release_leases(cursor: _Batch, op: ReleaseLeases) -> None:
    cursor.execute(
        f"UPDATE commands SET lease_until = 0 WHERE owner = ? AND {_LEASED}", (op.owner,)
    )
    cursor.execute(
        f"UPDATE flows SET lease_until = 0 WHERE owner = ? AND {_LIVE_FLOWS}",
        (op.owner,),
    )


_FLOW_COLUMNS: Final = tuple(f.name for f in attrs.fields(Flow))
_FLOW_JSON: Final = frozenset({"params", "vars", "result"})
_FLOW_MUTABLE: Final = tuple(
    c for c in _FLOW_COLUMNS if c not in ("id", "name", "created_at", "params", "forked_from")
)


def _flow_row(flow: Flow, columns: Sequence[str] = _FLOW_COLUMNS) -> tuple[Any, ...]:
    return tuple(_dumps(getattr(flow, c)) if c in _FLOW_JSON else getattr(flow, c) for c in columns)


def flow_from_row(row: sqlite3.Row) -> Flow:
    fields = {k: row[k] for k in _FLOW_COLUMNS}
    for name in _FLOW_JSON:
        fields[name] = _loads(fields[name])
    return Flow(**fields)


def _insert_flow(cursor: _Batch, op: InsertFlow) -> Event:
    f = op.flow
    detail = {"forked_from": f.forked_from} if f.forked_from else None
    event = _journal(cursor, None, f.id, f.created_at, None, f.state, "start", detail)
    if op.snapshot is not None:
        _insert_snapshot(cursor, op.snapshot)
    cursor.execute(
        f"INSERT INTO flows ({', '.join(_FLOW_COLUMNS)}) "
        f"VALUES ({', '.join('?' for _ in _FLOW_COLUMNS)})",
        _flow_row(f),
    )
    return event


def _copy_steps(cursor: _Batch, op: CopySteps) -> None:
    cursor.execute(
        "INSERT INTO flow_steps (flow_id, step, kind, command_id, value, created_at) "
        "SELECT ?, step, kind, command_id, value, created_at FROM flow_steps "
        "WHERE flow_id = ? AND step < ?",
        (op.target, op.source, op.before),
    )


def _move_flow(cursor: _Batch, op: MoveFlow) -> Event:
    op.check()
    b, a = op.before, op.after
    event = _journal(cursor, None, a.id, a.updated_at, b.state, a.state, op.event, op.detail)
    cursor.execute(
        f"UPDATE flows SET {', '.join(f'{c} = ?' for c in _FLOW_MUTABLE)} "
        "WHERE id = ? AND state = ? AND owner IS ?",
        (*_flow_row(a, _FLOW_MUTABLE), b.id, b.state, b.owner),
    )
    if cursor.rowcount != 1:
        raise _flow_lost_race(cursor, b, op.event)
    return event


def _record_step(cursor: _Batch, op: RecordStep) -> None:
    s, f = op.step, op.flow
    cursor.execute(
        "UPDATE flows SET step = ?, updated_at = ? WHERE id = ? AND state = ? AND owner IS ?",
        (s.step, s.created_at, f.id, f.state, f.owner),
    )
    if cursor.rowcount != 1:
        raise _flow_lost_race(cursor, f, "record a step")
    cursor.execute(
        "INSERT INTO flow_steps (flow_id, step, kind, command_id, value, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (s.flow_id, s.step, s.kind, s.command_id, _dumps(s.value), s.created_at),
    )


def _group(cursor: _Batch, op: Group) -> builtins.list[Any]:
    # A member that raises raises out of the group, which is undone whole.
    return _apply_runs(cursor, op.operations, functools.partial(_apply, cursor))


def _add_cache_entry(cursor: _Batch, op: AddCacheEntry) -> None:
    cursor.execute(
        "INSERT INTO cache (command_id, key, adapter, created_at, hits) VALUES (?, ?, ?, ?, 0)",
        (op.command_id, op.key, op.adapter, op.at),
    )


def _count_cache_hit(cursor: _Batch, op: CountCacheHit) -> None:
    cursor.execute(
        "UPDATE cache SET hits = hits + 1, last_hit_at = ? WHERE command_id = ?",
        (op.at, op.command_id),
    )


_APPLY: Final[Mapping[type[Any], Callable[[_Batch, Any], Any]]] = {
    Insert: _insert,
    Move: _move,
    Chain: _chain,
    Note: _note,
    TakeOver: _take_over,
    TakeOverFlow: _take_over_flow,
    AddLateReply: _add_late_reply,
    UseLateReply: _use_late_reply,
    RenewLeases: _renew_leases,
    RenewFlowLeases: _renew_flow_leases,
    ReleaseLeases: _release_leases,
    InsertFlow: _insert_flow,
    CopySteps: _copy_steps,
    MoveFlow: _move_flow,
    RecordStep: _record_step,
    Group: _group,
    AddCacheEntry: _add_cache_entry,
    CountCacheHit: _count_cache_hit,
}
"""The SQL of each kind of operation. A kind missing here is a bug caught
by the contract tests (every kind is committed there)."""


def _apply(cursor: _Batch, op: Operation) -> Any:
    return _APPLY[type(op)](cursor, op)


# --- Runs: like operations written by one statement ----------------------------
#
# The engine commits hundreds of like operations at a time (a claimed batch
# of ``Move``s, a round of reply-and-finish ``Chain``s, ``submit_many``'s
# ``Insert``s). Written one by one, each costs an ``execute`` and a savepoint
# of its own; a run of them written by one ``executemany`` under one savepoint
# saves about 1-2 us an operation (measured on 1,024 claims, replies or
# inserts a commit: most of what bench/lifecycle.py's "statements only" saves
# over "grouped" is building parameters beforehand, which a store cannot).
# The fast path only ever writes what the one-by-one path would: when a run
# cannot be written whole (a compare-and-set lost, a value refused), it is
# undone and written again one by one, so that each operation gets exactly
# the result it gets alone.

_Params = tuple[Any, ...]


class _RunKind(NamedTuple):
    """How an operation of a kind that can join a run is written there.

    ``family`` is a cheap first look (None: the operation writes more than
    a row, and goes its own way): only neighbours of one family can share a
    statement, and the statement is only worked out for ``_MIN_RUN`` or more
    of them in a row, so that a small commit costs what it did.
    ``statement`` gives the one statement that writes its row and the
    columns it writes; ``params`` that statement's parameters; ``journal``
    queues its journal rows and returns what its caller is told."""

    family: Callable[[Any], Hashable | None]
    statement: Callable[[Any], tuple[str, tuple[str, ...]]]
    params: Callable[[Any, tuple[str, ...]], _Params]
    journal: Callable[[_Batch, Any], Any]


def _insert_family(op: Insert) -> Hashable | None:
    cmd = op.command
    if op.snapshot is not None or (cmd.flow_id is not None and cmd.step is not None):
        return None  # a snapshot or a flow step to write too: see _insert
    return ()


def _insert_statement(op: Insert) -> tuple[str, tuple[str, ...]]:
    return _INSERT_COMMAND, COLUMNS


def _insert_params(op: Insert, columns: tuple[str, ...]) -> _Params:
    return command_row(op.command, columns)


def _ends(op: Move | Chain) -> tuple[Command, Command]:
    """The command as the caller read it, and as it must become."""
    if isinstance(op, Move):
        return op.before, op.after
    return op.moves[0].before, op.moves[-1].after


def _cas_statement(op: Move | Chain) -> tuple[str, tuple[str, ...]]:
    op.check()
    changed = _changed(*_ends(op))
    return _move_sql(changed), changed


def _cas_run_params(op: Move | Chain, changed: tuple[str, ...]) -> _Params:
    return _cas_params(*_ends(op), changed)


_event: Final = operator.attrgetter("event")

_RUNS: Final[Mapping[type[Any], _RunKind]] = {
    Insert: _RunKind(_insert_family, _insert_statement, _insert_params, _journal_insert),
    Move: _RunKind(_event, _cas_statement, _cas_run_params, _journal_move),
    Chain: _RunKind(
        lambda op: tuple(map(_event, op.moves)),
        _cas_statement,
        _cas_run_params,
        _journal_chain,
    ),
}
"""The kinds whose operations can be written in runs: each writes one row of
``commands`` (and its journal rows), as its ``_APPLY`` function does. Moves
of one event (a claimed batch), chains of the same events (a round of
replies and finishes) that change the same columns share a statement."""


class _Staged(NamedTuple):
    """An operation of a run, with the columns its statement writes."""

    op: Operation
    columns: tuple[str, ...]


def _family(op: Operation) -> Hashable | None:
    kind = _RUNS.get(type(op))
    family = None if kind is None else kind.family(op)
    return None if family is None else (type(op), family)


_MIN_RUN: Final = 4
"""Fewer operations of a family in a row are written one by one: cutting
them into a run costs about what one ``executemany`` saves on two or three
(the lifecycle's ``sequential`` row commits two or three of a kind at a
time, and its store time grew by about 10 us a command, 4% of its whole,
when they were cut into runs)."""


def _family_end(operations: Sequence[Operation], start: int) -> int:
    """Where the operations of ``operations[start]``'s family that follow
    it in a row end (``start + 1`` if there are fewer than ``_MIN_RUN``)."""
    first, last = operations[start], start + _MIN_RUN - 1
    if last >= len(operations) or type(operations[last]) is not type(first):
        return start + 1  # a cheap look first: most small commits stop here
    family = _family(first)
    end = start + 1
    if family is not None:
        while end < len(operations) and _family(operations[end]) == family:
            end += 1
    return end


def _by_statement(
    operations: Sequence[Operation],
) -> Iterator[tuple[str | None, builtins.list[_Staged]]]:
    """Operations of one family cut where their statement changes."""
    sql: str | None = None
    run: builtins.list[_Staged] = []
    for op in operations:
        key: str | None
        columns: tuple[str, ...]
        try:
            key, columns = _RUNS[type(op)].statement(op)
        except Exception:
            key, columns = None, ()  # alone, it raises what is wrong with it
        if run and (key is None or key != sql):
            yield sql, run
            run = []
        sql = key
        run.append(_Staged(op, columns))
    if run:
        yield sql, run


def _savepoint(cursor: _Batch, name: str, write: Callable[[_Batch, _A], _T], arg: _A) -> _T:
    """``write(cursor, arg)`` inside a savepoint: if it raises, everything it
    did is undone (its rows, and its journal rows and their seqs), and the
    exception goes on. If SQLite has rolled the whole transaction back
    meanwhile, there is no savepoint left to undo: the caller sees
    ``in_transaction`` false."""
    journaled, seq = len(cursor.rows), cursor.next_seq
    cursor.execute("SAVEPOINT " + name)
    try:
        result = write(cursor, arg)
    except Exception:
        if cursor.connection.in_transaction:
            cursor.execute("ROLLBACK TO " + name)
            cursor.execute("RELEASE " + name)
            del cursor.rows[journaled:]
            cursor.next_seq = seq
        raise
    cursor.execute("RELEASE " + name)
    return result


class _RunRefused(Exception):
    """A run that did not change one row for each of its operations: some
    compare-and-set lost. Which one, and why, the one-by-one path tells."""


def _write_run(cursor: _Batch, sql: str, run: Sequence[_Staged]) -> builtins.list[Any] | None:
    """The results of the operations of ``run``, written by one
    ``executemany`` of ``sql`` under one savepoint; None, and nothing
    written, if they are not all written."""
    try:
        return _savepoint(cursor, "run", _write_whole, (sql, run))
    except Exception:
        if not cursor.connection.in_transaction:
            raise  # SQLite rolled the whole transaction back
        return None


def _write_whole(cursor: _Batch, job: tuple[str, Sequence[_Staged]]) -> builtins.list[Any]:
    sql, run = job
    kinds = [(_RUNS[type(staged.op)], staged) for staged in run]
    results = [kind.journal(cursor, staged.op) for kind, staged in kinds]
    cursor.executemany(sql, [kind.params(staged.op, staged.columns) for kind, staged in kinds])
    if cursor.rowcount != len(run):
        raise _RunRefused
    return results


def _apply_runs(
    cursor: _Batch, operations: Sequence[Operation], alone: Callable[[Operation], Any]
) -> builtins.list[Any]:
    """The result of each of ``operations``, in order: runs of two or more
    of a statement, among ``_MIN_RUN`` or more of a family, written by
    ``_write_run``; every other operation, and each one of a run that could
    not be written whole, by ``alone`` (so that an operation committed by
    itself takes the one-by-one path, which the runs must match:
    tests/test_store_runs.py compares the two)."""
    results: builtins.list[Any] = []
    start = 0
    while start < len(operations):
        end = _family_end(operations, start)
        if end - start < _MIN_RUN:
            results.append(alone(operations[start]))
            start += 1
            continue
        for sql, run in _by_statement(operations[start:end]):
            written = None if sql is None or len(run) == 1 else _write_run(cursor, sql, run)
            results.extend([alone(staged.op) for staged in run] if written is None else written)
        start = end
    return results


# --- Owners ------------------------------------------------------------------


def _pid_space() -> str:
    """What makes a pid name one process: this kernel's boot and this pid
    namespace (Linux: ``boot_id`` and the namespace's inode). Two hosts, or
    two containers, that share a host name do not share it; ``""`` where it
    cannot be read (then no owner is ever declared gone at once)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"{boot.replace('-', '')[:12]}.{namespace}"


_PID_SPACE: Final = _pid_space()


def make_owner(token: str) -> str:
    """``host:pid:token@space``: enough to tell, in this pid space (this boot
    of this kernel, this pid namespace), whether the owner of a lease still
    runs; the host name is for people reading the table."""
    return f"{socket.gethostname()}:{os.getpid()}:{token}@{_PID_SPACE}"


def owner_is_gone(owner: str) -> bool:
    """True when ``owner`` names a process of this pid space that no longer
    runs.

    An owner elsewhere (another host, another container, another boot), or
    one we cannot read (an owner written before the pid space was in its
    name), is never declared gone: its lease has to run out instead. The host
    name alone is not trusted: two machines may share one. A recycled pid
    only makes us wait for the lease, which is safe."""
    _, _, rest = owner.partition(":")
    pid_text, _, named = rest.partition(":")
    _, at, space = named.rpartition("@")
    if not at or not _PID_SPACE or space != _PID_SPACE or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False  # alive and someone else's, or no pid this system has
    return False


# --- The store ---------------------------------------------------------------


class Store:
    """A dovecote database file. Synchronous: every call is short, and the
    engine serialises writes through its committer task."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        if str(path).lower().startswith(("postgresql:", "postgres:")):
            # A URL taken for a path would become directories named after it.
            raise StoreError(
                "a postgresql:// URL is not a SQLite file: open it with flows.location.open_store"
            )
        self.path = Path(path)
        self.read_only = read_only
        try:
            conn = self._open_read_only() if read_only else self._open()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        self._conn = conn
        self.db = sqlite_utils.Database(conn)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if read_only:
                self._check_schema()
            else:
                self._set_up()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{self.path} is not a usable dovecote database: {exc}") from exc
        except BaseException:
            conn.close()
            raise

    def _open(self) -> sqlite3.Connection:
        """The file, created if need be for its owner alone: prompts and
        replies are nobody else's to read. The directories dovecote makes
        are 0700 and the file 0600 whatever the umask; SQLite gives its WAL
        and shared-memory files the mode of the database file."""
        parent = self.path.parent
        for missing in reversed([p for p in (parent, *parent.parents) if not p.exists()]):
            missing.mkdir(mode=0o700, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return sqlite3.connect(self.path, isolation_level=None)

    def _open_read_only(self) -> sqlite3.Connection:
        """The file opened so that nothing can be written, and so that it can
        be read where nothing can be written (a read-only file, directory or
        mount). SQLite's read-only mode still needs the WAL's shared-memory
        file, which it cannot create in a read-only directory; when there is
        no WAL with changes in it, the file alone is the whole database, and
        it is read as immutable."""
        uri = self.path.resolve().as_uri()
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError:
            conn.close()
            wal = self.path.with_name(self.path.name + "-wal")
            if wal.exists() and wal.stat().st_size > 0:
                raise
        except sqlite3.DatabaseError:
            return conn  # not a database at all: the schema check says so
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None)

    def _check_schema(self) -> None:
        """Read-only, the schema cannot be brought up to date: refuse one
        that is not this dovecote's, rather than misread it."""
        version = self._schema_version()
        if version < SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema {version}, and this dovecote reads schema "
                f"{SCHEMA_VERSION}: run a command that writes (dovecote serve, replay) on it "
                "once, where it can be written, to bring it up to date"
            )

    def _set_up(self) -> None:
        """WAL, and the schema brought up to date. SQLite may answer "locked"
        at once, without waiting out the busy timeout, while another process
        opens or checkpoints the same file (a WAL being set up or recovered):
        that is retried, for as long as the busy timeout."""
        give_up = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode = WAL")
                self._conn.execute("PRAGMA synchronous = NORMAL")
                self._migrate()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > give_up:
                    raise
                time.sleep(0.01)

    @classmethod
    def existing(cls, path: str | os.PathLike[str]) -> Store:
        """The database at ``path``, which must exist: a command that only
        looks never creates one (a mistyped path is an error, not an empty
        answer)."""
        if not Path(path).exists():
            raise StoreError(f"no database at {path} (check --db or $DOVECOTE_DB)")
        return cls(path)

    @classmethod
    def for_reading(cls, path: str | os.PathLike[str]) -> Store:
        """``existing``, opened read-only: what the commands that only look
        use, so that they work on a file they cannot write, and never
        change one by looking."""
        if not Path(path).exists():
            raise StoreError(f"no database at {path} (check --db or $DOVECOTE_DB)")
        return cls(path, read_only=True)

    def close(self) -> None:
        self._conn.close()

    # --- schema --------------------------------------------------------------

    def _migrate(self) -> None:
        if self._schema_version() == SCHEMA_VERSION:
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while we waited for the lock.
            version = self._schema_version()
            steps = (
                self._create_v1,
                self._create_v2,
                self._create_v3,
                self._create_v4,
                self._create_v5,
                self._create_v6,
            )
            for target, step in enumerate(steps[:SCHEMA_VERSION], start=1):
                if version < target:
                    step()
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def _schema_version(self) -> int:
        """The file's schema version; ``SchemaTooNew`` past ours, before
        anything is written."""
        version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{self.path} was written by a newer dovecote (schema {version}); "
                f"this one understands schema {SCHEMA_VERSION} and older: upgrade dovecote"
            )
        return version

    def _create_v1(self) -> None:
        db = self.db
        db.table("commands").create(
            {
                "id": str,
                "adapter": str,
                "request": str,
                "state": str,
                "created_at": float,
                "timeout": float,
                "attempt": int,
                "max_attempts": int,
                "reason": str,
                "expires_at": float,
                "sent_at": float,
                "deadline": float,
                "replied_at": float,
                "finished_at": float,
                "not_before": float,
                "reply": str,
                "error": str,
                "handler": str,
                "handler_args": str,
                "flow_id": str,
                "step": int,
                "snapshot_id": str,
                "replay_of": str,
                "priority": int,
                "owner": str,
                "lease_until": float,
                "cost": float,
            },
            pk="id",
            column_order=list(COLUMNS),
            not_null={
                "adapter",
                "request",
                "state",
                "created_at",
                "timeout",
                "attempt",
                "max_attempts",
                "priority",
            },
        )
        db.table("commands").create_index(
            ["state", "adapter", DescIndex("priority"), "id"], index_name="commands_by_state"
        )
        db.table("commands").create_index(["replay_of"], index_name="commands_by_replay_of")
        db.table("commands").create_index(["flow_id"], index_name="commands_by_flow")
        db.table("events").create(
            {
                "id": int,
                "command_id": str,
                "flow_id": str,
                "at": float,
                "from_state": str,
                "to_state": str,
                "event": str,
                "detail": str,
            },
            pk="id",
            not_null={"at", "to_state", "event"},
        )
        db.table("events").create_index(["command_id"], index_name="events_by_command")
        db.table("events").create_index(["flow_id"], index_name="events_by_flow")
        db.table("late_replies").create(
            {"id": int, "command_id": str, "reply": str, "received_at": float, "used_by": str},
            pk="id",
            not_null={"command_id", "reply", "received_at"},
        )
        db.table("late_replies").create_index(["command_id"], index_name="late_replies_by_command")
        db.table("snapshots").create(
            {
                "id": str,
                "uri": str,
                "version": int,
                "start": int,
                "end": int,
                "text": str,
                "created_at": float,
                "document": str,
            },
            pk="id",
            not_null={"uri", "version", "start", "end", "text", "created_at"},
        )
        db.create_view(
            "dead_letters",
            """
            SELECT commands.*,
                   (SELECT replay.id FROM commands AS replay
                     WHERE replay.replay_of = commands.id
                     ORDER BY replay.id DESC LIMIT 1) AS replayed_by,
                   (SELECT count(*) FROM late_replies
                     WHERE late_replies.command_id = commands.id
                       AND late_replies.used_by IS NULL) AS unused_late_replies
              FROM commands
             WHERE state = 'dead'
            """,
        )

    def _create_v2(self) -> None:
        """Flows: the ``flows`` table and each flow's ``flow_steps``."""
        db = self.db
        db.table("flows").create(
            {
                "id": str,
                "name": str,
                "state": str,
                "created_at": float,
                "updated_at": float,
                "params": str,
                "step": int,
                "stage": str,
                "vars": str,
                "result": str,
                "error": str,
                "forked_from": str,
                "owner": str,
                "lease_until": float,
            },
            pk="id",
            column_order=list(_FLOW_COLUMNS),
            not_null={"name", "state", "created_at", "updated_at", "step"},
        )
        db.table("flows").create_index(["state"], index_name="flows_by_state")
        db.table("flow_steps").create(
            {
                "flow_id": str,
                "step": int,
                "kind": str,
                "command_id": str,
                "value": str,
                "created_at": float,
            },
            pk=("flow_id", "step"),
            not_null={"flow_id", "step", "kind", "created_at"},
        )
        db.table("flow_steps").create_index(["command_id"], index_name="flow_steps_by_command")

    def _create_v3(self) -> None:
        """Index only the rows that have what is indexed: most commands are
        neither replays nor steps of a flow, and an index entry for their
        NULLs cost a write per command and per journal row for nothing."""
        for index, table, column in (
            ("commands_by_replay_of", "commands", "replay_of"),
            ("commands_by_flow", "commands", "flow_id"),
            ("events_by_flow", "events", "flow_id"),
        ):
            self._conn.execute(f"DROP INDEX {index}")
            self._conn.execute(
                f"CREATE INDEX {index} ON {table} ({column}) WHERE {column} IS NOT NULL"
            )

    def _create_v4(self) -> None:
        """A snapshot keeps the text around its region, not the whole document:
        where that text began (rows before this kept the whole document, from 0)."""
        self._conn.execute(
            "ALTER TABLE snapshots ADD COLUMN document_start INTEGER NOT NULL DEFAULT 0"
        )

    def _create_v5(self) -> None:
        """The response cache; a flow's budget; and an index for what an
        adapter has spent since a time (its budget per day)."""
        self.db.table("cache").create(
            {
                "command_id": str,
                "key": str,
                "adapter": str,
                "created_at": float,
                "hits": int,
                "last_hit_at": float,
            },
            pk="command_id",
            not_null={"key", "adapter", "created_at", "hits"},
        )
        self.db.table("cache").create_index(["key"], index_name="cache_by_key")
        self._conn.execute("ALTER TABLE flows ADD COLUMN budget REAL")
        self._conn.execute(
            "CREATE INDEX commands_spent ON commands (adapter, replied_at) WHERE cost IS NOT NULL"
        )

    def _create_v6(self) -> None:
        """Live rows indexed apart from finished ones, so that what the
        engine watches costs the same with a million finished rows in the
        file as with none. Each index holds only the rows in the states it
        serves (its WHERE is built from flows.states, and the queries that use
        it say the very same words: SQLite takes a partial index only for a
        query whose WHERE contains the index's own terms). A finished row
        leaves them all, and the full index on state they replace goes: it
        was written for every row and every transition, and read mostly for
        the few live rows."""
        conn = self._conn
        conn.execute("DROP INDEX commands_by_state")
        for sql in _LIVE_INDEXES:
            conn.execute(sql)

    # --- writes --------------------------------------------------------------

    def commit(self, operations: Sequence[Operation]) -> builtins.list[Any]:
        """Apply ``operations`` in one transaction; one result per operation:
        its value, or the exception it raised, which does not stop the
        others. Each operation runs inside its own savepoint, so one that
        fails half way (a lost compare-and-set, a value SQLite cannot hold, a
        constraint) leaves nothing behind: a ``Group`` is all or nothing. A
        lost race is an ``IllegalTransition``; anything else an operation
        raises becomes a ``StoreError`` that says what was refused.

        When the transaction itself fails (disk full, I/O error, locked past
        the busy timeout), nothing of it is applied, and the operations are
        tried again one transaction each, so that the error reaches only
        those it is about. Nothing raises out of here but a
        ``BaseException`` that is not an ``Exception``: the committer that
        calls it must never die."""
        try:
            return self._commit(operations)
        except Exception as exc:
            if len(operations) == 1:
                return [self._error(operations[0], exc)]
        results: builtins.list[Any] = []
        for op in operations:
            try:
                results.extend(self._commit([op]))
            except Exception as exc:
                results.append(self._error(op, exc))
        return results

    def _error(self, operation: Operation, exc: Exception) -> Exception:
        """What the caller of a failed operation is told."""
        if isinstance(exc, IllegalTransition | StoreError):
            return exc
        error = StoreError(
            f"database {self.path}: {type(operation).__name__} refused: {type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        return error

    def _commit(self, operations: Sequence[Operation]) -> builtins.list[Any]:
        conn = self._conn
        cursor = conn.cursor(_Batch)
        cursor.execute("BEGIN IMMEDIATE")
        try:
            cursor.next_seq = cursor.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[
                0
            ]
            cursor.rows = []
            results = _apply_runs(cursor, operations, functools.partial(self._alone, cursor))
            cursor.executemany(_INSERT_EVENT, cursor.rows)
            cursor.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    def _alone(self, cursor: _Batch, op: Operation) -> Any:
        """``op``'s result, written in a savepoint of its own: whatever it
        raises, half way or not, is undone alone, a group as a whole."""
        try:
            return _savepoint(cursor, "operation", _apply, op)
        except Exception as exc:
            if not self._conn.in_transaction:
                raise  # SQLite rolled the whole transaction back
            return self._error(op, exc)

    def commit_one(self, operation: Operation) -> Any:
        """``commit`` for a single operation, raising what it raised."""
        result = self.commit([operation])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def snapshot(self, snapshot_id: str) -> Snapshot | None:
        row = self._conn.execute("SELECT * FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
        return Snapshot(**dict(row)) if row else None

    # --- reads ---------------------------------------------------------------

    def find(self, command_id: str) -> Command | None:
        row = self._conn.execute("SELECT * FROM commands WHERE id = ?", (command_id,)).fetchone()
        return command_from_row(row) if row else None

    def get(self, command_id: str) -> Command:
        command = self.find(command_id)
        if command is None:
            raise UnknownCommand(command_id)
        return command

    def list(
        self,
        states: Iterable[str] | None = None,
        *,
        limit: int | None = None,
        flow_id: str | None = None,
        adapter: str | None = None,
        reason: str | None = None,
        newest_first: bool = False,
        since: float | None = None,
    ) -> builtins.list[Command]:
        """Commands in ``states``, by id; ``since``: created at or after it."""
        where, params = self._filters(states, flow_id=flow_id, adapter=adapter, reason=reason)
        if since is not None:
            where += (" AND " if where else " WHERE ") + "created_at >= ?"
            params.append(since)
        sql = f"SELECT * FROM commands{where} ORDER BY id {'DESC' if newest_first else 'ASC'}"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [command_from_row(r) for r in self._conn.execute(sql, params)]

    def dead_letters(
        self,
        *,
        reason: str | None = None,
        adapter: str | None = None,
        limit: int | None = None,
        include_replayed: bool = False,
    ) -> builtins.list[tuple[Command, str | None, int]]:
        """Dead commands, oldest first, each with the id of its newest replay
        (or ``None``) and its count of unused late replies. By default only
        those not yet replayed: the ones waiting for a decision."""
        where, params = self._filters(None, adapter=adapter, reason=reason)
        if not include_replayed:
            where += (" AND " if where else " WHERE ") + "replayed_by IS NULL"
        sql = f"SELECT * FROM dead_letters{where} ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [
            (command_from_row(r), r["replayed_by"], r["unused_late_replies"])
            for r in self._conn.execute(sql, params)
        ]

    @staticmethod
    def _filters(
        states: Iterable[str] | None, **equal: str | None
    ) -> tuple[str, builtins.list[Any]]:
        clauses: builtins.list[str] = []
        params: builtins.list[Any] = []
        if states is not None:
            states = list(states)
            clauses.append(f"state IN ({', '.join('?' for _ in states)})")
            params.extend(states)
        for column, value in equal.items():
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        return (" WHERE " + " AND ".join(clauses) if clauses else "", params)

    def history(self, command_id: str) -> builtins.list[Event]:
        rows = self._conn.execute(
            "SELECT * FROM events WHERE command_id = ? ORDER BY id", (command_id,)
        )
        return [_event_from_row(r) for r in rows]

    def events_since(self, seq: int, limit: int = 1000) -> builtins.list[Event]:
        rows = self._conn.execute(
            "SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (seq, limit)
        )
        return [_event_from_row(r) for r in rows]

    def late_replies(
        self, command_id: str, *, unused_only: bool = False
    ) -> builtins.list[LateReply]:
        sql = "SELECT * FROM late_replies WHERE command_id = ?"
        if unused_only:
            sql += " AND used_by IS NULL"
        return [
            LateReply(
                id=r["id"],
                command_id=r["command_id"],
                reply=Reply.from_json(json.loads(r["reply"])),
                received_at=r["received_at"],
                used_by=r["used_by"],
            )
            for r in self._conn.execute(sql + " ORDER BY id", (command_id,))
        ]

    def ready_to_send(
        self,
        adapter: str,
        now: float,
        limit: int,
        handlers: Iterable[str] | None = None,
        known: Mapping[str, Command] | None = None,
    ) -> builtins.list[Command]:
        """Pending commands for ``adapter`` that may be sent now, highest
        priority first, then oldest first. With ``handlers``, only commands
        whose handler is one of them (or none): an engine never claims a
        command it could not finish.

        ``known`` holds commands as this process inserted them. A row still
        pending on the attempt it was inserted with has never moved, so it is
        exactly that record: it is taken from ``known`` rather than decoded
        again (the request's JSON is most of a command's reading cost)."""
        sql = (
            f"SELECT * FROM commands WHERE {_PENDING} AND adapter = ? "
            "AND (not_before IS NULL OR not_before <= ?)"
        )
        params: builtins.list[Any] = [adapter, now]
        if handlers is not None:
            names = list(handlers)
            sql += f" AND (handler IS NULL OR handler IN ({', '.join('?' for _ in names)}))"
            params.extend(names)
        sql += " ORDER BY priority DESC, id LIMIT ?"
        params.append(limit)
        known = known or {}
        ready = []
        for row in self._conn.execute(sql, params):
            command = known.get(row["id"])
            if command is None or command.attempt != row["attempt"]:
                command = command_from_row(row)
            ready.append(command)
        return ready

    def timed_pending(self) -> builtins.list[tuple[str, float | None, float | None]]:
        """(id, expires_at, not_before) of every pending command with a time
        attached: what the timer must watch after a restart."""
        rows = self._conn.execute(f"SELECT id, expires_at, not_before FROM commands WHERE {_TIMED}")
        return [(r[0], r[1], r[2]) for r in rows]

    def abandoned(
        self, me: str, now: float, is_gone: Callable[[str], bool]
    ) -> builtins.list[Command]:
        """Commands in flight (``sent`` or ``replied``) that their owner has
        lost: its lease ran out, or ``is_gone(owner)``. ``me`` is never gone,
        but its own commands are among these when their lease ran out: an
        engine renews the leases of what it holds, so one it let run out is
        one it lost hold of (a commit the disk refused); the engine skips
        those it still holds."""
        return [command_from_row(r) for r in self._lost_hold("commands", _LEASED, me, now, is_gone)]

    def _lost_hold(
        self, table: str, states: str, me: str, now: float, is_gone: Callable[[str], bool]
    ) -> builtins.list[sqlite3.Row]:
        """The rows in ``states`` of ``table`` whose holder lost them, by id.
        Only held rows are read, through their partial index: first the few
        distinct owners (``is_gone`` runs once per owner, not per row),
        then the rows of a lapsed lease or a gone owner."""
        owners = self._conn.execute(
            f"SELECT DISTINCT owner FROM {table} WHERE {states} AND owner IS NOT ?",
            (me,),
        )
        gone = [o for (o,) in owners if o is not None and is_gone(o)]
        sql = (
            f"SELECT * FROM {table} WHERE {states} "
            "AND (owner IS NULL OR lease_until IS NULL OR lease_until < ?"
        )
        params: builtins.list[Any] = [now]
        if gone:
            sql += f" OR owner IN ({', '.join('?' for _ in gone)})"
            params.extend(gone)
        # Sorted here, not by ORDER BY id, which would lead SQLite to walk
        # the whole table in id order instead of the few rows of the index.
        return sorted(self._conn.execute(sql + ")", params), key=operator.itemgetter("id"))

    def find_flow(self, flow_id: str) -> Flow | None:
        row = self._conn.execute("SELECT * FROM flows WHERE id = ?", (flow_id,)).fetchone()
        return flow_from_row(row) if row else None

    def flows(
        self, states: Iterable[str] | None = None, *, limit: int | None = None
    ) -> builtins.list[Flow]:
        where, params = self._filters(states)
        sql = f"SELECT * FROM flows{where} ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [flow_from_row(r) for r in self._conn.execute(sql, params)]

    def flow_steps(self, flow_id: str) -> builtins.list[FlowStep]:
        rows = self._conn.execute(
            "SELECT * FROM flow_steps WHERE flow_id = ? ORDER BY step", (flow_id,)
        )
        return [
            FlowStep(
                flow_id=r["flow_id"],
                step=r["step"],
                kind=r["kind"],
                command_id=r["command_id"],
                value=_loads(r["value"]),
                created_at=r["created_at"],
            )
            for r in rows
        ]

    def flow_history(self, flow_id: str) -> builtins.list[Event]:
        rows = self._conn.execute(
            "SELECT * FROM events WHERE flow_id = ? AND command_id IS NULL ORDER BY id",
            (flow_id,),
        )
        return [_event_from_row(r) for r in rows]

    def abandoned_flows(
        self, me: str, now: float, is_gone: Callable[[str], bool]
    ) -> builtins.list[Flow]:
        """Unfinished flows nobody (alive) runs: no owner, a lease run out,
        or an owner that ``is_gone``. As with ``abandoned``, ``me`` is never
        gone, but its own flows whose lease it let run out are here."""
        return [flow_from_row(r) for r in self._lost_hold("flows", _LIVE_FLOWS, me, now, is_gone)]

    # --- the response cache and budgets ------------------------------------

    def cached(self, key: str, replied_since: float) -> Command | None:
        """The newest ``done`` command entered under ``key`` whose reply came
        after ``replied_since`` (older ones have outlived the TTL)."""
        row = self._conn.execute(
            "SELECT commands.* FROM cache JOIN commands ON commands.id = cache.command_id "
            "WHERE cache.key = ? AND commands.state = 'done' AND commands.reply IS NOT NULL "
            "AND commands.replied_at >= ? ORDER BY commands.replied_at DESC LIMIT 1",
            (key, replied_since),
        ).fetchone()
        return None if row is None else command_from_row(row)

    def cache_stats(self) -> builtins.list[dict[str, Any]]:
        """Per adapter: entries (calls entered, the misses), those with a
        reply to serve, hits, bytes of those replies, the oldest entry."""
        rows = self._conn.execute(
            """
            SELECT cache.adapter AS adapter,
                   count(*) AS entries,
                   coalesce(sum(commands.state = 'done'), 0) AS served,
                   coalesce(sum(cache.hits), 0) AS hits,
                   coalesce(sum(CASE WHEN commands.state = 'done'
                                     THEN length(CAST(commands.reply AS BLOB)) END), 0) AS bytes,
                   min(cache.created_at) AS oldest
              FROM cache LEFT JOIN commands ON commands.id = cache.command_id
             GROUP BY cache.adapter ORDER BY cache.adapter
            """
        )
        return [dict(r) for r in rows]

    def clear_cache(self, adapter: str | None = None, older_than: float | None = None) -> int:
        """Forget cache entries (of ``adapter``, made before ``older_than``);
        how many. Their commands stay: the record is never the cache's."""
        sql, params = "DELETE FROM cache WHERE 1", list[Any]()
        if adapter is not None:
            sql += " AND adapter = ?"
            params.append(adapter)
        if older_than is not None:
            sql += " AND created_at < ?"
            params.append(older_than)
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            count = self._conn.execute(sql, params).rowcount
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        return int(count)

    def spent(self, adapter: str, since: float) -> float:
        """The recorded cost of ``adapter``'s replies since ``since``."""
        row = self._conn.execute(
            "SELECT coalesce(sum(cost), 0.0) FROM commands "
            "WHERE adapter = ? AND replied_at >= ? AND cost IS NOT NULL",
            (adapter, since),
        ).fetchone()
        return float(row[0])

    def flow_budgets(self) -> builtins.list[dict[str, Any]]:
        """Every flow with a budget, and what its commands have cost."""
        rows = self._conn.execute(
            "SELECT flows.id AS flow, flows.name AS name, flows.budget AS budget, "
            "(SELECT coalesce(sum(cost), 0.0) FROM commands WHERE flow_id = flows.id) AS spent "
            "FROM flows WHERE budget IS NOT NULL ORDER BY flows.id"
        )
        return [dict(r) for r in rows]

    def flow_spent(self, flow_id: str) -> float:
        """The recorded cost of a flow's commands."""
        row = self._conn.execute(
            "SELECT coalesce(sum(cost), 0.0) FROM commands WHERE flow_id = ?", (flow_id,)
        ).fetchone()
        return float(row[0])

    def counts(self, states: Iterable[str] | None = None) -> dict[tuple[str, str], int]:
        """Number of commands by (adapter, state), of ``states`` if given.
        Each state is counted under the condition of the partial index that
        holds it, if one does, so that counting live work reads live rows."""
        if states is None:
            groups = ["1"]
        else:
            wanted = set(states)
            groups = [
                state_in(group) for group in (wanted & {PENDING}, wanted & LEASED_STATES) if group
            ]
            rest = wanted - {PENDING} - LEASED_STATES
            if rest:
                groups.append(state_in(rest))
        counted: dict[tuple[str, str], int] = {}
        for where in groups:
            for adapter, state, count in self._conn.execute(
                f"SELECT adapter, state, count(*) FROM commands WHERE {where} "
                "GROUP BY adapter, state"
            ):
                counted[adapter, state] = count
        return counted

    def usage_totals(self, by: str) -> builtins.list[dict[str, Any]]:
        """Calls, tokens and cost grouped ``by`` adapter, flow or day."""
        key = {
            "adapter": "adapter",
            "flow": "flow_id",
            "day": "date(created_at, 'unixepoch')",
        }[by]
        rows = self._conn.execute(
            f"""
            SELECT {key} AS key,
                   count(*) AS calls,
                   sum(state = 'done') AS done,
                   sum(state = 'dead') AS dead,
                   coalesce(sum(json_extract(reply, '$.usage.input_tokens')), 0) AS input_tokens,
                   coalesce(sum(json_extract(reply, '$.usage.output_tokens')), 0) AS output_tokens,
                   coalesce(sum(cost), 0.0) AS cost
              FROM commands GROUP BY key ORDER BY key
            """
        )
        return [dict(r) for r in rows]

    def prune(self, older_than: float) -> int:
        """Delete terminal commands finished before ``older_than`` (epoch
        seconds), with their journal and late replies. The one place where
        anything is deleted, and only when a person asks."""
        terminal = tuple(TERMINAL_STATES)
        marks = ", ".join("?" for _ in terminal)
        select = f"SELECT id FROM commands WHERE state IN ({marks}) AND finished_at < ?"
        params = (*terminal, older_than)
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(f"DELETE FROM events WHERE command_id IN ({select})", params)
            conn.execute(f"DELETE FROM late_replies WHERE command_id IN ({select})", params)
            count = conn.execute(
                f"DELETE FROM commands WHERE state IN ({marks}) AND finished_at < ?", params
            ).rowcount
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return int(count)


if TYPE_CHECKING:

    def _satisfies(store: Store) -> StoreProtocol:
        return store  # mypy --strict checks here that Store is a StoreProtocol
