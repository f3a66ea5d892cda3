"""The keeper: time's promises and the leases that make engines share a file.

* **Alarms** (``ring``, called by flows.timers): a sent command whose
  deadline passed is dead-lettered (``timeout``, or ``expired`` when its
  whole-life bound was the deadline) and its send stopped; a pending one
  whose ``expires_at`` passed is dead (``expire``); a backed-off retry that
  is due wakes the dispatcher. Timeouts are committed together, a batch per
  ring; one the store refuses (a full disk) rings again a poll later.
* **Leases** (``run``): every third of a lease, the leases of every send in
  flight, every handler running and every flow script running here are
  renewed; a send whose lease another process took (cancelled or answered
  there) is stopped.
* **Recovery** (``recover``): work whose owner is gone (its lease lapsed, or
  its pid is gone on this host) is taken over: a ``sent`` command goes back
  to ``pending`` (a new attempt) when its adapter's ``on_interrupt`` policy
  allows and attempts are left, else it is dead (``interrupted``); a
  ``replied`` one has its handler run here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import trio

from flows.core import Core
from flows.records import Command
from flows.states import (
    EXPIRE,
    FAIL,
    PENDING,
    REASON_EXPIRED,
    REASON_INTERRUPTED,
    REASON_TIMEOUT,
    RETRY,
    SENT,
    TIMEOUT,
    LostRace,
)
from flows.store import RenewFlowLeases, RenewLeases, TakeOver, owner_is_gone
from flows.timers import DEADLINE, EXPIRY, Alarm
from flows.timers import RETRY as RETRY_ALARM

RENEW_BATCH: Final = 1024  # most leases renewed in one transaction


class Keeper:
    def __init__(
        self,
        core: Core,
        *,
        complete: Callable[[Command], Awaitable[None]],
        wake_dispatcher: Callable[[], None],
        running_flows: Callable[[], tuple[str, ...]],
        resume_flows: Callable[[], Awaitable[int]],
    ) -> None:
        self._core = core
        self._complete = complete
        self._wake_dispatcher = wake_dispatcher
        self._running_flows = running_flows
        self._resume_flows = resume_flows

    def schedule_stored(self) -> None:
        """Set the alarms of the pending commands in the file (at start)."""
        core = self._core
        for command_id, expires_at, not_before in core.store.timed_pending():
            if expires_at is not None:
                core.timers.schedule(core.clock.trio_time(expires_at), EXPIRY, command_id)
            if not_before is not None:
                core.timers.schedule(core.clock.trio_time(not_before), RETRY_ALARM, command_id)

    # --- alarms --------------------------------------------------------------

    async def ring(self, alarms: list[Alarm]) -> None:
        core = self._core
        timeouts: list[tuple[Command, str, dict[str, Any]]] = []
        for alarm in alarms:
            if alarm.kind == DEADLINE:
                command = core.held.sending(alarm.command_id)
                if command is None or command.attempt != alarm.attempt:
                    continue  # answered, cancelled or re-sent since
                expired = command.expires_at is not None and command.deadline == command.expires_at
                reason = REASON_EXPIRED if expired else REASON_TIMEOUT
                timeouts.append((command, TIMEOUT, {"reason": reason}))
            elif alarm.kind == EXPIRY:
                pending = core.store.find(alarm.command_id)
                if pending is not None and pending.state == PENDING:
                    timeouts.append((pending, EXPIRE, {"reason": REASON_EXPIRED}))
            else:
                self._wake_dispatcher()
        if not timeouts:
            return
        refused: list[Command] = []
        for after in await core.mover.move_many(timeouts, refused=refused):
            if after is not None:
                core.held.stop(after.id)
        # A timeout the store refused (a full disk) is not forgotten: its
        # alarm rings again, until the disk takes it.
        later = trio.current_time() + core.poll_interval
        for command in refused:
            if command.state == SENT:
                core.timers.schedule(later, DEADLINE, command.id, command.attempt)
            else:
                core.timers.schedule(later, EXPIRY, command.id)

    # --- leases and recovery -------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew our leases; take over what dead engines left."""
        task_status.started()
        while True:
            await trio.sleep(self._core.lease / 3)
            await self.renew_leases()
            await self.recover()
            await self._resume_flows()

    async def renew_leases(self) -> None:
        """Renew the lease of every flow this engine runs, and of every send
        in flight and handler running, a slice per transaction; stop the
        sends another process took."""
        core = self._core
        # Only sends claimed before a slice's renewal can be judged by it: a
        # claim committed later is not in ``held`` yet may be sending by the
        # time we resume.
        sending = core.held.sends()
        ids = [*sending, *core.held.handling]
        now = core.clock.now()
        until = now + core.lease
        await core.committer.commit(RenewFlowLeases(core.owner, until, self._running_flows(), now))
        for first in range(0, len(ids), RENEW_BATCH):
            chunk = tuple(ids[first : first + RENEW_BATCH])
            held = await core.committer.commit(RenewLeases(core.owner, until, chunk, now))
            for command_id in chunk:
                command = sending.get(command_id)
                if command is not None and command_id not in held:
                    # Cancelled or answered by another process: stop sending.
                    core.held.stop(command_id, only=command)

    async def recover(self) -> int:
        """Take over commands whose owner is gone; return how many."""
        core = self._core
        now = core.clock.now()
        handlers = core.handler_names()
        moves: list[tuple[Command, str, dict[str, Any]]] = []
        takeovers: list[Command] = []
        for command in core.store.abandoned(core.owner, now, owner_is_gone):
            if core.held.holds(command.id):
                continue  # ours, still in hand (its lease renewal was refused)
            if command.state == SENT:
                adapter = core.adapters.get(command.adapter)
                policy = adapter.settings.on_interrupt if adapter else "retry"
                if policy == "retry" and command.attempt < command.max_attempts:
                    changes = {"attempt": command.attempt + 1, "reason": None, "not_before": None}
                    moves.append((command, RETRY, changes))
                else:
                    moves.append((command, FAIL, {"reason": REASON_INTERRUPTED}))
            elif command.handler is None or command.handler in handlers:
                takeovers.append(command)
        await core.mover.move_many(
            moves, detail=lambda c: {"reason": REASON_INTERRUPTED, "owner": c.owner}
        )
        taken = 0
        for command in takeovers:
            lease_until = now + core.lease
            try:
                await core.committer.commit(TakeOver(command, core.owner, lease_until, now))
            except LostRace:
                continue
            taken += 1
            core.spawn(
                self._complete, attrs.evolve(command, owner=core.owner, lease_until=lease_until)
            )
        if moves:
            self._wake_dispatcher()
        return len(moves) + taken
