"""The store's file format: a file written by an older dovecote is upgraded
in place when it is opened, and keeps everything it held."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from adapters.base import Request
from flows.errors import StoreError
from flows.records import Command, new_id
from flows.snapshots import Snapshot
from flows.store import SCHEMA_VERSION, Insert, Store

PARTIAL = {
    "commands_by_replay_of": ("commands", "replay_of"),
    "commands_by_flow": ("commands", "flow_id"),
    "events_by_flow": ("events", "flow_id"),
}


def _index_sql(path: Path) -> dict[str, str]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"))
    finally:
        conn.close()


def _undo_v5(conn: sqlite3.Connection) -> None:
    """What schema 5 added, taken away: a file as schema 4 left it."""
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
    store.commit_one(Insert(command))
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
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (5,)
    conn.close()


def test_a_schema_3_snapshot_keeps_its_whole_document_from_offset_0(tmp_path: Path) -> None:
    """Schema 3 stored the whole document with each snapshot; upgraded, such a
    row reads as context that begins at offset 0, which it is."""
    path = tmp_path / "old.db"
    command = _pending("fix", snapshot_id="s1")
    snapshot = Snapshot("s1", "file:///a", 3, 4, 7, "teh", 1.0, document="One teh two.")
    store = Store(path)
    store.commit_one(Insert(command, snapshot=snapshot))
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
