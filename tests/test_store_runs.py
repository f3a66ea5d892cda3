"""Runs of like operations in one commit (flows/store.py, "Runs"): the
SQLite store writes consecutive Inserts, Moves and Chains of one statement
by one ``executemany``, and must give every operation exactly the result,
and leave exactly the rows, that committing it alone would.

The property test commits a random batch on one store and the same
operations one commit each on a twin; everything the caller is told and
everything the files hold must be the same.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.base import Reply, Request, Usage
from flows.errors import StoreError
from flows.operations import Chain, Group, Insert, Move, Note, Operation, TakeOver
from flows.records import Command, Event
from flows.states import (
    DISPATCH,
    DONE,
    FINISH,
    PENDING,
    REPLIED,
    REPLY,
    SENT,
    IllegalTransition,
    LostRace,
)
from flows.store import Store
from tests.conftest import ask

AT = 1_700_000_000.0
ME = "here:1:me"
OTHER = "here:2:other"
REQUEST = Request.from_json(ask("hello"))
ANSWER = Reply("hi", Usage(3, 4))
TOO_BIG = 2**63  # one past SQLite's integers


def command(command_id: str, **fields: Any) -> Command:
    values: dict[str, Any] = {
        "id": command_id,
        "adapter": "a",
        "request": REQUEST,
        "state": PENDING,
        "created_at": AT,
        "timeout": 30.0,
    }
    return Command(**{**values, **fields})


def claim(c: Command, owner: str = ME) -> Move:
    sent = c.evolve(state=SENT, sent_at=AT, owner=owner, lease_until=AT + 30)
    return Move(c, sent, DISPATCH, AT, {"owner": owner})


def reply_and_finish(sent: Command) -> Chain:
    replied = sent.evolve(state=REPLIED, reply=ANSWER, replied_at=AT + 1)
    done = replied.evolve(state=DONE, finished_at=AT + 1, owner=None, lease_until=None)
    return Chain((Move(sent, replied, REPLY, AT + 1), Move(replied, done, FINISH, AT + 1)))


def unstorable(command_id: str, how: str) -> Insert:
    """An insert SQLite refuses only when it binds the row: the engine's
    boundary would stop these, the store must still refuse them alone."""
    if how == "surrogate in the request's handler args":
        return Insert(command(command_id, handler_args={"text": "\ud800"}))
    if how == "integer past 64 bits":
        return Insert(command(command_id, priority=TOO_BIG))
    if how == "surrogate in the detail":
        return Insert(command(command_id), detail={"text": "x\udfff"})
    raise AssertionError(how)


UNSTORABLE = (
    "surrogate in the request's handler args",
    "integer past 64 bits",
    "surrogate in the detail",
)


@pytest.fixture
def directory() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def contents(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, as SQLite holds it."""
    conn = store.db.conn
    tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {
        table: sorted((tuple(row) for row in conn.execute(f'SELECT * FROM "{table}"')), key=repr)
        for table in tables
    }


def outcome(result: Any, store: Store) -> Any:
    """What a caller is told, comparable across two files: an error by its
    type, message (the file's path taken out) and what it names."""
    if isinstance(result, BaseException):
        message = str(result).replace(str(store.path), "<file>")
        return (type(result), message, getattr(result, "command_id", None))
    return result


def savepoints(store: Store, write: Callable[[], object]) -> list[str]:
    seen: list[str] = []
    store.db.conn.set_trace_callback(seen.append)
    try:
        write()
    finally:
        store.db.conn.set_trace_callback(None)
    return [s for s in seen if re.match(r"SAVEPOINT", s)]


def pending(directory: Path, count: int) -> tuple[Store, list[Command]]:
    """A fresh store holding ``count`` pending commands, ``c-000`` on."""
    store = Store(directory / "dovecote.db")
    commands = [command(f"c-{i:03d}") for i in range(count)]
    store.commit([Insert(c) for c in commands])
    return store, commands


# --- the property: one commit is the same as each operation alone ---------------

PENDING_IDS = tuple(f"p-{i}" for i in range(4))
SENT_IDS = tuple(f"s-{i}" for i in range(4))
KNOWN = PENDING_IDS + SENT_IDS


def seeded(path: Path) -> tuple[Store, dict[str, Command], dict[str, Command]]:
    """A store holding four pending commands and four sent ones; each
    command as inserted, and as claimed by ``ME``."""
    store = Store(path)
    inserted = {i: command(i) for i in KNOWN}
    claimed = {i: claim(c).after for i, c in inserted.items()}
    store.commit([Insert(c) for c in inserted.values()])
    store.commit([claim(inserted[i]) for i in SENT_IDS])
    return store, inserted, claimed


Spec = tuple[str, int]
KINDS = (
    "insert",
    "insert duplicate",
    "insert unstorable",
    "claim",
    "claim stale",
    "claim unknown",
    "claim forbidden",
    "reply and finish",
    "note",
    "take over",
    "group of inserts",
)


def build(
    spec: Spec, serial: int, inserted: dict[str, Command], claimed: dict[str, Command]
) -> Operation:
    """The operation ``spec`` names, made from the seeded rows only (never
    from what an earlier operation of the batch did), so that a command
    claimed twice in a batch loses its second race because the row moved."""
    kind, index = spec
    known = KNOWN[index % len(KNOWN)]
    fresh = f"n-{serial:03d}"
    if kind == "insert":
        return Insert(command(fresh, priority=index), detail={"n": serial} if index % 2 else None)
    if kind == "insert duplicate":
        return Insert(command(known))
    if kind == "insert unstorable":
        return unstorable(fresh, UNSTORABLE[index % len(UNSTORABLE)])
    if kind == "claim":  # wins on a pending row, the first time
        return claim(inserted[known])
    if kind == "claim stale":  # the caller read an attempt the row no longer has
        return claim(inserted[known].evolve(attempt=2))
    if kind == "claim unknown":
        return claim(command(f"gone-{serial:03d}"))
    if kind == "claim forbidden":  # a pending command cannot finish
        before = inserted[known]
        return Move(before, before.evolve(state=DONE, finished_at=AT), FINISH, AT)
    if kind == "reply and finish":  # wins on a sent row, the first time
        return reply_and_finish(claimed[known])
    if kind == "note":
        return Note(known, "final_text", AT + 2, {"text": known})
    if kind == "take over":
        return TakeOver(claimed[known], OTHER, AT + 60, AT + 3)
    if kind == "group of inserts":
        members: list[Operation] = [Insert(command(f"{fresh}-{k}")) for k in range(3)]
        if index % 3 == 0:
            members.insert(1, Insert(command(known)))  # the whole group fails
        return Group(tuple(members))
    raise AssertionError(kind)


# Segments of one kind, so that runs (and runs broken by another kind) are common.
segments = st.lists(
    st.tuples(
        st.sampled_from(KINDS), st.lists(st.integers(0, 2 * len(KNOWN)), min_size=1, max_size=10)
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(segments)
def test_one_commit_of_many_is_the_same_as_each_alone(
    segments: list[tuple[str, list[int]]],
) -> None:
    specs = [(kind, index) for kind, indexes in segments for index in indexes]
    with tempfile.TemporaryDirectory() as name:
        together, inserted, claimed = seeded(Path(name) / "together.db")
        alone, _, _ = seeded(Path(name) / "alone.db")
        ops = [build(spec, serial, inserted, claimed) for serial, spec in enumerate(specs)]
        results = together.commit(ops)
        expected = [alone.commit([op])[0] for op in ops]
        assert [outcome(r, together) for r in results] == [outcome(r, alone) for r in expected]
        assert contents(together) == contents(alone)
        together.close()
        alone.close()


# --- examples --------------------------------------------------------------------


def test_a_run_of_claims_with_one_lost_race_commits_the_others_in_order(
    directory: Path,
) -> None:
    store, commands = pending(directory, 100)
    [taken] = store.commit([claim(commands[49], owner=OTHER)])  # another engine won #50
    assert isinstance(taken, Event)
    results = store.commit([claim(c) for c in commands])
    assert isinstance(results[49], LostRace) and results[49].command_id == "c-049"
    assert results[49].state == SENT
    won = [r for i, r in enumerate(results) if i != 49]
    assert all(isinstance(r, Event) and r.to_state == SENT for r in won)
    assert [r.seq for r in won] == list(range(taken.seq + 1, taken.seq + 100))
    assert [e.command_id for e in store.events_since(taken.seq)] == [
        c.id for i, c in enumerate(commands) if i != 49
    ]
    assert store.get("c-049").owner == OTHER
    assert {c.owner for c in store.list([SENT])} == {ME, OTHER}
    assert len(store.list([SENT])) == 100
    store.close()


@pytest.mark.parametrize("how", UNSTORABLE)
def test_a_run_where_one_insert_is_refused_commits_the_others(directory: Path, how: str) -> None:
    store = Store(directory / "dovecote.db")
    ops: list[Operation] = [Insert(command(f"c-{i:03d}")) for i in range(100)]
    ops[49] = unstorable("c-049", how)
    results = store.commit(ops)
    assert isinstance(results[49], StoreError)
    assert "Insert refused" in str(results[49])
    assert all(isinstance(r, Event) for i, r in enumerate(results) if i != 49)
    assert [r.seq for i, r in enumerate(results) if i != 49] == list(range(1, 100))
    assert store.find("c-049") is None
    assert len(store.list()) == 99
    assert [e.command_id for e in store.events_since(0)] == [
        f"c-{i:03d}" for i in range(100) if i != 49
    ]
    store.close()


def test_a_run_of_reply_and_finish_chains_loses_only_the_stale_one(directory: Path) -> None:
    store, commands = pending(directory, 20)
    claims = [claim(c) for c in commands]
    store.commit(claims)
    chains = [reply_and_finish(m.after) for m in claims]
    chains[7] = reply_and_finish(claims[7].after.evolve(owner=OTHER))  # not the holder
    results = store.commit(chains)
    assert isinstance(results[7], LostRace) and results[7].command_id == "c-007"
    assert all([e.to_state for e in r] == [REPLIED, DONE] for i, r in enumerate(results) if i != 7)
    assert store.get("c-007") == claims[7].after
    assert len(store.list([DONE])) == 19
    store.close()


def test_a_group_of_inserts_with_one_refused_fails_whole_and_alone(directory: Path) -> None:
    store = Store(directory / "dovecote.db")
    members = [Insert(command(f"g-{i}")) for i in range(10)]
    bad = Group((*members[:5], unstorable("g-bad", "integer past 64 bits"), *members[5:]))
    good = Group(tuple(Insert(command(f"h-{i}")) for i in range(10)))
    results = store.commit([bad, good, Insert(command("after"))])
    assert isinstance(results[0], StoreError)
    assert [e.seq for e in results[1]] == list(range(1, 11))
    assert isinstance(results[2], Event) and results[2].seq == 11
    assert [c.id for c in store.list()] == ["after", *(f"h-{i}" for i in range(10))]  # by id
    store.close()


def test_a_forbidden_move_in_a_run_is_illegal_and_the_run_goes_on(directory: Path) -> None:
    store, commands = pending(directory, 9)
    ops = [claim(c) for c in commands]
    ops[4] = Move(commands[4], commands[4].evolve(state=DONE), DISPATCH, AT)  # leads to sent
    results = store.commit(ops)
    assert isinstance(results[4], IllegalTransition) and not isinstance(results[4], LostRace)
    assert [c.id for c in store.list([SENT])] == [f"c-{i:03d}" for i in range(9) if i != 4]
    assert store.get("c-004") == commands[4]
    store.close()


def test_a_run_of_like_operations_is_written_under_one_savepoint(directory: Path) -> None:
    """What the runs are for: a thousand claims cost one savepoint and one
    executemany, not a savepoint (and an execute) each."""
    store = Store(directory / "dovecote.db")
    commands = [command(f"c-{i:04d}") for i in range(1000)]
    inserted = savepoints(store, lambda: store.commit([Insert(c) for c in commands]))
    claims = [claim(c) for c in commands]
    claimed = savepoints(store, lambda: store.commit(claims))
    finished = savepoints(store, lambda: store.commit([reply_and_finish(m.after) for m in claims]))
    assert (len(inserted), len(claimed), len(finished)) == (1, 1, 1)
    assert len(store.list([DONE])) == 1000
    store.close()
