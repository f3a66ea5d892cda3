"""The pending table: one SQLite file that any person can open with
``sqlite3`` and read. The only module that writes SQL.

Tables
------

``commands``      one row per call to a model: the pending table itself.
``events``        the journal: one row per transition, never updated or
                  deleted by the engine. Replaying it gives every command's
                  current state.
``late_replies``  replies that arrived after their command stopped waiting.
``snapshots``     the text of an editor region when a call about it was made.
``dead_letters``  a view: dead commands, with the replay that retried each.

Why writes come in batches
--------------------------

A transition is a compare-and-set (``UPDATE ... WHERE id = ? AND state = ?``)
plus its journal row, and both must commit together before anyone acts on
the transition. Committing each one alone costs a WAL frame write and a
lock round-trip per transition; committing the transitions that arrive
together in one transaction ("group commit") costs one. ``Store.commit``
takes a batch of operations and applies each independently inside one
transaction: an operation that loses its compare-and-set is reported to its
caller and skipped, the others commit. The engine's committer task feeds it;
nothing is visible before ``commit`` returns.

Durability: WAL with ``synchronous=NORMAL``. A committed transition survives
the process being killed (``kill -9``); after a power cut the last few
transactions may be rolled back, never half-applied.
"""

from __future__ import annotations

import builtins
import json
import os
import socket
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import sqlite_utils
from sqlite_utils.db import DescIndex

from adapters.base import Reply, Request
from flows.errors import SchemaTooNew, StoreError, UnknownCommand
from flows.records import Command, CommandError, Event, LateReply
from flows.snapshots import Snapshot
from flows.states import PENDING, REPLIED, SENT, TERMINAL_STATES, IllegalTransition

SCHEMA_VERSION: Final = 1
BUSY_TIMEOUT_MS: Final = 10_000

# Column order of ``commands``: the names of ``Command``'s fields, as-is.
COLUMNS: Final = tuple(f.name for f in attrs.fields(Command))
# Columns a transition may change: everything but identity and the call itself.
_MUTABLE: Final = tuple(c for c in COLUMNS if c not in ("id", "adapter", "request", "created_at"))
_JSON_COLUMNS: Final = frozenset({"request", "reply", "error", "handler_args"})

_INSERT_COMMAND: Final = (
    f"INSERT INTO commands ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
)
_MOVE_COMMAND: Final = (
    f"UPDATE commands SET {', '.join(f'{c} = ?' for c in _MUTABLE)} "
    "WHERE id = ? AND state = ? AND attempt = ? AND owner IS ?"
)
_INSERT_EVENT: Final = (
    "INSERT INTO events (command_id, flow_id, at, from_state, to_state, event, detail) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def command_row(command: Command, columns: Sequence[str] = COLUMNS) -> tuple[Any, ...]:
    values = []
    for name in columns:
        value = getattr(command, name)
        if name in _JSON_COLUMNS and value is not None:
            value = _dumps(value.to_json() if hasattr(value, "to_json") else value)
        values.append(value)
    return tuple(values)


def command_from_row(row: sqlite3.Row) -> Command:
    fields = dict(zip(row.keys(), row, strict=True))
    fields["request"] = Request.from_json(json.loads(fields["request"]))
    reply = _loads(fields["reply"])
    fields["reply"] = Reply.from_json(reply) if reply is not None else None
    error = _loads(fields["error"])
    fields["error"] = CommandError.from_json(error) if error is not None else None
    fields["handler_args"] = _loads(fields["handler_args"])
    return Command(**{k: v for k, v in fields.items() if k in COLUMNS})


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


# --- Operations: what the engine asks the store to commit --------------------


@attrs.frozen
class Insert:
    """A new command, born ``pending``, and its first journal row; with the
    snapshot of the region it is about, if any, in the same transaction."""

    command: Command
    detail: Any = None
    snapshot: Snapshot | None = None

    def apply(self, cursor: sqlite3.Cursor) -> Event:
        cmd = self.command
        if self.snapshot is not None:
            s = self.snapshot
            cursor.execute(
                "INSERT INTO snapshots "
                '(id, uri, version, start, "end", text, created_at, document) '
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (s.id, s.uri, s.version, s.start, s.end, s.text, s.created_at, s.document),
            )
        cursor.execute(_INSERT_COMMAND, command_row(cmd))
        return _journal(
            cursor, cmd.id, cmd.flow_id, cmd.created_at, None, cmd.state, "submit", self.detail
        )


@attrs.frozen
class Move:
    """A transition: ``before`` is the command as the caller last read it,
    ``after`` the command as it must become. Compare-and-set on state,
    attempt and owner, so that neither a concurrent transition nor another
    engine's takeover is ever overwritten."""

    before: Command
    after: Command
    event: str
    at: float
    detail: Any = None

    def apply(self, cursor: sqlite3.Cursor) -> Event:
        b, a = self.before, self.after
        cursor.execute(
            _MOVE_COMMAND, (*command_row(a, _MUTABLE), b.id, b.state, b.attempt, b.owner)
        )
        if cursor.rowcount != 1:
            raise _lost_race(cursor, b, self.event)
        return _journal(cursor, a.id, a.flow_id, self.at, b.state, a.state, self.event, self.detail)


@attrs.frozen
class TakeOver:
    """Become the owner of a command another engine left behind, without
    changing its state (a ``replied`` command whose handler must run again)."""

    before: Command
    owner: str
    lease_until: float

    def apply(self, cursor: sqlite3.Cursor) -> None:
        b = self.before
        cursor.execute(
            "UPDATE commands SET owner = ?, lease_until = ? "
            "WHERE id = ? AND state = ? AND attempt = ? AND owner IS ?",
            (self.owner, self.lease_until, b.id, b.state, b.attempt, b.owner),
        )
        if cursor.rowcount != 1:
            raise _lost_race(cursor, b, "take over")


@attrs.frozen
class AddLateReply:
    command_id: str
    reply: Reply
    at: float

    def apply(self, cursor: sqlite3.Cursor) -> int:
        cursor.execute(
            "INSERT INTO late_replies (command_id, reply, received_at) VALUES (?, ?, ?)",
            (self.command_id, _dumps(self.reply.to_json()), self.at),
        )
        return int(cursor.lastrowid or 0)


@attrs.frozen
class UseLateReply:
    late_reply_id: int
    used_by: str

    def apply(self, cursor: sqlite3.Cursor) -> None:
        cursor.execute(
            "UPDATE late_replies SET used_by = ? WHERE id = ? AND used_by IS NULL",
            (self.used_by, self.late_reply_id),
        )
        if cursor.rowcount != 1:
            raise IllegalTransition(f"late reply {self.late_reply_id} was already used")


@attrs.frozen
class RenewLeases:
    """Extend the lease of every command ``owner`` holds; returns the ids it
    still holds, so the engine learns which ones were taken from it."""

    owner: str
    until: float

    def apply(self, cursor: sqlite3.Cursor) -> frozenset[str]:
        cursor.execute(
            "UPDATE commands SET lease_until = ? WHERE owner = ? AND state IN (?, ?)",
            (self.until, self.owner, SENT, REPLIED),
        )
        cursor.execute(
            "SELECT id FROM commands WHERE owner = ? AND state IN (?, ?)",
            (self.owner, SENT, REPLIED),
        )
        return frozenset(row[0] for row in cursor.fetchall())


@attrs.frozen
class ReleaseLeases:
    """End every lease ``owner`` holds now (a clean shutdown), so that the
    next engine takes its work over at once instead of after the lease."""

    owner: str

    def apply(self, cursor: sqlite3.Cursor) -> None:
        cursor.execute(
            "UPDATE commands SET lease_until = 0 WHERE owner = ? AND state IN (?, ?)",
            (self.owner, SENT, REPLIED),
        )


Operation = Insert | Move | TakeOver | AddLateReply | UseLateReply | RenewLeases | ReleaseLeases


def _journal(
    cursor: sqlite3.Cursor,
    command_id: str | None,
    flow_id: str | None,
    at: float,
    from_state: str | None,
    to_state: str,
    event: str,
    detail: Any,
) -> Event:
    cursor.execute(
        _INSERT_EVENT, (command_id, flow_id, at, from_state, to_state, event, _dumps(detail))
    )
    return Event(
        seq=int(cursor.lastrowid or 0),
        command_id=command_id,
        flow_id=flow_id,
        at=at,
        from_state=from_state,
        to_state=to_state,
        event=event,
        detail=detail,
    )


def _lost_race(cursor: sqlite3.Cursor, expected: Command, event: str) -> IllegalTransition:
    row = cursor.execute(
        "SELECT state, attempt, owner FROM commands WHERE id = ?", (expected.id,)
    ).fetchone()
    found = "no such command" if row is None else f"{row[0]!r} (attempt {row[1]}, owner {row[2]})"
    return IllegalTransition(
        f"command {expected.id}: cannot {event}: expected {expected.state!r} "
        f"(attempt {expected.attempt}, owner {expected.owner}), found {found}",
        command_id=expected.id,
        state=row[0] if row else "",
        event=event,
    )


# --- Owners ------------------------------------------------------------------


def make_owner(token: str) -> str:
    """``host:pid:token``: enough to tell, on this host, whether the owner
    of a lease still runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{token}"


def owner_is_gone(owner: str) -> bool:
    """True when ``owner`` names a process on this host that no longer runs.

    An owner on another host, or one we cannot read, is never declared gone:
    its lease has to run out instead. A recycled pid only makes us wait for
    the lease, which is safe."""
    host, _, rest = owner.partition(":")
    pid_text, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# --- The store ---------------------------------------------------------------


class Store:
    """A dovecote database file. Synchronous: every call is short, and the
    engine serialises writes through its committer task."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        self._conn = conn
        self.db = sqlite_utils.Database(conn)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{self.path} is not a usable dovecote database: {exc}") from exc
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self._conn.close()

    # --- schema --------------------------------------------------------------

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{self.path} was written by a newer dovecote (schema {version}); "
                f"this one understands schema {SCHEMA_VERSION} and older: upgrade dovecote"
            )
        if version == SCHEMA_VERSION:
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while we waited for the lock.
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version < 1:
                self._create_v1()
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

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

    # --- writes --------------------------------------------------------------

    def commit(self, operations: Sequence[Operation]) -> builtins.list[Any]:
        """Apply ``operations`` in one transaction; one result per operation:
        its value, or the exception it raised (a lost compare-and-set is an
        ``IllegalTransition``; it does not stop the others).

        When SQLite itself fails (disk full, I/O error), the batch is rolled
        back and retried one operation at a time, so that the error reaches
        only the operation that causes it."""
        try:
            return self._commit(operations)
        except sqlite3.Error as exc:
            if len(operations) == 1:
                return [StoreError(f"database {self.path}: {exc}")]
        results: builtins.list[Any] = []
        for op in operations:
            try:
                results.extend(self._commit([op]))
            except sqlite3.Error as exc:
                results.append(StoreError(f"database {self.path}: {exc}"))
        return results

    def _commit(self, operations: Iterable[Operation]) -> builtins.list[Any]:
        conn = self._conn
        results: builtins.list[Any] = []
        cursor = conn.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            for op in operations:
                try:
                    results.append(op.apply(cursor))
                except IllegalTransition as exc:
                    results.append(exc)
                except sqlite3.IntegrityError as exc:
                    results.append(StoreError(f"database {self.path}: {exc}"))
            cursor.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

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
    ) -> builtins.list[Command]:
        where, params = self._filters(states, flow_id=flow_id, adapter=adapter, reason=reason)
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
    ) -> builtins.list[Command]:
        """Pending commands for ``adapter`` that may be sent now, highest
        priority first, then oldest first. With ``handlers``, only commands
        whose handler is one of them (or none): an engine never claims a
        command it could not finish."""
        sql = (
            "SELECT * FROM commands WHERE state = ? AND adapter = ? "
            "AND (not_before IS NULL OR not_before <= ?)"
        )
        params: builtins.list[Any] = [PENDING, adapter, now]
        if handlers is not None:
            names = list(handlers)
            sql += f" AND (handler IS NULL OR handler IN ({', '.join('?' for _ in names)}))"
            params.extend(names)
        sql += " ORDER BY priority DESC, id LIMIT ?"
        params.append(limit)
        return [command_from_row(r) for r in self._conn.execute(sql, params)]

    def timed_pending(self) -> builtins.list[tuple[str, float | None, float | None]]:
        """(id, expires_at, not_before) of every pending command with a time
        attached: what the timer must watch after a restart."""
        rows = self._conn.execute(
            "SELECT id, expires_at, not_before FROM commands WHERE state = ? "
            "AND (expires_at IS NOT NULL OR not_before IS NOT NULL)",
            (PENDING,),
        )
        return [(r[0], r[1], r[2]) for r in rows]

    def abandoned(
        self, me: str, now: float, is_gone: Callable[[str], bool]
    ) -> builtins.list[Command]:
        """Commands in flight (``sent`` or ``replied``) whose owner is not
        ``me`` and has lost them: its lease ran out, or ``is_gone(owner)``."""
        owners = [
            r[0]
            for r in self._conn.execute(
                "SELECT DISTINCT owner FROM commands WHERE state IN (?, ?) AND owner IS NOT ?",
                (SENT, REPLIED, me),
            )
        ]
        gone = [o for o in owners if o is None or is_gone(o)]
        sql = (
            "SELECT * FROM commands WHERE state IN (?, ?) AND owner IS NOT ? "
            "AND (lease_until IS NULL OR lease_until < ?"
        )
        params: builtins.list[Any] = [SENT, REPLIED, me, now]
        named = [o for o in gone if o is not None]
        if named:
            sql += f" OR owner IN ({', '.join('?' for _ in named)})"
            params.extend(named)
        sql += ") ORDER BY id"
        return [command_from_row(r) for r in self._conn.execute(sql, params)]

    def counts(self) -> dict[tuple[str, str], int]:
        """Number of commands by (adapter, state)."""
        rows = self._conn.execute(
            "SELECT adapter, state, count(*) FROM commands GROUP BY adapter, state"
        )
        return {(r[0], r[1]): r[2] for r in rows}

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
