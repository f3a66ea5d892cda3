"""The pending table in a PostgreSQL database, shared by engines on many
hosts: the same tables, journal and view as the SQLite file (``flows.schema``),
the same operations committed in batches (``flows.store``'s records), in
PostgreSQL's dialect. The only other module that writes SQL.

What differs from SQLite, and why
---------------------------------

- **Two connections.** psycopg's async side is asyncio's, and dovecote runs
  on trio, so the store is synchronous: ``commit`` runs in a worker thread
  (``commit_blocks``: the committer hands it whole batches), reads run on
  the engine's thread. Each has its own connection, so that a read never
  lands inside a batch's open transaction.
- **Database time for leases.** Engines on several hosts have clocks that
  disagree; a lease written on one host's clock and read on another's could
  be stolen while it is live. So each leased table has one column of
  PostgreSQL's own, ``lease_expires`` (``flows.schema.LEASE_EXPIRES``): the
  lease's *duration* as the engine asked for it (the operation's
  ``lease_until`` less the ``at`` it was measured from) added to the
  server's ``clock_timestamp()``. ``abandoned`` asks the server whether that
  has passed, never the engine's ``now``. ``lease_until`` keeps what the
  engine wrote, so a row reads back exactly as committed, as in SQLite.
- **Claims skip locked rows.** A claim (``pending`` -> ``sent``) is a
  compare-and-set ``... FOR UPDATE SKIP LOCKED``: when another engine is
  claiming the same row, this one loses the race at once instead of waiting
  for the other's commit to learn it lost.
- **Journal order.** Several engines commit at once. The journal's ids are
  what readers page by (``events_since``), so an id must never become
  visible after a higher one: ids are given under a transaction-scoped
  advisory lock taken just before the journal rows are written, and held
  to the commit, from the highest id (as SQLite's write lock gives them).
"""

from __future__ import annotations

import builtins
import contextlib
import decimal
import json
import operator
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Final, cast

import attrs
import psycopg
import psycopg.errors

from adapters.base import Reply
from flows import schema
from flows.errors import SchemaTooNew, StoreError, UnknownCommand
from flows.location import PgLocation
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
from flows.records import Command, Event, Flow, FlowStep, LateReply, storable_text
from flows.snapshots import Snapshot
from flows.states import (
    DISPATCH,
    PENDING,
    TERMINAL_STATES,
    IllegalTransition,
    LostRace,
)
from flows.store import COLUMNS, command_from_row, command_row, flow_from_row
from flows.wakeups import EVERY_ADAPTER, Changes

NOW: Final = "extract(epoch FROM clock_timestamp())"
LEASE_EXPIRES: Final = schema.LEASE_EXPIRES
"""The server's clock, in the epoch seconds every time column holds."""

_JOURNAL_LOCK: Final = 0x646F7665636F7401  # 'dovecot' + 1: the journal's ids
_SCHEMA_LOCK: Final = 0x646F7665636F7402  # creating the schema
_RESERVED: Final = 0x646F7665  # with a row's hashtext(id): read for a claim (ready_to_send)
CHANNEL: Final = "dovecote"
"""The LISTEN/NOTIFY channel of wake-ups (see ``wait_for_change``)."""
_READY: Final = "ready"


_MUTABLE: Final = tuple(c for c in COLUMNS if c not in ("id", "adapter", "request", "created_at"))
_mutable_values: Final = operator.attrgetter(*_MUTABLE)
_FLOW_COLUMNS: Final = tuple(f.name for f in attrs.fields(Flow))
_FLOW_JSON: Final = frozenset({"params", "vars", "result"})
_FLOW_MUTABLE: Final = tuple(
    c for c in _FLOW_COLUMNS if c not in ("id", "name", "created_at", "params", "forked_from")
)
# The watched queries say their partial index's own words (flows.schema).
_LEASED: Final = schema.LEASED_ROWS
_LIVE_FLOWS: Final = schema.LIVE_FLOW_ROWS
_TERMINAL: Final = schema.state_in(TERMINAL_STATES)

_encode: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _dumps(value: Any) -> str | None:
    return None if value is None else _encode(value)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class _Row(tuple[Any, ...]):
    """A row as ``sqlite3.Row`` gives it (by index, by name, ``keys()``), so
    that both stores decode rows with the same functions."""

    names: tuple[str, ...]

    def keys(self) -> tuple[str, ...]:
        return self.names

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self.names.index(key))
        return tuple.__getitem__(self, key)


def _row_factory(cursor: Any) -> Callable[[Sequence[Any]], _Row]:
    names = tuple(d.name for d in cursor.description or ())

    def make(values: Sequence[Any]) -> _Row:
        row = _Row(values)
        row.names = names
        return row

    return make


def _event(row: _Row) -> Event:
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


def _command(row: _Row) -> Command:
    return command_from_row(cast(Any, row))


def _flow(row: _Row) -> Flow:
    return flow_from_row(cast(Any, row))


# --- A batch --------------------------------------------------------------


@attrs.define
class _Journaled:
    """A journal row of the batch, whose id is given at the end (see the
    module's docstring): what the operation returns until then."""

    command_id: str | None
    flow_id: str | None
    at: float
    from_state: str | None
    to_state: str
    event: str
    detail: Any
    detail_json: str | None
    seq: int = 0

    def value(self) -> Event:
        return Event(
            seq=self.seq,
            command_id=self.command_id,
            flow_id=self.flow_id,
            at=self.at,
            from_state=self.from_state,
            to_state=self.to_state,
            event=self.event,
            detail=self.detail,
        )


@attrs.define
class _Batch:
    cursor: psycopg.Cursor[Any]
    rows: list[_Journaled] = attrs.Factory(list)
    notices: list[str] = attrs.Factory(list)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return self.cursor.execute(sql.encode(), params)

    def journal(
        self,
        command_id: str | None,
        flow_id: str | None,
        at: float,
        from_state: str | None,
        to_state: str,
        event: str,
        detail: Any,
    ) -> _Journaled:
        encoded = _dumps(detail)
        if encoded is not None:
            storable_text(encoded, "a journal detail")
        row = _Journaled(command_id, flow_id, at, from_state, to_state, event, detail, encoded)
        self.rows.append(row)
        return row


def _resolve(result: Any) -> Any:
    """An operation's result with its journal rows made ``Event``s."""
    if isinstance(result, _Journaled):
        return result.value()
    if isinstance(result, list):
        return [_resolve(r) for r in result]
    return result


def _lease(until: float | None, at: float | None) -> tuple[str, builtins.list[Any]]:
    """The SET terms of a lease: ``lease_until`` as the engine gave it (read
    back as written, like every other column), and ``lease_expires``, when
    it runs out on the server's clock: ``until - at`` seconds from now
    (``at`` unknown: measured from this host's clock). An ended lease (0,
    ``ReleaseLeases``) or none at all is the same on both clocks."""
    if until is None or until == 0:
        return f"lease_until = %s, {LEASE_EXPIRES} = %s", [until, until]
    duration = until - (time.time() if at is None else at)
    return f"lease_until = %s, {LEASE_EXPIRES} = {NOW} + %s", [until, duration]


def _lost_race(batch: _Batch, expected: Command, event: str) -> LostRace:
    row = batch.execute(
        "SELECT state, attempt, owner FROM commands WHERE id = %s", (expected.id,)
    ).fetchone()
    found = "no such command" if row is None else f"{row[0]!r} (attempt {row[1]}, owner {row[2]})"
    if row is not None and (row[0], row[1], row[2]) == (
        expected.state,
        expected.attempt,
        expected.owner,
    ):
        found += ", being claimed by another engine"
    return LostRace(
        f"command {expected.id}: cannot {event}: expected {expected.state!r} "
        f"(attempt {expected.attempt}, owner {expected.owner}), found {found}",
        command_id=expected.id,
        state=row[0] if row else "",
        event=event,
    )


def _flow_lost_race(batch: _Batch, expected: Flow, event: str) -> LostRace:
    row = batch.execute("SELECT state, owner FROM flows WHERE id = %s", (expected.id,)).fetchone()
    found = f"{row[0]!r} (owner {row[1]})" if row else "no such flow"
    return LostRace(
        f"flow {expected.id}: cannot {event}: expected {expected.state!r} "
        f"(owner {expected.owner}), found {found}",
        command_id=expected.id,
        state=row[0] if row else "",
        event=event,
    )


_CAS: Final = "id = %s AND state = %s AND attempt = %s AND owner IS NOT DISTINCT FROM %s"


def _compare_and_set(batch: _Batch, before: Command, after: Command, event: str, at: float) -> None:
    changed = [
        column
        for column, new, old in zip(
            _MUTABLE, _mutable_values(after), _mutable_values(before), strict=True
        )
        if new is not old
    ]
    sets, params = [], []
    values = command_row(after, tuple(changed))
    for column, value in zip(changed, values, strict=True):
        if column == "lease_until":
            sql, extra = _lease(after.lease_until, at)
            sets.append(sql)
            params.extend(extra)
        else:
            sets.append(f'"{column}" = %s')
            params.append(value)
    key = (before.id, before.state, before.attempt, before.owner)
    if not sets:
        sets, params = ["state = state"], []
    if before.state == PENDING and event == DISPATCH:
        # A claim: a row another engine is claiming right now is lost at
        # once, not waited for.
        where = f"id = (SELECT id FROM commands WHERE {_CAS} FOR UPDATE SKIP LOCKED)"
    else:
        where = _CAS
    cursor = batch.execute(f"UPDATE commands SET {', '.join(sets)} WHERE {where}", (*params, *key))
    if cursor.rowcount != 1:
        raise _lost_race(batch, before, event)
    if after.state in TERMINAL_STATES:
        batch.notices.append(f"{after.state}:{after.id}")
    elif after.state == PENDING and before.state != PENDING:  # a retry: claimable again
        batch.notices.append(f"{_READY}:{after.adapter}")


def _insert_snapshot(batch: _Batch, s: Snapshot) -> None:
    batch.execute(
        "INSERT INTO snapshots "
        '(id, uri, version, start, "end", text, created_at, document, document_start) '
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
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


_INSERT_COMMAND: Final = (
    f"INSERT INTO commands ({', '.join(COLUMNS)}) VALUES ({', '.join('%s' for _ in COLUMNS)})"
)


def _insert(batch: _Batch, op: Insert) -> _Journaled:
    cmd = op.command
    event = batch.journal(cmd.id, cmd.flow_id, cmd.created_at, None, cmd.state, "submit", op.detail)
    if op.snapshot is not None:
        _insert_snapshot(batch, op.snapshot)
    batch.execute(_INSERT_COMMAND, command_row(cmd))
    if cmd.flow_id is not None and cmd.step is not None:
        if cmd.replay_of is None:
            batch.execute(
                "INSERT INTO flow_steps (flow_id, step, kind, command_id, value, created_at) "
                "VALUES (%s, %s, 'call', %s, NULL, %s)",
                (cmd.flow_id, cmd.step, cmd.id, cmd.created_at),
            )
        else:
            done = batch.execute(
                "UPDATE flow_steps SET command_id = %s "
                "WHERE flow_id = %s AND step = %s AND command_id = %s",
                (cmd.id, cmd.flow_id, cmd.step, cmd.replay_of),
            )
            if done.rowcount != 1:
                raise LostRace(
                    f"command {cmd.replay_of}: another replay took step {cmd.step} "
                    f"of flow {cmd.flow_id} over",
                    command_id=cmd.replay_of,
                    state="dead",
                    event="replay",
                )
    batch.notices.append(f"{_READY}:{cmd.adapter}")
    return event


def _journal_move(batch: _Batch, move: Move) -> _Journaled:
    b, a = move.before, move.after
    return batch.journal(a.id, a.flow_id, move.at, b.state, a.state, move.event, move.detail)


def _move(batch: _Batch, op: Move) -> _Journaled:
    op.check()
    event = _journal_move(batch, op)
    _compare_and_set(batch, op.before, op.after, op.event, op.at)
    return event


def _chain(batch: _Batch, op: Chain) -> builtins.list[_Journaled]:
    op.check()
    events = [_journal_move(batch, move) for move in op.moves]
    first, last = op.moves[0], op.moves[-1]
    _compare_and_set(batch, first.before, last.after, first.event, last.at)
    return events


def _note(batch: _Batch, op: Note) -> _Journaled:
    row = batch.execute(
        "SELECT state, flow_id FROM commands WHERE id = %s", (op.command_id,)
    ).fetchone()
    if row is None:
        raise UnknownCommand(op.command_id)
    return batch.journal(op.command_id, row[1], op.at, row[0], row[0], op.event, op.detail)


def _journal_take_over(batch: _Batch, op: TakeOver | TakeOverFlow) -> _Journaled:
    """As SQLite's: a note (the state stays) naming the previous and the new owner."""
    b = op.before
    command_id, flow_id = (None, b.id) if isinstance(b, Flow) else (b.id, b.flow_id)
    who = {"previous_owner": b.owner, "owner": op.owner}
    return batch.journal(command_id, flow_id, op.at, b.state, b.state, TAKE_OVER, who)


def _take_over(batch: _Batch, op: TakeOver) -> _Journaled:
    b = op.before
    event = _journal_take_over(batch, op)
    lease, params = _lease(op.lease_until, op.at)
    done = batch.execute(
        f"UPDATE commands SET owner = %s, {lease} WHERE {_CAS}",
        (op.owner, *params, b.id, b.state, b.attempt, b.owner),
    )
    if done.rowcount != 1:
        raise _lost_race(batch, b, TAKE_OVER)
    return event


def _take_over_flow(batch: _Batch, op: TakeOverFlow) -> _Journaled:
    b = op.before
    event = _journal_take_over(batch, op)
    lease, params = _lease(op.lease_until, op.at)
    done = batch.execute(
        f"UPDATE flows SET owner = %s, {lease}, updated_at = %s "
        "WHERE id = %s AND state = %s AND owner IS NOT DISTINCT FROM %s",
        (op.owner, *params, op.at, b.id, b.state, b.owner),
    )
    if done.rowcount != 1:
        raise _flow_lost_race(batch, b, TAKE_OVER)
    return event


def _add_late_reply(batch: _Batch, op: AddLateReply) -> int:
    row = batch.execute(
        "INSERT INTO late_replies (command_id, reply, received_at) VALUES (%s, %s, %s) "
        "RETURNING id",
        (op.command_id, _dumps(op.reply.to_json()), op.at),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _use_late_reply(batch: _Batch, op: UseLateReply) -> None:
    done = batch.execute(
        "UPDATE late_replies SET used_by = %s WHERE id = %s AND used_by IS NULL",
        (op.used_by, op.late_reply_id),
    )
    if done.rowcount != 1:
        raise LostRace(f"late reply {op.late_reply_id} was already used")


def _renew_leases(batch: _Batch, op: RenewLeases) -> frozenset[str]:
    if not op.ids:
        return frozenset()
    lease, params = _lease(op.until, op.at)
    rows = batch.execute(
        f"UPDATE commands SET {lease} WHERE owner = %s AND {_LEASED} AND id = ANY(%s) RETURNING id",
        (*params, op.owner, list(op.ids)),
    ).fetchall()
    return frozenset(r[0] for r in rows)


def _renew_flow_leases(batch: _Batch, op: RenewFlowLeases) -> None:
    if op.ids:
        lease, params = _lease(op.until, op.at)
        batch.execute(
            f"UPDATE flows SET {lease} WHERE owner = %s AND id = ANY(%s)",
            (*params, op.owner, list(op.ids)),
        )


def _release_leases(batch: _Batch, op: ReleaseLeases) -> None:
    batch.execute(
        f"UPDATE commands SET lease_until = 0, {LEASE_EXPIRES} = 0 WHERE owner = %s AND {_LEASED}",
        (op.owner,),
    )
    batch.execute(
        f"UPDATE flows SET lease_until = 0, {LEASE_EXPIRES} = 0 WHERE owner = %s AND {_LIVE_FLOWS}",
        (op.owner,),
    )


def _flow_values(flow: Flow, columns: Sequence[str], at: float) -> tuple[str, list[Any]]:
    """The SET terms and parameters of ``columns`` of ``flow``; its lease
    also on the server's clock, measured from ``at``."""
    terms, params = [], []
    for c in columns:
        if c == "lease_until":
            sql, extra = _lease(flow.lease_until, at)
            terms.append(sql)
            params.extend(extra)
        else:
            terms.append(f"{c} = %s")
            value = getattr(flow, c)
            params.append(_dumps(value) if c in _FLOW_JSON else value)
    return ", ".join(terms), params


def _insert_flow(batch: _Batch, op: InsertFlow) -> _Journaled:
    f = op.flow
    detail = {"forked_from": f.forked_from} if f.forked_from else None
    event = batch.journal(None, f.id, f.created_at, None, f.state, "start", detail)
    if op.snapshot is not None:
        _insert_snapshot(batch, op.snapshot)
    batch.execute(
        f"INSERT INTO flows ({', '.join(_FLOW_COLUMNS)}) "
        f"VALUES ({', '.join('%s' for _ in _FLOW_COLUMNS)})",
        [_dumps(getattr(f, c)) if c in _FLOW_JSON else getattr(f, c) for c in _FLOW_COLUMNS],
    )
    if f.lease_until is not None:
        lease, params = _lease(f.lease_until, f.created_at)
        batch.execute(f"UPDATE flows SET {lease} WHERE id = %s", (*params, f.id))
    return event


def _copy_steps(batch: _Batch, op: CopySteps) -> None:
    batch.execute(
        "INSERT INTO flow_steps (flow_id, step, kind, command_id, value, created_at) "
        "SELECT %s, step, kind, command_id, value, created_at FROM flow_steps "
        "WHERE flow_id = %s AND step < %s",
        (op.target, op.source, op.before),
    )


def _move_flow(batch: _Batch, op: MoveFlow) -> _Journaled | None:
    op.check()
    b, a = op.before, op.after
    event = None
    if b.state != a.state:
        event = batch.journal(None, a.id, a.updated_at, b.state, a.state, op.event, op.detail)
    sets, params = _flow_values(a, _FLOW_MUTABLE, a.updated_at)
    done = batch.execute(
        f"UPDATE flows SET {sets} WHERE id = %s AND state = %s AND owner IS NOT DISTINCT FROM %s",
        (*params, b.id, b.state, b.owner),
    )
    if done.rowcount != 1:
        raise _flow_lost_race(batch, b, op.event)
    return event


def _record_step(batch: _Batch, op: RecordStep) -> None:
    s = op.step
    flow = op.flow
    done = batch.execute(
        "UPDATE flows SET step = %s, updated_at = %s WHERE id = %s AND state = %s "
        "AND owner IS NOT DISTINCT FROM %s",
        (s.step, s.created_at, flow.id, flow.state, flow.owner),
    )
    if done.rowcount != 1:
        raise _flow_lost_race(batch, flow, "record a step")
    batch.execute(
        "INSERT INTO flow_steps (flow_id, step, kind, command_id, value, created_at) "
        "VALUES (%s, %s, %s, %s, %s, %s)",
        (s.flow_id, s.step, s.kind, s.command_id, _dumps(s.value), s.created_at),
    )


def _group(batch: _Batch, op: Group) -> builtins.list[Any]:
    return [_apply(batch, member) for member in op.operations]


def _add_cache_entry(batch: _Batch, op: AddCacheEntry) -> None:
    batch.execute(
        "INSERT INTO cache (command_id, key, adapter, created_at, hits) VALUES (%s, %s, %s, %s, 0)",
        (op.command_id, op.key, op.adapter, op.at),
    )


def _count_cache_hit(batch: _Batch, op: CountCacheHit) -> None:
    batch.execute(
        "UPDATE cache SET hits = hits + 1, last_hit_at = %s WHERE command_id = %s",
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


def _apply(batch: _Batch, op: Operation) -> Any:
    return _APPLY[type(op)](batch, op)


_ONE_STATEMENT: Final = frozenset(
    {Move, Chain, Note, TakeOver, TakeOverFlow, UseLateReply, RenewLeases, RenewFlowLeases}
    | {AddLateReply, MoveFlow, CountCacheHit, AddCacheEntry, CopySteps}
)
"""Operations that write with one statement (their journal rows wait in the
batch): nothing of one is left to undo when it fails."""


def _one_statement(op: Operation) -> bool:
    if isinstance(op, Insert):  # a plain submit; not one with a snapshot or a flow's step
        c = op.command
        return op.snapshot is None and (c.flow_id is None or c.step is None)
    return type(op) in _ONE_STATEMENT


class _Refused(Exception):
    """The server refused a statement outside a savepoint: the transaction
    is lost, and the batch is run again with a savepoint per operation."""


def _waited_for(op: Operation) -> Iterator[tuple[str, str]]:
    """``(table, id)`` of the existing rows ``op`` updates waiting for
    their locks (a claim does not wait: it skips a locked row)."""
    if isinstance(op, Move):
        if not (op.before.state == PENDING and op.event == DISPATCH):
            yield "commands", op.before.id
    elif isinstance(op, Chain | Group):
        for inner in op.moves if isinstance(op, Chain) else op.operations:
            yield from _waited_for(inner)
    elif isinstance(op, TakeOver):
        yield "commands", op.before.id
    elif isinstance(op, RenewLeases):
        yield from (("commands", i) for i in op.ids)
    elif isinstance(op, MoveFlow | TakeOverFlow):
        yield "flows", op.before.id
    elif isinstance(op, RecordStep):
        yield "flows", op.flow.id
    elif isinstance(op, RenewFlowLeases):
        yield from (("flows", i) for i in op.ids)


def _lock_in_order(batch: _Batch, operations: Sequence[Operation]) -> None:
    """Lock the rows the batch will update, by table and id, before any
    operation runs. Engines commit batches that touch the same rows in
    different orders (two engines recovering one dead engine's work, a
    reply racing a cancel): taking the locks in one order makes the later
    batch wait for the earlier one, where taking them as the operations
    come would deadlock, and PostgreSQL would abort one side's operations.
    ``FOR NO KEY UPDATE``: the lock an ``UPDATE`` takes anyway."""
    wanted: dict[str, set[str]] = {"commands": set(), "flows": set()}
    for op in operations:
        for table, row_id in _waited_for(op):
            wanted[table].add(row_id)
    for table in ("commands", "flows"):
        if wanted[table]:
            batch.execute(
                f"SELECT 1 FROM {table} WHERE id = ANY(%s) ORDER BY id FOR NO KEY UPDATE",
                (sorted(wanted[table]),),
            )


# --- Connecting -------------------------------------------------------------


def connect(where: PgLocation, *, read_only: bool = False) -> psycopg.Connection[Any]:
    """A connection to ``where``, or one ``StoreError`` that says which of
    the usual things went wrong, never quoting the password."""
    options: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in where.url:
        options["connect_timeout"] = 10
    if "application_name" not in where.url:
        options["application_name"] = "dovecote"
    if read_only:
        options["options"] = "-c default_transaction_read_only=on"
    try:
        return psycopg.connect(where.url, **options)
    except psycopg.Error as exc:
        why = _why(where, exc)
    raise StoreError(why)  # out here: the driver's error is no context of ours


def _why(where: PgLocation, exc: BaseException) -> str:
    text = where.scrub(str(exc)).strip()
    low = text.lower()
    last = text.splitlines()[-1] if text else type(exc).__name__
    if "password authentication failed" in low or "no password supplied" in low:
        return (
            f"PostgreSQL at {where.display} refused the credentials: {last} "
            "(check the URL's password, PGPASSWORD or ~/.pgpass)"
        )
    if "does not exist" in low and "database" in low:
        return f"PostgreSQL at {where.display}: {last} (create it, or check the URL)"
    if "connection refused" in low or "no such file or directory" in low:
        return (
            f"cannot reach PostgreSQL at {where.display}: connection refused "
            "(is the server running, on that host and port?)"
        )
    if "translate host name" in low or "timeout expired" in low:
        return f"cannot reach PostgreSQL at {where.display}: {last}"
    return f"cannot connect to PostgreSQL at {where.display}: {last}"


# --- The store --------------------------------------------------------------


class PostgresStore:
    """A dovecote database in PostgreSQL (``postgresql://`` URL)."""

    commit_blocks: ClassVar[bool] = True

    def __init__(self, url: str | PgLocation, *, read_only: bool = False) -> None:
        self.location = url if isinstance(url, PgLocation) else PgLocation.parse(url)
        self.path = self.location.display  # what messages name the database by
        self.read_only = read_only
        self._reader_lock = threading.Lock()
        self._listener: psycopg.Connection[Any] | None = None
        # The server processes of this store's writers (one, or more after
        # reconnects): their notifications are our own, not news.
        self._own_pids: set[int] = set()
        self._read = connect(self.location, read_only=read_only)
        try:
            if read_only:
                self._check_schema()
            else:
                self._set_up()
            self._write: psycopg.Connection[Any] | None = None
            if not read_only:
                self._writer()
        except BaseException:
            self._read.close()
            raise

    def __repr__(self) -> str:
        return f"PostgresStore({self.location.display!r})"

    @classmethod
    def existing(cls, url: str) -> PostgresStore:
        return cls(url)

    @classmethod
    def for_reading(cls, url: str) -> PostgresStore:
        return cls(url, read_only=True)

    def close(self) -> None:
        self._read.close()
        if self._write is not None:
            self._write.close()
        if self._listener is not None:
            self._listener.close()

    # --- schema --------------------------------------------------------------

    def _version(self, conn: psycopg.Connection[Any]) -> int | None:
        """The schema version of the database; None when it has no dovecote
        tables; a ``StoreError`` when it has some but no version."""
        found = conn.execute(
            "SELECT to_regclass('schema_version') IS NOT NULL, to_regclass('commands') IS NOT NULL"
        ).fetchone()
        assert found is not None
        if not found[0]:
            if found[1]:
                raise StoreError(
                    f"{self.path} has a commands table but no schema_version: "
                    "not a dovecote database"
                )
            return None
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _refuse_newer(self, version: int | None) -> None:
        if version is not None and version > schema.SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{self.path} was written by a newer dovecote (schema {version}); "
                f"this one understands schema {schema.SCHEMA_VERSION} and older: upgrade dovecote"
            )
        if version is not None and version < schema.SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema {version}, older than any PostgreSQL dovecote made"
            )

    def _check_schema(self) -> None:
        version = self._version(self._read)
        if version is None:
            raise StoreError(f"{self.path} holds no dovecote database (check --db or $DOVECOTE_DB)")
        self._refuse_newer(version)

    def _set_up(self) -> None:
        """The schema, created whole in one transaction, or nothing: under a
        lock, so that engines starting together create it once."""
        conn = self._read
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                version = self._version(conn)
                self._refuse_newer(version)
                if version is None:
                    for statement in schema.postgresql_ddl():
                        conn.execute(statement.encode())
                    conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
                    conn.execute(
                        "INSERT INTO schema_version (version) VALUES (%s)",
                        (schema.SCHEMA_VERSION,),
                    )
        except psycopg.Error as exc:
            raise StoreError(
                f"cannot set up {self.path}: {self.location.scrub(str(exc))}"
            ) from None

    # --- writes --------------------------------------------------------------

    def commit(self, operations: Sequence[Operation]) -> builtins.list[Any]:
        """As ``flows.store.Store.commit``: one transaction, one result per
        operation (its value or its exception), each in its own savepoint.
        When the transaction itself fails (the server gone), every
        operation's result is that error, and the next commit connects
        again: a lost connection may have committed the batch or not, and
        only a retry of each operation, where its compare-and-set tells,
        could say which."""
        try:
            return self._commit(operations)
        except Exception as exc:
            self._drop_writer()
            error = StoreError(
                f"database {self.path}: the batch failed: {type(exc).__name__}: "
                f"{self.location.scrub(str(exc))}"
            )
            return [error] * len(operations)

    def _drop_writer(self) -> None:
        if self._write is not None:
            with contextlib.suppress(Exception):
                self._write.close()
            self._write = None

    def _writer(self) -> psycopg.Connection[Any]:
        if self.read_only:
            raise StoreError(f"{self.path} is open read-only")
        if self._write is None or self._write.closed:
            self._write = connect(self.location)
            self._own_pids.add(self._write.info.backend_pid)
        return self._write

    def _error(self, operation: Operation, exc: Exception) -> Exception:
        """What the caller of a failed operation is told (as SQLite's)."""
        if isinstance(exc, IllegalTransition | StoreError):
            return exc
        error = StoreError(
            f"database {self.path}: {type(operation).__name__} refused: {type(exc).__name__}: "
            f"{self.location.scrub(str(exc))}"
        )
        error.__cause__ = exc
        return error

    def _commit(self, operations: Sequence[Operation]) -> builtins.list[Any]:
        try:
            return self._commit_batch(operations, careful=False)
        except _Refused:
            return self._commit_batch(operations, careful=True)

    def _commit_batch(self, operations: Sequence[Operation], careful: bool) -> builtins.list[Any]:
        """One transaction. An operation of several statements runs in a
        savepoint of its own, so that one failing half way is undone alone.
        One of a single statement does not (a savepoint costs two round trips
        to the server, more than the statement): if it loses its race it
        wrote nothing; if the server refuses it (an error aborts the whole
        transaction), the batch is rolled back and run again ``careful``,
        every operation in its own savepoint."""
        conn = self._writer()
        results: builtins.list[Any] = []
        with conn.transaction(), conn.cursor() as cursor:
            batch = _Batch(cursor)
            _lock_in_order(batch, operations)
            for op in operations:
                journaled, notices = len(batch.rows), len(batch.notices)
                alone = careful or not _one_statement(op)
                try:
                    if alone:
                        with conn.transaction():
                            results.append(_apply(batch, op))
                    else:
                        results.append(_apply(batch, op))
                except Exception as exc:
                    if conn.broken:
                        raise  # the connection, not the operation
                    if not alone and isinstance(exc, psycopg.Error):
                        raise _Refused from exc
                    del batch.rows[journaled:]
                    del batch.notices[notices:]
                    results.append(self._error(op, exc))
            if batch.rows:
                batch.execute("SELECT pg_advisory_xact_lock(%s)", (_JOURNAL_LOCK,))
                top = batch.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()
                seq = int(top[0]) if top else 0
                for row in batch.rows:
                    seq += 1
                    row.seq = seq
                cursor.executemany(
                    b"INSERT INTO events "
                    b"(id, command_id, flow_id, at, from_state, to_state, event, detail) "
                    b"VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    [
                        (
                            r.seq,
                            r.command_id,
                            r.flow_id,
                            r.at,
                            r.from_state,
                            r.to_state,
                            r.event,
                            r.detail_json,
                        )
                        for r in batch.rows
                    ],
                )
            if batch.notices:
                # One statement for the batch's wake-ups, however many.
                batch.execute(
                    "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p",
                    (CHANNEL, _payloads(batch.notices)),
                )
        return [_resolve(r) for r in results]

    def commit_one(self, operation: Operation) -> Any:
        result = self.commit([operation])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    # --- reads ---------------------------------------------------------------

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> builtins.list[_Row]:
        """Rows of a read, on the reading connection; a connection the
        server dropped is opened again once (a read can be repeated)."""
        for attempt in (1, 2):
            try:
                with self._reader_lock, self._read.cursor(row_factory=_row_factory) as cursor:
                    cursor.execute(sql.encode(), params)
                    return cursor.fetchall() if cursor.description else []
            except psycopg.OperationalError as exc:
                if attempt == 2 or not self._read.closed:
                    raise StoreError(
                        f"database {self.path}: {self.location.scrub(str(exc))}"
                    ) from None
                self._read = connect(self.location, read_only=self.read_only)
        raise AssertionError("unreachable")

    def snapshot(self, snapshot_id: str) -> Snapshot | None:
        rows = self._rows("SELECT * FROM snapshots WHERE id = %s", (snapshot_id,))
        return Snapshot(**dict(zip(rows[0].keys(), rows[0], strict=True))) if rows else None

    def find(self, command_id: str) -> Command | None:
        rows = self._rows("SELECT * FROM commands WHERE id = %s", (command_id,))
        return _command(rows[0]) if rows else None

    def get(self, command_id: str) -> Command:
        command = self.find(command_id)
        if command is None:
            raise UnknownCommand(command_id)
        return command

    @staticmethod
    def _filters(
        states: Iterable[str] | None, **equal: str | None
    ) -> tuple[str, builtins.list[Any]]:
        clauses: builtins.list[str] = []
        params: builtins.list[Any] = []
        if states is not None:
            clauses.append("state = ANY(%s)")
            params.append(list(states))
        for column, value in equal.items():
            if value is not None:
                clauses.append(f"{column} = %s")
                params.append(value)
        return (" WHERE " + " AND ".join(clauses) if clauses else "", params)

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
        where, params = self._filters(states, flow_id=flow_id, adapter=adapter, reason=reason)
        if since is not None:
            where += (" AND " if where else " WHERE ") + "created_at >= %s"
            params.append(since)
        sql = f"SELECT * FROM commands{where} ORDER BY id {'DESC' if newest_first else 'ASC'}"
        if limit is not None:
            sql += " LIMIT %s"
            params.append(limit)
        return [_command(r) for r in self._rows(sql, params)]

    def dead_letters(
        self,
        *,
        reason: str | None = None,
        adapter: str | None = None,
        limit: int | None = None,
        include_replayed: bool = False,
    ) -> builtins.list[tuple[Command, str | None, int]]:
        where, params = self._filters(None, adapter=adapter, reason=reason)
        if not include_replayed:
            where += (" AND " if where else " WHERE ") + "replayed_by IS NULL"
        sql = f"SELECT * FROM dead_letters{where} ORDER BY id"
        if limit is not None:
            sql += " LIMIT %s"
            params.append(limit)
        return [
            (_command(r), r["replayed_by"], int(r["unused_late_replies"]))
            for r in self._rows(sql, params)
        ]

    def history(self, command_id: str) -> builtins.list[Event]:
        rows = self._rows("SELECT * FROM events WHERE command_id = %s ORDER BY id", (command_id,))
        return [_event(r) for r in rows]

    def events_since(self, seq: int, limit: int = 1000) -> builtins.list[Event]:
        rows = self._rows("SELECT * FROM events WHERE id > %s ORDER BY id LIMIT %s", (seq, limit))
        return [_event(r) for r in rows]

    def late_replies(
        self, command_id: str, *, unused_only: bool = False
    ) -> builtins.list[LateReply]:
        sql = "SELECT * FROM late_replies WHERE command_id = %s"
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
            for r in self._rows(sql + " ORDER BY id", (command_id,))
        ]

    def ready_to_send(
        self,
        adapter: str,
        now: float,
        limit: int,
        handlers: Iterable[str] | None = None,
        known: Mapping[str, Command] | None = None,
    ) -> builtins.list[Command]:
        """As SQLite's. ``not_before`` is the engine's own time (a retry's
        back-off), so it is compared with the engine's ``now``."""
        sql = (
            f"SELECT * FROM commands WHERE {schema.PENDING_ROWS} AND adapter = %s "
            "AND (not_before IS NULL OR not_before <= %s)"
        )
        params: builtins.list[Any] = [adapter, now]
        if handlers is not None:
            sql += " AND (handler IS NULL OR handler = ANY(%s))"
            params.append(builtins.list(handlers))
        sql += " ORDER BY priority DESC, id LIMIT %s"
        params.append(limit)
        if not self.read_only:
            # Engines sharing the table all read its oldest rows, and all but
            # one would lose their claims of them. So a read reserves what it
            # returns (an advisory lock of this reading session, given back
            # at its next read, by which time the claims are committed, or
            # when the session ends) and passes over what another engine's
            # read reserved, looking further down for it.
            self._rows("SELECT pg_advisory_unlock_all()")
            sql = (
                f"SELECT * FROM ({sql.replace('LIMIT %s', 'LIMIT %s * 4')}) AS c "
                "WHERE pg_try_advisory_lock(%s, hashtext(c.id)) LIMIT %s"
            )
            params += [_RESERVED, limit]
        known = known or {}
        ready = []
        for row in self._rows(sql, params):
            command = known.get(row["id"])
            if command is None or command.attempt != row["attempt"]:
                command = _command(row)
            ready.append(command)
        return ready

    def timed_pending(self) -> builtins.list[tuple[str, float | None, float | None]]:
        rows = self._rows(
            f"SELECT id, expires_at, not_before FROM commands WHERE {schema.TIMED_ROWS}"
        )
        return [(r[0], r[1], r[2]) for r in rows]

    def abandoned(
        self, me: str, now: float, is_gone: Callable[[str], bool]
    ) -> builtins.list[Command]:
        """As SQLite's, but whether a lease ran out is the server's to say
        (``now``, the engine's clock, is not used): see the module's
        docstring."""
        return [_command(r) for r in self._lost_hold("commands", _LEASED, me, is_gone)]

    def _lost_hold(
        self, table: str, states: str, me: str, is_gone: Callable[[str], bool]
    ) -> builtins.list[_Row]:
        """The rows in ``states`` of ``table`` whose holder lost them: no
        owner, a lease lapsed on the server's clock, or an owner ``is_gone``
        (asked once per owner)."""
        owners = self._rows(
            f"SELECT DISTINCT owner FROM {table} WHERE {states} AND owner IS DISTINCT FROM %s",
            (me,),
        )
        gone = [o for (o,) in owners if o is not None and is_gone(o)]
        return self._rows(
            f"SELECT * FROM {table} WHERE {states} AND (owner IS NULL "
            f"OR {LEASE_EXPIRES} IS NULL OR {LEASE_EXPIRES} < {NOW} OR owner = ANY(%s)) "
            "ORDER BY id",
            (gone,),
        )

    def find_flow(self, flow_id: str) -> Flow | None:
        rows = self._rows("SELECT * FROM flows WHERE id = %s", (flow_id,))
        return _flow(rows[0]) if rows else None

    def flows(
        self, states: Iterable[str] | None = None, *, limit: int | None = None
    ) -> builtins.list[Flow]:
        where, params = self._filters(states)
        sql = f"SELECT * FROM flows{where} ORDER BY id"
        if limit is not None:
            sql += " LIMIT %s"
            params.append(limit)
        return [_flow(r) for r in self._rows(sql, params)]

    def flow_steps(self, flow_id: str) -> builtins.list[FlowStep]:
        rows = self._rows("SELECT * FROM flow_steps WHERE flow_id = %s ORDER BY step", (flow_id,))
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
        rows = self._rows(
            "SELECT * FROM events WHERE flow_id = %s AND command_id IS NULL ORDER BY id",
            (flow_id,),
        )
        return [_event(r) for r in rows]

    def abandoned_flows(
        self, me: str, now: float, is_gone: Callable[[str], bool]
    ) -> builtins.list[Flow]:
        """As SQLite's, the lease judged on the server's clock."""
        return [_flow(r) for r in self._lost_hold("flows", _LIVE_FLOWS, me, is_gone)]

    # --- the response cache and budgets ------------------------------------

    def cached(self, key: str, replied_since: float) -> Command | None:
        rows = self._rows(
            "SELECT commands.* FROM cache JOIN commands ON commands.id = cache.command_id "
            "WHERE cache.key = %s AND commands.state = 'done' AND commands.reply IS NOT NULL "
            "AND commands.replied_at >= %s ORDER BY commands.replied_at DESC LIMIT 1",
            (key, replied_since),
        )
        return _command(rows[0]) if rows else None

    def cache_stats(self) -> builtins.list[dict[str, Any]]:
        rows = self._rows(
            """
            SELECT cache.adapter AS adapter,
                   count(*) AS entries,
                   count(*) FILTER (WHERE commands.state = 'done') AS served,
                   coalesce(sum(cache.hits), 0) AS hits,
                   coalesce(sum(CASE WHEN commands.state = 'done'
                                     THEN octet_length(commands.reply) END), 0) AS bytes,
                   min(cache.created_at) AS oldest
              FROM cache LEFT JOIN commands ON commands.id = cache.command_id
             GROUP BY cache.adapter ORDER BY cache.adapter
            """
        )
        return [_plain(r) for r in rows]

    def _write_alone(self, sql: str, params: Sequence[Any]) -> int:
        """One statement in a transaction of its own; its row count. Not
        through the committer: a person's command (prune, clear) runs on a
        store no engine of this process is committing to."""
        conn = self._writer()
        with conn.transaction(), conn.cursor() as cursor:
            cursor.execute(sql.encode(), params)
            return int(cursor.rowcount)

    def clear_cache(self, adapter: str | None = None, older_than: float | None = None) -> int:
        sql, params = "DELETE FROM cache WHERE true", builtins.list[Any]()
        if adapter is not None:
            sql += " AND adapter = %s"
            params.append(adapter)
        if older_than is not None:
            sql += " AND created_at < %s"
            params.append(older_than)
        return self._write_alone(sql, params)

    def spent(self, adapter: str, since: float) -> float:
        rows = self._rows(
            "SELECT coalesce(sum(cost), 0.0) FROM commands "
            "WHERE adapter = %s AND replied_at >= %s AND cost IS NOT NULL",
            (adapter, since),
        )
        return float(rows[0][0])

    def flow_budgets(self) -> builtins.list[dict[str, Any]]:
        rows = self._rows(
            "SELECT flows.id AS flow, flows.name AS name, flows.budget AS budget, "
            "(SELECT coalesce(sum(cost), 0.0) FROM commands WHERE flow_id = flows.id) AS spent "
            "FROM flows WHERE budget IS NOT NULL ORDER BY flows.id"
        )
        return [_plain(r) for r in rows]

    def flow_spent(self, flow_id: str) -> float:
        rows = self._rows(
            "SELECT coalesce(sum(cost), 0.0) FROM commands WHERE flow_id = %s", (flow_id,)
        )
        return float(rows[0][0])

    def counts(self, states: Iterable[str] | None = None) -> dict[tuple[str, str], int]:
        where, params = self._filters(states)
        rows = self._rows(
            f"SELECT adapter, state, count(*) FROM commands{where} GROUP BY adapter, state", params
        )
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def usage_totals(self, by: str) -> builtins.list[dict[str, Any]]:
        key = {
            "adapter": "adapter",
            "flow": "flow_id",
            "day": "to_char(to_timestamp(created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        }[by]
        rows = self._rows(
            f"""
            SELECT {key} AS key,
                   count(*) AS calls,
                   count(*) FILTER (WHERE state = 'done') AS done,
                   count(*) FILTER (WHERE state = 'dead') AS dead,
                   coalesce(sum((reply::json #>> '{{usage,input_tokens}}')::bigint), 0)
                       AS input_tokens,
                   coalesce(sum((reply::json #>> '{{usage,output_tokens}}')::bigint), 0)
                       AS output_tokens,
                   coalesce(sum(cost), 0.0) AS cost
              FROM commands GROUP BY 1 ORDER BY 1
            """
        )
        return [_plain(r) for r in rows]

    def prune(self, older_than: float) -> int:
        conn = self._writer()
        select = f"SELECT id FROM commands WHERE {_TERMINAL} AND finished_at < %s"
        params = (older_than,)
        with conn.transaction(), conn.cursor() as cursor:
            cursor.execute(f"DELETE FROM events WHERE command_id IN ({select})".encode(), params)
            cursor.execute(
                f"DELETE FROM late_replies WHERE command_id IN ({select})".encode(), params
            )
            cursor.execute(
                f"DELETE FROM commands WHERE {_TERMINAL} AND finished_at < %s".encode(), params
            )
            return int(cursor.rowcount)

    # --- wake-ups ------------------------------------------------------------

    def _listening(self) -> psycopg.Connection[Any]:
        """The connection that LISTENs, opened (again) when it is missing."""
        if self._listener is None or self._listener.closed:
            conn = connect(self.location)
            conn.execute(f"LISTEN {CHANNEL}")
            self._listener = conn
        return self._listener

    def listen(self) -> None:
        """Start listening now (see ``wait_for_change``)."""
        self._listening()

    def listening(self) -> int:
        """Start listening (if not yet, or again) and return the descriptor
        of the listening connection: readable when a change is announced
        (or the connection ends), so that trio can wait for it without a
        thread (``trio.lowlevel.wait_readable``), then ask
        ``wait_for_change(0)``."""
        return self._listening().fileno()

    def wait_for_change(self, timeout: float) -> Changes:
        """Block until another connection commits a change someone may wait
        for, or ``timeout`` seconds pass (then the ``Changes`` are empty):
        commands to claim, by adapter, and commands that ended. Meant for a
        worker thread (``trio.to_thread.run_sync``). Listening starts at the
        first call (or ``listen``), so a change committed before it is not
        seen: read the table after starting to listen, not before.

        A lost connection (the server restarted) is opened again, and this
        call returns ``EVERY_ADAPTER`` ready: what was told meanwhile is
        lost, and the caller should look."""
        try:
            listener = self._listening()
            notices = builtins.list(listener.notifies(timeout=timeout, stop_after=1))
            # What came with it in the same moment: one wake-up, every change.
            notices += builtins.list(listener.notifies(timeout=0.0))
        except (psycopg.Error, StoreError):
            if self._listener is not None:
                with contextlib.suppress(Exception):
                    self._listener.close()
            self._listener = None
            time.sleep(min(timeout, 0.5))  # the server may be coming back: no busy loop
            with contextlib.suppress(StoreError):
                self._listening()  # listening again before the caller looks
            return Changes(ready=frozenset({EVERY_ADAPTER}))
        ready, finished = set(), []
        # This store's own commits are not news: its engine knows them.
        mine = self._own_pids
        for notice in (
            line for n in notices if n.pid not in mine for line in n.payload.split("\n")
        ):
            kind, _, key = notice.partition(":")
            if kind == _READY:
                ready.add(key)
            else:
                finished.append((key, kind))
        return Changes(frozenset(ready), tuple(finished))


_PAYLOAD_BYTES: Final = 7900  # PostgreSQL's limit is 8000 bytes a notification


def _payloads(notices: Iterable[str]) -> builtins.list[str]:
    """The batch's distinct notices, newline-joined into as few payloads as
    fit PostgreSQL's size limit."""
    payloads: builtins.list[str] = []
    current: builtins.list[str] = []
    size = 0
    for notice in dict.fromkeys(notices):
        length = len(notice.encode()) + 1
        if current and size + length > _PAYLOAD_BYTES:
            payloads.append("\n".join(current))
            current, size = [], 0
        current.append(notice)
        size += length
    if current:
        payloads.append("\n".join(current))
    return payloads


def _plain(row: _Row) -> dict[str, Any]:
    """A row as a dict of plain numbers (PostgreSQL's sums are Decimals)."""
    out = {}
    for name, value in zip(row.keys(), row, strict=True):
        if isinstance(value, decimal.Decimal):
            value = float(value) if value % 1 else int(value)
        out[name] = value
    return out
