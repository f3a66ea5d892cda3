"""What the engine asks a store to commit: plain records, no SQL.

Each operation says *what* must become true (a command born, a transition,
a lease renewed); a store (``flows.storage.StoreProtocol``) says *how*, in
its own dialect: ``flows.store`` holds the SQLite statements for each kind.
Keeping the two apart is what lets a second store (PostgreSQL) commit the
very same batches the engine builds.

What an operation can check without a database it checks here, once, for
every store: a move must be one the state table allows (``check``); a
chain's moves must follow one another. What needs the database (is the row
still the one the caller read?) is each store's compare-and-set, which
raises ``LostRace`` when the row moved.

Times are the engine's (epoch seconds, ``Engine.now()``). A lease is given
as an absolute ``lease_until`` together with the ``at`` it was measured
from, so that a store that keeps leases on its own clock (a database
server's ``now()``, shared by engines on hosts with skewed clocks) grants
the same *duration*: ``after.lease_until - at`` for a claim,
``lease_until - at`` for a take-over, ``until - at`` for a renewal.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, Final

import attrs

from adapters.base import Reply
from flows.records import Command, Flow, FlowStep
from flows.snapshots import Snapshot
from flows.states import COMMAND_TRANSITIONS, FLOW_TRANSITIONS, IllegalTransition, next_state

TAKE_OVER: Final = "take over"
"""The journal's name for a take-over. Not an event of either state table,
on purpose: a take-over changes who holds a command or flow, never its
state (``from_state`` and ``to_state`` of its journal row are the same, as
for a ``Note``), so the table need not and must not allow it, and replaying
the journal's transitions still gives every current state."""


def _check_leads(
    before: Command | Flow,
    after: Command | Flow,
    event: str,
    table: Mapping[str, Mapping[str, str]],
    what: str,
) -> None:
    """``IllegalTransition`` unless ``table`` allows ``event`` from
    ``before``'s state and it leads to ``after``'s."""
    target = next_state(before.state, event, command_id=before.id, table=table, what=what)
    if target != after.state:
        raise IllegalTransition(
            f"{what} {before.id}: {event} from {before.state!r} leads to {target!r}, "
            f"not {after.state!r}",
            command_id=before.id,
            state=before.state,
            event=event,
        )


@attrs.frozen
class Insert:
    """A new command, born ``pending``, and its first journal row; with the
    snapshot of the region it is about, if any, in the same transaction.
    A flow's call records its step with it; a replay of a flow's dead step
    takes that step over (only one replay can: a second one is a
    ``LostRace``)."""

    command: Command
    detail: Any = None
    snapshot: Snapshot | None = None


@attrs.frozen
class Move:
    """A transition: ``before`` is the command as the caller last read it,
    ``after`` the command as it must become. Compare-and-set on state,
    attempt and owner, so that neither a concurrent transition nor another
    engine's takeover is ever overwritten."""

    before: Command
    after: Command
    event: str
    at: float
    detail: Any = None

    def check(self) -> None:
        """The table is enforced by the store too, not only by the engine: no
        caller can move a terminal command or journal an event that lies."""
        _check_leads(self.before, self.after, self.event, COMMAND_TRANSITIONS, "command")


@attrs.frozen
class Chain:
    """Transitions of one command in a row, each starting where the one
    before ended (``sent -> replied -> done`` for a reply with no handler):
    every one is checked and journaled, the row is written once. The
    compare-and-set is the first move's, so the chain is all or nothing."""

    moves: tuple[Move, ...]

    def check(self) -> None:
        for move, following in itertools.pairwise(self.moves):
            if following.before is not move.after:
                raise ValueError("a chain's moves must follow one another")
        for move in self.moves:
            move.check()


@attrs.frozen
class Note:
    """A journal row about a command that moves nothing: its state is the
    same before and after (``from_state = to_state``), e.g. ``final_text``,
    the person's text of a corrected region. The command must exist."""

    command_id: str
    event: str
    at: float
    detail: Any = None


@attrs.frozen
class TakeOver:
    """Become the owner of a command another engine left behind, without
    changing its state (a ``replied`` command whose handler must run again):
    compare-and-set on state, attempt and owner, journaled as ``TAKE_OVER``
    with the previous and the new owner, at ``at`` (when the lease was
    measured from)."""

    before: Command
    owner: str
    lease_until: float
    at: float


@attrs.frozen
class TakeOverFlow:
    """Become the owner of a flow whose runner is gone, to run its script
    again: compare-and-set on state and owner, journaled as ``TAKE_OVER``
    (not a transition: the flow stays in the state it was left in)."""

    before: Flow
    owner: str
    lease_until: float
    at: float


@attrs.frozen
class AddLateReply:
    """A reply that came after its command stopped waiting for it, kept for
    a person to use (``replay(use_late_reply=True)``)."""

    command_id: str
    reply: Reply
    at: float


@attrs.frozen
class UseLateReply:
    """Mark a late reply used by the replay ``used_by``: once only, a second
    use is a ``LostRace``."""

    late_reply_id: int
    used_by: str


@attrs.frozen
class RenewLeases:
    """Extend the lease of the commands ``ids`` that ``owner`` still holds;
    returns the ids it still holds, so the engine learns which ones were
    taken from it.

    By ids, not "all the owner holds", so that an engine with a hundred
    thousand calls in flight renews them a slice per transaction instead of
    stalling on one update of every row."""

    owner: str
    until: float
    ids: tuple[str, ...]
    at: float


@attrs.frozen
class RenewFlowLeases:
    """Extend the lease of the flows ``ids`` that ``owner`` runs. By ids, as
    ``RenewLeases``: a flow whose script stopped (its commit refused) is not
    renewed, so that its lease runs out and it is taken up again."""

    owner: str
    until: float
    ids: tuple[str, ...]
    at: float


@attrs.frozen
class ReleaseLeases:
    """End every lease ``owner`` holds now (a clean shutdown), so that the
    next engine takes its work over at once instead of after the lease."""

    owner: str


@attrs.frozen
class InsertFlow:
    """A new flow, born ``running``, and its first journal row; with the
    snapshot of an editor region it works on, if any."""

    flow: Flow
    snapshot: Snapshot | None = None


@attrs.frozen
class CopySteps:
    """A fork: the steps of ``source`` before ``before`` become the new
    flow's, so it reuses their replies instead of calling again."""

    source: str
    target: str
    before: int


@attrs.frozen
class MoveFlow:
    """A flow transition, compare-and-set on its state and owner, journaled.
    Only moves of ``FLOW_TRANSITIONS``: a new owner is a ``TakeOverFlow``, a
    step counted a ``RecordStep``."""

    before: Flow
    after: Flow
    event: str
    detail: Any = None

    def check(self) -> None:
        _check_leads(self.before, self.after, self.event, FLOW_TRANSITIONS, "flow")


@attrs.frozen
class RecordStep:
    """A journaled value of a flow (``now``, ``random``, a sleep's end), and
    the flow's step counter moved on to it, together: compare-and-set on the
    flow's state and owner, so that a flow cancelled or taken over meanwhile
    records nothing (``LostRace``). Not a transition, and not in the
    events journal: the ``flow_steps`` row is its record."""

    step: FlowStep
    flow: Flow


@attrs.frozen
class Group:
    """Operations that commit together or not at all: if any one raises (a
    lost compare-and-set, a value the store refuses), every one of them is
    rolled back and the group's result is that error. Its value is the list
    of its operations' results. A caller whose operations only make sense
    together says so with a group (``Committer.commit_together``); the
    operations of one batch are otherwise independent of each other."""

    operations: tuple[Operation, ...]


@attrs.frozen
class AddCacheEntry:
    """A cached call's command, entered under its key as it is submitted:
    its reply answers later calls with that key once it is ``done``."""

    key: str
    adapter: str
    command_id: str
    at: float


@attrs.frozen
class CountCacheHit:
    """One more call answered from ``command_id``'s entry (an entry cleared
    meanwhile counts nothing: the hit is served all the same)."""

    command_id: str
    at: float


Operation = (
    Group
    | AddCacheEntry
    | CountCacheHit
    | Insert
    | Move
    | Chain
    | Note
    | TakeOver
    | TakeOverFlow
    | AddLateReply
    | UseLateReply
    | RenewLeases
    | RenewFlowLeases
    | ReleaseLeases
    | InsertFlow
    | CopySteps
    | MoveFlow
    | RecordStep
)
