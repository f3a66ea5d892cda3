"""What the engine, the flows runtime, the editor bridge and the CLI need of
a store: the one interface every store implements.

``flows.store.Store`` (SQLite, the embedded default) implements it; a store
on a database server (PostgreSQL) implements the same methods with the same
promises. Nothing here may need SQLite: no file path, no connection, no
savepoint. Writes come only as batches of ``flows.operations`` records
through ``commit``; everything else reads.

The promises every implementation keeps (``tests/store_contract.py``
checks them against each one):

- **Durable before visible.** When ``commit`` returns, what it applied is
  committed: another process reading the store sees it, and a crash of this
  one does not undo it.
- **Compare-and-set.** A ``Move``, ``Chain``, ``TakeOver``, ``TakeOverFlow``,
  ``MoveFlow``, ``RecordStep`` or ``UseLateReply`` applies only if the row
  is still as the operation's ``before`` says (state, attempt, owner). If it
  moved, the operation's result is ``LostRace`` and nothing of it is
  applied. A move the state table forbids is ``IllegalTransition`` (never
  ``LostRace``), also with nothing applied.
- **Journal.** Every transition, take-over and note appends one journal row
  in the same transaction; rows are numbered (``Event.seq``) in commit
  order and never change.
- **Time.** Times in operations and arguments are the engine's epoch
  seconds. A store may keep leases on its own clock instead (a database
  server's, shared by all its engines): it then grants the lease's
  *duration* (``lease_until - at``, see flows.operations) from its own now,
  and compares lapses (``abandoned``) with its own now, ignoring ``now``.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from flows.operations import Operation
from flows.records import Command, Event, Flow, FlowStep, LateReply
from flows.snapshots import Snapshot


class StoreProtocol(Protocol):
    """A pending table with its journal, flows, late replies, snapshots
    and response cache (see the module docstring for what every method
    promises)."""

    # --- writes ------------------------------------------------------------

    def commit(self, operations: Sequence[Operation]) -> builtins.list[Any]:
        """Apply ``operations`` in one transaction, in order; one result per
        operation: its value (an ``Event`` for a journaled one), or the
        exception it raised, which does not stop the others. Each is all or
        nothing on its own, a ``Group`` as a whole. A lost compare-and-set
        is ``LostRace``, a forbidden move ``IllegalTransition``, anything
        else refused a ``StoreError``. If the transaction itself fails (disk
        full, connection lost), nothing of it is applied and each operation
        is told its own error. Raises nothing but a ``BaseException`` that is
        not an ``Exception``."""
        ...

    def close(self) -> None:
        """Release the store's connections. Nothing committed is lost."""
        ...

    # --- commands ----------------------------------------------------------

    def find(self, command_id: str) -> Command | None:
        """The command as last committed, or ``None``."""
        ...

    def get(self, command_id: str) -> Command:
        """The command as last committed; ``UnknownCommand`` if none."""
        ...

    def list(
        self,
        states: Iterable[str] | None = None,
        *,
        limit: int | None = None,
        flow_id: str | None = None,
        adapter: str | None = None,
        reason: str | None = None,
        newest_first: bool = False,
        since: float | None = None,
    ) -> builtins.list[Command]:
        """Commands matching every filter given, in id order (ids grow with
        time: oldest first, or newest first), at most ``limit``; ``since``:
        created at or after it."""
        ...

    def history(self, command_id: str) -> builtins.list[Event]:
        """The command's journal, in commit order (``seq`` ascending)."""
        ...

    def late_replies(
        self, command_id: str, *, unused_only: bool = False
    ) -> builtins.list[LateReply]:
        """Replies that came after the command stopped waiting, oldest first."""
        ...

    def dead_letters(
        self,
        *,
        reason: str | None = None,
        adapter: str | None = None,
        limit: int | None = None,
        include_replayed: bool = False,
    ) -> builtins.list[tuple[Command, str | None, int]]:
        """Dead commands in id order, each with its newest replay's id (or
        ``None``) and its count of unused late replies; by default only the
        ones not replayed yet."""
        ...

    def snapshot(self, snapshot_id: str) -> Snapshot | None:
        """The editor region a command was made about, or ``None``."""
        ...

    # --- what the engine watches -------------------------------------------

    def ready_to_send(
        self,
        adapter: str,
        now: float,
        limit: int,
        handlers: Iterable[str] | None = None,
        known: Mapping[str, Command] | None = None,
    ) -> builtins.list[Command]:
        """At most ``limit`` pending commands of ``adapter`` whose
        ``not_before`` has come, highest priority first, then oldest; with
        ``handlers``, only those with no handler or one of them. Reads only:
        the caller claims them with ``Move``s, which may lose races.
        ``known`` maps ids to commands as this process inserted them; a store
        may return those records instead of decoding rows that never moved."""
        ...

    def timed_pending(self) -> builtins.list[tuple[str, float | None, float | None]]:
        """``(id, expires_at, not_before)`` of every pending command with
        either time set, in no particular order: what the timers must watch
        after a restart."""
        ...

    def abandoned(
        self, me: str, now: float, is_gone: Callable[[str], bool]
    ) -> builtins.list[Command]:
        """Leased commands (``LEASED_STATES``) their holder lost, in id
        order: no owner, a lease lapsed before ``now``, or an owner other
        than ``me`` for which ``is_gone`` is true. ``me``'s own lapsed ones
        are included; ``is_gone`` is asked at most once per distinct owner."""
        ...

    def counts(self, states: Iterable[str] | None = None) -> dict[tuple[str, str], int]:
        """Number of commands by ``(adapter, state)``, of ``states`` only if
        given (asking for the live states must not read finished rows)."""
        ...

    # --- flows -------------------------------------------------------------

    def find_flow(self, flow_id: str) -> Flow | None:
        """The flow as last committed, or ``None``."""
        ...

    def flows(
        self, states: Iterable[str] | None = None, *, limit: int | None = None
    ) -> builtins.list[Flow]:
        """Flows in ``states`` (all if ``None``), in id order, at most ``limit``."""
        ...

    def flow_steps(self, flow_id: str) -> builtins.list[FlowStep]:
        """The flow's recorded steps, by step number."""
        ...

    def flow_history(self, flow_id: str) -> builtins.list[Event]:
        """The flow's own journal (not its commands'), in commit order."""
        ...

    def abandoned_flows(
        self, me: str, now: float, is_gone: Callable[[str], bool]
    ) -> builtins.list[Flow]:
        """Unfinished flows nobody alive runs, in id order: as ``abandoned``,
        for flows."""
        ...

    # --- cache, budgets, statistics, upkeep --------------------------------

    def cached(self, key: str, replied_since: float) -> Command | None:
        """The newest ``done`` command entered under ``key`` whose reply came
        at or after ``replied_since``, or ``None``."""
        ...

    def cache_stats(self) -> builtins.list[dict[str, Any]]:
        """Per adapter, by name: ``adapter``, ``entries``, ``served``,
        ``hits``, ``bytes``, ``oldest``."""
        ...

    def clear_cache(self, adapter: str | None = None, older_than: float | None = None) -> int:
        """Forget cache entries (of ``adapter``, made before ``older_than``),
        in one transaction; how many. The commands stay."""
        ...

    def spent(self, adapter: str, since: float) -> float:
        """The summed cost of ``adapter``'s replies received since ``since``."""
        ...

    def flow_spent(self, flow_id: str) -> float:
        """The summed cost of a flow's commands."""
        ...

    def flow_budgets(self) -> builtins.list[dict[str, Any]]:
        """Every flow with a budget, by id: ``flow``, ``name``, ``budget``,
        ``spent``."""
        ...

    def usage_totals(self, by: str) -> builtins.list[dict[str, Any]]:
        """Calls, ``done``, ``dead``, tokens and cost grouped ``by``
        ``"adapter"``, ``"flow"`` or ``"day"`` (UTC), by key."""
        ...

    def prune(self, older_than: float) -> int:
        """Delete terminal commands finished before ``older_than`` with their
        journal and late replies, in one transaction; how many commands."""
        ...
