"""The cyclic garbage collector and the calls in flight.

A send in flight is about thirty objects that CPython's cyclic collector
tracks (its task and coroutines, its cancel scope and status, the command,
its request and messages, its send context), and a full collection walks
every tracked object in the process while nothing else runs: with 100,000
calls in flight it paused the engine for 0.6 to 1.8 s, and the deadlines
due meanwhile were dead-lettered that late (p99 lateness followed the
longest pause). It finds nothing there: a call's objects are freed by
reference counting when its send ends (measured: 147 unreachable objects in
all, over a run of 20,000 calls that timed out).

So while the process has many sends in flight (``MANY``), what it holds is
frozen every ``MANY`` sends started (``gc.freeze``, O(1): the tracked
objects move to a generation no collection walks; a frozen object is still
freed when its last reference goes), after a collection of the young
generations, so that young garbage is not frozen with them. A full
collection then walks at most the last ``MANY`` sends. When fewer than
``MANY`` are in flight, everything is thawed (``gc.unfreeze``), so that a
cycle that formed among frozen objects meanwhile (an exception kept in a
frame it passed through, say) is collected by the next full collection:
that is what a process that always has many calls in flight pays, such
cycles wait for a quieter moment. A process with fewer than ``MANY`` in
flight never freezes anything.

``MANY`` is 256: at 1,000 HTTP calls in flight (bench.overhead) the full
collections that walk them cost dovecote 10-15% of its throughput against
raw httpx with 1,024 (0.89x, about 180 us of engine CPU a call); with 256,
0.91-0.98x and about 155 us, and the lifecycle's batches are no slower.

The collector is one per process, so this is too: every engine of the
process reports its sends' starts and ends here.
"""

from __future__ import annotations

import gc
from typing import Final

MANY: Final = 256

_in_flight = 0
_started_since_freeze = 0
_frozen = False


def started() -> None:
    """A send started somewhere in this process."""
    global _in_flight, _started_since_freeze, _frozen
    _in_flight += 1
    _started_since_freeze += 1
    if _started_since_freeze >= MANY and _in_flight >= MANY:
        gc.collect(1)
        gc.freeze()
        _started_since_freeze = 0
        _frozen = True


def ended() -> None:
    """A send ended (however it ended)."""
    global _in_flight, _started_since_freeze, _frozen
    _in_flight -= 1
    if _frozen and _in_flight < MANY:
        # Everything frozen, ours or not (a program that froze its start-up
        # objects itself sees them thawed here).
        gc.unfreeze()
        _started_since_freeze = 0
        _frozen = False
