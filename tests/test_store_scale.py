"""Flat as it grows: what the engine watches reads the live rows only.

Finished commands pile up in the file (nothing is deleted until a person
prunes); the queries an engine runs all the time (claims, leases and
take-over, timers after a restart, flows to resume, counts of live work)
must cost the same with many finished rows as with none. Checked two ways
on a real SQLite file: each query's plan goes through a partial index of
live rows, never a scan of the table; and the number of SQLite virtual
machine steps each one takes does not grow with 20,000 finished rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from adapters.base import Reply, Request
from flows.operations import (
    Chain,
    Insert,
    InsertFlow,
    Move,
    Operation,
    ReleaseLeases,
    RenewFlowLeases,
    RenewLeases,
)
from flows.records import Command, Flow
from flows.states import LIVE_STATES
from flows.store import Store
from tests.conftest import ask

AT = 1_700_000_000.0
NOW = AT + 100
ME = "here:1:me"
OTHER = "here:2:other"
FINISHED = 20_000
LEASED_IDS = ("live-0010", "live-0011")

LIVE_INDEXES = (
    "commands_ready",
    "commands_timed",
    "commands_leased",
    "commands_dead",
    "flows_live",
    "flows_by_state",
)


def _command(n: int, **fields: Any) -> Command:
    values: dict[str, Any] = {
        "id": f"live-{n:04d}",
        "adapter": "a",
        "request": Request.from_json(ask(f"call {n}")),
        "state": "pending",
        "created_at": AT + n,
        "timeout": 30.0,
    }
    return Command(**{**values, **fields})


def _sent(c: Command, owner: str, lease_until: float) -> Move:
    after = attrs.evolve(c, state="sent", sent_at=AT, owner=owner, lease_until=lease_until)
    return Move(c, after, "dispatch", AT)


def _live_work(store: Store) -> None:
    """A little of everything an engine watches: pending work for two
    adapters (some not before later, some expiring), work in flight with
    live and lapsed leases, a replied command, flows running and stalled."""
    ops: list[Operation] = []
    for n in range(10):
        timed: dict[str, Any] = {}
        if n % 3 == 0:
            timed["expires_at"] = AT + 500
        if n % 4 == 1:
            timed["not_before"] = AT + 50
        ops.append(Insert(_command(n, adapter="ab"[n % 2], priority=n % 3, **timed)))
    for n, (owner, lease) in enumerate(
        [(ME, NOW + 30), (OTHER, NOW + 30), (OTHER, AT), ("here:9:gone", NOW + 30)], start=10
    ):
        c = _command(n)
        ops += [Insert(c), _sent(c, owner, lease)]
    c = _command(20)
    sent = _sent(c, OTHER, AT)
    replied = attrs.evolve(sent.after, state="replied", reply=Reply("r"), replied_at=AT)
    ops += [Insert(c), sent, Move(sent.after, replied, "reply", AT)]
    for n, (state, owner, lease) in enumerate(
        [("running", ME, NOW + 30), ("waiting", OTHER, AT), ("stalled", None, None)]
    ):
        flow = Flow(f"flow-{n}", "f", state, AT, AT, owner=owner, lease_until=lease)
        ops.append(InsertFlow(flow))
    results = store.commit(ops)
    assert not [r for r in results if isinstance(r, BaseException)]


def _finish_many(store: Store, count: int) -> None:
    """``count`` finished commands (done, and some cancelled) with their
    journal, and finished flows: one of each made through the store, then
    copied in SQL, which is quicker than 20,000 real lifecycles and stores
    the same rows."""
    done = _command(9000, id="template-done")
    sent = _sent(done, ME, NOW)
    replied = attrs.evolve(sent.after, state="replied", reply=Reply("ok"), replied_at=AT)
    finished = attrs.evolve(replied, state="done", finished_at=AT, owner=None, lease_until=None)
    cancelled = _command(9001, id="template-cancelled")
    ended = attrs.evolve(cancelled, state="cancelled", finished_at=AT)
    flow = Flow("template-flow", "f", "completed", AT, AT)
    store.commit(
        [
            Insert(done),
            Chain(
                (
                    sent,
                    Move(sent.after, replied, "reply", AT),
                    Move(replied, finished, "finish", AT),
                )
            ),
            Insert(cancelled),
            Move(cancelled, ended, "cancel", AT),
            InsertFlow(flow),
        ]
    )
    conn = store.db.conn
    columns = [r[1] for r in conn.execute("PRAGMA table_info(commands)")]
    rest = ", ".join(c for c in columns if c != "id")
    flow_columns = [r[1] for r in conn.execute("PRAGMA table_info(flows)")]
    flow_rest = ", ".join(c for c in flow_columns if c != "id")
    numbers = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
    with conn:
        conn.execute(
            f"{numbers} INSERT INTO commands (id, {rest}) "
            f"SELECT printf('old-%06d', i), {rest} FROM n, commands "
            "WHERE commands.id = CASE WHEN i % 10 = 0 THEN 'template-cancelled' "
            "ELSE 'template-done' END",
            (count,),
        )
        conn.execute(
            f"{numbers} INSERT INTO events (command_id, at, from_state, to_state, event) "
            "SELECT printf('old-%06d', i), 1.0, 'pending', 'done', 'finish' FROM n",
            (count,),
        )
        conn.execute(
            f"{numbers} INSERT INTO flows (id, {flow_rest}) "
            f"SELECT printf('old-flow-%06d', i), {flow_rest} FROM n, flows "
            "WHERE flows.id = 'template-flow'",
            (count // 10,),
        )


WATCHED: dict[str, Callable[[Store], object]] = {
    "ready_to_send": lambda s: s.ready_to_send("a", NOW, 100, ["h"]),
    "ready_to_send, no handlers": lambda s: s.ready_to_send("b", NOW, 100),
    "abandoned": lambda s: s.abandoned(ME, NOW, lambda owner: owner == "here:9:gone"),
    "timed_pending": lambda s: s.timed_pending(),
    "abandoned_flows": lambda s: s.abandoned_flows(ME, NOW, lambda owner: False),
    "counts of live work": lambda s: s.counts(LIVE_STATES),
    "renew leases": lambda s: s.commit(
        [RenewLeases(ME, NOW + 60, ("live-0010", "live-0011"), NOW)]
    ),
    "renew flow leases": lambda s: s.commit([RenewFlowLeases(ME, NOW + 60, ("flow-0",), NOW)]),
    "release leases": lambda s: s.commit([ReleaseLeases("here:7:nobody")]),
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "dovecote.db")
    _live_work(store)
    yield store
    store.close()


def _statements(store: Store, query: Callable[[Store], object]) -> list[str]:
    """The SQL ``query`` runs, with its values in place."""
    seen: list[str] = []
    store.db.conn.set_trace_callback(seen.append)
    try:
        query(store)
    finally:
        store.db.conn.set_trace_callback(None)
    return [s for s in seen if re.match(r"\s*(SELECT|UPDATE|DELETE|WITH)", s, re.IGNORECASE)]


@pytest.mark.parametrize("name", list(WATCHED))
def test_what_the_engine_watches_goes_through_a_live_index(store: Store, name: str) -> None:
    statements = _statements(store, WATCHED[name])
    assert statements, name
    for sql in statements:
        plan = [row[3] for row in store.db.conn.execute("EXPLAIN QUERY PLAN " + sql)]
        for step in plan:
            table = re.match(r"(SCAN|SEARCH) (commands|flows)\b", step)
            if table is None:
                continue
            if step.startswith("SEARCH") and "sqlite_autoindex" in step and "(id=?)" in step:
                continue  # by primary key: one row per id asked for
            used = re.search(r"USING (?:COVERING )?INDEX (\w+)", step)
            assert used and used.group(1) in LIVE_INDEXES, (name, sql, plan)


def _steps(store: Store, query: Callable[[Store], object]) -> int:
    """How many SQLite virtual machine instructions ``query`` executes."""
    count = 0

    def tick() -> int:
        nonlocal count
        count += 1
        return 0

    store.db.conn.set_progress_handler(tick, 1)
    try:
        query(store)
    finally:
        store.db.conn.set_progress_handler(None, 1)
    return count


def test_what_the_engine_watches_reads_as_much_with_many_finished_rows(
    store: Store,
) -> None:
    before = {name: _steps(store, query) for name, query in WATCHED.items()}
    results = {name: query(store) for name, query in WATCHED.items()}
    _finish_many(store, FINISHED)
    assert store.counts()[("a", "done")] > FINISHED * 0.8
    after = {name: _steps(store, query) for name, query in WATCHED.items()}
    assert {name: query(store) for name, query in WATCHED.items()} == results
    for name in WATCHED:
        # A few steps more for a deeper B-tree, never one per finished row.
        assert after[name] <= before[name] * 1.2 + 100, (name, before[name], after[name])


def test_states_are_written_into_sql_only_as_state_names(store: Store) -> None:
    """The live queries carry their states as literals (partial indexes
    need that): anything but a state's name is refused, never run."""
    for bad in (["pending') OR 1=1 --"], ["Pending"]):
        with pytest.raises(ValueError, match="state names"):
            store.counts(bad)
    assert store.counts(["unheard_of"]) == {}
