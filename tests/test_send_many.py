"""An adapter that takes a batch (``send_many``): one call per claimed batch,
answers by index as they come, each command's deadline and cancel its own,
and a hostile adapter's answers refused one by one. Where time is the subject
the tests run on trio's MockClock (SQLite: the ``db`` fixture says why)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import flows
from adapters.base import (
    AdapterSettings,
    Answer,
    PermanentError,
    Reply,
    Request,
    RetryableError,
    SendContext,
)
from adapters.scripted import ScriptedAdapter
from flows.commit import Committer
from flows.errors import EngineClosing
from flows.location import open_store
from flows.store import Note
from tests.conftest import ask

Sends = Sequence[tuple[Request, SendContext]]
Script = Callable[[Sends, Answer], Any]


class Batches:
    """A batch adapter whose behaviour each test writes (``script``), which
    records every call it gets and whether the engine cancelled it."""

    def __init__(self, script: Script, max_in_flight: int = 64) -> None:
        self.settings = AdapterSettings(name="batches", max_in_flight=max_in_flight)
        self.script = script
        self.calls: list[list[str]] = []  # each call's command ids, in order
        self.cancelled = 0

    async def send(self, request: Request, context: SendContext) -> Reply:
        raise AssertionError("a batch adapter is sent batches")

    async def send_many(self, sends: Sends, answer: Answer) -> None:
        self.calls.append([context.command_id for _, context in sends])
        try:
            await self.script(sends, answer)
        except trio.Cancelled:
            self.cancelled += 1
            raise

    async def aclose(self) -> None:
        pass


def echo(request: Request) -> Reply:
    return Reply(request.last_user_text.upper())


async def answer_all(sends: Sends, answer: Answer) -> None:
    for index, (request, _) in enumerate(sends):
        answer(index, echo(request))


async def test_a_claimed_batch_is_one_call_and_every_reply_is_committed(db: Path | str) -> None:
    adapter = Batches(answer_all)
    async with flows.open_engine(db, adapters=[adapter]) as engine:
        ids = await engine.submit_many("batches", [ask(f"q{i}") for i in range(50)])
        done = [await engine.wait(command_id) for command_id in ids]
        history = engine.store.history(ids[7])
    assert adapter.calls == [ids]  # one call, in submission order
    assert [c.state for c in done] == ["done"] * 50
    assert [c.reply.text for c in done if c.reply] == [f"Q{i}" for i in range(50)]
    assert [(e.from_state, e.to_state, e.event) for e in history] == [
        (None, "pending", "submit"),
        ("pending", "sent", "dispatch"),
        ("sent", "replied", "reply"),
        ("replied", "done", "finish"),
    ]


async def test_answers_out_of_order_and_over_time_each_end_their_own_command(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    finished_at: dict[int, float] = {}

    async def slowly(sends: Sends, answer: Answer) -> None:
        for index in (2, 0, 1):
            await trio.sleep(10)
            answer(index, echo(sends[index][0]))
            finished_at[index] = trio.current_time()

    adapter = Batches(slowly)
    async with flows.open_engine(db_path, adapters=[adapter]) as engine:
        ids = await engine.submit_many("batches", [ask("a"), ask("b"), ask("c")], timeout=60)
        first = await engine.wait(ids[2])
        # Committed while the call still runs: the others are not done yet.
        assert engine.get(ids[0]).state == "sent"
        rest = [await engine.wait(ids[0]), await engine.wait(ids[1])]
    assert first.reply and first.reply.text == "C"
    assert [c.reply.text for c in rest if c.reply] == ["A", "B"]
    assert finished_at[2] < finished_at[0] < finished_at[1]
    assert adapter.cancelled == 0  # it returned by itself, every answer given


async def test_one_timeout_does_not_stop_the_others_and_the_call_ends_when_none_waits(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def first_never(sends: Sends, answer: Answer) -> None:
        await trio.sleep(5)
        for index in range(1, len(sends)):
            answer(index, echo(sends[index][0]))
        await trio.sleep_forever()  # index 0 is never answered

    adapter = Batches(first_never)
    async with flows.open_engine(db_path, adapters=[adapter]) as engine:
        ids = await engine.submit_many("batches", [ask(f"q{i}") for i in range(4)], timeout=30)
        states = [await engine.wait(command_id) for command_id in ids]
        await trio.sleep(1)
        late = engine.store.late_replies(ids[0])
        cancelled_while_open = adapter.cancelled
    assert [c.state for c in states] == ["dead", "done", "done", "done"]
    assert states[0].reason == "timeout" and states[0].finished_at is not None
    assert late == []  # never answered: nothing late
    assert cancelled_while_open == 1  # nobody waited any more: the call was cancelled


async def test_an_answer_after_the_timeout_is_ignored(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def too_late(sends: Sends, answer: Answer) -> None:
        # "b" at once; "a" after 60 s, past its 10 s deadline (ignored then).
        late = [i for i, (request, _) in enumerate(sends) if request.last_user_text == "a"]
        for index, (request, _) in enumerate(sends):
            if index not in late:
                answer(index, echo(request))
        await trio.sleep(60)
        for index in late:
            answer(index, echo(sends[index][0]))

    adapter = Batches(too_late)
    async with flows.open_engine(db_path, adapters=[adapter]) as engine:
        [a] = await engine.submit_many("batches", [ask("a")], timeout=10)
        [b] = await engine.submit_many("batches", [ask("b")], timeout=100)
        dead, done = await engine.wait(a), await engine.wait(b)
        await trio.sleep(100)
        history = engine.store.history(a)
        late = engine.store.late_replies(a)
    assert dead.state == "dead" and dead.reason == "timeout" and done.state == "done"
    assert [e.event for e in history] == ["submit", "dispatch", "timeout"]
    assert late == []


async def test_cancel_stops_one_command_of_a_batch(db: Path | str) -> None:
    answered = trio.Event()
    go_on = trio.Event()

    async def wait_then_answer(sends: Sends, answer: Answer) -> None:
        answer(1, echo(sends[1][0]))
        answered.set()
        await go_on.wait()
        answer(0, echo(sends[0][0]))

    adapter = Batches(wait_then_answer)
    async with flows.open_engine(db, adapters=[adapter]) as engine:
        ids = await engine.submit_many("batches", [ask("a"), ask("b")])
        await answered.wait()
        await engine.cancel(ids[0])
        go_on.set()
        cancelled, done = await engine.wait(ids[0]), await engine.wait(ids[1])
    assert cancelled.state == "cancelled" and cancelled.reply is None
    assert done.state == "done"


@pytest.mark.parametrize(
    ("ending", "state", "reason", "attempt"),
    [
        (None, "dead", "error", 1),  # returned without answering: a bug in the adapter
        (RetryableError("overloaded", status=503), "pending", None, 2),
        (ValueError("the adapter broke"), "dead", "error", 1),
    ],
)
async def test_a_call_that_ends_without_answering_fails_what_it_left(
    db_path: Path,
    autojump_clock: trio.testing.MockClock,
    ending: Exception | None,
    state: str,
    reason: str | None,
    attempt: int,
) -> None:
    async def half(sends: Sends, answer: Answer) -> None:
        answer(0, echo(sends[0][0]))
        if ending is not None:
            raise ending

    adapter = Batches(half, max_in_flight=2)
    async with flows.open_engine(db_path, adapters=[adapter]) as engine:
        ids = await engine.submit_many(
            "batches", [ask("a"), ask("b")], max_attempts=3, timeout=1000
        )
        assert (await engine.wait(ids[0])).state == "done"
        with trio.move_on_after(0.1):
            await engine.wait(ids[1])  # a retry would go on: look at the row now
        left = engine.get(ids[1])
    assert (left.state, left.reason, left.attempt) == (state, reason, attempt)
    if ending is None:
        assert left.error is not None and "without answering" in left.error.message
    else:
        assert left.error is not None and left.error.message == str(ending)


@pytest.mark.parametrize(
    "hostile",
    [
        lambda answer, reply: answer(5, reply),  # no such request
        lambda answer, reply: answer(-1, reply),  # not counted from the end
        lambda answer, reply: answer("0", reply),  # not an index
        lambda answer, reply: answer(True, reply),  # a bool is no index either
    ],
    ids=["out-of-range", "negative", "string", "bool"],
)
async def test_an_answer_to_no_request_is_refused_and_answers_nothing(
    db_path: Path, autojump_clock: trio.testing.MockClock, hostile: Any
) -> None:
    refused: list[BaseException] = []

    async def wrong(sends: Sends, answer: Answer) -> None:
        try:
            hostile(answer, echo(sends[0][0]))
        except IndexError as exc:
            refused.append(exc)
        await trio.sleep(1)
        answer(0, Reply("right"))

    adapter = Batches(wrong, max_in_flight=1)
    async with flows.open_engine(db_path, adapters=[adapter]) as engine:
        [command_id] = await engine.submit_many("batches", [ask("a")])
        done = await engine.wait(command_id)
    assert len(refused) == 1
    assert done.reply is not None and done.reply.text == "right"


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (Reply("\ud800 lone surrogate"), "surrogate"),
        (Reply("ok", raw={"n": 2**70}), "9223372036854775807"),
        ("not a reply", "not a Reply"),
        (None, "not a Reply"),
    ],
    ids=["surrogate", "huge-int", "string", "none"],
)
async def test_an_unstorable_or_wrong_answer_fails_only_its_command(
    db: Path | str, bad: Any, why: str
) -> None:
    async def one_bad(sends: Sends, answer: Answer) -> None:
        answer(0, bad)
        answer(1, echo(sends[1][0]))

    adapter = Batches(one_bad)
    async with flows.open_engine(db, adapters=[adapter]) as engine:
        ids = await engine.submit_many("batches", [ask("a"), ask("b")])
        failed, done = await engine.wait(ids[0]), await engine.wait(ids[1])
    assert failed.state == "dead" and failed.reason == "error"
    assert failed.error is not None and why in failed.error.message
    assert done.state == "done"


async def test_a_second_answer_for_one_request_is_ignored(db: Path | str) -> None:
    async def twice(sends: Sends, answer: Answer) -> None:
        answer(0, Reply("first"))
        answer(0, Reply("second"))

    adapter = Batches(twice)
    async with flows.open_engine(db, adapters=[adapter]) as engine:
        [command_id] = await engine.submit_many("batches", [ask("a")])
        done = await engine.wait(command_id)
        await trio.sleep(0.05)
        late = engine.store.late_replies(command_id)
    assert done.reply is not None and done.reply.text == "first" and late == []


async def test_closing_the_engine_mid_call_leaves_the_batch_for_the_next(db: Path | str) -> None:
    started = trio.Event()

    async def forever(sends: Sends, answer: Answer) -> None:
        started.set()
        await trio.sleep_forever()

    async with flows.open_engine(db, adapters=[Batches(forever)]) as engine:
        ids = await engine.submit_many("batches", [ask(f"q{i}") for i in range(5)])
        await started.wait()
    again = Batches(answer_all)
    async with flows.open_engine(db, adapters=[again]) as engine:
        done = [await engine.wait(command_id) for command_id in ids]
    assert [c.state for c in done] == ["done"] * 5
    assert [c.attempt for c in done] == [2] * 5  # handed back on close, sent again
    assert again.calls == [ids]


async def test_the_scripted_adapter_answers_a_mixed_batch_as_it_answers_each(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Immediate, delayed, hanging, failing and malformed scripts in one
    batch end as each would alone through ``send``."""
    texts = ["teh cat", "#delay 3\nteh", "#hang\nx", "#fail 404\nx", "#delay x\nx", "#reply\nok"]

    async def each_alone() -> list[tuple[str, str | None, str | None]]:
        ends = []
        for text in texts:

            class OneByOne(ScriptedAdapter):
                send_many = None  # type: ignore[assignment]

            async with flows.open_engine(db_path, adapters=[OneByOne()]) as engine:
                command_id = await engine.submit("scripted", ask(text), timeout=10)
                command = await engine.wait(command_id)
                ends.append(
                    (command.state, command.reason, command.reply.text if command.reply else None)
                )
        return ends

    alone = await each_alone()
    db_path.unlink()
    scripted = ScriptedAdapter()
    async with flows.open_engine(db_path, adapters=[scripted]) as engine:
        ids = await engine.submit_many("scripted", [ask(t) for t in texts], timeout=10)
        batched = []
        for command_id in ids:
            command = await engine.wait(command_id)
            batched.append(
                (command.state, command.reason, command.reply.text if command.reply else None)
            )
    assert batched == alone
    assert [s for s, _, _ in batched] == ["done", "done", "dead", "dead", "dead", "done"]
    assert scripted.calls == len(texts)


# --- Committer.commit_soon ---------------------------------------------------


async def test_commit_soon_calls_back_once_committed_and_survives_a_callback_that_raises(
    db_path: Path,
) -> None:
    store = open_store(db_path)
    seen: list[Any] = []

    def boom(results: list[Any]) -> None:
        raise RuntimeError("a callback's bug")

    try:
        async with flows.open_engine(db_path) as engine:
            command_id = await engine.submit("scripted", ask("#hang\nx"))
            committer = Committer(engine.store)
            async with trio.open_nursery() as nursery:
                await nursery.start(committer.run)
                committer.commit_soon([Note(command_id, "look", 1.0)], boom)
                committer.commit_soon([Note(command_id, "look", 2.0, {"n": 2})], seen.extend)
                committer.commit_soon([Note("no-such-id", "look", 3.0)], seen.extend)
                while len(seen) < 2:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            with pytest.raises(EngineClosing):
                committer.commit_soon([Note(command_id, "look", 4.0)], seen.extend)
            notes = [e for e in engine.store.history(command_id) if e.event == "look"]
    finally:
        store.close()
    assert seen[0].detail == {"n": 2} and "no command with id" in str(seen[1])
    assert [e.at for e in notes] == [1.0, 2.0]  # the one whose callback raised is committed too


# --- a property: random batches, answers, timeouts and cancels ---------------

NEVER = None  # the adapter never answers that request


@st.composite
def plans(draw: st.DrawFn) -> list[tuple[float | None, str, bool, bool, float]]:
    """Per request: when it is answered (or never), with what, whether it is
    answered twice, whether it is cancelled at 3 s, and its timeout."""
    return draw(
        st.lists(
            st.tuples(
                st.sampled_from([0.0, 1.0, 10.0, 100.0, NEVER]),
                st.sampled_from(["reply", "retryable", "permanent", "unstorable"]),
                st.booleans(),
                st.booleans(),
                st.sampled_from([5.0, 50.0]),
            ),
            min_size=1,
            max_size=10,
        )
    )


def _expected(delay: float | None, outcome: str, cancelled: bool, timeout: float) -> str:
    answered_at = float("inf") if delay is None else delay
    if cancelled and answered_at >= 3.0:
        return "cancelled"
    if answered_at >= timeout:
        return "dead/timeout"
    return {
        "reply": "done/None",
        "retryable": "dead/retries_exhausted",
        "permanent": "dead/error",
        "unstorable": "dead/error",
    }[outcome]


@settings(max_examples=60, deadline=None)
@given(plan=plans())
def test_random_batches_end_every_command_once_as_it_would_alone(
    tmp_path_factory: pytest.TempPathFactory,
    plan: list[tuple[float | None, str, bool, bool, float]],
) -> None:
    """Whatever the batch (answers out of order, late, twice, failing, never;
    timeouts; cancels at 3 s), each command ends once, as the plan says it
    would alone; every call ends once nobody in it waits; and every send
    gives its room back (a second batch as large is sent whole)."""
    db_path = tmp_path_factory.mktemp("batches") / "dovecote.db"
    ended: list[int] = []

    def outcome(kind: str, request: Request) -> Reply | Exception:
        if kind == "reply":
            return echo(request)
        if kind == "retryable":
            return RetryableError("busy", status=503)
        if kind == "unstorable":
            return Reply("\udc00")
        return PermanentError("no", status=400)

    async def planned(sends: Sends, answer: Answer) -> None:
        # The plan's index of each request is in its text: two timeouts are two
        # submits, which may be claimed as two calls.
        mine = [(int(r.last_user_text[1:]), at) for at, (r, _) in enumerate(sends)]
        try:
            waited = 0.0
            for delay, index, at in sorted(
                (plan[i][0], i, at) for i, at in mine if plan[i][0] is not None
            ):
                await trio.sleep(delay - waited)
                waited = delay
                answer(at, outcome(plan[index][1], sends[at][0]))
                if plan[index][2]:
                    answer(at, Reply("a second answer"))
            await trio.sleep_forever()
        finally:
            ended.append(len(sends))

    async def main() -> None:
        adapter = Batches(planned, max_in_flight=len(plan))
        with trio.fail_after(10_000):  # virtual seconds: a send that keeps its room hangs
            await run(adapter)

    async def run(adapter: Batches) -> None:
        async with flows.open_engine(db_path, adapters=[adapter]) as engine:
            started = trio.current_time()
            ids = [""] * len(plan)
            for timeout in sorted({p[4] for p in plan}):
                chosen = [i for i, p in enumerate(plan) if p[4] == timeout]
                new = await engine.submit_many(
                    "batches", [ask(f"q{i}") for i in chosen], timeout=timeout, max_attempts=1
                )
                for i, command_id in zip(chosen, new, strict=True):
                    ids[i] = command_id
            await trio.sleep_until(started + 3.0)
            for index, (_, _, _, cancel, _) in enumerate(plan):
                if cancel:
                    with contextlib.suppress(flows.IllegalTransition):
                        await engine.cancel(ids[index])
            final = [await engine.wait(command_id) for command_id in ids]
            await trio.sleep(200)
            assert sum(ended) == len(plan) == sum(map(len, adapter.calls))
            for index, command in enumerate(final):
                delay, kind, _, cancel, timeout = plan[index]
                got = command.state
                if got != "cancelled":
                    got = f"{command.state}/{command.reason}"
                assert got == _expected(delay, kind, cancel, timeout), (index, plan[index])
            adapter.script = answer_all
            again = await engine.submit_many("batches", [ask("q0")] * len(plan))
            assert [(await engine.wait(c)).state for c in again] == ["done"] * len(plan)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_a_subclass_that_overrides_send_is_sent_through_it(db: Path | str) -> None:
    """An adapter subclassed to record (or change) its sends keeps its
    ``send`` in force, though the class it extends takes batches."""

    class Recording(ScriptedAdapter):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        async def send(self, request: Request, context: SendContext) -> Reply:
            self.seen.append(context.command_id)
            return await super().send(request, context)

    class Batching(Recording):
        async def send_many(self, sends: Sends, answer: Answer) -> None:
            await super().send_many(sends, answer)  # its own: batches again

    recording, batching = Recording(), Batching()
    async with flows.open_engine(db, adapters=[recording]) as engine:
        ids = await engine.submit_many("scripted", [ask("teh"), ask("a")])
        done = [await engine.wait(command_id) for command_id in ids]
    async with flows.open_engine(db, adapters=[batching]) as engine:
        [other] = await engine.submit_many("scripted", [ask("b")])
        assert (await engine.wait(other)).state == "done"
    assert sorted(recording.seen) == sorted(ids) and [c.state for c in done] == ["done"] * 2
    assert batching.seen == []  # send_many defined below send: batches
