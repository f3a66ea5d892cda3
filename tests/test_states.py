"""The command state table, pair by pair: every allowed transition works,
in memory and against a real database; every other one raises."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import attrs
import pytest

from adapters.base import Request
from flows.core import moved
from flows.records import Command, new_id
from flows.states import (
    COMMAND_EVENTS,
    COMMAND_STATES,
    COMMAND_TRANSITIONS,
    FLOW_FOLLOWS_STEP,
    FLOW_TRANSITIONS,
    LEASED_STATES,
    TERMINAL_STATES,
    IllegalTransition,
    LostRace,
    entering,
    next_state,
)
from flows.storage import StoreProtocol
from flows.store import Chain, Insert, Move
from tests.stores import commit_one

ALLOWED = [(s, e, t) for s, moves in COMMAND_TRANSITIONS.items() for e, t in moves.items()]
FORBIDDEN = [
    (s, e)
    for s, e in itertools.product(COMMAND_STATES, COMMAND_EVENTS)
    if e not in COMMAND_TRANSITIONS[s]
]

# The design's diagram, written out independently of the table.
EXPECTED_EDGES = {
    ("pending", "sent"),
    ("pending", "dead"),
    ("pending", "cancelled"),
    ("pending", "replied"),
    ("sent", "replied"),
    ("sent", "pending"),
    ("sent", "dead"),
    ("sent", "cancelled"),
    ("replied", "done"),
    ("replied", "dead"),
}


def test_the_table_draws_the_designed_machine() -> None:
    assert {(s, t) for s, _, t in ALLOWED} == EXPECTED_EDGES
    assert set(COMMAND_TRANSITIONS) == set(COMMAND_STATES)
    for state in TERMINAL_STATES:
        assert COMMAND_TRANSITIONS[state] == {}


@pytest.mark.parametrize(("state", "event", "target"), ALLOWED)
def test_allowed(state: str, event: str, target: str) -> None:
    assert next_state(state, event) == target


@pytest.mark.parametrize(("state", "event"), FORBIDDEN)
def test_forbidden(state: str, event: str) -> None:
    with pytest.raises(IllegalTransition) as caught:
        next_state(state, event, command_id="c1")
    assert caught.value.state == state and caught.value.event == event
    assert "c1" in str(caught.value)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (s, t)
        for s, t in itertools.product(COMMAND_STATES, COMMAND_STATES)
        if (s, t) not in EXPECTED_EDGES
    ],
)
def test_no_event_makes_an_undesigned_move(source: str, target: str) -> None:
    reachable = {COMMAND_TRANSITIONS[source].get(event) for event in COMMAND_EVENTS}
    assert target not in reachable


def _command(state: str) -> Command:
    return Command(
        id=new_id(),
        adapter="scripted",
        request=Request.from_json({"messages": [{"role": "user", "content": "hi"}]}),
        state=state,
        created_at=1.0,
        timeout=5.0,
    )


@pytest.mark.parametrize(("state", "event", "target"), ALLOWED)
def test_allowed_in_the_store(
    make_store: Callable[[], StoreProtocol], state: str, event: str, target: str
) -> None:
    store = make_store()
    before = _command(state)
    commit_one(store, Insert(before))
    after = attrs.evolve(before, state=next_state(state, event))
    journal = commit_one(store, Move(before, after, event, 2.0))
    assert (journal.from_state, journal.to_state, journal.event) == (state, target, event)
    assert store.get(before.id).state == target
    assert [e.to_state for e in store.history(before.id)] == [state, target]
    # The same move again is a lost race: it raises and overwrites nothing.
    with pytest.raises(LostRace):
        commit_one(store, Move(before, after, event, 3.0))
    assert len(store.history(before.id)) == 2
    store.close()


def test_a_chain_writes_once_journals_each_and_is_all_or_nothing(
    make_store: Callable[[], StoreProtocol],
) -> None:
    store = make_store()
    sent = _command("sent")
    commit_one(store, Insert(sent))
    replied = sent.evolve(state="replied", replied_at=2.0)
    done = replied.evolve(state="done", finished_at=2.0)
    chain = Chain((Move(sent, replied, "reply", 2.0), Move(replied, done, "finish", 2.0)))
    journal = commit_one(store, chain)
    assert [(e.from_state, e.to_state, e.event) for e in journal] == [
        ("sent", "replied", "reply"),
        ("replied", "done", "finish"),
    ]
    assert store.get(sent.id) == done
    # Replayed, the first move's compare-and-set fails: nothing is journaled.
    with pytest.raises(LostRace):
        commit_one(store, chain)
    assert len(store.history(sent.id)) == 3
    # A step the table forbids refuses the whole chain before writing.
    other = _command("sent")
    commit_one(store, Insert(other))
    dead = other.evolve(state="dead")
    with pytest.raises(IllegalTransition):
        commit_one(
            store, Chain((Move(other, dead, "timeout", 2.0), Move(dead, dead, "finish", 2.0)))
        )
    assert store.get(other.id) == other
    store.close()


def test_evolve_is_attrs_evolve() -> None:
    command = _command("pending")
    changes = {"state": "sent", "owner": "me", "attempt": 2, "sent_at": 3.0}
    assert command.evolve(**changes) == attrs.evolve(command, **changes)
    with pytest.raises(ValueError, match="unknown command state"):
        command.evolve(state="flying")
    with pytest.raises(TypeError, match="no field"):
        command.evolve(colour="blue")


@pytest.mark.parametrize(("state", "event", "target"), ALLOWED)
def test_every_move_applies_what_entering_its_target_sets(
    state: str, event: str, target: str
) -> None:
    # A command held by an engine: whatever the move, the lease survives
    # only into a leased state, and only a terminal state is stamped.
    held = _command(state).evolve(owner="host:1:engine", lease_until=50.0)
    after = moved(held, event, 7.0, {})
    assert after.state == target
    assert (after.owner is not None) == (target in LEASED_STATES)
    assert (after.lease_until is not None) == (target in LEASED_STATES)
    assert (after.finished_at == 7.0) == (target in TERMINAL_STATES)
    # The mover's own changes come on top (a claim names its owner).
    claimed = moved(held, event, 7.0, {"owner": "host:2:other"})
    assert claimed.owner == "host:2:other"


def test_entering_is_written_for_every_state() -> None:
    for state in COMMAND_STATES:
        changes = entering(state, 3.0)
        assert ("owner" in changes) == (state not in LEASED_STATES)
        assert changes.get("finished_at") == (3.0 if state in TERMINAL_STATES else None)


@pytest.mark.parametrize(("key", "events"), list(FLOW_FOLLOWS_STEP.items()))
def test_a_flow_follows_its_step_by_legal_moves_only(
    key: tuple[str, str], events: tuple[str, ...]
) -> None:
    state = key[1]
    for event in events:
        state = next_state(state, event, table=FLOW_TRANSITIONS, what="flow")
    # A finished step leaves its flow running; a dead one, stalled; a replay, waiting.
    assert state == {"step done": "running", "step dead": "stalled"}.get(key[0], "waiting")


def test_a_lost_race_is_an_illegal_transition() -> None:
    # Callers that catch every refusal still catch a lost race; callers that
    # expect only a race catch LostRace and let a forbidden move surface.
    assert issubclass(LostRace, IllegalTransition)
    with pytest.raises(IllegalTransition) as refused:
        next_state("done", "dispatch")
    assert not isinstance(refused.value, LostRace)
