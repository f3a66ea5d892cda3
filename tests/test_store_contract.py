"""The store protocol's contract (flows.storage), written once and run
against every implementation in tests/stores.py.

Only protocol methods are used on a store; what a test needs to see under
it (the journal's size, a newer schema) it asks of the store's kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import pytest

from adapters.base import Reply, Request, Usage
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
from flows.records import Command, Event, Flow, FlowStep
from flows.snapshots import Snapshot
from flows.states import (
    CANCEL,
    COMPLETE,
    DEAD,
    DISPATCH,
    DONE,
    FAIL,
    FINISH,
    LIVE_STATES,
    PENDING,
    REPLIED,
    REPLY,
    RUNNING,
    SENT,
    STALL,
    TIMEOUT,
    WAIT,
    WAITING,
    IllegalTransition,
    LostRace,
)
from flows.storage import StoreProtocol
from tests.conftest import ask
from tests.stores import StoreKind
from tests.stores import commit_one as one

AT = 1_700_000_000.0
LEASE = 30.0
ME = "here:1:me"
OTHER = "here:2:other"

MakeStore = Callable[[], StoreProtocol]


_serial = iter(range(1, 1_000_000))


def command(**fields: Any) -> Command:
    values: dict[str, Any] = {
        "id": f"c-{next(_serial):06d}",
        "adapter": "a",
        "request": Request.from_json(ask("hello")),
        "state": PENDING,
        "created_at": AT,
        "timeout": 30.0,
    }
    return Command(**{**values, **fields})


def inserted(store: StoreProtocol, **fields: Any) -> Command:
    c = command(**fields)
    one(store, Insert(c))
    return c


def moved(store: StoreProtocol, c: Command, event: str, at: float = AT, **changes: Any) -> Command:
    after = attrs.evolve(c, **changes)
    one(store, Move(c, after, event, at))
    return after


def claimed(store: StoreProtocol, c: Command, owner: str = ME, at: float = AT) -> Command:
    return moved(
        store, c, DISPATCH, at, state=SENT, sent_at=at, owner=owner, lease_until=at + LEASE
    )


def replied(
    store: StoreProtocol, c: Command, text: str = "hi", cost: float | None = None
) -> Command:
    return moved(
        store, c, REPLY, state=REPLIED, reply=Reply(text, Usage(3, 4)), replied_at=AT + 1, cost=cost
    )


def done(store: StoreProtocol, c: Command) -> Command:
    return moved(store, c, FINISH, state=DONE, finished_at=AT + 2, owner=None, lease_until=None)


def flow(**fields: Any) -> Flow:
    values: dict[str, Any] = {
        "id": f"f-{next(_serial):06d}",
        "name": "test.flow",
        "state": RUNNING,
        "created_at": AT,
        "updated_at": AT,
        "owner": ME,
        "lease_until": AT + LEASE,
    }
    return Flow(**{**values, **fields})


def unchanged(kind: StoreKind, store: StoreProtocol, c: Command, history: Sequence[Event]) -> None:
    assert store.get(c.id) == c
    assert store.history(c.id) == list(history)


# --- commands: insert and read ------------------------------------------------


def test_inserted_commands_are_read_back_in_id_order(make_store: MakeStore) -> None:
    store = make_store()
    a = inserted(store, adapter="x", created_at=AT)
    b = inserted(store, adapter="y", created_at=AT + 1, flow_id=None)
    c = inserted(store, adapter="x", created_at=AT + 2)
    assert store.find(b.id) == b and store.get(b.id) == b
    assert store.find("nope") is None
    with pytest.raises(UnknownCommand):
        store.get("nope")
    assert store.list() == [a, b, c]
    assert store.list(newest_first=True) == [c, b, a]
    assert store.list(limit=2) == [a, b]
    assert store.list(adapter="x") == [a, c]
    assert store.list(since=AT + 1) == [b, c]
    assert store.list([SENT]) == []
    c_sent = claimed(store, c)
    assert store.list([SENT]) == [c_sent]
    assert store.list([PENDING, SENT], adapter="x") == [a, c_sent]
    [submit, dispatch] = store.history(c.id)
    assert (submit.from_state, submit.to_state, submit.event) == (None, PENDING, "submit")
    assert (dispatch.from_state, dispatch.to_state, dispatch.event) == (PENDING, SENT, DISPATCH)
    assert submit.seq < dispatch.seq


def test_a_commit_is_seen_by_another_handle_and_results_come_in_order(
    store_kind: StoreKind,
) -> None:
    store = store_kind.new()
    a, b = command(), command()
    results = store.commit([Insert(a, detail={"n": 1}), Insert(a), Insert(b)])
    assert isinstance(results[0], Event) and results[0].detail == {"n": 1}
    assert isinstance(results[1], StoreError)  # a duplicate id
    assert isinstance(results[2], Event) and results[2].seq > results[0].seq
    other = store_kind.again(store)
    assert other.list() == [a, b]
    assert [e.detail for e in other.history(a.id)] == [{"n": 1}]


def test_a_note_is_journaled_without_moving_the_command(make_store: MakeStore) -> None:
    store = make_store()
    c = inserted(store)
    event = one(store, Note(c.id, "final_text", AT + 5, {"text": "x"}))
    assert (event.from_state, event.to_state, event.event) == (PENDING, PENDING, "final_text")
    assert store.history(c.id)[-1] == event
    assert store.get(c.id) == c
    with pytest.raises(StoreError, match="nope"):  # about no command: refused
        one(store, Note("nope", "final_text", AT))


# --- compare-and-set ------------------------------------------------------------


def test_a_stale_move_is_a_lost_race_and_changes_nothing(
    store_kind: StoreKind,
) -> None:
    store = store_kind.new()
    c = inserted(store)
    sent = claimed(store, c)
    history = store.history(c.id)
    rows = store_kind.journal_rows(store)
    for stale in (
        Move(c, attrs.evolve(c, state=SENT, owner=OTHER), DISPATCH, AT),  # moved since
        Move(c, attrs.evolve(c, state="cancelled"), CANCEL, AT),
        Move(attrs.evolve(sent, owner=OTHER), attrs.evolve(sent, state=DEAD), TIMEOUT, AT),
        Move(attrs.evolve(sent, attempt=2), attrs.evolve(sent, state=DEAD), TIMEOUT, AT),
    ):
        with pytest.raises(LostRace) as lost:
            one(store, stale)
        assert lost.value.command_id == c.id and lost.value.state == SENT
        unchanged(store_kind, store, sent, history)
    with pytest.raises(LostRace):
        one(store, Move(command(), attrs.evolve(command(), state=SENT), DISPATCH, AT))  # no row
    assert store_kind.journal_rows(store) == rows


def test_a_forbidden_move_is_illegal_not_a_lost_race_and_changes_nothing(
    store_kind: StoreKind,
) -> None:
    store = store_kind.new()
    c = inserted(store)
    history = store.history(c.id)
    rows = store_kind.journal_rows(store)
    for forbidden in (
        Move(c, attrs.evolve(c, state=DONE), FINISH, AT),  # pending cannot finish
        Move(c, attrs.evolve(c, state=DEAD), DISPATCH, AT),  # dispatch leads to sent
    ):
        with pytest.raises(IllegalTransition) as caught:
            one(store, forbidden)
        assert not isinstance(caught.value, LostRace)
        unchanged(store_kind, store, c, history)
    finished = done(store, replied(store, claimed(store, c)))
    history = store.history(c.id)
    for event in (CANCEL, FAIL, DISPATCH):
        with pytest.raises(IllegalTransition) as caught:
            one(store, Move(finished, attrs.evolve(finished, state=DEAD), event, AT))
        assert not isinstance(caught.value, LostRace)
    unchanged(store_kind, store, finished, history)
    assert store_kind.journal_rows(store) == rows + 3


def test_a_chain_is_journaled_move_by_move_and_is_all_or_nothing(
    store_kind: StoreKind,
) -> None:
    store = store_kind.new()
    sent = claimed(store, inserted(store))
    r = attrs.evolve(sent, state=REPLIED, reply=Reply("ok"), replied_at=AT + 1)
    d = attrs.evolve(r, state=DONE, finished_at=AT + 1, owner=None, lease_until=None)
    chain = Chain((Move(sent, r, REPLY, AT + 1), Move(r, d, FINISH, AT + 1)))
    history = store.history(sent.id)
    rows = store_kind.journal_rows(store)
    stale = Chain(
        (
            Move(attrs.evolve(sent, owner=OTHER), r, REPLY, AT + 1),
            Move(r, d, FINISH, AT + 1),
        )
    )
    with pytest.raises(LostRace):
        one(store, stale)
    bad_end = attrs.evolve(d, state=DEAD)
    with pytest.raises(IllegalTransition):
        one(store, Chain((Move(sent, r, REPLY, AT + 1), Move(r, bad_end, FINISH, AT + 1))))
    unchanged(store_kind, store, sent, history)
    assert store_kind.journal_rows(store) == rows
    events = one(store, chain)
    assert [(e.from_state, e.to_state) for e in events] == [(SENT, REPLIED), (REPLIED, DONE)]
    assert store.get(sent.id) == d
    assert store.history(sent.id) == [*history, *events]


def test_a_group_commits_whole_or_not_at_all_and_alone(store_kind: StoreKind) -> None:
    store = store_kind.new()
    c = inserted(store)
    fresh = command()
    rows = store_kind.journal_rows(store)
    stale = attrs.evolve(c, owner=OTHER)
    losing = Group((Insert(fresh), Move(stale, attrs.evolve(stale, state="cancelled"), CANCEL, AT)))
    other = command()
    results = store.commit([losing, Insert(other)])
    assert isinstance(results[0], LostRace)
    assert isinstance(results[1], Event)
    assert store.find(fresh.id) is None
    assert store.get(c.id) == c
    assert store_kind.journal_rows(store) == rows + 1
    sent = attrs.evolve(c, state=SENT, owner=ME, lease_until=AT + LEASE)
    [first, second] = one(store, Group((Insert(fresh), Move(c, sent, DISPATCH, AT))))
    assert first.command_id == fresh.id and second.to_state == SENT
    assert store.get(c.id) == sent


# --- leases, take-over, abandoned ----------------------------------------------


def test_leases_are_renewed_for_the_holder_only_and_released(make_store: MakeStore) -> None:
    store = make_store()
    mine = claimed(store, inserted(store))
    theirs = claimed(store, inserted(store), owner=OTHER)
    waiting = inserted(store)
    held = one(store, RenewLeases(ME, AT + 100, (mine.id, theirs.id, waiting.id, "nope"), AT))
    assert held == frozenset({mine.id})
    assert store.get(mine.id).lease_until == AT + 100
    assert store.get(theirs.id).lease_until == AT + LEASE
    assert store.get(waiting.id) == waiting
    assert one(store, RenewLeases(ME, AT + 100, (), AT)) == frozenset()
    one(store, ReleaseLeases(ME))
    released = store.get(mine.id)
    assert released.owner == ME and released.lease_until is not None
    assert released.lease_until < AT
    assert store.get(theirs.id).lease_until == AT + LEASE
    assert [c.id for c in store.abandoned(OTHER, AT, lambda owner: False)] == [mine.id]


def test_a_take_over_is_a_compare_and_set_journaled_as_a_note(make_store: MakeStore) -> None:
    store = make_store()
    r = replied(store, claimed(store, inserted(store), owner=OTHER))
    before = store.history(r.id)
    event = one(store, TakeOver(r, ME, AT + 200, AT + 170))
    assert (event.from_state, event.to_state, event.event) == (REPLIED, REPLIED, TAKE_OVER)
    assert event.detail == {"previous_owner": OTHER, "owner": ME} and event.at == AT + 170
    assert store.history(r.id) == [*before, event]
    mine = store.get(r.id)
    assert (mine.state, mine.owner, mine.lease_until) == (REPLIED, ME, AT + 200)
    with pytest.raises(LostRace):  # the old owner's record is stale now
        one(store, TakeOver(r, "here:3:third", AT + 300, AT + 270))
    assert store.get(r.id) == mine
    # The previous owner's renewal no longer holds it.
    assert one(store, RenewLeases(OTHER, AT + 400, (r.id,), AT)) == frozenset()


def test_abandoned_is_the_leased_work_whose_holder_lost_it(store_kind: StoreKind) -> None:
    store = store_kind.new()
    now = AT + 100
    lapsed = claimed(store, inserted(store), owner=OTHER, at=AT)  # lease ends AT + 30
    live = claimed(store, inserted(store), owner=OTHER, at=now)
    gone = claimed(store, inserted(store), owner="here:9:gone", at=now)
    own_live = claimed(store, inserted(store), owner=ME, at=now)
    own_lapsed = replied(store, claimed(store, inserted(store), owner=ME, at=AT))
    inserted(store)  # pending: nobody holds it
    done(store, replied(store, claimed(store, inserted(store), owner="here:9:gone", at=AT)))
    store_kind.lapse(store, [lapsed.id, own_lapsed.id])  # a store on its own clock: 100 s on
    asked: list[str] = []

    def is_gone(owner: str) -> bool:
        asked.append(owner)
        return owner == "here:9:gone"

    found = store.abandoned(ME, now, is_gone)
    assert [c.id for c in found] == [lapsed.id, gone.id, own_lapsed.id]
    assert found[0] == lapsed
    assert sorted(asked) == sorted({OTHER, "here:9:gone"})  # once per owner, never ME
    assert live.id not in {c.id for c in found} and own_live.id not in {c.id for c in found}


# --- late replies -----------------------------------------------------------------


def test_a_late_reply_is_kept_and_used_once(make_store: MakeStore) -> None:
    store = make_store()
    dead = moved(
        store,
        claimed(store, inserted(store)),
        TIMEOUT,
        state=DEAD,
        reason="timeout",
        finished_at=AT + 1,
        owner=None,
        lease_until=None,
    )
    first = one(store, AddLateReply(dead.id, Reply("late one"), AT + 2))
    second = one(store, AddLateReply(dead.id, Reply("late two"), AT + 3))
    assert first < second
    assert [r.reply.text for r in store.late_replies(dead.id)] == ["late one", "late two"]
    [(letter, replayed_by, unused)] = store.dead_letters()
    assert (letter, replayed_by, unused) == (dead, None, 2)
    one(store, UseLateReply(first, "r-1"))
    with pytest.raises(LostRace):
        one(store, UseLateReply(first, "r-2"))
    assert [(r.id, r.used_by) for r in store.late_replies(dead.id)] == [
        (first, "r-1"),
        (second, None),
    ]
    assert [r.id for r in store.late_replies(dead.id, unused_only=True)] == [second]
    assert store.dead_letters()[0][2] == 1


def test_dead_letters_name_their_newest_replay(make_store: MakeStore) -> None:
    store = make_store()
    dead = moved(store, inserted(store), "expire", state=DEAD, reason="expired", finished_at=AT)
    other = moved(store, inserted(store, adapter="b"), "refuse", state=DEAD, reason="budget")
    replay = inserted(store, replay_of=dead.id)
    assert [c.id for c, _, _ in store.dead_letters()] == [other.id]
    letters = store.dead_letters(include_replayed=True)
    assert [(c.id, by) for c, by, _ in letters] == [(dead.id, replay.id), (other.id, None)]
    assert [c.id for c, _, _ in store.dead_letters(reason="budget")] == [other.id]
    assert store.dead_letters(adapter="a") == []
    assert len(store.dead_letters(include_replayed=True, limit=1)) == 1


# --- what the engine watches -------------------------------------------------------


def test_ready_to_send_is_by_priority_then_age_per_adapter(make_store: MakeStore) -> None:
    store = make_store()
    old = inserted(store)
    urgent = inserted(store, priority=5)
    later = inserted(store, not_before=AT + 50)
    newer = inserted(store)
    inserted(store, adapter="b")
    handled = inserted(store, handler="h")
    claimed(store, inserted(store))
    done(store, replied(store, claimed(store, inserted(store))))
    ids = [c.id for c in store.ready_to_send("a", AT, 10)]
    assert ids == [urgent.id, old.id, newer.id, handled.id]
    assert [c.id for c in store.ready_to_send("a", AT + 50, 10)] == [
        urgent.id,
        old.id,
        later.id,
        newer.id,
        handled.id,
    ]
    assert [c.id for c in store.ready_to_send("a", AT, 2)] == [urgent.id, old.id]
    assert [c.id for c in store.ready_to_send("a", AT, 10, handlers=["other"])] == [
        urgent.id,
        old.id,
        newer.id,
    ]
    assert store.ready_to_send("a", AT, 10, known={old.id: old})[1] is old
    assert store.ready_to_send("c", AT, 10) == []


def test_timed_pending_is_every_pending_command_with_a_time(make_store: MakeStore) -> None:
    store = make_store()
    expiring = inserted(store, expires_at=AT + 9)
    retrying = inserted(store, not_before=AT + 8)
    both = inserted(store, expires_at=AT + 7, not_before=AT + 6)
    inserted(store)
    claimed(store, inserted(store, expires_at=AT + 5))
    assert sorted(store.timed_pending()) == sorted(
        [
            (expiring.id, AT + 9, None),
            (retrying.id, None, AT + 8),
            (both.id, AT + 7, AT + 6),
        ]
    )


def test_counts_are_by_adapter_and_state_and_can_be_asked_for_live_work(
    make_store: MakeStore,
) -> None:
    store = make_store()
    inserted(store)
    inserted(store, adapter="b")
    claimed(store, inserted(store))
    replied(store, claimed(store, inserted(store)))
    done(store, replied(store, claimed(store, inserted(store))))
    everything = {("a", PENDING): 1, ("b", PENDING): 1, ("a", SENT): 1, ("a", REPLIED): 1}
    assert store.counts() == {**everything, ("a", DONE): 1}
    assert store.counts(LIVE_STATES) == everything
    assert store.counts([DONE, SENT]) == {("a", DONE): 1, ("a", SENT): 1}
    assert store.counts([]) == {}


# --- flows ------------------------------------------------------------------------


def test_flows_move_by_their_table_with_compare_and_set(store_kind: StoreKind) -> None:
    store = store_kind.new()
    f = flow()
    start = one(store, InsertFlow(f))
    assert (start.flow_id, start.command_id, start.to_state, start.event) == (
        f.id,
        None,
        RUNNING,
        "start",
    )
    assert store.find_flow(f.id) == f and store.find_flow("nope") is None
    waiting = attrs.evolve(f, state=WAITING, step=1, updated_at=AT + 1)
    call = command(flow_id=f.id, step=1)
    [moved_event, _] = one(store, Group((MoveFlow(f, waiting, WAIT, {"step": 1}), Insert(call))))
    assert store.find_flow(f.id) == waiting
    assert [s.command_id for s in store.flow_steps(f.id)] == [call.id]
    rows = store_kind.journal_rows(store)
    with pytest.raises(LostRace):
        one(store, MoveFlow(f, attrs.evolve(f, state="completed"), COMPLETE))
    with pytest.raises(IllegalTransition) as caught:
        one(store, MoveFlow(waiting, attrs.evolve(waiting, state="completed"), COMPLETE))
    assert not isinstance(caught.value, LostRace)
    assert store.find_flow(f.id) == waiting and store_kind.journal_rows(store) == rows
    stalled = attrs.evolve(waiting, state="stalled", updated_at=AT + 2)
    one(store, MoveFlow(waiting, stalled, STALL))
    assert [e.event for e in store.flow_history(f.id)] == ["start", WAIT, STALL]
    assert store.flow_history(f.id)[1] == moved_event
    assert store.flows() == [stalled]
    assert store.flows(["stalled"]) == [stalled] and store.flows([RUNNING]) == []


def test_a_flow_records_steps_and_is_taken_over_and_forked(make_store: MakeStore) -> None:
    store = make_store()
    f = flow(owner=OTHER)
    one(store, InsertFlow(f))
    step = FlowStep(f.id, 1, "now", None, 12.5, AT + 3)
    assert one(store, RecordStep(step, f)) is None
    counted = store.find_flow(f.id)
    assert counted == attrs.evolve(f, step=1, updated_at=AT + 3)
    assert store.flow_steps(f.id) == [step]
    with pytest.raises(LostRace):  # a stale flow records nothing
        one(store, RecordStep(FlowStep(f.id, 2, "now", None, 1.0, AT), attrs.evolve(f, owner=ME)))
    assert store.flow_steps(f.id) == [step]
    event = one(store, TakeOverFlow(counted, ME, AT + 90, AT + 60))
    assert (event.from_state, event.to_state, event.event) == (RUNNING, RUNNING, TAKE_OVER)
    assert event.detail == {"previous_owner": OTHER, "owner": ME}
    mine = store.find_flow(f.id)
    assert mine == attrs.evolve(counted, owner=ME, lease_until=AT + 90, updated_at=AT + 60)
    assert store.flow_history(f.id)[-1] == event
    with pytest.raises(LostRace):
        one(store, TakeOverFlow(counted, "here:3:third", AT + 90, AT + 60))
    one(store, RenewFlowLeases(ME, AT + 500, (f.id,), AT + 400))
    assert store.find_flow(f.id) == attrs.evolve(mine, lease_until=AT + 500)
    one(store, RenewFlowLeases(OTHER, AT + 900, (f.id,), AT + 400))  # not the holder
    assert store.find_flow(f.id) == attrs.evolve(mine, lease_until=AT + 500)
    fork = flow(forked_from=f.id)
    one(store, Group((InsertFlow(fork), CopySteps(f.id, fork.id, 2))))
    assert [(s.flow_id, s.step, s.value) for s in store.flow_steps(fork.id)] == [(fork.id, 1, 12.5)]
    assert store.flow_history(fork.id)[0].detail == {"forked_from": f.id}


def test_abandoned_flows_are_the_unfinished_ones_nobody_alive_runs(
    make_store: MakeStore,
) -> None:
    store = make_store()
    now = AT + 100
    flows = {
        "lapsed": flow(owner=OTHER, lease_until=AT),
        "live": flow(owner=OTHER, lease_until=now + 10),
        "gone": flow(owner="here:9:gone", lease_until=now + 10),
        "own": flow(owner=ME, lease_until=now + 10),
        "own lapsed": flow(owner=ME, lease_until=AT),
        "unowned": flow(owner=None, lease_until=None),
        "finished": flow(state="completed", owner=None, lease_until=None),
    }
    store.commit([InsertFlow(f) for f in flows.values()])
    asked: list[str] = []

    def is_gone(owner: str) -> bool:
        asked.append(owner)
        return owner == "here:9:gone"

    found = [f.id for f in store.abandoned_flows(ME, now, is_gone)]
    assert found == [flows[k].id for k in ("lapsed", "gone", "own lapsed", "unowned")]
    assert sorted(asked) == sorted({OTHER, "here:9:gone"})


# --- cache, budgets, statistics, upkeep ---------------------------------------------


def test_the_cache_serves_done_replies_within_their_time(make_store: MakeStore) -> None:
    store = make_store()
    first = inserted(store)
    one(store, AddCacheEntry("k", "a", first.id, AT))
    assert store.cached("k", AT - 1) is None  # not done yet
    finished = done(store, replied(store, claimed(store, first), text="cached"))
    assert store.cached("k", AT) == finished
    assert store.cached("k", AT + 2) is None  # replied at AT + 1: too old
    assert store.cached("other", AT) is None
    newer = done(store, replied(store, claimed(store, inserted(store)), text="newer"))
    one(store, AddCacheEntry("k", "a", newer.id, AT + 1))
    assert store.cached("k", AT) in (finished, newer)
    one(store, CountCacheHit(first.id, AT + 5))
    one(store, CountCacheHit(first.id, AT + 6))
    one(store, CountCacheHit("nope", AT + 6))  # counts nothing, refuses nothing
    [stats] = store.cache_stats()
    assert (stats["adapter"], stats["entries"], stats["served"], stats["hits"]) == ("a", 2, 2, 2)
    assert stats["bytes"] > 0 and stats["oldest"] == AT
    assert store.clear_cache("b") == 0
    assert store.clear_cache(older_than=AT + 1) == 1
    assert store.clear_cache() == 1
    assert store.cached("k", AT) is None and store.cache_stats() == []
    assert store.get(first.id) == finished  # the record is never the cache's


def test_spent_and_budgets_sum_recorded_costs(make_store: MakeStore) -> None:
    store = make_store()
    f = flow(budget=1.0)
    one(store, InsertFlow(f))
    one(store, InsertFlow(flow()))
    replied(store, claimed(store, inserted(store, flow_id=f.id)), cost=0.25)
    replied(store, claimed(store, inserted(store)), cost=0.5)
    replied(store, claimed(store, inserted(store, adapter="b")), cost=2.0)
    claimed(store, inserted(store))
    assert store.spent("a", AT) == 0.75
    assert store.spent("a", AT + 2) == 0.0
    assert store.spent("b", AT) == 2.0
    assert store.flow_spent(f.id) == 0.25 and store.flow_spent("nope") == 0.0
    assert store.flow_budgets() == [{"flow": f.id, "name": f.name, "budget": 1.0, "spent": 0.25}]


def test_usage_totals_group_calls_tokens_and_cost(make_store: MakeStore) -> None:
    store = make_store()
    done(store, replied(store, claimed(store, inserted(store)), cost=0.5))
    moved(store, inserted(store), "expire", state=DEAD, reason="expired", finished_at=AT)
    inserted(store, adapter="b")
    by_adapter = store.usage_totals("adapter")
    assert [(r["key"], r["calls"], r["done"], r["dead"]) for r in by_adapter] == [
        ("a", 2, 1, 1),
        ("b", 1, 0, 0),
    ]
    assert (by_adapter[0]["input_tokens"], by_adapter[0]["output_tokens"]) == (3, 4)
    assert by_adapter[0]["cost"] == 0.5
    assert [r["key"] for r in store.usage_totals("day")] == ["2023-11-14"]


def test_prune_deletes_only_old_finished_commands_with_their_journal(
    store_kind: StoreKind,
) -> None:
    store = store_kind.new()
    old = done(store, replied(store, claimed(store, inserted(store))))  # finished AT + 2
    one(store, AddLateReply(old.id, Reply("late"), AT + 3))
    live = claimed(store, inserted(store))
    pending = inserted(store)
    assert store.prune(AT + 2) == 0
    assert store.prune(AT + 3) == 1
    assert store.find(old.id) is None and store.history(old.id) == []
    assert store.late_replies(old.id) == []
    assert store.list() == [live, pending]
    assert store_kind.journal_rows(store) == 3


def test_snapshots_are_stored_with_their_command(make_store: MakeStore) -> None:
    store = make_store()
    s = Snapshot(
        id="s-1",
        uri="file:///a.txt",
        version=3,
        start=2,
        end=7,
        text="hello",
        created_at=AT,
        document="a hello b",
        document_start=0,
    )
    c = command(snapshot_id=s.id)
    one(store, Insert(c, snapshot=s))
    assert store.snapshot(s.id) == s and store.snapshot("nope") is None
    clash = command(snapshot_id=s.id)
    with pytest.raises(StoreError):  # the same snapshot twice: neither is stored
        one(store, Insert(clash, snapshot=s))
    assert store.find(clash.id) is None


# --- schema -----------------------------------------------------------------------


def test_a_store_of_a_newer_schema_is_refused_and_left_as_it_was(store_kind: StoreKind) -> None:
    store = store_kind.new()
    inserted(store)
    store_kind.make_newer(store)
    before = store_kind.fingerprint(store)
    with pytest.raises(SchemaTooNew, match="newer dovecote"):
        store_kind.reopen(store)
    assert store_kind.fingerprint(store) == before


def test_every_kind_of_operation_has_its_statements() -> None:
    """A kind the union names but a store cannot apply would only fail
    where it is first committed; the contract tests commit each kind."""
    import typing

    from flows import operations

    kinds = set(typing.get_args(operations.Operation))
    used = {
        Insert,
        Move,
        Chain,
        Note,
        TakeOver,
        TakeOverFlow,
        AddLateReply,
        UseLateReply,
        RenewLeases,
        RenewFlowLeases,
        ReleaseLeases,
        InsertFlow,
        CopySteps,
        MoveFlow,
        RecordStep,
        Group,
        AddCacheEntry,
        CountCacheHit,
    }
    assert kinds == used


def _outcome(result: Any) -> Any:
    """A result as a caller tells it apart: an error by its type."""
    return type(result) if isinstance(result, BaseException) else result


def test_a_batch_has_the_same_outcome_as_its_operations_one_by_one(
    store_kind: StoreKind,
) -> None:
    """A store may write a batch's operations together (one statement for
    many claims); what each caller is told, and what is stored, must be
    what committing them one at a time gives: losers lose alone, a second
    move of one command sees the first, a refused value refuses only its own
    operation."""
    together, alone = store_kind.new(), store_kind.new()
    pending = [command(priority=n % 3) for n in range(40)]
    for store in (together, alone):
        store.commit([Insert(c) for c in pending])
    sent = {c.id: attrs.evolve(c, state=SENT, owner=ME, lease_until=AT + LEASE) for c in pending}
    batch: list[Operation] = []
    for n, c in enumerate(pending):
        if n % 7 == 3:  # stale: read before another engine took it
            batch.append(Move(attrs.evolve(c, owner=OTHER), sent[c.id], DISPATCH, AT))
        elif n % 11 == 5:  # forbidden: pending cannot finish
            batch.append(Move(c, attrs.evolve(c, state=DONE), FINISH, AT))
        else:
            batch.append(Move(c, sent[c.id], DISPATCH, AT))
    first, second = pending[0], pending[1]
    r = attrs.evolve(sent[first.id], state=REPLIED, reply=Reply("x"), replied_at=AT)
    d = attrs.evolve(r, state=DONE, finished_at=AT, owner=None, lease_until=None)
    batch.insert(1, Move(first, sent[first.id], DISPATCH, AT))  # the same claim again: lost
    batch += [
        Chain((Move(sent[first.id], r, REPLY, AT), Move(r, d, FINISH, AT))),  # follows it
        Move(second, sent[second.id], DISPATCH, AT, {"bad": "\ud800"}),  # unstorable detail
        Insert(command()),
        Insert(command(handler_args={"bad": "\udfff"})),  # unstorable: refused alone
        Insert(pending[2]),  # a duplicate id
        Insert(command()),
    ]
    results = together.commit(batch)
    expected = [alone.commit([op])[0] for op in batch]
    assert [_outcome(r) for r in results] == [_outcome(e) for e in expected]
    assert isinstance(results[1], LostRace)
    assert together.list() == alone.list()
    for c in together.list():
        assert together.history(c.id) == alone.history(c.id)
    assert store_kind.journal_rows(together) == store_kind.journal_rows(alone)
