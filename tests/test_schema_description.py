"""flows.schema describes the tables, indexes and view every store holds;
SQLite's store reaches them by migrations. What a new SQLite file holds must
be what is described, or the two stores would drift apart unseen."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from flows import schema
from flows.store import SCHEMA_VERSION, Store

_SQLITE_TYPES = {str: "TEXT", int: "INTEGER", float: "REAL"}


def test_a_new_sqlite_file_holds_the_described_schema(db_path: Path) -> None:
    Store(db_path).close()
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    assert schema.SCHEMA_VERSION == SCHEMA_VERSION
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {t.name for t in schema.TABLES}
    for t in schema.TABLES:
        info = conn.execute(f"PRAGMA table_info({t.name})").fetchall()
        found = [(r[1], r[2].upper(), bool(r[3]), r[4]) for r in info]
        described = [
            (
                c.name,
                _SQLITE_TYPES[c.kind],
                c.not_null,
                None if c.default is None else str(c.default),
            )
            for c in t.columns
        ]
        assert found == described, t.name
        key = sorted((r[5], r[1]) for r in info if r[5])
        assert tuple(name for _, name in key) == t.primary_key, t.name
    indexes = {
        r[0]: r[1]
        for r in conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        )
    }
    assert set(indexes) == {i.name for i in schema.INDEXES}
    for i in schema.INDEXES:
        described = [c.replace('"', "").lower() for c in i.columns]
        sql = indexes[i.name].replace('"', "").lower()
        on = sql[sql.index("(") + 1 : sql.index(")")]
        assert [c.strip() for c in on.split(",")] == described, i.name
        where = sql.partition(" where ")[2].strip() or None
        assert where == (i.where.lower() if i.where else None), i.name
    views = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'view'")}
    assert views == set(schema.VIEWS)
