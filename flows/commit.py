"""Group commit: many transitions, one SQLite transaction.

Every task that wants a transition committed hands its operation to the
``Committer`` and waits. The committer's own task wakes once the running
tasks have queued what they have, commits the whole queue in one
transaction, and hands each waiter its own result. Under load, hundreds of
transitions share one commit; alone, a transition waits one scheduling round.

A store whose ``commit`` waits on a network (``commit_blocks``: PostgreSQL)
is given each batch in a worker thread, so that trio goes on running while
the server answers; SQLite's commit, a few hundred microseconds of local
work, runs inline, which is faster than a thread hand-off.

Waiting cannot be cancelled, on purpose: once an operation is queued it
will be committed, and a caller that was cancelled meanwhile must still
learn the outcome, or it would act as if the transition had not happened (a
reply committed as ``replied`` whose handler then never runs). The wait is
trio's lowest-level one (``wait_task_rescheduled`` with an abort that
refuses), because the committer wakes hundreds of waiters per transaction
and a cancel scope and an event for each cost more than the SQL.

A caller with nothing to do but act on the outcome need not wait at all:
``commit_soon`` queues operations with a function the committer calls with
their results once they are committed (the send path finishes a reply this
way: no task waits per reply).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import outcome
import trio

from flows.errors import EngineClosing, StoreError
from flows.operations import Group, Operation
from flows.storage import StoreProtocol

log = logging.getLogger("dovecote")

Then = Callable[[list[Any]], None]
"""What ``commit_soon`` calls with the results, in the committer's task."""


def _refuse(_: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


class Committer:
    def __init__(self, store: StoreProtocol) -> None:
        self._store = store
        self._offload = bool(getattr(store, "commit_blocks", False))
        # Each entry: operations, and the task waiting for their results (or
        # the function to call with them).
        self._queue: list[tuple[list[Operation], trio.lowlevel.Task | Then]] = []
        self._queued = trio.Event()
        self.batches = 0
        self.closed = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await self._queued.wait()
                self._queued = trio.Event()
                await self._flush()
                # Let the woken callers run (and queue their next transitions)
                # before the next batch is cut.
                await trio.lowlevel.checkpoint()
        finally:
            # The engine is closing. Its callers wait without a way out, so
            # what they queued is committed now, and later calls are refused.
            self.closed = True
            await self._flush()

    async def _flush(self) -> None:
        batch, self._queue = self._queue, []
        if not batch:
            return
        operations = [op for ops, _ in batch for op in ops]
        try:
            if self._offload:
                # Shielded: the batch has left the queue, and its waiters
                # must hear its outcome even when the engine is cancelled.
                with trio.CancelScope(shield=True):
                    results = await trio.to_thread.run_sync(self._store.commit, operations)
            else:
                results = self._store.commit(operations)
        except Exception as exc:
            # ``StoreProtocol.commit`` reports failures as results; should anything
            # still escape it, every waiter hears of it and the loop goes on.
            error = StoreError(f"could not commit: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            results = [error] * len(operations)
        self.batches += 1
        at = 0
        for ops, waiter in batch:
            mine = results[at : at + len(ops)]
            at += len(ops)
            if isinstance(waiter, trio.lowlevel.Task):
                trio.lowlevel.reschedule(waiter, outcome.Value(mine))
                continue
            try:
                waiter(mine)
            except Exception:
                # The committer must never die: what a caller does with its
                # outcome is the caller's problem.
                log.exception("acting on a commit failed")

    async def commit_many(self, operations: Sequence[Operation]) -> list[Any]:
        """Commit ``operations`` in one transaction; each result is a value
        or the exception its operation raised (not raised here)."""
        if self.closed:
            raise EngineClosing("the engine is closing: nothing more is committed")
        self._queue.append((list(operations), trio.lowlevel.current_task()))
        self._queued.set()
        results: list[Any] = await trio.lowlevel.wait_task_rescheduled(_refuse)
        return results

    def commit_soon(self, operations: Sequence[Operation], then: Then) -> None:
        """Queue ``operations`` for the next transaction and return at once;
        ``then(results)`` is called (in the committer's task, so it must not
        block) once they are committed, each result a value or the exception
        its operation raised. An engine that is closing commits what was
        queued before it closed and refuses the rest (``EngineClosing``)."""
        if self.closed:
            raise EngineClosing("the engine is closing: nothing more is committed")
        self._queue.append((list(operations), then))
        self._queued.set()

    async def commit_all(self, operations: Sequence[Operation]) -> list[Any]:
        """``commit_many``, raising the first error among the results (the
        operations that succeeded stay committed: use ``commit_together``
        when they must not)."""
        results = await self.commit_many(operations)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    async def commit_together(self, operations: Sequence[Operation]) -> list[Any]:
        """Commit ``operations`` all or none (one ``Group``): their results,
        or the first error, raised, with nothing of them committed."""
        (results,) = await self.commit_all([Group(tuple(operations))])
        return list(results)

    async def commit(self, operation: Operation) -> Any:
        """Commit one operation; raise what it raised."""
        (result,) = await self.commit_all([operation])
        return result
