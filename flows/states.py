"""Every rule of the command state machine, as one table.

Theory of operation
-------------------

A command is one call to a model. It is born ``pending`` in the pending
table and ends in exactly one of three terminal states: ``done`` (the reply
was matched and its handler ran), ``dead`` (a dead letter: it timed out,
failed, ran out of attempts, was cut off by a crash, or its handler failed)
or ``cancelled`` (a person or program said stop). Nothing terminal ever
changes again; to try a dead call again one *replays* it, which makes a new
``pending`` command whose ``replay_of`` names the dead one.

Between birth and end, a command moves only by *events*. The table below is
keyed ``state -> event -> next state``, in the manner of h11's ``_state.py``:
if a (state, event) pair is not in it, the move is illegal and
``IllegalTransition`` is raised. The store enforces the same rule a second
time, against other processes, with a compare-and-set on the current state;
a lost race also raises, it never overwrites.

    pending --dispatch--> sent --reply--> replied --finish--> done
    sent --retry--> pending          (retryable error, or an interrupted send)
    sent --timeout / fail--> dead    (deadline passed; permanent error,
                                      attempts exhausted, interrupted)
    replied --fail--> dead           (the reply handler raised)
    pending --expire--> dead         (its whole-life ``expires_at`` passed)
    pending, sent --cancel--> cancelled
    pending --resolve--> replied     (a replay answered from a stored late
                                      reply, or a call from the response
                                      cache, instead of calling the model)
    pending --refuse--> dead         (sending it would pass a budget)

A *flow* (several commands in a script or a declared machine) has a
machine of its own, below: ``running`` while its code runs, ``waiting``
while a step's command is out, ``stalled`` when that command was
dead-lettered (replaying it resumes the flow), and one of ``completed``,
``failed`` or ``cancelled`` at the end.

    running --wait--> waiting --resume--> running --complete--> completed
    waiting --stall--> stalled --retry--> waiting
    running, waiting, stalled --fail--> failed
    running, waiting, stalled --cancel--> cancelled

Why ``resolve`` exists: a model's reply that arrives after its command died
is kept as a *late reply*. Replaying that dead letter with the late reply
must not pretend a send happened, so the replay goes straight from
``pending`` to ``replied``, and the journal says so.

The drawings in docs/states.md are generated from these tables by
``python -m flows.diagrams``; edit the table, not the drawing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

# States of a command.
PENDING: Final = "pending"
SENT: Final = "sent"
REPLIED: Final = "replied"
DONE: Final = "done"
DEAD: Final = "dead"
CANCELLED: Final = "cancelled"

COMMAND_STATES: Final = (PENDING, SENT, REPLIED, DONE, DEAD, CANCELLED)
TERMINAL_STATES: Final = frozenset({DONE, DEAD, CANCELLED})

# Events that move a command.
DISPATCH: Final = "dispatch"
REPLY: Final = "reply"
FINISH: Final = "finish"
RETRY: Final = "retry"
TIMEOUT: Final = "timeout"
FAIL: Final = "fail"
EXPIRE: Final = "expire"
CANCEL: Final = "cancel"
RESOLVE: Final = "resolve"
REFUSE: Final = "refuse"

COMMAND_EVENTS: Final = (
    DISPATCH,
    REPLY,
    FINISH,
    RETRY,
    TIMEOUT,
    FAIL,
    EXPIRE,
    CANCEL,
    RESOLVE,
    REFUSE,
)

COMMAND_TRANSITIONS: Final[Mapping[str, Mapping[str, str]]] = {
    PENDING: {
        DISPATCH: SENT,
        EXPIRE: DEAD,
        CANCEL: CANCELLED,
        RESOLVE: REPLIED,
        REFUSE: DEAD,
    },
    SENT: {REPLY: REPLIED, RETRY: PENDING, TIMEOUT: DEAD, FAIL: DEAD, CANCEL: CANCELLED},
    REPLIED: {FINISH: DONE, FAIL: DEAD},
    DONE: {},
    DEAD: {},
    CANCELLED: {},
}

# What a state means for the columns that say who holds a command.
#
# A *leased* command is held by one engine (``owner``) until ``lease_until``:
# its send is in flight or its reply handler runs, and another engine may take
# it over only once the lease has run out (or its owner is known dead).
# Entering any other state hands the command back: owner and lease are
# cleared, so that no stale lease outlives the state that needed it. Entering
# a terminal state stamps ``finished_at``.
LEASED_STATES: Final = frozenset({SENT, REPLIED})
CANCELLABLE_STATES: Final = frozenset(
    s for s, moves in COMMAND_TRANSITIONS.items() if CANCEL in moves
)
LIVE_STATES: Final = frozenset(COMMAND_STATES) - TERMINAL_STATES


def entering(state: str, at: float) -> dict[str, Any]:
    """The columns that entering ``state`` at ``at`` sets, whatever the move:
    out of a leased state the lease goes with it; a terminal state is
    stamped with when it finished. The caller's own changes come on top
    (a claim names its owner and lease). One rule, applied by every mover,
    in the manner of h11's state-triggered transitions."""
    changes: dict[str, Any] = {}
    if state not in LEASED_STATES:
        changes["owner"] = None
        changes["lease_until"] = None
    if state in TERMINAL_STATES:
        changes["finished_at"] = at
    return changes


# States of a flow.
RUNNING: Final = "running"
WAITING: Final = "waiting"
STALLED: Final = "stalled"
COMPLETED: Final = "completed"
FAILED: Final = "failed"

FLOW_STATES: Final = (RUNNING, WAITING, STALLED, COMPLETED, FAILED, CANCELLED)
FLOW_TERMINAL_STATES: Final = frozenset({COMPLETED, FAILED, CANCELLED})

# Events that move a flow (``fail`` and ``cancel`` are shared with commands).
WAIT: Final = "wait"
RESUME: Final = "resume"
STALL: Final = "stall"
COMPLETE: Final = "complete"

FLOW_EVENTS: Final = (WAIT, RESUME, STALL, RETRY, COMPLETE, FAIL, CANCEL)

FLOW_TRANSITIONS: Final[Mapping[str, Mapping[str, str]]] = {
    RUNNING: {WAIT: WAITING, COMPLETE: COMPLETED, FAIL: FAILED, CANCEL: CANCELLED},
    WAITING: {RESUME: RUNNING, STALL: STALLED, FAIL: FAILED, CANCEL: CANCELLED},
    STALLED: {RETRY: WAITING, FAIL: FAILED, CANCEL: CANCELLED},
    COMPLETED: {},
    FAILED: {},
    CANCELLED: {},
}

# How a flow follows the command of the step it waits on: (the step's
# command became ..., the flow is ...) -> the flow's moves, in order. A step
# that ends ``done`` resumes its flow (a stalled one is first retried: a
# replay answered it); one that ends ``dead`` stalls it (a flow resumed by
# recovery onto a dead step first waits on it); a replay taking over a dead
# step retries a stalled flow. Any other pair moves nothing.
STEP_DONE: Final = "step done"
STEP_DEAD: Final = "step dead"
STEP_REPLAYED: Final = "step replayed"
FLOW_FOLLOWS_STEP: Final[Mapping[tuple[str, str], tuple[str, ...]]] = {
    (STEP_DONE, WAITING): (RESUME,),
    (STEP_DONE, STALLED): (RETRY, RESUME),
    (STEP_DEAD, RUNNING): (WAIT, STALL),
    (STEP_DEAD, WAITING): (STALL,),
    (STEP_REPLAYED, STALLED): (RETRY,),
}

# Why a command is dead or cancelled (the ``reason`` column).
REASON_TIMEOUT: Final = "timeout"
REASON_EXPIRED: Final = "expired"
REASON_ERROR: Final = "error"
REASON_RETRIES_EXHAUSTED: Final = "retries_exhausted"
REASON_INTERRUPTED: Final = "interrupted"
REASON_HANDLER_ERROR: Final = "handler_error"
REASON_CANCELLED_BY_USER: Final = "cancelled_by_user"
REASON_BUDGET: Final = "budget"  # refused before sending: it would pass a budget


class IllegalTransition(Exception):
    """A move the state table forbids, or one lost to a concurrent writer.

    ``state`` is the state the command was found in, ``event`` the move that
    was attempted."""

    def __init__(
        self, message: str, *, command_id: str | None = None, state: str = "", event: str = ""
    ) -> None:
        super().__init__(message)
        self.command_id = command_id
        self.state = state
        self.event = event


class LostRace(IllegalTransition):
    """A move the table allows, refused because the row was no longer in the
    state it was read in: another task or engine moved it first. Expected
    wherever two writers may meet (a reply racing a timeout, two engines
    taking over one lease); nothing was changed."""


def next_state(
    state: str,
    event: str,
    *,
    command_id: str | None = None,
    table: Mapping[str, Mapping[str, str]] = COMMAND_TRANSITIONS,
    what: str = "command",
) -> str:
    """The state ``event`` leads to from ``state`` in ``table`` (commands by
    default, ``FLOW_TRANSITIONS`` for flows), or ``IllegalTransition``."""
    try:
        return table[state][event]
    except KeyError:
        allowed = ", ".join(table.get(state, {})) or "nothing (terminal)"
        who = f"{what} {command_id} " if command_id else ""
        raise IllegalTransition(
            f"{who}cannot {event} from {state!r}; allowed from {state!r}: {allowed}",
            command_id=command_id,
            state=state,
            event=event,
        ) from None
