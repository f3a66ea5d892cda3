"""What the engine's parts share, and the one way they move a command.

The engine is a few parts around one store (see flows/engine.py): the
dispatcher, the send path, the keeper, the flow runner. Each is a small
class with one job; they share this ``Core``: the store and its committer,
the timers, the clock, what this engine holds in hand, who is told of
changes, and this engine's identity and lease. The ``Mover`` is the one
path from "this command should move" to "it moved, durably, and everyone
who needs to know knows": it computes the next state from the table (with
what entering that state sets, ``states.entering``), commits, and only then
acts.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import attrs
import trio

from adapters.base import Adapter
from flows import handlers as handler_registry
from flows.commit import Committer
from flows.errors import EngineClosing, StoreError
from flows.held import Held
from flows.notices import Notices
from flows.records import Command, Event
from flows.states import LostRace, entering, next_state
from flows.storage import StoreProtocol
from flows.store import Move
from flows.timers import Timers

log = logging.getLogger("dovecote")


class Clock:
    """Wall-clock time (epoch seconds) as this engine sees it: trio's clock
    plus a fixed offset, so that a ``MockClock`` moves it too."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._epoch = wall_clock() - trio.current_time()

    def now(self) -> float:
        return self._epoch + trio.current_time()

    def trio_time(self, wall: float) -> float:
        """The trio time at which the wall clock reads ``wall``."""
        return wall - self._epoch


def moved(command: Command, event: str, at: float, changes: Mapping[str, Any]) -> Command:
    """``command`` after ``event`` at ``at``: the table's next state, what
    entering it sets, then the mover's own ``changes``."""
    state = next_state(command.state, event, command_id=command.id)
    return command.changed({"state": state}, entering(state, at), changes)


class Mover:
    def __init__(self, committer: Committer, clock: Clock, notices: Notices, held: Held) -> None:
        self._committer = committer
        self._clock = clock
        self._notices = notices
        self._held = held

    async def move(
        self, command: Command, event: str, detail: Any = None, **changes: Any
    ) -> Command:
        """Commit one transition of ``command`` and act on it; ``LostRace``
        if the row moved meanwhile (nothing changed)."""
        now = self._clock.now()
        after = moved(command, event, now, changes)
        journal = await self._committer.commit(Move(command, after, event, now, detail))
        self.committed(after, journal)
        return after

    async def move_many(
        self,
        moves: Sequence[tuple[Command, str, Mapping[str, Any]]],
        detail: Any = None,
        refused: list[Command] | None = None,
    ) -> list[Command | None]:
        """Commit several transitions together; ``None`` for each one lost
        to a concurrent change or refused by the store. The refused ones (a
        full disk, say: worth trying again later) are added to ``refused``,
        as they were before the move."""
        now = self._clock.now()
        afters = [moved(c, e, now, changes) for c, e, changes in moves]
        results = await self._committer.commit_many(
            [
                Move(c, a, e, now, detail(c) if callable(detail) else detail)
                for (c, e, _), a in zip(moves, afters, strict=True)
            ]
        )
        out: list[Command | None] = []
        failed: list[tuple[str, BaseException]] = []
        for (before, _, _), after, result in zip(moves, afters, results, strict=True):
            if isinstance(result, LostRace):
                out.append(None)
            elif isinstance(result, BaseException):
                failed.append((after.id, result))
                out.append(None)
                if refused is not None:
                    refused.append(before)
            else:
                self.committed(after, result)
                out.append(after)
        if failed:
            # One line for the batch: a store that is away refuses them all.
            first_id, first = failed[0]
            more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
            log.error("could not commit a transition of %s%s: %s", first_id, more, first)
        return out

    def committed(self, command: Command, event: Event) -> None:
        """Everything that follows a committed transition of ``command``."""
        if event.from_state is not None:
            self._held.moved(command.id)
        self._notices.committed(command, event)


@attrs.define
class Core:
    """The engine's shared parts (see the module docstring)."""

    store: StoreProtocol
    committer: Committer
    timers: Timers
    clock: Clock
    notices: Notices
    held: Held
    mover: Mover
    adapters: dict[str, Adapter]
    handlers: dict[str, handler_registry.Handler]
    nursery: trio.Nursery
    owner: str
    lease: float
    poll_interval: float

    def handler(self, name: str) -> handler_registry.Handler | None:
        return self.handlers.get(name) or handler_registry.REGISTRY.get(name)

    def handler_names(self) -> set[str]:
        return set(self.handlers) | set(handler_registry.REGISTRY)

    def can_handle(self, command: Command) -> bool:
        """True when this engine can run the command's reply handler."""
        return command.handler is None or self.handler(command.handler) is not None

    def spawn(self, function: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``function(*args)`` as one of the engine's background tasks.
        A task the engine's closing catches half way just ends: what it had
        committed stands, and recovery finishes the rest next time."""
        self.nursery.start_soon(until_closing, function, *args)


async def until_closing(function: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """One background step (a send, a handler, a flow's script). If the store
    refuses its commit, the step ends and says so; what it held is found
    again by recovery (its lease runs out) and done again."""
    try:
        await function(*args)
    except EngineClosing:
        pass
    except (StoreError, sqlite3.Error) as exc:
        log.error("%s: %s", name_of(function), exc)


def name_of(function: Callable[..., Any]) -> str:
    return getattr(function, "__qualname__", None) or repr(function)
