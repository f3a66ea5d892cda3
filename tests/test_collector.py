"""The cyclic garbage collector leaves the sends in flight alone (flows.collector):
with many in flight their objects are frozen, thawed when few are, young garbage is
never frozen, and a cycle that forms meanwhile is still collected once few are."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import trio
import trio.testing

import flows
from adapters.scripted import ScriptedAdapter
from flows import collector
from tests.conftest import ask

SENDS = 2 * collector.MANY


class Knot:
    """An object in a reference cycle with itself: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


async def _all_sent(engine: flows.Engine, hanging: ScriptedAdapter) -> None:
    while hanging.calls < SENDS:
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.001)


async def test_sends_in_flight_are_frozen_and_thawed_when_they_end(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    assert gc.get_freeze_count() == 0
    hanging = ScriptedAdapter(max_in_flight=SENDS)
    async with flows.open_engine(db_path, adapters=[hanging]) as engine:
        with engine.subscribe(buffer=10 * SENDS) as notices:
            young = Knot()  # garbage when the freezing starts: not to be frozen
            young_collected = weakref.ref(young)
            del young
            await engine.submit_many("scripted", [ask("#hang\nx")] * SENDS, timeout=60)
            await _all_sent(engine, hanging)
            assert young_collected() is None
            # Each hanging send is dozens of tracked objects (its task, coroutines,
            # cancel scope, command, request): none of them is walked by a full
            # collection now.
            assert gc.get_freeze_count() >= 10 * SENDS
            knot = Knot()
            collected = weakref.ref(knot)
            del knot
            dead = 0
            async for notice in notices:
                if isinstance(notice, flows.StateChange) and notice.command.state == "dead":
                    dead += 1
                    if dead == SENDS:
                        break
            while hanging.calls and engine.store.counts() != {("scripted", "dead"): SENDS}:
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
        # Every send ended (timed out): nothing is frozen any more, and the cycle
        # made while they were in flight is collected.
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert collected() is None


async def test_closing_an_engine_with_sends_in_flight_thaws(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    hanging = ScriptedAdapter(max_in_flight=SENDS)
    async with flows.open_engine(db_path, adapters=[hanging]) as engine:
        await engine.submit_many("scripted", [ask("#hang\nx")] * SENDS, timeout=3600)
        await _all_sent(engine, hanging)
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


async def test_few_sends_in_flight_freeze_nothing(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    hanging = ScriptedAdapter(max_in_flight=collector.MANY - 1)
    async with flows.open_engine(db_path, adapters=[hanging]) as engine:
        await engine.submit_many("scripted", [ask("#hang\nx")] * SENDS, timeout=3600)
        while hanging.calls < collector.MANY - 1:
            await trio.sleep(0.001)
        assert gc.get_freeze_count() == 0


async def test_one_engine_idle_does_not_thaw_another_ones_sends(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    hanging = ScriptedAdapter(max_in_flight=SENDS)
    async with flows.open_engine(tmp_path / "a.db", adapters=[hanging]) as busy:
        await busy.submit_many("scripted", [ask("#hang\nx")] * SENDS, timeout=3600)
        await _all_sent(busy, hanging)
        async with flows.open_engine(tmp_path / "b.db") as other:
            await other.call("scripted", ask("hello"))  # a send that starts and ends
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


def test_young_garbage_is_collected_not_frozen() -> None:
    gc.collect()
    young = Knot()  # garbage the moment many sends are in flight
    collected = weakref.ref(young)
    del young
    for _ in range(collector.MANY):
        collector.started()
    try:
        assert gc.get_freeze_count() > 0
        assert collected() is None
    finally:
        for _ in range(collector.MANY):
            collector.ended()
    assert gc.get_freeze_count() == 0
