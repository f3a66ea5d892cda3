"""The dispatcher: claims pending commands and starts their sends.

One task. Each round it asks the store, adapter by adapter, for the
commands ready to send (highest priority, then oldest; not before a
backed-off retry is due), as many as the adapter has room for
(``max_in_flight`` less the sends in flight here) and at most a batch
(``CLAIM_BATCH``, halved down to ``MIN_CLAIM_BATCH`` while other engines on
the same table win most of this one's claims: they all read the oldest
rows, and a smaller batch is read, decoded and claimed sooner); admits
those that no budget refuses and the rate limit lets through now; claims
them in one commit (``pending -> sent``, owned by this engine under a
lease, with a deadline); and hands the ones won to the send path, together
(an adapter that takes a batch gets them in one call). Claims lost to
another engine are simply not sent.

It sleeps until woken (``wake``: a submit, a send that ended, a retry that
is due, another process's submit announced by the store, flows.wakeups) or
``poll_interval`` passes (another process's submits are seen then on a
store that announces nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import trio

from adapters.base import Adapter
from flows import budget
from flows.core import Core
from flows.ratelimit import RateLimit, estimate_tokens
from flows.records import Command
from flows.states import DISPATCH, REASON_BUDGET, REFUSE
from flows.timers import DEADLINE
from flows.timers import RETRY as RETRY_ALARM

CLAIM_BATCH: Final = 1024  # most commands claimed in one dispatcher round
MIN_CLAIM_BATCH: Final = 32  # fewest, however many claims other engines win
FLOW_BUDGETS_KEPT: Final = 10_000  # flows whose budget is remembered


class Dispatcher:
    def __init__(self, core: Core, start_sends: Callable[[Adapter, list[Command]], None]) -> None:
        self._core = core
        self._start_sends = start_sends
        self._wanted = trio.Event()
        self._limits = {
            name: RateLimit(a.settings.requests_per_minute, a.settings.tokens_per_minute)
            for name, a in core.adapters.items()
            if a.settings.requests_per_minute or a.settings.tokens_per_minute
        }
        # Each flow's budget, once read: it never changes.
        self._flow_budgets: dict[str, float | None] = {}
        # How many to claim a round, by adapter: halved while other engines
        # win most of our claims (they read the same oldest rows), doubled
        # back while we win them all.
        self._batch = dict.fromkeys(core.adapters, CLAIM_BATCH)

    def wake(self) -> None:
        """Look for work now, not at the next poll."""
        self._wanted.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wanted = trio.Event()
            if await self.dispatch_once():
                await trio.lowlevel.checkpoint()
                continue
            with trio.move_on_after(self._core.poll_interval):
                await self._wanted.wait()

    async def dispatch_once(self) -> bool:
        """Claim what may be sent now; True if an adapter may have more."""
        core = self._core
        more = False
        handlers = core.handler_names()
        for name, adapter in core.adapters.items():
            room = core.held.room(name, adapter.settings.max_in_flight)
            if room <= 0:
                continue
            # A round claims a bounded batch: claiming a hundred thousand at
            # once would hold the loop (and every timer) for seconds.
            room = min(room, self._batch[name])
            now = core.clock.now()
            ready = [
                c
                for c in core.store.ready_to_send(name, now, room, handlers, core.held.unsent)
                if c.id not in core.held.claiming
            ]
            more = more or len(ready) == room
            ready = await self._within_budget(adapter, ready)
            limit = self._limits.get(name)
            if limit is not None:
                ready, more = self._within_limit(limit, ready, more)
            if not ready:
                continue
            core.held.claiming.update(c.id for c in ready)
            try:
                claims = []
                for command in ready:
                    deadline = now + command.timeout
                    if command.expires_at is not None:
                        deadline = min(deadline, command.expires_at)
                    changes = {
                        "sent_at": now,
                        "deadline": deadline,
                        "not_before": None,
                        "owner": core.owner,
                        "lease_until": now + core.lease,
                    }
                    claims.append((command, DISPATCH, changes))
                refused: list[Command] = []
                claimed = await core.mover.move_many(
                    claims, detail={"owner": core.owner}, refused=refused
                )
                if refused:
                    more = False  # the store refuses claims: wait, do not spin
            finally:
                core.held.claiming.difference_update(c.id for c in ready)
            lost = claimed.count(None) - len(refused)
            if lost * 2 > len(claimed):
                self._batch[name] = max(MIN_CLAIM_BATCH, self._batch[name] // 2)
            elif lost == 0:
                self._batch[name] = min(CLAIM_BATCH, self._batch[name] * 2)
            won = [c for c in claimed if c is not None]  # None: another engine was faster
            for command in won:
                assert command.deadline is not None
                core.timers.schedule(
                    core.clock.trio_time(command.deadline), DEADLINE, command.id, command.attempt
                )
            if won:
                self._start_sends(adapter, won)
        return more

    async def _within_budget(self, adapter: Adapter, ready: list[Command]) -> list[Command]:
        """The commands of ``ready`` that no budget refuses; the others are
        dead-lettered with reason ``budget`` (flows.budget)."""
        core = self._core
        daily = adapter.settings.budget_per_day
        if not ready:
            return ready
        if len(self._flow_budgets) > FLOW_BUDGETS_KEPT:
            self._flow_budgets.clear()  # read again when needed: a long life sees many flows
        flow_budgets = {}
        for flow_id in {c.flow_id for c in ready if c.flow_id is not None}:
            if flow_id not in self._flow_budgets:
                flow = core.store.find_flow(flow_id)
                self._flow_budgets[flow_id] = flow.budget if flow else None
            if self._flow_budgets[flow_id] is not None:
                flow_budgets[flow_id] = self._flow_budgets[flow_id]
        if daily is None and not flow_budgets:
            return ready
        name = adapter.settings.name
        now = core.clock.now()
        today = core.store.spent(name, budget.day_start(now)) if daily is not None else 0.0
        spent = {flow_id: core.store.flow_spent(flow_id) for flow_id in flow_budgets}
        admitted: list[Command] = []
        refused: list[tuple[Command, str, dict[str, Any]]] = []
        why: dict[str, Any] = {}
        for command in ready:
            estimate = budget.estimate(command.request, adapter.settings.price)
            ceiling = flow_budgets.get(command.flow_id or "")
            if daily is not None and today + estimate > daily:
                why[command.id] = {"budget": daily, "per": "day", "spent": today}
            elif ceiling is not None and spent[command.flow_id or ""] + estimate > ceiling:
                why[command.id] = {
                    "budget": ceiling,
                    "per": "flow",
                    "spent": spent[command.flow_id or ""],
                }
            else:
                admitted.append(command)
                today += estimate
                if ceiling is not None:
                    spent[command.flow_id or ""] += estimate
                continue
            why[command.id]["estimate"] = estimate
            refused.append((command, REFUSE, {"reason": REASON_BUDGET}))
        if refused:
            await core.mover.move_many(refused, detail=lambda c: why[c.id])
        return admitted

    def _within_limit(
        self, limit: RateLimit, ready: list[Command], more: bool
    ) -> tuple[list[Command], bool]:
        """The head of ``ready`` that the rate limit admits now; when it
        stops admitting, an alarm wakes the dispatcher when it will."""
        now = trio.current_time()
        for index, command in enumerate(ready):
            later = limit.admit(now, estimate_tokens(command.request))
            if later is not None:
                self._core.timers.schedule(later, RETRY_ALARM, command.id)
                return ready[:index], False
        return ready, more
