"""Wake-ups across processes: what another engine commits, seen at once.

An engine wakes its own dispatcher and waiters when it commits; what other
processes commit on the same database it would see only at its next poll
(``poll_interval``). A store that can tell when others commit (PostgreSQL's
LISTEN/NOTIFY: a ``ChangeFeed``) is listened to by ``relay``, one task per
engine: new work wakes the dispatcher, a command that ended elsewhere wakes
whoever waits for it here. A store that cannot (SQLite) needs no task: the
poll is all there is, and on one machine it is cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol, runtime_checkable

import attrs
import trio

from flows.notices import Notices

LISTEN_SLICE: Final = 1.0
"""Seconds a worker thread waits for a change before it asks again: how long
an abandoned wait may outlive the engine that closed."""


EVERY_ADAPTER: Final = "*"
"""In ``Changes.ready``: changes may have been missed; every adapter should look."""


@attrs.frozen
class Changes:
    """What other engines committed that someone here may wait for."""

    ready: frozenset[str] = frozenset()
    """Adapters with commands to claim (new, or back to pending)."""
    finished: tuple[tuple[str, str], ...] = ()
    """``(command id, terminal state)`` of commands that ended."""

    def __bool__(self) -> bool:
        return bool(self.ready or self.finished)


@runtime_checkable
class ChangeFeed(Protocol):
    """A store that can say when other processes commit."""

    def listen(self) -> None:
        """Start listening: changes committed from now on are told."""
        ...

    def wait_for_change(self, timeout: float) -> Changes:
        """Block (a worker thread's call) until changes come or ``timeout``
        seconds pass (then they are empty)."""
        ...


async def relay(
    store: object,
    wake_dispatcher: Callable[[], None],
    notices: Notices,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Until cancelled: wake ``wake_dispatcher`` when another process
    submits (or retries) work, and the waiters of a command another process
    ended. Started once listening, so that nothing committed after
    ``task_status.started()`` is missed; a store that is no ``ChangeFeed``
    returns at once."""
    if not isinstance(store, ChangeFeed):
        task_status.started()
        return
    await trio.to_thread.run_sync(store.listen)
    task_status.started()
    while True:
        # Abandoned on cancel: the thread ends by itself within a slice.
        changes = await trio.to_thread.run_sync(
            store.wait_for_change, LISTEN_SLICE, abandon_on_cancel=True
        )
        if changes.ready:
            wake_dispatcher()
        for command_id, _state in changes.finished:
            notices.ended_elsewhere(command_id)
