"""The engine on each store (the ``db`` fixture: a real SQLite file, a real
PostgreSQL database). Where time is the subject the tests run on trio's
MockClock (``autojump_clock``), so deadlines are exact and a 30-second
timeout takes no time; those run on SQLite only (``db_path``: the ``db``
fixture says why)."""

from __future__ import annotations

import itertools
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio

import flows
from adapters.base import (
    AdapterSettings,
    PermanentError,
    Reply,
    Request,
    RetryableError,
    SendContext,
)
from adapters.scripted import ScriptedAdapter
from flows.engine import Backoff
from flows.location import open_store
from flows.records import Command, new_id
from flows.store import Insert
from tests.conftest import ask

WALL = 1_700_000_000.0


def fixed_wall() -> float:
    return WALL


class Recorder:
    """An adapter whose answers the test decides, recording what it was sent."""

    def __init__(self, name: str = "rec", max_in_flight: int = 16, **settings: Any) -> None:
        self.settings = AdapterSettings(name=name, max_in_flight=max_in_flight, **settings)
        self.sent: list[tuple[str, int, float]] = []
        self.answers: list[Any] = []
        self.in_flight = 0
        self.peak = 0

    async def send(self, request: Request, context: SendContext) -> Reply:
        self.sent.append((context.command_id, context.attempt, trio.current_time()))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            answer = self.answers.pop(0) if self.answers else Reply(request.last_user_text)
            if isinstance(answer, float | int):
                await trio.sleep(answer)
                return Reply(request.last_user_text)
            if isinstance(answer, BaseException):
                raise answer
            assert isinstance(answer, Reply)
            return answer
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        pass


async def test_call_returns_the_corrected_reply(db: Path | str) -> None:
    async with flows.open_engine(db) as engine:
        reply = await engine.call("scripted", ask("Teh cat did not recieve it."))
    assert reply.text == "The cat did not receive it."
    assert reply.usage is not None and reply.usage.output_tokens == 6


async def test_lifecycle_is_journaled(db: Path | str) -> None:
    async with flows.open_engine(db) as engine:
        command_id = await engine.submit("scripted", ask("teh"))
        command = await engine.wait(command_id)
        history = engine.history(command_id)
    assert command.state == "done" and command.reply == Reply("the", command.reply.usage)
    assert [(e.from_state, e.to_state, e.event) for e in history] == [
        (None, "pending", "submit"),
        ("pending", "sent", "dispatch"),
        ("sent", "replied", "reply"),
        ("replied", "done", "finish"),
    ]
    assert command.created_at <= command.sent_at <= command.replied_at <= command.finished_at  # type: ignore[operator]
    assert command.owner is None and command.lease_until is None


async def test_deadline_is_exact(db_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with flows.open_engine(db_path, wall_clock=fixed_wall) as engine:
        with engine.subscribe() as notices:
            start = trio.current_time()
            command_id = await engine.submit("scripted", ask("#hang\nhello"), timeout=30)
            async for notice in notices:
                if isinstance(notice, flows.StateChange) and notice.command.state == "dead":
                    fired_at = trio.current_time()
                    break
        command = engine.get(command_id)
    assert fired_at - start == pytest.approx(30, abs=1e-6)
    assert command.reason == "timeout"
    assert command.deadline == pytest.approx(command.sent_at + 30, abs=1e-6)  # type: ignore[operator]
    assert command.finished_at == pytest.approx(command.deadline, abs=1e-6)
    assert command.attempt == 1  # a timeout is not retried


async def test_ten_thousand_deadlines_fire_in_order(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rng = random.Random(7)
    timeouts = [1 + i / 10 for i in range(10_000)]
    rng.shuffle(timeouts)
    hanging = ScriptedAdapter(max_in_flight=10_000)
    async with flows.open_engine(db_path, adapters=[hanging], wall_clock=fixed_wall) as engine:
        deaths: list[tuple[float, str]] = []
        with engine.subscribe(buffer=50_000) as notices:
            ids = [await engine.submit("scripted", ask("#hang\nx"), timeout=t) for t in timeouts]
            async for notice in notices:
                if isinstance(notice, flows.StateChange) and notice.command.state == "dead":
                    deaths.append((trio.current_time(), notice.command.id))
                    if len(deaths) == len(ids):
                        break
        commands = {c.id: c for c in engine.list(["dead"])}
    assert len(commands) == 10_000
    ordered = sorted(ids, key=lambda i: commands[i].deadline or 0)
    assert [i for _, i in deaths] == ordered
    for fired_at, command_id in deaths:
        command = commands[command_id]
        assert command.reason == "timeout"
        assert command.finished_at == pytest.approx(command.deadline, abs=1e-6)
        assert fired_at + (WALL - 0) >= 0  # fired on the mock clock, not real time
    assert hanging.calls == 10_000


async def test_retries_back_off_and_honour_retry_after(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    recorder = Recorder()
    recorder.answers = [
        RetryableError("slow down", status=429, retry_after=7.0),
        RetryableError("oops", status=503),
        Reply("finally"),
    ]
    backoff = Backoff(base=1.0, cap=60.0)
    async with flows.open_engine(db_path, adapters=[recorder], backoff=backoff, seed=1) as engine:
        command = await engine.wait(await engine.submit("rec", ask("x"), max_attempts=3))
    assert command.state == "done" and command.reply is not None
    assert command.reply.text == "finally" and command.attempt == 3
    (_, a1, t1), (_, a2, t2), (_, a3, t3) = recorder.sent
    assert (a1, a2, a3) == (1, 2, 3)
    assert t2 - t1 >= 7.0  # Retry-After: 7 s beats the 0.5-1 s backoff
    assert 1.0 <= t3 - t2 <= 2.0  # attempt 2's backoff: base * 2 = 2 s, jittered to [1, 2]
    retries = [e for e in engine_history(db_path, command.id) if e[2] == "retry"]
    assert [r[3]["error"]["status"] for r in retries] == [429, 503]


def engine_history(db: Path | str, command_id: str) -> list[tuple[Any, ...]]:
    store = open_store(db)
    try:
        return [(e.from_state, e.to_state, e.event, e.detail) for e in store.history(command_id)]
    finally:
        store.close()


async def test_retries_exhausted(db_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with flows.open_engine(db_path) as engine:
        command = await engine.wait(
            await engine.submit("scripted", ask("#fail 503\nx"), max_attempts=2)
        )
    assert (command.state, command.reason, command.attempt) == ("dead", "retries_exhausted", 2)
    assert command.error is not None and command.error.status == 503


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_permanent_errors_are_not_retried(
    db_path: Path, autojump_clock: trio.testing.MockClock, status: int
) -> None:
    async with flows.open_engine(db_path) as engine:
        command = await engine.wait(
            await engine.submit("scripted", ask(f"#fail {status}\nx"), max_attempts=5)
        )
    assert (command.state, command.reason, command.attempt) == ("dead", "error", 1)
    assert command.error is not None and command.error.status == status


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
async def test_retryable_statuses(
    db_path: Path, autojump_clock: trio.testing.MockClock, status: int
) -> None:
    async with flows.open_engine(db_path) as engine:
        command = await engine.wait(
            await engine.submit("scripted", ask(f"#fail {status}\nx"), max_attempts=3)
        )
    assert (command.reason, command.attempt) == ("retries_exhausted", 3)


async def test_an_adapter_bug_dead_letters_without_taking_the_engine_down(
    db: Path | str,
) -> None:
    recorder = Recorder()
    recorder.answers = [ZeroDivisionError("bug"), Reply("fine")]
    async with flows.open_engine(db, adapters=[recorder]) as engine:
        broken = await engine.wait(await engine.submit("rec", ask("x")))
        fine = await engine.wait(await engine.submit("rec", ask("y")))
    assert (broken.state, broken.reason) == ("dead", "error")
    assert broken.error is not None and broken.error.type == "ZeroDivisionError"
    assert fine.state == "done"


async def test_handler_runs_by_name_with_its_arguments(db: Path | str) -> None:
    seen: list[tuple[str, str, Any]] = []

    @flows.handler("test.collect")
    def collect(engine: flows.Engine, command: flows.Command) -> None:
        assert command.state == "replied" and command.reply is not None
        seen.append((command.id, command.reply.text, command.handler_args))

    async with flows.open_engine(db) as engine:
        command_id = await engine.submit(
            "scripted", ask("teh"), handler="test.collect", handler_args={"k": [1, 2]}
        )
        command = await engine.wait(command_id)
    assert command.state == "done"
    assert seen == [(command_id, "the", {"k": [1, 2]})]
    store = open_store(db)  # as another process reads it back
    try:
        stored = store.get(command_id)
    finally:
        store.close()
    assert (stored.handler, stored.handler_args) == ("test.collect", {"k": [1, 2]})
    if isinstance(db, Path):  # the SQLite file's own encoding: compact JSON text
        raw = sqlite3.connect(db).execute(
            "SELECT handler_args FROM commands WHERE id = ?", (command_id,)
        )
        assert raw.fetchone() == ('{"k":[1,2]}',)


async def test_failing_handler_dead_letters_with_handler_error(db: Path | str) -> None:
    @flows.handler("test.explode")
    async def explode(engine: flows.Engine, command: flows.Command) -> None:
        raise RuntimeError("cannot apply")

    async with flows.open_engine(db) as engine:
        command = await engine.wait(
            await engine.submit("scripted", ask("x"), handler="test.explode")
        )
    assert (command.state, command.reason) == ("dead", "handler_error")
    assert command.error is not None and command.error.message == "cannot apply"
    assert command.reply is not None  # the reply is kept: replay can reuse nothing, but it is there


async def test_late_reply_is_stored_not_applied(db: Path | str) -> None:
    async with flows.open_engine(db) as engine:
        command_id = await engine.submit("scripted", ask("#hang\nx"), timeout=0.05)
        dead = await engine.wait(command_id)
        delivery = await engine.deliver(command_id, {"text": "too late"})
        again = engine.get(command_id)
        late = engine.store.late_replies(command_id)
    assert delivery == flows.Delivery(accepted=False, late=True)
    assert again == dead  # terminal states never change
    assert [r.reply.text for r in late] == ["too late"]


async def test_deliver_matches_by_id(db: Path | str) -> None:
    async with flows.open_engine(db) as engine:
        first = await engine.submit("scripted", ask("#hang\na"), timeout=60)
        second = await engine.submit("scripted", ask("#hang\nb"), timeout=60)
        while engine.get(second).state != "sent":
            await trio.sleep(0.01)
        assert await engine.deliver(second, {"text": "for b"}) == flows.Delivery(True, False)
        done = await engine.wait(second)
        assert done.reply is not None and done.reply.text == "for b"
        assert engine.get(first).state == "sent"
        with pytest.raises(flows.UnknownCommand):
            await engine.deliver("no-such-id", {"text": "x"})
        await engine.cancel(first)


async def test_replay_with_new_timeout(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with flows.open_engine(db_path) as engine:
        dead_id = await engine.submit("scripted", ask("#delay 5\nteh"), timeout=2)
        assert (await engine.wait(dead_id)).reason == "timeout"
        [new_id] = await engine.replay([dead_id], timeout=10)
        replayed = await engine.wait(new_id)
        dead = engine.get(dead_id)
        letters = engine.store.dead_letters(include_replayed=True)
        waiting = engine.store.dead_letters()
    assert replayed.state == "done" and replayed.replay_of == dead_id
    assert replayed.timeout == 10 and replayed.reply is not None and replayed.reply.text == "the"
    assert dead.state == "dead"  # the dead letter itself never changes
    assert [(c.id, by) for c, by, _ in letters] == [(dead_id, new_id)]
    assert waiting == []  # nothing left waiting for a decision


async def test_replay_from_late_reply_calls_no_model(db: Path | str) -> None:
    scripted = ScriptedAdapter()
    async with flows.open_engine(db, adapters=[scripted]) as engine:
        dead_id = await engine.submit("scripted", ask("#hang\nx"), timeout=0.05)
        await engine.wait(dead_id)
        await engine.deliver(dead_id, {"text": "the late answer"})
        calls = scripted.calls
        [new_id] = await engine.replay([dead_id], use_late_reply=True)
        replayed = await engine.wait(new_id)
        history = engine.history(new_id)
        late = engine.store.late_replies(dead_id)
    assert scripted.calls == calls
    assert replayed.state == "done" and replayed.reply is not None
    assert replayed.reply.text == "the late answer" and replayed.sent_at is None
    assert [e.event for e in history] == ["submit", "resolve", "finish"]
    assert late[0].used_by == new_id


async def test_replay_refuses_what_is_not_dead_and_changes_nothing(db: Path | str) -> None:
    async with flows.open_engine(db) as engine:
        done_id = await engine.submit("scripted", ask("x"))
        await engine.wait(done_id)
        dead_id = await engine.submit("scripted", ask("#fail 400\nx"))
        await engine.wait(dead_id)
        before = engine.list()
        with pytest.raises(flows.IllegalTransition, match="only dead commands"):
            await engine.replay([dead_id, done_id])
        with pytest.raises(flows.UnknownCommand):
            await engine.replay([dead_id, "nope"])
        with pytest.raises(ValueError):
            await engine.replay([dead_id], timeout=-1)
        assert engine.list() == before


async def test_cancel_pending_and_sent(db: Path | str) -> None:
    slow = Recorder(max_in_flight=1)
    slow.answers = [3600.0]
    async with flows.open_engine(db, adapters=[slow]) as engine:
        sent_id = await engine.submit("rec", ask("a"), timeout=7200)
        pending_id = await engine.submit("rec", ask("b"))
        while engine.get(sent_id).state != "sent":
            await trio.sleep(0.01)
        assert engine.get(pending_id).state == "pending"  # max_in_flight is 1
        cancelled = await engine.cancel(sent_id)
        assert (cancelled.state, cancelled.reason) == ("cancelled", "cancelled_by_user")
        await engine.cancel(pending_id)
        with trio.fail_after(5):
            while slow.in_flight:
                await trio.sleep(0.01)  # the send was cancelled, not left running
        with pytest.raises(flows.IllegalTransition):
            await engine.cancel(pending_id)
        assert [c.state for c in engine.list()] == ["cancelled", "cancelled"]
    assert [s[0] for s in slow.sent] == [sent_id]


async def test_max_in_flight_and_priority(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    recorder = Recorder(max_in_flight=2)
    recorder.answers = [1.0] * 6
    async with flows.open_engine(db_path, adapters=[recorder]) as engine:
        batch = [await engine.submit("rec", ask(f"b{i}")) for i in range(4)]
        while recorder.in_flight < 2:
            await trio.sleep(0.01)
        urgent = await engine.submit("rec", ask("urgent"), priority=10)
        for command_id in [*batch, urgent]:
            await engine.wait(command_id)
    assert recorder.peak == 2
    sent_at = {command_id: at for command_id, _, at in recorder.sent}
    # The first two were claimed before the urgent one existed; it takes the
    # first free slot, ahead of the older batch work still waiting.
    assert sent_at[urgent] == min(sent_at[b] for b in batch[2:])
    assert sent_at[urgent] < max(sent_at[b] for b in batch[2:])


async def test_expires_at_bounds_the_whole_life(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    blocked = Recorder(max_in_flight=1)
    blocked.answers = [100.0, 1.0]
    async with flows.open_engine(db_path, adapters=[blocked], wall_clock=fixed_wall) as engine:
        first = await engine.submit("rec", ask("a"), timeout=1000)
        queued = await engine.submit("rec", ask("b"), expires_at=engine.now() + 10)
        expired = await engine.wait(queued)
        assert (expired.state, expired.reason) == ("dead", "expired")
        assert expired.sent_at is None
        assert expired.finished_at == pytest.approx(WALL + 10, abs=1e-6)
        await engine.wait(first)


async def test_bad_input_changes_nothing(db: Path | str) -> None:
    async with flows.open_engine(db) as engine:
        bad: list[dict[str, Any]] = [
            {"adapter": "nope", "request": ask("x")},
            {"adapter": "scripted", "request": {"messages": []}},
            {"adapter": "scripted", "request": {"messages": [{"role": "robot", "content": "x"}]}},
            {"adapter": "scripted", "request": {"prompt": "x"}},
            {"adapter": "scripted", "request": ask("x", temperature=9)},
            {"adapter": "scripted", "request": ask("x"), "timeout": -1},
            {"adapter": "scripted", "request": ask("x"), "timeout": float("nan")},
            {"adapter": "scripted", "request": ask("x"), "timeout": 10**9},
            {"adapter": "scripted", "request": ask("x"), "max_attempts": 0},
            {"adapter": "scripted", "request": ask("x"), "handler": "no.such.handler"},
            {"adapter": "scripted", "request": ask("x"), "handler_args": {"f": object()}},
        ]
        for arguments in bad:
            with pytest.raises((ValueError, TypeError)):
                await engine.submit(**arguments)
        assert engine.list() == []
        assert (await engine.wait(await engine.submit("scripted", ask("ok")))).state == "done"


async def test_call_raises_command_failed(db: Path | str) -> None:
    async with flows.open_engine(db) as engine:
        with pytest.raises(flows.CommandFailed) as caught:
            await engine.call("scripted", ask("#fail 400\nx"))
    assert caught.value.command.reason == "error"
    assert "HTTP 400" in str(caught.value)


async def test_subscribers_see_every_transition_after_commit(db: Path | str) -> None:
    async with flows.open_engine(db) as engine:
        with engine.subscribe() as notices:
            command_id = await engine.submit("scripted", ask("teh"))
            seen = []
            async for notice in notices:
                if isinstance(notice, flows.StateChange):
                    # Committed before it is published: the store already agrees.
                    assert engine.get(command_id).state in (
                        notice.command.state,
                        *_later(notice.command.state),
                    )
                    seen.append(notice.event.to_state)
                    if notice.command.is_terminal:
                        break
    assert seen == ["pending", "sent", "replied", "done"]


def _later(state: str) -> tuple[str, ...]:
    order = ["pending", "sent", "replied", "done"]
    return tuple(order[order.index(state) + 1 :])


async def test_permanent_error_from_a_custom_adapter_keeps_its_message(db: Path | str) -> None:
    recorder = Recorder()
    recorder.answers = [PermanentError("model not found", status=404)]
    async with flows.open_engine(db, adapters=[recorder]) as engine:
        command = await engine.wait(await engine.submit("rec", ask("x")))
    assert command.error == flows.CommandError("PermanentError", "model not found", 404)


async def test_requests_per_minute_spread_the_sends(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    limited = Recorder(max_in_flight=100, requests_per_minute=60)
    async with flows.open_engine(db_path, adapters=[limited]) as engine:
        ids = [await engine.submit("rec", ask("x"), timeout=600) for _ in range(10)]
        for command_id in ids:
            assert (await engine.wait(command_id)).state == "done"
    times = [t for _, _, t in limited.sent]
    # 60 a minute with a one-second burst: two at once, then one a second.
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 10
    assert times[-1] - times[0] == pytest.approx(8.0, abs=0.01)
    assert all(g <= 1.0 + 1e-6 for g in gaps)
    for start in range(len(times)):
        window = [t for t in times if times[start] <= t < times[start] + 60]
        assert len(window) <= 60


async def test_tokens_per_minute_hold_back_big_requests(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    limited = Recorder(max_in_flight=100, tokens_per_minute=600)
    async with flows.open_engine(db_path, adapters=[limited]) as engine:
        ids = [
            await engine.submit("rec", ask("y" * 400), timeout=600) for _ in range(4)
        ]  # 100 tokens each: 10 s of budget each
        for command_id in ids:
            await engine.wait(command_id)
    times = [t for _, _, t in limited.sent]
    # One every 10 s, each allowed the 1 s burst early: t0, t0+9, t0+19, t0+29.
    assert [round(t - times[0], 6) for t in times] == [0, 9, 19, 29]


async def test_submit_many_stores_a_batch_in_order_and_runs_it(db: Path | str) -> None:
    async with flows.open_engine(db) as engine:
        ids = await engine.submit_many(
            "scripted", [ask(f"teh {i}") for i in range(50)], timeout=30, priority=5
        )
        assert ids == sorted(ids) and len(set(ids)) == 50
        done = [await engine.wait(command_id) for command_id in ids]
    assert [c.state for c in done] == ["done"] * 50
    assert [c.reply.text if c.reply else None for c in done] == [f"the {i}" for i in range(50)]
    assert {(c.timeout, c.priority) for c in done} == {(30.0, 5)}
    assert await _no_submit_many_of_nothing(db) == []


async def _no_submit_many_of_nothing(db: Path | str) -> list[str]:
    async with flows.open_engine(db) as engine:
        return await engine.submit_many("scripted", [])


async def test_submit_many_with_one_bad_request_stores_none(db: Path | str) -> None:
    async with flows.open_engine(db) as engine:
        batch = [ask("fine"), {"messages": [{"role": "robot", "content": "x"}]}, ask("fine")]
        with pytest.raises(ValueError, match="role"):
            await engine.submit_many("scripted", batch)
        with pytest.raises(ValueError, match="unknown adapter"):
            await engine.submit_many("nope", [ask("x")])
        assert engine.list() == []


async def test_claims_come_in_bounded_rounds_without_waiting_between(
    db_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("flows.dispatch.CLAIM_BATCH", 7)
    recorder = Recorder(max_in_flight=100)
    recorder.answers = [1.0] * 50
    async with flows.open_engine(db_path, adapters=[recorder]) as engine:
        started = trio.current_time()
        ids = await engine.submit_many("rec", [ask(f"x{i}") for i in range(50)])
        finished = [await engine.wait(command_id) for command_id in ids]
    assert [c.state for c in finished] == ["done"] * 50
    # Eight rounds of at most seven claims, one after the other: every call
    # was sent at once, none waited for the dispatcher's poll.
    assert recorder.peak == 50
    assert {when for _, _, when in recorder.sent} == {started}


class Hanging(Recorder):
    """Every send hangs until the engine cancels it."""

    async def send(self, request: Request, context: SendContext) -> Reply:
        self.sent.append((context.command_id, context.attempt, trio.current_time()))
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_a_claim_committed_with_a_lease_renewal_still_times_out(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Another process adds calls half-way between ticks; this engine claims
    # them on its next poll (every 1 s), the very instant its keeper renews
    # its leases (every lease / 3 = 1 s). Claim and renewal then share a
    # transaction, in either order, and each task may resume first: a claim
    # the renewal could not see must still be timed out, not left "sent".
    adapter = Hanging(max_in_flight=1000)
    other = flows.Store(db_path)
    async with flows.open_engine(db_path, adapters=[adapter], lease=3.0) as engine:
        ids = []
        for tick in range(20):
            await trio.sleep_until(tick + 0.5)
            for _ in range(5):
                command = Command(
                    id=new_id(),
                    adapter="rec",
                    request=Request.from_json(ask("x")),
                    state="pending",
                    created_at=engine.now(),
                    timeout=2.0,
                )
                other.commit_one(Insert(command))
                ids.append(command.id)
        await trio.sleep(5.0)
        stuck = [c for c in map(engine.get, ids) if c.state != "dead"]
    other.close()
    assert stuck == []
    assert len(adapter.sent) == len(ids) == 100


async def test_leases_of_long_sends_and_handlers_are_renewed_slice_by_slice(
    db_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("flows.keeper.RENEW_BATCH", 3)
    adapter = Hanging(max_in_flight=100)
    handler_may_end = trio.Event()

    async def slow_handler(engine: flows.Engine, command: flows.Command) -> None:
        await handler_may_end.wait()

    @flows.flow("test.long_call")
    async def long_call(ctx: flows.FlowContext) -> str:
        return (await ctx.call("rec", ask("z"), timeout=60.0)).text

    recorder = Recorder(name="quick")
    async with flows.open_engine(
        db_path, adapters=[adapter, recorder], lease=3.0, handlers={"slow": slow_handler}
    ) as engine:
        sends = await engine.submit_many("rec", [ask("x")] * 10, timeout=60.0)
        handled = await engine.submit("quick", ask("y"), handler="slow")
        flow_id = await engine.start_flow("test.long_call")
        await trio.sleep(20.0)  # six lease lengths: only renewal keeps them
        now = engine.now()
        flow = engine.get_flow(flow_id)
        assert flow.owner == engine.owner
        assert flow.lease_until is not None and flow.lease_until > now
        for command_id in [*sends, handled]:
            command = engine.get(command_id)
            assert command.state in ("sent", "replied")
            assert command.owner == engine.owner
            assert command.lease_until is not None and command.lease_until > now
        handler_may_end.set()
        assert (await engine.wait(handled)).state == "done"
    assert len(adapter.sent) == 11  # never taken over, never re-sent
