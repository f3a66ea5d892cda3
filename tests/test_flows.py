"""Flows: durable scripts and declared machines on the pending table, on
each store (the ``db`` fixture); the MockClock tests on SQLite only."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flows
from flows.location import open_store
from flows.operations import TAKE_OVER
from flows.states import FLOW_EVENTS, FLOW_STATES, FLOW_TRANSITIONS, IllegalTransition, next_state
from tests.conftest import PYTHON, ROOT, ask
from tests.test_crash import read_line


def worker(db: Path | str, log: Path, action: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PYTHON, "-m", "tests.flow_worker", "--db", str(db), action],
        cwd=ROOT,
        env={**os.environ, "DOVECOTE_SCRIPTED_LOG": str(log)},
        stdout=subprocess.PIPE,
        text=True,
    )


def test_kill_9_mid_flow_calls_each_step_once(db: Path | str, tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    first = worker(db, log, "start")
    read_line(first, "after step 1")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert len(log.read_text().splitlines()) == 1  # step 1 only, so far

    second = worker(db, log, "resume")
    resumed = json.loads(read_line(second, "result ")[len("result ") :])
    second.wait(timeout=30)

    calls = [line.split() for line in log.read_text().splitlines()]
    assert len(calls) == 3 and Counter(c for c, _ in calls).most_common(1)[0][1] == 1
    assert {attempt for _, attempt in calls} == {"1"}

    # The same flow, never interrupted, gives the same result.
    clean_db, clean_log = tmp_path / "clean.db", tmp_path / "clean.log"
    clean = worker(clean_db, clean_log, "start")
    uninterrupted = json.loads(read_line(clean, "result ")[len("result ") :])
    clean.wait(timeout=30)
    assert (
        resumed["steps"]
        == uninterrupted["steps"]
        == [
            "the first step about geese",
            "second, after the first step about geese",
            "receive the third after second, after the first step about geese",
        ]
    )
    store = open_store(db)
    try:
        [flow] = store.flows()
    finally:
        store.close()
    assert flow.state == "completed" and flow.step == 5  # 3 calls, a sleep, a random


async def test_dead_step_stalls_the_flow_and_replay_resumes_it(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    @flows.flow("test.stall")
    async def stall(ctx: flows.FlowContext) -> str:
        a = await ctx.call("scripted", ask("teh"))
        b = await ctx.call("scripted", ask("#delay 10\nrecieve"), timeout=5)
        return a.text + " " + b.text

    async with flows.open_engine(db_path) as engine:
        flow_id = await engine.start_flow("test.stall")
        while engine.get_flow(flow_id).state != "stalled":
            await trio.sleep(0.5)
        [dead] = engine.list(["dead"])
        assert (dead.reason, dead.step, dead.flow_id) == ("timeout", 2, flow_id)
        with pytest.raises(IllegalTransition):
            await engine.retry_flow(await engine.start_flow("test.stall"))
        [replay] = await engine.replay([dead.id], timeout=30)
        assert await engine.wait_flow(flow_id) == "the receive"
        events = [(e.from_state, e.to_state) for e in engine.flow_history(flow_id)]
        steps = engine.store.flow_steps(flow_id)
    assert ("waiting", "stalled") in events and ("stalled", "waiting") in events
    assert events[-1] == ("running", "completed")
    assert steps[1].command_id == replay  # the replay took the step over


async def test_flow_retry_replays_the_stalled_step(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    @flows.flow("test.retry")
    async def one(ctx: flows.FlowContext) -> str:
        return (await ctx.call("scripted", ask("#delay 10\nteh"), timeout=5)).text

    async with flows.open_engine(db_path) as engine:
        flow_id = await engine.start_flow("test.retry")
        while engine.get_flow(flow_id).state != "stalled":
            await trio.sleep(0.5)
        new = await engine.retry_flow(flow_id, timeout=60)
        assert await engine.wait_flow(flow_id) == "the"
        assert engine.get(new).replay_of is not None


async def test_a_changed_script_is_stopped_naming_the_step(db: Path | str) -> None:
    version = {"prompt": "teh"}

    @flows.flow("test.changing")
    async def changing(ctx: flows.FlowContext) -> str:
        a = await ctx.call("scripted", ask("one"))
        b = await ctx.call("scripted", ask(version["prompt"]))
        return a.text + b.text

    async with flows.open_engine(db) as engine:
        flow_id = await engine.start_flow("test.changing")
        await engine.wait_flow(flow_id)
        version["prompt"] = "something else"
        forked = await engine.fork_flow(flow_id, from_step=3)  # reuses steps 1 and 2
        with pytest.raises(flows.FlowFailed) as caught:
            await engine.wait_flow(forked)
    assert "step 2" in str(caught.value) and "different request" in str(caught.value)


async def test_fork_reuses_steps_before_n(db: Path | str) -> None:
    calls = Counter[str]()

    @flows.flow("test.fork")
    async def forked(ctx: flows.FlowContext) -> list[str]:
        out = []
        for word in ("teh", "recieve", "wierd"):
            calls[word] += 1
            out.append((await ctx.call("scripted", ask(word))).text)
        return out

    async with flows.open_engine(db) as engine:
        original = await engine.start_flow("test.fork")
        assert await engine.wait_flow(original) == ["the", "receive", "weird"]
        sends = len(engine.list())
        copy = await engine.fork_flow(original, from_step=3)
        assert await engine.wait_flow(copy) == ["the", "receive", "weird"]
        assert len(engine.list()) == sends + 1  # only step 3 called again
        assert engine.get_flow(copy).forked_from == original


async def test_cancel_flow_cancels_its_calls(db: Path | str) -> None:
    @flows.flow("test.cancel")
    async def hangs(ctx: flows.FlowContext) -> None:
        await ctx.call("scripted", ask("#hang\nx"), timeout=600)

    async with flows.open_engine(db) as engine:
        flow_id = await engine.start_flow("test.cancel")
        while engine.get_flow(flow_id).state != "waiting":
            await trio.sleep(0.01)
        cancelled = await engine.cancel_flow(flow_id)
        assert cancelled.state == "cancelled"
        with pytest.raises(flows.FlowFailed):
            await engine.wait_flow(flow_id)
        [command] = engine.list()
        assert command.state == "cancelled"
        with pytest.raises(IllegalTransition):
            await engine.cancel_flow(flow_id)


async def test_bad_flow_starts_change_nothing(db: Path | str) -> None:
    async with flows.open_engine(db) as engine:
        with pytest.raises(ValueError, match="no flow registered"):
            await engine.start_flow("no-such-flow")
        with pytest.raises(ValueError, match="JSON"):
            await engine.start_flow("corrections", text=object())
        with pytest.raises(flows.UnknownFlow):
            engine.get_flow("nope")
        assert engine.list_flows() == []


async def test_corrections_flow(db: Path | str) -> None:
    async with flows.open_engine(db) as engine:
        flow_id = await engine.start_flow("corrections", text="Teh end, truely.")
        assert await engine.wait_flow(flow_id) == {"text": "The end, truly."}
        [command] = engine.list()
    assert command.request.system is not None and "spelling" in command.request.system
    assert [m.content for m in command.request.messages] == ["Teh end, truely."]


# --- the flow machine, pair by pair ------------------------------------------


@pytest.mark.parametrize(("state", "event"), list(itertools.product(FLOW_STATES, FLOW_EVENTS)))
def test_flow_table_pairs(state: str, event: str) -> None:
    target = FLOW_TRANSITIONS[state].get(event)
    if target is None:
        with pytest.raises(IllegalTransition):
            next_state(state, event, table=FLOW_TRANSITIONS)
    else:
        assert next_state(state, event, table=FLOW_TRANSITIONS) == target


# --- declared flows ----------------------------------------------------------

REVIEW = flows.declare(
    "test.review",
    initial="draft",
    stages={
        "draft": flows.Stage(prompt="#reply\n{draft}", save_as="text"),
        "review": flows.Stage(
            prompt="#reply\n{verdict}",
            save_as="verdict",
            choose={"approve": "approved", "reject": "rejected", "stop": "abandoned"},
        ),
        "published": flows.Stage(),
        "scrapped": flows.Stage(),
    },
    transitions={
        "draft": {"replied": "review"},
        "review": {"approved": "published", "rejected": "draft", "abandoned": "scrapped"},
    },
)


@pytest.mark.parametrize(
    ("verdict", "path", "final"),
    [
        ("approve", ["draft", "review", "published"], "completed"),
        ("stop now", ["draft", "review", "scrapped"], "completed"),
        ("maybe", ["draft", "review"], "failed"),  # no transition for "replied": refused
    ],
)
async def test_declared_flow_every_transition(
    db: Path | str, verdict: str, path: list[str], final: str
) -> None:
    async with flows.open_engine(db) as engine:
        flow_id = await engine.start_flow("test.review", draft="A note.", verdict=verdict)
        with trio.fail_after(10):
            while engine.get_flow(flow_id).state not in ("completed", "failed"):
                await trio.sleep(0.01)
        flow = engine.get_flow(flow_id)
        entered = ["draft"] + [
            e.detail["to"]
            for e in engine.flow_history(flow_id)
            if isinstance(e.detail, dict) and "to" in e.detail
        ]
    assert flow.state == final
    assert entered == path
    if final == "completed":
        assert flow.result == {"text": "A note.", "verdict": verdict}
    else:
        assert "allowed from 'review': approved, rejected, abandoned" in (flow.error or "")


async def test_declared_rejection_loops_back(db: Path | str) -> None:
    async with flows.open_engine(db) as engine:
        # The reviewer rejects once; the second review approves.
        flow_id = await engine.start_flow("test.review", draft="v1", verdict="reject")
        with trio.fail_after(10):
            while engine.get_flow(flow_id).stage != "draft" or engine.get_flow(flow_id).step < 3:
                await trio.sleep(0.01)
        flow = engine.get_flow(flow_id)
        assert flow.vars == {"text": "v1", "verdict": "reject"}
        await engine.cancel_flow(flow_id)


def test_declared_definitions_are_checked() -> None:
    with pytest.raises(ValueError, match="no such stage"):
        flows.DeclaredFlow("bad", "a", {"a": flows.Stage(prompt="x")}, {"a": {"e": "b"}})
    with pytest.raises(ValueError, match="initial stage"):
        flows.DeclaredFlow("bad", "z", {"a": flows.Stage()}, {})
    with pytest.raises(ValueError, match="no prompt"):
        flows.DeclaredFlow("bad", "a", {"a": flows.Stage(), "b": flows.Stage()}, {"a": {"e": "b"}})


def replays_to(events: list[Any], state: str) -> bool:
    current = None
    for event in events:
        if event.from_state != current:
            return False
        if current is None:
            if event.event != "start":
                return False
        elif event.event == TAKE_OVER:  # a new runner, not a transition
            if event.to_state != current:
                return False
        elif FLOW_TRANSITIONS[current].get(event.event) != event.to_state:
            return False
        current = event.to_state
    return current == state


# --- random interleavings ------------------------------------------------------


@flows.flow("test.hypothesis")
async def three_hanging_steps(ctx: flows.FlowContext) -> list[str]:
    return [
        (await ctx.call("scripted", ask(f"#hang\nstep {n}"), timeout=10)).text for n in range(3)
    ]


async def interleave(data: st.DataObject, db: Path) -> None:
    actions = data.draw(
        st.lists(
            st.sampled_from(["start", "reply", "timeout", "cancel", "replay", "restart"]),
            min_size=1,
            max_size=14,
        ),
        label="actions",
    )
    index = 0
    while index < len(actions):
        async with flows.open_engine(db) as engine:
            await trio.sleep(0.1)
            while index < len(actions):
                action = actions[index]
                index += 1
                if action == "restart":
                    break
                if action == "start":
                    await engine.start_flow("test.hypothesis")
                elif action == "reply":
                    sent = engine.list(["sent"])
                    if sent:
                        which = data.draw(st.sampled_from(sent), label="reply to")
                        await engine.deliver(which.id, {"text": "ok"})
                elif action == "timeout":
                    await trio.sleep(11)
                elif action == "cancel":
                    live = engine.list_flows(["running", "waiting", "stalled"])
                    if live:
                        which_flow = data.draw(st.sampled_from(live), label="cancel")
                        with contextlib.suppress(IllegalTransition):
                            await engine.cancel_flow(which_flow.id)
                else:
                    dead = [c for c, _, _ in engine.store.dead_letters()]
                    if dead:
                        await engine.replay([data.draw(st.sampled_from(dead), label="replay").id])
                await trio.sleep(0.1)
                for flow in engine.list_flows():
                    assert flow.state in FLOW_STATES
                    assert replays_to(engine.flow_history(flow.id), flow.state), flow


# On SQLite only: it runs on MockClock (see the ``db`` fixture).
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_interleavings_leave_flows_in_reachable_states(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(
            interleave,
            data,
            Path(tmp) / "dovecote.db",
            clock=trio.testing.MockClock(autojump_threshold=0),
        )
