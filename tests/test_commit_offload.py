"""The committer hands a store whose commit waits on a network
(``commit_blocks``) each batch in a worker thread: trio keeps running while
the server answers, and a batch that has left the queue is always answered,
even when the engine is cancelled mid-commit. The store's commit is
held by a gate, as a slow server would hold it."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import trio

from flows.commit import Committer


class SlowStore:
    """A store whose commit first waits for ``gate`` (at most 5 s), as a
    slow server would, then answers each operation with the thread it ran
    on. The committer uses nothing of a store but ``commit``."""

    commit_blocks: ClassVar[bool] = True

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.gate_was_open = False
        self.committed: list[Any] = []

    def commit(self, operations: Any) -> list[Any]:
        self.entered.set()
        self.gate_was_open = self.gate.wait(timeout=5)
        self.committed.extend(operations)
        return [threading.get_ident() for _ in operations]


async def test_trio_runs_on_while_a_blocking_commit_waits() -> None:
    store = SlowStore()
    committer = Committer(store)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        op: Any = object()

        async def open_the_gate() -> None:
            # Runs only if the commit is not holding trio's thread.
            while not store.entered.is_set():
                await trio.sleep(0.001)
            store.gate.set()

        nursery.start_soon(open_the_gate)
        thread = await committer.commit(op)
        nursery.cancel_scope.cancel()
    assert store.gate_was_open, "the commit held trio's thread: nothing else could run"
    assert thread != threading.get_ident()
    assert store.committed == [op]


async def test_a_batch_in_flight_is_answered_when_the_engine_is_cancelled() -> None:
    store = SlowStore()
    committer = Committer(store)  # type: ignore[arg-type]
    op: Any = object()
    results: list[Any] = []
    with trio.CancelScope() as engine:
        async with trio.open_nursery() as nursery:
            await nursery.start(committer.run)

            async def submit() -> None:
                results.append(await committer.commit(op))

            nursery.start_soon(submit)
            while not store.entered.is_set():
                await trio.sleep(0.001)
            engine.cancel()  # the batch is in the worker thread now
            store.gate.set()
    assert store.committed == [op]
    assert len(results) == 1 and results[0] != threading.get_ident()
    assert committer.closed


def test_what_is_queued_as_the_engine_is_cancelled_is_still_committed() -> None:
    """Cancelled before the committer cut its batch: its closing flush hands
    the batch to the thread from inside the cancelled scope, which must not
    drop it (the waiter could never be woken: its wait is uncancellable).
    Run in a thread of its own, so that a lost batch fails the test instead
    of hanging it."""
    store = SlowStore()
    store.gate.set()
    committer = Committer(store)  # type: ignore[arg-type]
    op: Any = object()
    results: list[Any] = []

    async def main() -> None:
        with trio.CancelScope() as engine:
            async with trio.open_nursery() as nursery:
                await nursery.start(committer.run)

                async def submit() -> None:
                    engine.cancel()  # the committer is told first, then the op is queued
                    results.append(await committer.commit(op))

                nursery.start_soon(submit)

    runner = threading.Thread(target=trio.run, args=(main,), daemon=True)
    runner.start()
    runner.join(timeout=10)
    assert not runner.is_alive(), "the waiter was never answered: its batch was dropped"
    assert store.committed == [op] and len(results) == 1
