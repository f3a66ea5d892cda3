"""The cyclic garbage collector and the calls in flight.

A send in flight is about thirty objects that CPython's cyclic collector
tracks (its task and coroutines, its cancel scope and status, the command,
its request and messages, its send context), and a full collection walks
every tracked object in the process while nothing else runs: with 100,000
calls in flight it paused the engine for 0.6 to 1.3 s, and the deadlines
due meanwhile were dead-lettered that late (p99 lateness followed the
longest pause). It finds nothing there: a call's objects are freed by
reference counting when its send ends (measured: 147 unreachable objects in
all, over a run of 20,000 calls that timed out).

So while this process has sends in flight, what it holds is frozen
(``gc.freeze``, O(1): the tracked objects move to a generation no
collection walks; a frozen object is still freed when its last reference
goes), a send at a time as each starts; and when no engine in the process
has a send in flight, everything is thawed (``gc.unfreeze``), so that a
cycle that did form meanwhile (an exception kept in a frame that raised it,
say) is collected by the next full collection. What a steady stream of
calls pays is that such a cycle waits until the process is idle.

The collector is one per process, so this is too: every engine of the
process says when it starts holding sends and when it holds none.
"""

from __future__ import annotations

import gc

_holding: set[int] = set()


def holding(holder: object) -> None:
    """``holder`` (an engine's ``Held``) starts a send: freeze what the
    process holds now (the sends started before this one among it)."""
    _holding.add(id(holder))
    gc.freeze()


def idle(holder: object) -> None:
    """``holder`` has no send in flight; when no holder has, thaw."""
    _holding.discard(id(holder))
    if not _holding:
        gc.unfreeze()
