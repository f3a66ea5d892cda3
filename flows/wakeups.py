"""Wake-ups from other processes, for a store that announces its changes.

A store on a database server (PostgreSQL: LISTEN/NOTIFY) tells every
engine what the others committed: adapters that got work to claim, and
commands that ended. Without it an engine sees another process's changes
only when it polls (``poll_interval``), which is what SQLite still does.
With it:

* a command submitted by another process wakes the dispatcher at once;
* a command another process ended wakes whoever waits for it here
  (``Engine.wait``, so flows too), is told to subscribers (the editor
  bridge), and stops this engine's send of it, if one is still in flight
  (it was cancelled or answered elsewhere).

One task waits on the listening connection's descriptor in trio itself
(``trio.lowlevel.wait_readable``), so closing the engine cancels it at
once, with no thread left blocked on the connection; once it is readable,
the announcements are taken in a worker thread (they are there: it does not
wait), as are connecting and reading rows, which block on the network. A
lost connection (the server restarted) is opened again by the store, and
after it with a growing pause; since announcements made meanwhile are lost
(``EVERY_ADAPTER``), the dispatcher and every waiter then look at the table
themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final, Protocol

import attrs
import trio

from flows.core import Core
from flows.errors import StoreError
from flows.records import Command, Event

log = logging.getLogger("dovecote")

RECONNECT_FIRST: Final = 0.05  # seconds before listening again after a loss
RECONNECT_MOST: Final = 2.0  # the longest pause between tries

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


class ChangeFeed(Protocol):
    """A store that can say when other processes commit (flows.pgstore)."""

    def listening(self) -> int:
        """Listen (again, if the connection was lost); the descriptor that
        becomes readable when a change is announced."""
        ...

    def wait_for_change(self, timeout: float) -> Changes:
        """The changes announced, waiting at most ``timeout`` seconds;
        ``EVERY_ADAPTER`` ready when some may have been missed."""
        ...


def feed_of(store: object) -> ChangeFeed | None:
    """The store's announcements, if it makes any."""
    if callable(getattr(store, "listening", None)):
        return store  # type: ignore[return-value]
    return None


class Wakeups:
    def __init__(self, core: Core, feed: ChangeFeed, wake_dispatcher: Callable[[], None]) -> None:
        self._core = core
        self._feed = feed
        self._wake_dispatcher = wake_dispatcher
        self.lost = 0  # times the listening connection was lost and opened again

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Listening before ``started``: what is submitted after the engine
        # is up is announced to it.
        fd = await self._listen(first=True)
        task_status.started()
        while True:
            await trio.lowlevel.wait_readable(fd)
            # In a thread: on a lost connection the store connects again.
            changes = await trio.to_thread.run_sync(
                self._feed.wait_for_change, 0.0, abandon_on_cancel=True
            )
            if EVERY_ADAPTER in changes.ready:
                # The connection was lost: what was announced meanwhile is
                # lost too, so the dispatcher and every waiter look.
                self.lost += 1
                log.warning("stopped listening for other processes' changes; listening again")
                fd = await self._listen(first=False)
                self._wake_dispatcher()
                self._core.notices.look_again()
            if changes:
                await self._act(changes)

    async def _listen(self, *, first: bool) -> int:
        pause = RECONNECT_FIRST
        while True:
            try:
                return await trio.to_thread.run_sync(self._feed.listening, abandon_on_cancel=True)
            except StoreError as exc:
                if first:
                    raise
                log.warning("%s; trying again in %.2f s", exc, pause)
            await trio.sleep(pause)
            pause = min(pause * 2, RECONNECT_MOST)

    async def _act(self, changes: Changes) -> None:
        core = self._core
        if EVERY_ADAPTER in changes.ready or not changes.ready.isdisjoint(core.adapters):
            self._wake_dispatcher()
        if not changes.finished:
            return
        for command_id, _ in changes.finished:
            core.held.stop(command_id)  # ended elsewhere: our send is moot
        notices = core.notices
        wanted = [
            command_id
            for command_id, _ in changes.finished
            if notices.subscribed or notices.waited_for(command_id)
        ]
        if not wanted:
            return
        ended = await trio.to_thread.run_sync(self._read, wanted, notices.subscribed)
        for command, event in ended:
            notices.ended_elsewhere(command, event)

    def _read(self, ids: list[str], with_events: bool) -> list[tuple[Command, Event | None]]:
        """The ended commands, each with its last journal row when someone
        subscribes (a waiter needs the command alone)."""
        store = self._core.store
        out: list[tuple[Command, Event | None]] = []
        for command_id in ids:
            command = store.find(command_id)
            if command is None or not command.is_terminal:
                continue  # pruned meanwhile, or replayed: nothing to tell
            history = store.history(command_id) if with_events else []
            out.append((command, history[-1] if history else None))
        return out
