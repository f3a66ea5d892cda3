"""Subscriptions (flows.notices): what a subscriber relies on, in real trio.

A subscription is read as a trio memory channel would be: every notice in
order, none lost to a cancelled ``receive``, the held ones before
``EndOfChannel`` when the engine lets go (the ``with`` block ended, or the
subscriber fell ``buffer`` behind), ``ClosedResourceError`` once the
subscriber closed it. The property test at the end holds it to a trio memory
channel (what subscriptions were before) over random sequences."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import ParamSpec

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import flows
from flows.notices import Notice, Notices, Progress, Subscription
from tests.conftest import ask

P = ParamSpec("P")


def bounded(test: Callable[P, Awaitable[None]]) -> Callable[P, Awaitable[None]]:
    """Fail a test whose reader waits for a notice that never comes, rather
    than hang the suite."""

    @functools.wraps(test)
    async def run(*args: P.args, **kwargs: P.kwargs) -> None:
        with trio.fail_after(10):
            await test(*args, **kwargs)

    return run


def note(i: int) -> Progress:
    return Progress(f"c{i}", str(i))


def drain(subscription: Subscription) -> list[Notice]:
    """Every notice held now, without waiting (up to its end, if it ended)."""
    got: list[Notice] = []
    while True:
        try:
            got.append(subscription.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return got


@bounded
async def test_ten_thousand_notices_arrive_in_order_to_a_waiting_reader() -> None:
    notices = Notices()
    got: list[str] = []
    with notices.subscribe(buffer=100) as subscription:
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                async for notice in subscription:
                    assert isinstance(notice, Progress)
                    got.append(notice.text)
                    if len(got) == 10_000:
                        return

            nursery.start_soon(read)
            for first in range(0, 10_000, 50):  # bursts, as a commit publishes
                await trio.testing.wait_all_tasks_blocked()
                for i in range(first, first + 50):
                    notices.publish(note(i))
    assert got == [str(i) for i in range(10_000)]


@bounded
async def test_an_unbounded_subscription_holds_everything_unread() -> None:
    notices = Notices()
    with notices.subscribe(buffer=math.inf) as subscription:
        for i in range(100_000):
            notices.publish(note(i))
        assert notices.subscribed
        assert drain(subscription) == [note(i) for i in range(100_000)]


@bounded
async def test_a_cancelled_receive_loses_no_notice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    notices = Notices()
    with notices.subscribe(buffer=10) as subscription:
        with trio.move_on_after(5) as waited:
            await subscription.receive()
        assert waited.cancelled_caught
        notices.publish(note(1))
        assert await subscription.receive() == note(1)


@pytest.mark.parametrize("cancel_first", [True, False])
@bounded
async def test_a_cancel_and_a_publish_in_one_step_lose_nothing(cancel_first: bool) -> None:
    # Both before the reader runs again. Cancelled first: the reader is told
    # Cancelled and the notice waits for its next receive. Published first:
    # the reader was handed the notice, and the cancel comes too late for it.
    notices = Notices()
    with notices.subscribe(buffer=10) as subscription:
        got: list[Notice] = []
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def read() -> None:
                with scope:
                    got.append(await subscription.receive())

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            if cancel_first:
                scope.cancel()
            notices.publish(note(1))
            scope.cancel()
        assert scope.cancelled_caught == cancel_first
        assert got == ([] if cancel_first else [note(1)])
        assert got + drain(subscription) == [note(1)]


@bounded
async def test_a_second_task_receiving_at_once_is_refused_the_first_keeps_its_place() -> None:
    notices = Notices()
    with notices.subscribe(buffer=10) as subscription:
        got: list[object] = []
        async with trio.open_nursery() as nursery:

            async def first() -> None:
                got.append(await subscription.receive())

            nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError, match="already receiving"):
                await subscription.receive()
            notices.publish(note(1))
        assert got == [note(1)]
        # One at a time, one after the other, is fine.
        notices.publish(note(2))
        assert await subscription.receive() == note(2)


@bounded
async def test_a_subscriber_that_falls_behind_gets_what_it_held_then_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notices = Notices()
    with (
        notices.subscribe(buffer=3) as slow,
        notices.subscribe(buffer=math.inf) as keeping_up,
        caplog.at_level(logging.WARNING, logger="dovecote"),
    ):
        for i in range(6):
            notices.publish(note(i))
        assert drain(slow) == [note(0), note(1), note(2)]
        with pytest.raises(trio.EndOfChannel):
            slow.receive_nowait()
        with pytest.raises(trio.EndOfChannel):
            await slow.receive()
        notices.publish(note(6))  # the dropped one is not told again
        assert drain(keeping_up) == [note(i) for i in range(7)]
    assert [r.getMessage() for r in caplog.records] == ["dropping a subscriber that fell behind"]


@bounded
async def test_a_dropped_subscriber_waiting_in_receive_is_woken_with_its_end() -> None:
    # buffer=0: only a reader already waiting can take a notice (as a trio
    # memory channel of size 0); the next one finds no room.
    notices = Notices()
    with notices.subscribe(buffer=0) as subscription:
        got: list[object] = []
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                async for notice in subscription:
                    got.append(notice)
                got.append("end")

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            notices.publish(note(1))
            notices.publish(note(2))  # the reader has not run: no room
        assert got == [note(1), "end"]
        assert not notices.subscribed


@bounded
async def test_the_end_of_the_with_block_ends_the_subscription_after_what_it_held() -> None:
    notices = Notices()
    with notices.subscribe(buffer=10) as subscription:
        notices.publish(note(1))
        notices.publish(note(2))
    assert not notices.subscribed
    notices.publish(note(3))
    assert [notice async for notice in subscription] == [note(1), note(2)]
    with pytest.raises(trio.EndOfChannel):
        subscription.receive_nowait()


@bounded
async def test_a_reader_waiting_when_the_with_block_ends_gets_end_of_channel() -> None:
    notices = Notices()
    ended = trio.Event()
    async with trio.open_nursery() as nursery:
        with notices.subscribe(buffer=10) as subscription:

            async def read() -> None:
                async for _ in subscription:
                    raise AssertionError("nothing was published")
                ended.set()

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
    assert ended.is_set()


@bounded
async def test_a_closed_subscription_refuses_receive_and_is_forgotten_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notices = Notices()
    with (
        notices.subscribe(buffer=10) as closed,
        notices.subscribe(buffer=10) as other,
        caplog.at_level(logging.WARNING, logger="dovecote"),
    ):
        notices.publish(note(1))
        closed.close()
        with pytest.raises(trio.ClosedResourceError):
            closed.receive_nowait()
        with pytest.raises(trio.ClosedResourceError):
            await closed.receive()
        notices.publish(note(2))
        assert drain(other) == [note(1), note(2)]
        closed.close()  # twice is fine
    with pytest.raises(trio.ClosedResourceError):
        closed.receive_nowait()
    assert caplog.records == []  # it did not fall behind: it left


@bounded
async def test_closing_from_another_task_wakes_the_waiting_reader() -> None:
    notices = Notices()
    with notices.subscribe(buffer=10) as subscription:
        raised: list[type[BaseException]] = []
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                try:
                    await subscription.receive()
                except trio.ClosedResourceError as e:
                    raised.append(type(e))

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            await subscription.aclose()
        assert raised == [trio.ClosedResourceError]
        notices.publish(note(1))
        assert not notices.subscribed


@bounded
async def test_publishing_from_inside_a_readers_loop() -> None:
    # A subscriber whose handling of a notice commits more (a flow's next
    # step): what it publishes comes after what is already held, in order.
    notices = Notices()
    got: list[str] = []
    with notices.subscribe(buffer=100) as subscription:
        notices.publish(note(0))
        notices.publish(note(1))
        async for notice in subscription:
            assert isinstance(notice, Progress)
            got.append(notice.text)
            if int(notice.text) <= 20:
                notices.publish(Progress("c", str(int(notice.text) + 2)))
            if len(got) == 23:
                break
    assert got == [str(i) for i in range(23)]


@bounded
async def test_every_subscriber_gets_every_notice_whatever_state_it_is_in() -> None:
    notices = Notices()
    got: list[object] = []
    with ExitStack() as stack:
        waiting, holding, unbounded = (
            stack.enter_context(notices.subscribe(buffer=b)) for b in (5, 5, math.inf)
        )
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                async for notice in waiting:
                    got.append(notice)
                    if len(got) == 5:
                        return

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            for i in range(5):
                notices.publish(note(i))
        assert got == drain(holding) == drain(unbounded) == [note(i) for i in range(5)]


async def test_buffer_must_be_a_count_or_infinity() -> None:
    notices = Notices()
    for bad in (1.5, math.nan, -math.inf, "10", True, None):
        with pytest.raises(TypeError), notices.subscribe(buffer=bad):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match="0 or more"), notices.subscribe(buffer=-1):
        pass
    assert not notices.subscribed


async def test_clone_is_refused_by_name() -> None:
    with (
        Notices().subscribe(buffer=1) as subscription,
        pytest.raises(TypeError, match="one reader"),
    ):
        subscription.clone()


async def test_no_notice_is_made_when_nobody_subscribes(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[str] = []

    def counted(command: flows.Command, event: flows.Event) -> flows.StateChange:
        made.append(event.to_state)
        return flows.StateChange(command, event)

    monkeypatch.setattr("flows.notices.StateChange", counted)
    async with flows.open_engine(db_path) as engine:
        with engine.subscribe():
            pass
        await engine.wait(await engine.submit("scripted", ask("teh")))
        assert made == []
        with engine.subscribe():
            await engine.wait(await engine.submit("scripted", ask("teh")))
        assert made == ["pending", "sent", "replied", "done"]


async def test_an_engine_subscription_sees_a_commands_life_and_ends_with_the_block(
    db_path: Path,
) -> None:
    async with flows.open_engine(db_path) as engine:
        with engine.subscribe() as subscription:
            assert isinstance(subscription, flows.Subscription)
            await engine.wait(await engine.submit("scripted", ask("teh")))
            seen = [
                n.event.to_state for n in drain(subscription) if isinstance(n, flows.StateChange)
            ]
        assert seen == ["pending", "sent", "replied", "done"]
        with pytest.raises(trio.EndOfChannel):
            await subscription.receive()
        with pytest.raises(ValueError):
            engine.subscribe(buffer=-5).__enter__()


# --- held to a trio memory channel ------------------------------------------

_steps = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(0, 2)),
        st.tuples(st.just("receive"), st.integers(0, 2)),
        st.tuples(st.just("close"), st.integers(0, 2)),
        st.tuples(st.just("leave"), st.integers(0, 2)),
    ),
    max_size=60,
)


@given(
    buffers=st.lists(st.integers(0, 4) | st.just(math.inf), min_size=3, max_size=3), steps=_steps
)
def test_subscriptions_read_as_trio_memory_channels_did(
    buffers: list[float], steps: list[tuple[str, int]]
) -> None:
    """Random publishes, reads, closes and ends of the ``with`` block over
    three subscribers: each reads what (or raises as) the memory channel that
    a subscription used to be would, the sender dropping a full or broken one."""
    notices = Notices()
    ours = [notices.subscribe(buffer=b) for b in buffers]
    subscriptions = [manager.__enter__() for manager in ours]
    channels = [trio.open_memory_channel[int](b) for b in buffers]
    live = [True] * 3  # the sender side still sends to it
    count = 0
    for step, who in steps:
        if step == "publish":
            notices.publish(note(count))
            for i, (send, _) in enumerate(channels):
                if live[i]:
                    try:
                        send.send_nowait(count)
                    except (trio.WouldBlock, trio.BrokenResourceError):
                        live[i] = False
                        send.close()
            count += 1
        elif step == "receive":
            assert _read(subscriptions[who]) == _read(channels[who][1])
        elif step == "close":
            subscriptions[who].close()
            channels[who][1].close()
        else:
            ours[who].__exit__(None, None, None)
            live[who] = False
            channels[who][0].close()
    for subscription, (_, receive) in zip(subscriptions, channels, strict=True):
        for _ in range(6):
            assert _read(subscription) == _read(receive)


def _read(channel: trio.abc.ReceiveChannel[object]) -> str:
    """What ``receive_nowait`` gives, as a comparable word."""
    try:
        got = channel.receive_nowait()  # type: ignore[attr-defined]
    except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError) as e:
        return type(e).__name__
    return got.text if isinstance(got, Progress) else str(got)
