"""The send path: a claimed command's send, its reply, its handler.

``Sender.start`` runs one send in the engine's nursery, inside the cancel
scope ``Held`` keeps for it, so that a timeout, a cancel, a reply delivered
by another path or a lease lost to another engine stops it. What the send
returns is committed before anything acts on it:

* a reply to a command with no handler: ``sent -> replied -> done`` in one
  commit (two journal rows, one transaction, one wait);
* a reply to a command with a handler: ``sent -> replied`` (leased to this
  engine), then the handler runs and the command is ``done`` with its
  result, or ``dead`` with reason ``handler_error``;
* a retryable error: back to ``pending`` with a backed-off ``not_before``
  while attempts are left, else ``dead`` (``retries_exhausted``);
* any other error: ``dead`` (``error``).

A reply that comes back after the command stopped waiting (timed out or
cancelled meanwhile: the move is a lost race) is kept as a late reply.
"""

from __future__ import annotations

import inspect
import json
import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from adapters.base import Adapter, AdapterError, Reply, RetryableError, SendContext
from flows.core import Core, moved
from flows.notices import Progress
from flows.records import Command, CommandError, storable
from flows.states import (
    FAIL,
    FINISH,
    REASON_ERROR,
    REASON_HANDLER_ERROR,
    REASON_RETRIES_EXHAUSTED,
    REPLY,
    RETRY,
    LostRace,
)
from flows.store import AddLateReply, Chain, Move
from flows.timers import RETRY as RETRY_ALARM

if TYPE_CHECKING:
    from flows.engine import Engine

log = logging.getLogger("dovecote")


@attrs.frozen
class Backoff:
    """Exponential backoff with jitter: attempt n waits a random time in
    [d/2, d] where d = base * 2**(n-1), capped. A ``Retry-After`` from the
    provider is honoured: we never come back sooner than it asks."""

    base: float = 0.5
    cap: float = 60.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        full = min(self.cap, self.base * 2.0 ** max(0, attempt - 1))
        jittered = full / 2 + rng.random() * full / 2
        return max(jittered, retry_after or 0.0, 0.0)


class Sender:
    def __init__(
        self,
        core: Core,
        engine: Engine,
        *,
        backoff: Backoff,
        rng: random.Random,
        on_send_ended: Callable[[], None],
    ) -> None:
        self._core = core
        self._engine = engine  # what a reply handler is given
        self._backoff = backoff
        self._rng = rng
        self._on_send_ended = on_send_ended

    def start(self, adapter: Adapter, command: Command) -> None:
        """Send ``command`` (just claimed by this engine) in the background.
        It counts against the adapter's room from now, not from when its
        task first runs: the dispatcher's next round must see it."""
        self._core.spawn(self._send, adapter, command, self._core.held.start(command))

    async def _send(self, adapter: Adapter, command: Command, scope: trio.CancelScope) -> None:
        core = self._core
        assert command.deadline is not None
        notices = core.notices
        context = SendContext(
            command_id=command.id,
            attempt=command.attempt,
            deadline=command.deadline,
            report_progress=lambda text: notices.publish(Progress(command.id, text)),
        )
        reply: Reply | None = None
        failure: BaseException | None = None
        try:
            with scope:
                try:
                    # A reply the store cannot hold fails the send, here,
                    # rather than every commit that would carry it.
                    reply = storable(await adapter.send(command.request, context), "the reply")
                except Exception as exc:
                    failure = exc
        finally:
            core.held.ended(command)
            self._on_send_ended()
        if scope.cancelled_caught:
            return  # timed out, cancelled or answered elsewhere: they moved it
        if reply is not None:
            try:
                if command.handler is None:
                    await self._reply_and_finish(command, reply)
                    return
                replied = await self.accept(command, reply)
            except LostRace:
                # It stopped waiting meanwhile (timeout, cancel): keep the reply.
                await core.committer.commit(AddLateReply(command.id, reply, core.clock.now()))
                return
            await self.complete(replied)
        elif failure is not None:
            await self._failed(command, failure)

    async def _reply_and_finish(self, command: Command, reply: Reply) -> None:
        """sent -> replied -> done in one commit, for a command with no
        handler: both transitions journaled, one transaction, one wait."""
        core = self._core
        now = core.clock.now()
        replied = moved(
            command,
            REPLY,
            now,
            {"reply": reply, "replied_at": now, "cost": self.cost(command.adapter, reply)},
        )
        done = moved(replied, FINISH, now, {})
        (journal,) = await core.committer.commit_all(
            [Chain((Move(command, replied, REPLY, now), Move(replied, done, FINISH, now)))]
        )
        core.mover.committed(replied, journal[0])
        core.mover.committed(done, journal[1])

    async def accept(self, command: Command, reply: Reply) -> Command:
        """sent -> replied, taking ownership for the handler."""
        core = self._core
        now = core.clock.now()
        runnable = core.can_handle(command)
        return await core.mover.move(
            command,
            REPLY,
            reply=reply,
            replied_at=now,
            cost=self.cost(command.adapter, reply),
            # An engine that cannot run the handler leaves the command for
            # one that can (no owner: any engine may take it over).
            owner=core.owner if runnable else None,
            lease_until=now + core.lease if runnable else None,
        )

    def cost(self, adapter: str, reply: Reply) -> float | None:
        known = self._core.adapters.get(adapter)
        price = known.settings.price if known else None
        return price.cost(reply.usage) if price and reply.usage else None

    async def _failed(self, command: Command, failure: BaseException) -> None:
        core = self._core
        error = CommandError(
            type=type(failure).__name__,
            message=str(failure),
            status=failure.status if isinstance(failure, AdapterError) else None,
        )
        if not isinstance(failure, AdapterError):
            log.error("adapter %s raised %r for %s", command.adapter, failure, command.id)
        try:
            if isinstance(failure, RetryableError):
                if command.attempt < command.max_attempts:
                    delay = self._backoff.delay(command.attempt, failure.retry_after, self._rng)
                    retry = await core.mover.move(
                        command,
                        RETRY,
                        {"error": error.to_json(), "delay": delay},
                        attempt=command.attempt + 1,
                        not_before=core.clock.now() + delay,
                        error=error,
                    )
                    assert retry.not_before is not None
                    core.timers.schedule(
                        core.clock.trio_time(retry.not_before), RETRY_ALARM, retry.id
                    )
                    return
                reason = REASON_RETRIES_EXHAUSTED
            else:
                reason = REASON_ERROR
            await self.dead_letter(command, reason, error)
        except LostRace:
            pass  # it was timed out or cancelled meanwhile

    async def dead_letter(self, command: Command, reason: str, error: CommandError) -> None:
        await self._core.mover.move(
            command, FAIL, {"error": error.to_json()}, reason=reason, error=error
        )

    async def complete(self, command: Command) -> None:
        """Run a replied command's handler; done, or dead with handler_error.
        Its lease is renewed meanwhile: a handler may take its time."""
        held = self._core.held
        held.handling.add(command.id)
        try:
            await self._handle(command)
        finally:
            held.handling.discard(command.id)

    async def _handle(self, command: Command) -> None:
        core = self._core
        error: CommandError | None = None
        outcome: Any = None
        if command.handler is not None:
            handler = core.handler(command.handler)
            try:
                if handler is None:
                    raise LookupError(f"no reply handler registered as {command.handler!r}")
                outcome = handler(self._engine, command)
                if inspect.isawaitable(outcome):
                    outcome = await outcome
                json.dumps(outcome)
                storable(outcome, "the handler's result")
            except Exception as exc:
                log.exception("handler %s failed for %s", command.handler, command.id)
                error = CommandError(type=type(exc).__name__, message=str(exc))
        try:
            if error is None:
                await core.mover.move(
                    command, FINISH, {"result": outcome} if outcome is not None else None
                )
            else:
                await self.dead_letter(command, REASON_HANDLER_ERROR, error)
        except LostRace:
            pass  # another engine took it over meanwhile and will finish it
