"""The store's file format: a file written by an older dovecote is upgraded
in place when it is opened, and keeps everything it held."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import attrs
import pytest

import flows.store
from adapters.base import Reply, Request
from flows.errors import StoreError
from flows.operations import AddCacheEntry, AddLateReply, Chain, InsertFlow, Move, Operation
from flows.records import Command, Flow, new_id
from flows.snapshots import Snapshot
from flows.store import SCHEMA_VERSION, Insert, Store
from tests.stores import commit_one

PARTIAL = {
    "commands_by_replay_of": ("commands", "replay_of"),
    "commands_by_flow": ("commands", "flow_id"),
    "events_by_flow": ("events", "flow_id"),
}


V6_INDEXES = ("commands_ready", "commands_timed", "commands_leased", "commands_dead", "flows_live")


def _index_sql(path: Path) -> dict[str, str]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"))
    finally:
        conn.close()


def _undo_v6(conn: sqlite3.Connection) -> None:
    """What schema 6 changed, undone: a file as schema 5 left it."""
    for index in V6_INDEXES:
        conn.execute(f"DROP INDEX {index}")
    conn.execute("CREATE INDEX commands_by_state ON commands (state, adapter, priority DESC, id)")


def _undo_v5(conn: sqlite3.Connection) -> None:
    """What schema 5 added (and 6 after it), taken away: a file as schema 4
    left it."""
    _undo_v6(conn)
    conn.execute("DROP TABLE cache")
    conn.execute("DROP INDEX commands_spent")
    conn.execute("ALTER TABLE flows DROP COLUMN budget")


def _pending(content: str, snapshot_id: str | None = None) -> Command:
    return Command(
        id=new_id(),
        adapter="scripted",
        request=Request.from_json({"messages": [{"role": "user", "content": content}]}),
        state="pending",
        created_at=1.0,
        timeout=5.0,
        snapshot_id=snapshot_id,
    )


def _one_command(path: Path) -> Command:
    """A new file at ``path`` with one pending command in it."""
    store = Store(path)
    command = _pending("keep me")
    commit_one(store, Insert(command))
    store.close()
    return command


def test_a_schema_2_file_is_upgraded_and_keeps_its_commands(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    command = _one_command(path)
    # Turn the file back into what schema 2 wrote: full indexes, version 2.
    conn = sqlite3.connect(path, isolation_level=None)
    for index, (table, column) in PARTIAL.items():
        conn.execute(f"DROP INDEX {index}")
        conn.execute(f"CREATE INDEX {index} ON {table} ({column})")
    _undo_v5(conn)
    conn.execute("ALTER TABLE snapshots DROP COLUMN document_start")
    conn.execute("PRAGMA user_version = 2")
    conn.close()
    assert all("WHERE" not in _index_sql(path)[index] for index in PARTIAL)

    store = Store(path)
    assert store.get(command.id) == command
    assert [e.event for e in store.history(command.id)] == ["submit"]
    store.close()
    indexes = _index_sql(path)
    for index, (_, column) in PARTIAL.items():
        assert indexes[index].endswith(f"WHERE {column} IS NOT NULL"), indexes[index]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (6,)
    conn.close()


def test_a_schema_3_snapshot_keeps_its_whole_document_from_offset_0(tmp_path: Path) -> None:
    """Schema 3 stored the whole document with each snapshot; upgraded, such a
    row reads as context that begins at offset 0, which it is."""
    path = tmp_path / "old.db"
    command = _pending("fix", snapshot_id="s1")
    snapshot = Snapshot("s1", "file:///a", 3, 4, 7, "teh", 1.0, document="One teh two.")
    store = Store(path)
    commit_one(store, Insert(command, snapshot=snapshot))
    store.close()
    conn = sqlite3.connect(path, isolation_level=None)
    _undo_v5(conn)
    conn.execute("ALTER TABLE snapshots DROP COLUMN document_start")
    conn.execute("PRAGMA user_version = 3")
    conn.close()

    store = Store(path)
    assert store.snapshot("s1") == snapshot
    assert store.snapshot("s1").document_start == 0  # type: ignore[union-attr]
    store.close()


def test_opening_retries_a_file_another_process_holds_for_a_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite can answer "locked" at once, busy timeout or not, while another
    # process sets up or recovers the same WAL: opening tries again.
    real = Store._migrate
    refusals = iter([sqlite3.OperationalError("database is locked")] * 2)

    def migrate(store: Store) -> None:
        refusal = next(refusals, None)
        if refusal is not None:
            raise refusal
        real(store)

    monkeypatch.setattr(Store, "_migrate", migrate)
    store = Store(tmp_path / "db")
    assert next(refusals, None) is None  # both refusals were met, then it opened
    store.close()

    # Anything else is not waited out.
    def broken(store: Store) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(Store, "_migrate", broken)
    with pytest.raises(StoreError, match="disk I/O error"):
        Store(tmp_path / "other")


def test_a_schema_4_file_gains_the_cache_and_flow_budgets(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    command = _one_command(path)
    conn = sqlite3.connect(path, isolation_level=None)
    _undo_v5(conn)
    conn.execute("PRAGMA user_version = 4")
    conn.close()

    store = Store(path)
    assert store.get(command.id) == command
    assert store.cache_stats() == []
    assert store.spent("scripted", 0.0) == 0.0
    store.close()
    conn = sqlite3.connect(path)
    assert "budget" in [r[1] for r in conn.execute("PRAGMA table_info(flows)")]
    conn.close()


def _contents(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table, in rowid order."""
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in tables}
    finally:
        conn.close()


def test_a_schema_5_file_gains_the_live_indexes_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file made by the schema 5 code path (this store, told it is
    schema 5), with a command in every state, a journal, a late reply, a
    flow and its step, a cache entry and a snapshot, is brought to schema 6
    when opened: the same rows, the new indexes, the engine's queries on
    them."""
    path = tmp_path / "v5.db"
    monkeypatch.setattr(flows.store, "SCHEMA_VERSION", 5)
    store = Store(path)
    assert _schema(path) == 5 and "commands_ready" not in _index_sql(path)
    commands = {state: _pending(state) for state in ("pending", "sent", "done", "dead")}
    flow = Flow("f-1", "f", "waiting", 1.0, 1.0, step=1, owner="h:1:x", lease_until=2.0)
    step = attrs.evolve(_pending("step"), flow_id=flow.id, step=1)
    ops: list[Operation] = [Insert(c) for c in commands.values()]
    ops += [
        InsertFlow(flow),
        Insert(step),
        AddCacheEntry("k", "scripted", commands["done"].id, 1.0),
    ]
    c = commands["sent"]
    ops.append(
        Move(c, attrs.evolve(c, state="sent", owner="h:1:x", lease_until=2.0), "dispatch", 1.0)
    )
    c = commands["done"]
    r = attrs.evolve(c, state="sent", owner="h:1:x", lease_until=2.0)
    rr = attrs.evolve(r, state="replied", reply=Reply("ok"), replied_at=1.0, cost=0.5)
    d = attrs.evolve(rr, state="done", finished_at=1.0, owner=None, lease_until=None)
    ops.append(
        Chain((Move(c, r, "dispatch", 1.0), Move(r, rr, "reply", 1.0), Move(rr, d, "finish", 1.0)))
    )
    c = commands["dead"]
    dead = attrs.evolve(c, state="dead", reason="expired", finished_at=1.0)
    ops += [Move(c, dead, "expire", 1.0), AddLateReply(c.id, Reply("late"), 1.5)]
    results = store.commit(ops)
    assert not [r for r in results if isinstance(r, BaseException)], results
    store.close()
    before = _contents(path)
    monkeypatch.undo()

    store = Store(path)
    assert _schema(path) == SCHEMA_VERSION == 6
    assert _contents(path) == before
    indexes = _index_sql(path)
    assert "commands_by_state" not in indexes
    for index in V6_INDEXES:
        assert "WHERE state" in indexes[index], index
    assert [x.id for x in store.ready_to_send("scripted", 10.0, 10)] == [
        commands["pending"].id,
        step.id,
    ]
    assert [x.id for x in store.abandoned("h:2:y", 10.0, lambda owner: False)] == [
        commands["sent"].id
    ]
    assert [f.id for f in store.abandoned_flows("h:2:y", 10.0, lambda owner: False)] == [flow.id]
    assert [x.id for x, _, _ in store.dead_letters()] == [commands["dead"].id]
    assert store.cached("k", 0.0) == d
    store.close()


def _schema(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()
