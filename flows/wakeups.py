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
once, with no thread left blocked; the announcements are then read without
waiting. Connecting, and reading rows, block on the network, so they run in
a worker thread. A lost connection (the server restarted) is opened again
with a growing pause; since announcements made meanwhile are lost, the
dispatcher and every waiter then look at the table themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

import trio

from flows.core import Core
from flows.errors import StoreError
from flows.records import Command, Event

if TYPE_CHECKING:
    from flows.pgstore import Changes

log = logging.getLogger("dovecote")

RECONNECT_FIRST: Final = 0.05  # seconds before listening again after a loss
RECONNECT_MOST: Final = 2.0  # the longest pause between tries


class ChangeFeed(Protocol):
    """What a store that announces changes offers (flows.pgstore)."""

    def listening(self) -> int: ...

    def wait_for_change(self, timeout: float) -> Changes: ...

    def stop_listening(self) -> None: ...


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
            try:
                await trio.lowlevel.wait_readable(fd)
                changes = self._feed.wait_for_change(0.0)
            except StoreError as exc:
                self.lost += 1
                log.warning("%s; listening again", exc)
                fd = await self._listen(first=False)
                # Announcements made while we were not listening are lost.
                self._wake_dispatcher()
                self._core.notices.look_again()
                continue
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
        if not changes.ready.isdisjoint(core.adapters):
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
