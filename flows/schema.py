"""The pending table's schema, described once, rendered per dialect.

Every store holds the same tables, indexes and view, under the same schema
version: a database read by ``dovecote stats`` or exported is the same
whichever server holds it. This module says what they are; each store
creates them in its own dialect. SQLite's store (``flows.store``) reaches
this schema by its migrations, one version after another, as files written
by older dovecotes must; ``tests/test_schema_description.py`` checks that
what it creates is what is described here. PostgreSQL's store
(``flows.pgstore``) creates the latest version at once, from
``postgresql_ddl``.

Times are epoch seconds (``REAL`` / ``double precision``), JSON is text in
both: the same encoder writes it, and a row reads back byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

import attrs

from flows.states import DEAD, FLOW_STATES, FLOW_TERMINAL_STATES, LEASED_STATES, PENDING

SCHEMA_VERSION: Final = 6


def state_in(states: Iterable[str]) -> str:
    """``state = 'a'`` or ``state IN ('a', 'b')``: a set of states as an SQL
    condition on literals, always written the same way, so that a query
    and a partial index built from the same set say the same words. SQLite
    uses a partial index only for a query whose WHERE clause contains the
    index's own terms (a bound parameter is not one, nor is ``IN`` for ``=``);
    PostgreSQL's planner, too, proves a partial index usable from literals."""
    names = sorted(states)
    if not names or not all(re.fullmatch("[a-z_]+", name) for name in names):
        raise ValueError(f"not a set of state names: {names!r}")
    if len(names) == 1:
        return f"state = '{names[0]}'"
    return "state IN (" + ", ".join(f"'{name}'" for name in names) + ")"


PENDING_ROWS: Final = state_in([PENDING])
LEASED_ROWS: Final = state_in(LEASED_STATES)
TIMED_ROWS: Final = f"{PENDING_ROWS} AND (expires_at IS NOT NULL OR not_before IS NOT NULL)"
LIVE_FLOW_ROWS: Final = state_in(set(FLOW_STATES) - FLOW_TERMINAL_STATES)


@attrs.frozen
class Column:
    name: str
    kind: type  # str, int or float
    not_null: bool = False
    default: int | None = None


@attrs.frozen
class Table:
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]


@attrs.frozen
class Index:
    name: str
    table: str
    columns: tuple[str, ...]  # a column, or "column DESC"
    where: str | None = None  # a partial index: only the rows that have what is indexed


def _columns(spec: str) -> tuple[Column, ...]:
    """``"id text!, step int, at real!"``: ``!`` is NOT NULL, ``=N`` a default."""
    kinds = {"text": str, "int": int, "real": float}
    columns = []
    for item in spec.split(","):
        name, kind = item.split()
        default = None
        if "=" in kind:
            kind, _, value = kind.partition("=")
            default = int(value)
        not_null = kind.endswith("!")
        columns.append(Column(name, kinds[kind.rstrip("!")], not_null, default))
    return tuple(columns)


TABLES: Final = (
    Table(
        "commands",
        _columns(
            "id text, adapter text!, request text!, state text!, created_at real!, "
            "timeout real!, attempt int!, max_attempts int!, reason text, expires_at real, "
            "sent_at real, deadline real, replied_at real, finished_at real, not_before real, "
            "reply text, error text, handler text, handler_args text, flow_id text, step int, "
            "snapshot_id text, replay_of text, priority int!, owner text, lease_until real, "
            "cost real"
        ),
        ("id",),
    ),
    Table(
        "events",
        _columns(
            "id int, command_id text, flow_id text, at real!, from_state text, "
            "to_state text!, event text!, detail text"
        ),
        ("id",),
    ),
    Table(
        "late_replies",
        _columns("id int, command_id text!, reply text!, received_at real!, used_by text"),
        ("id",),
    ),
    Table(
        "snapshots",
        _columns(
            "id text, uri text!, version int!, start int!, end int!, text text!, "
            "created_at real!, document text, document_start int!=0"
        ),
        ("id",),
    ),
    Table(
        "flows",
        _columns(
            "id text, name text!, state text!, created_at real!, updated_at real!, "
            "params text, step int!, stage text, vars text, result text, error text, "
            "forked_from text, owner text, lease_until real, budget real"
        ),
        ("id",),
    ),
    Table(
        "flow_steps",
        _columns(
            "flow_id text!, step int!, kind text!, command_id text, value text, created_at real!"
        ),
        ("flow_id", "step"),
    ),
    Table(
        "cache",
        _columns(
            "command_id text, key text!, adapter text!, created_at real!, hits int!, "
            "last_hit_at real"
        ),
        ("command_id",),
    ),
)

INDEXES: Final = (
    # Live rows indexed apart from finished ones (schema 6): what the engine
    # watches costs the same with a million finished rows as with none.
    Index("commands_ready", "commands", ("adapter", "priority DESC", "id"), PENDING_ROWS),
    Index("commands_timed", "commands", ("id",), TIMED_ROWS),
    Index("commands_leased", "commands", ("owner", "lease_until"), LEASED_ROWS),
    Index("commands_dead", "commands", ("id",), state_in([DEAD])),
    Index("flows_live", "flows", ("owner", "lease_until"), LIVE_FLOW_ROWS),
    Index("commands_by_replay_of", "commands", ("replay_of",), "replay_of IS NOT NULL"),
    Index("commands_by_flow", "commands", ("flow_id",), "flow_id IS NOT NULL"),
    Index("commands_spent", "commands", ("adapter", "replied_at"), "cost IS NOT NULL"),
    Index("events_by_command", "events", ("command_id",)),
    Index("events_by_flow", "events", ("flow_id",), "flow_id IS NOT NULL"),
    Index("late_replies_by_command", "late_replies", ("command_id",)),
    Index("flows_by_state", "flows", ("state",)),
    Index("flow_steps_by_command", "flow_steps", ("command_id",)),
    Index("cache_by_key", "cache", ("key",)),
)

VIEWS: Final = {
    "dead_letters": """
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
}


def table(name: str) -> Table:
    return next(t for t in TABLES if t.name == name)


_PG_TYPES: Final = {str: "text", int: "bigint", float: "double precision"}

LEASE_EXPIRES: Final = "lease_expires"
"""PostgreSQL's one column of its own, in each table with a lease, after
the described ones: when the lease runs out on the *server's* clock, which
every engine sharing the database agrees on. ``lease_until`` keeps the time
the engine wrote (it reads back as written); lapses are judged by this one."""


def postgresql_ddl() -> list[str]:
    """The statements that create the whole schema in PostgreSQL."""
    statements = []
    for t in TABLES:
        lines = []
        for c in t.columns:
            line = f'"{c.name}" {_PG_TYPES[c.kind]}'
            if t.primary_key == (c.name,) and c.kind is int:
                line += " GENERATED BY DEFAULT AS IDENTITY"  # SQLite's INTEGER PRIMARY KEY
            if c.not_null or c.name in t.primary_key:
                line += " NOT NULL"
            if c.default is not None:
                line += f" DEFAULT {c.default}"
            lines.append(line)
        if any(c.name == "lease_until" for c in t.columns):
            lines.append(f"{LEASE_EXPIRES} double precision")
        lines.append(f"PRIMARY KEY ({', '.join(t.primary_key)})")
        statements.append(f"CREATE TABLE {t.name} (\n  " + ",\n  ".join(lines) + "\n)")
    for i in INDEXES:
        sql = f"CREATE INDEX {i.name} ON {i.table} ({', '.join(i.columns)})"
        statements.append(sql + (f" WHERE {i.where}" if i.where else ""))
    for name, select in VIEWS.items():
        statements.append(f"CREATE VIEW {name} AS {select}")
    return statements
