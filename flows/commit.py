"""Group commit: many transitions, one SQLite transaction.

Every task that wants a transition committed hands its operation to the
``Committer`` and waits. The committer's own task wakes once the running
tasks have queued what they have, commits the whole queue in one
transaction, and hands each waiter its own result. Under load, hundreds of
transitions share one commit; alone, a transition waits one scheduling round.

Waiting is shielded from cancellation on purpose: once an operation is
queued it will be committed, and a caller that was cancelled meanwhile must
still learn the outcome, or it would act as if the transition had not
happened (a reply committed as ``replied`` whose handler then never runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from flows.store import Operation, Store


class _Slot:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Any = None


class Committer:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._queue: list[tuple[Operation, _Slot]] = []
        self._queued = trio.Event()
        self.batches = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._queued.wait()
            self._queued = trio.Event()
            batch, self._queue = self._queue, []
            results = self._store.commit([op for op, _ in batch])
            self.batches += 1
            for (_, slot), result in zip(batch, results, strict=True):
                slot.result = result
                slot.done.set()
            # Let the woken callers run (and queue their next transitions)
            # before the next batch is cut.
            await trio.lowlevel.checkpoint()

    async def commit_many(self, operations: Sequence[Operation]) -> list[Any]:
        """Commit ``operations`` in one transaction; each result is a value
        or the exception its operation raised (not raised here)."""
        slots = []
        for op in operations:
            slot = _Slot()
            self._queue.append((op, slot))
            slots.append(slot)
        self._queued.set()
        with trio.CancelScope(shield=True):
            for slot in slots:
                await slot.done.wait()
        return [slot.result for slot in slots]

    async def commit(self, operation: Operation) -> Any:
        """Commit one operation; raise what it raised."""
        (result,) = await self.commit_many([operation])
        if isinstance(result, BaseException):
            raise result
        return result
