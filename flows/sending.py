"""The send path: a claimed command's send, its reply, its handler.

A claimed batch goes to its adapter in one of two ways:

* one ``send_many`` call for the whole batch, in one task, when the adapter
  offers it (adapters.base.BatchAdapter): each answer comes back by index and
  is acted on at once; the batch's one cancel scope (``held.SendBatch``) is
  cancelled when none of its commands waits any more;
* else one task per command (``send``), inside the cancel scope ``Held``
  keeps for it.

Either way a timeout, a cancel, a reply delivered by another path or a lease
lost to another engine stops that command's send (``Held.stop``), and what
the send returns is committed before anything acts on it:

* a reply to a command with no handler: ``sent -> replied -> done`` in one
  commit (two journal rows), queued without waiting (``Committer.commit_soon``:
  the committer acts on it once it is durable, so no task waits per reply);
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

import contextlib
import inspect
import json
import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from adapters.base import Adapter, AdapterError, Reply, RetryableError, SendContext
from flows.core import Core, moved, until_closing
from flows.errors import EngineClosing
from flows.held import Held, SendBatch
from flows.notices import Notices
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


class _Progress:
    """A send's ``report_progress``: one small object per send in flight (a
    closure was three: function, cell and tuple; a partial three as well)."""

    __slots__ = ("command_id", "notices")

    def __init__(self, notices: Notices, command_id: str) -> None:
        self.notices = notices
        self.command_id = command_id

    def __call__(self, text: str) -> None:
        self.notices.progress(self.command_id, text)


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


def batch_sender(adapter: Adapter) -> Callable[..., Any] | None:
    """The adapter's ``send_many``, if it offers one that stands for its
    ``send``: a subclass that overrides ``send`` (to record, to change what is
    sent) but not ``send_many`` is sent through its ``send``, else its
    override would be skipped without a word."""
    send_many: Callable[..., Any] | None = getattr(adapter, "send_many", None)
    mro = type(adapter).__mro__
    sends = next((cls for cls in mro if "send" in vars(cls)), None)
    batches = next((cls for cls in mro if "send_many" in vars(cls)), None)
    if sends is not None and batches is not None and sends is not batches:
        # ``send`` overridden below the ``send_many`` that would skip it.
        return None if issubclass(sends, batches) else send_many
    return send_many


class _Answers:
    """The ``answer`` a batch's ``send_many`` is given: one per batch."""

    __slots__ = ("batch", "held", "sender")

    def __init__(self, sender: Sender, held: Held, batch: SendBatch) -> None:
        self.sender = sender
        self.held = held
        self.batch = batch

    def __call__(self, index: int, answer: object) -> None:
        commands = self.batch.commands
        if type(index) is not int or not 0 <= index < len(commands):
            raise IndexError(f"send_many answered request {index!r} of {len(commands)}")
        command = commands[index]
        if self.held.answered(command):  # else it was stopped, or answered already
            self.sender.act_on(command, answer)


class _Finished:
    """What follows the commit of a reply and its finish (``commit_soon``):
    tell everyone; if the command had moved meanwhile, keep the reply."""

    __slots__ = ("core", "done", "replied")

    def __init__(self, core: Core, replied: Command, done: Command) -> None:
        self.core = core
        self.replied = replied
        self.done = done

    def __call__(self, results: list[Any]) -> None:
        (result,) = results
        core = self.core
        if isinstance(result, LostRace):
            # It stopped waiting meanwhile (timeout, cancel): keep the reply.
            reply = self.replied.reply
            assert reply is not None
            late = AddLateReply(self.done.id, reply, core.clock.now())
            with contextlib.suppress(EngineClosing):  # closing: it is lost, as late as it is
                core.committer.commit_soon([late], _logged)
        elif isinstance(result, BaseException):
            log.error("could not commit the reply to %s: %s", self.done.id, result)
        else:
            replied_event, done_event = result
            core.mover.committed(self.replied, replied_event)
            core.mover.committed(self.done, done_event)


def _logged(results: list[Any]) -> None:
    for result in results:
        if isinstance(result, BaseException):
            log.error("could not keep a late reply: %s", result)


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
        # Each adapter's ``send_many`` (or None: a task per ``send``), looked
        # up once rather than on every claimed batch.
        self._send_many = {name: batch_sender(a) for name, a in core.adapters.items()}

    def start(self, adapter: Adapter, commands: list[Command]) -> None:
        """Send ``commands`` (just claimed by this engine, for ``adapter``)
        in the background: in one ``send_many`` call if the adapter offers
        it, else a task each. They count against the adapter's room from
        now, not from when a task first runs: the dispatcher's next round
        must see them."""
        send_many = self._send_many.get(adapter.settings.name)
        if send_many is not None:
            batch = self._core.held.start_batch(commands)
            self._core.nursery.start_soon(self._send_batch, send_many, batch)
            return
        for command in commands:
            # The task is the send itself, not wrapped in ``until_closing``:
            # an engine may hold a hundred thousand sends, and each wrapper
            # was one more coroutine (about 400 bytes) for the whole wait.
            # The send commits nothing; what follows it is wrapped.
            scope = self._core.held.start(command)
            self._core.nursery.start_soon(self._send, adapter, command, scope)

    def _context(self, command: Command) -> SendContext:
        assert command.deadline is not None
        return SendContext(
            command_id=command.id,
            attempt=command.attempt,
            deadline=command.deadline,
            report_progress=_Progress(self._core.notices, command.id),
        )

    async def _send(self, adapter: Adapter, command: Command, scope: trio.CancelScope) -> None:
        core = self._core
        context = self._context(command)
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
        if reply is not None and command.handler is None:
            self._reply_and_finish(command, reply)
        else:
            await until_closing(self._settle, command, reply, failure)

    async def _send_batch(self, send_many: Callable[..., Any], batch: SendBatch) -> None:
        """One ``send_many`` call for ``batch``; its answers are acted on as
        they come (``_Answers``). Commands it leaves unanswered fail."""
        sends = [(command.request, self._context(command)) for command in batch.commands]
        failure: Exception | None = None
        try:
            with batch.scope:
                try:
                    await send_many(sends, _Answers(self, self._core.held, batch))
                except Exception as exc:
                    failure = exc
        finally:
            # Cancelled by the engine's closing, these end here unanswered.
            unanswered = [c for c in batch.commands if self._core.held.answered(c)]
            self._on_send_ended()
        if batch.scope.cancelled_caught:
            return  # none of them waited any more
        for command in unanswered:
            self.act_on(
                command,
                failure or RuntimeError("the adapter's send_many returned without answering"),
            )

    def act_on(self, command: Command, answer: object) -> None:
        """Act on what a batch's send of ``command`` came back with (its send
        has ended: ``Held.answered``)."""
        self._on_send_ended()
        if isinstance(answer, Reply):
            try:
                storable(answer, "the reply")
            except ValueError as exc:
                answer = exc
        elif not isinstance(answer, Exception):
            answer = TypeError(f"send_many answered {type(answer).__name__}, not a Reply")
        if isinstance(answer, Reply):
            if command.handler is None:
                self._reply_and_finish(command, answer)
            else:
                self._core.spawn(self._settle, command, answer, None)
        else:
            self._core.spawn(self._settle, command, None, answer)

    async def _settle(
        self, command: Command, reply: Reply | None, failure: BaseException | None
    ) -> None:
        """Commit what the send of ``command`` came back with (a reply for a
        command with a handler, or a failure)."""
        core = self._core
        if reply is not None:
            try:
                replied = await self.accept(command, reply)
            except LostRace:
                # It stopped waiting meanwhile (timeout, cancel): keep the reply.
                await core.committer.commit(AddLateReply(command.id, reply, core.clock.now()))
                return
            await self.complete(replied)
        elif failure is not None:
            await self._failed(command, failure)

    def _reply_and_finish(self, command: Command, reply: Reply) -> None:
        """sent -> replied -> done in one commit, for a command with no
        handler: both transitions journaled, one transaction, no task
        waiting for it (``_Finished`` acts on the outcome)."""
        core = self._core
        now = core.clock.now()
        replied = moved(
            command,
            REPLY,
            now,
            {"reply": reply, "replied_at": now, "cost": self.cost(command.adapter, reply)},
        )
        done = moved(replied, FINISH, now, {})
        chain = Chain((Move(command, replied, REPLY, now), Move(replied, done, FINISH, now)))
        # Closing: it stays sent, and leased; the next engine sends it again.
        with contextlib.suppress(EngineClosing):
            core.committer.commit_soon([chain], _Finished(core, replied, done))

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
