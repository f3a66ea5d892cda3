"""One timer for every deadline.

A command's deadline is a row in the pending table, not a sleeping task: an
engine may hold a hundred thousand of them. The ``Timers`` keep a heap of
(when, what, which command) and one task sleeps until the earliest, inside a
cancel scope that is moved whenever an earlier entry arrives. Entries are
never removed when they become moot (the reply came, the command was
cancelled): the engine checks, when one fires, whether it still applies.
That keeps scheduling O(log n) and cancellation free.

Times here are trio's clock, so that tests run on ``trio.testing.MockClock``
and a 30-second timeout takes no time and fires exactly.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Awaitable, Callable
from typing import Final

import attrs
import trio

DEADLINE: Final = "deadline"  # a sent command's reply is due
EXPIRY: Final = "expiry"  # a pending command's whole-life bound
RETRY: Final = "retry"  # a backed-off command may be sent again
RING_BATCH: Final = 1024  # most alarms handled in one ring


@attrs.frozen
class Alarm:
    when: float
    kind: str
    command_id: str
    attempt: int = 0


class Timers:
    def __init__(self, fire: Callable[[list[Alarm]], Awaitable[None]]) -> None:
        self._fire = fire
        # (when, tie-breaker, kind, command id, attempt): plain tuples
        # compare in C, and a tuple of numbers and strings is one the garbage
        # collector stops tracking. The heap holds an entry per command for
        # as long as its timeout (a minute, say): as objects, a hundred
        # thousand of them would be scanned by every full collection.
        self._heap: list[tuple[float, int, str, str, int]] = []
        self._seq = itertools.count()
        self._earlier = trio.Event()

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, when: float, kind: str, command_id: str, attempt: int = 0) -> None:
        """Ring at trio time ``when`` (already past: at the next round)."""
        entry = (when, next(self._seq), kind, command_id, attempt)
        heapq.heappush(self._heap, entry)
        if self._heap[0] is entry:
            self._earlier.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._earlier = trio.Event()
            now = trio.current_time()
            due: list[Alarm] = []
            # A bounded batch per ring: a backlog of thousands is handled in
            # rounds, so that replies and submits get turns in between.
            while self._heap and self._heap[0][0] <= now and len(due) < RING_BATCH:
                when, _, kind, command_id, attempt = heapq.heappop(self._heap)
                due.append(Alarm(when, kind, command_id, attempt))
            if due:
                await self._fire(due)
                await trio.lowlevel.checkpoint()
                continue
            next_when = self._heap[0][0] if self._heap else math.inf
            with trio.move_on_at(next_when):
                await self._earlier.wait()
