"""Telling the world what was committed: waiters and subscribers.

Every committed transition passes through ``Notices.committed``: a task
waiting for that command to end is woken with the terminal command itself
(no read of the row), and every subscriber gets a ``StateChange``. Nothing
is told before the transition is durable: the engine calls this only after
the committer returns.

Nothing is built per transition that nobody asked for: with no subscriber no
notice record is made, and a waiter costs a dict entry only while a task
waits.

A subscriber reads a ``Subscription``, our own one-reader channel, rather
than a trio memory channel: a reply round commits hundreds of transitions in
a row and a memory channel's send and receive (statistics, an ordered dict
of waiting tasks, clones to count) cost a few microseconds per notice on
both sides. A subscription is a deque and at most one waiting task.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, cast

import attrs
import outcome
import trio

from flows.records import Command, Event, FlowChange, StateChange
from flows.states import TERMINAL_STATES

log = logging.getLogger("dovecote")


@attrs.frozen
class Progress:
    """Streamed partial text of a command's reply (the whole text so far)."""

    command_id: str
    text: str


Notice = StateChange | Progress | FlowChange


class Subscription(trio.abc.ReceiveChannel[Notice]):
    """The notices published since ``Notices.subscribe``, in order.

    It behaves as the receiving end of a trio memory channel whose sender is
    the engine: ``receive`` (a checkpoint; a cancelled one loses nothing),
    ``receive_nowait`` (raises ``trio.WouldBlock``), ``async for``, and
    ``trio.EndOfChannel`` once the engine stops publishing to it (the
    ``with`` block ended, or it fell ``buffer`` notices behind and was
    dropped) and what it held is read; ``trio.ClosedResourceError`` once the
    subscriber closed it. One task receives at a time: a second one waiting
    beside it gets ``trio.BusyResourceError`` (notices handed out to whoever
    asked first are a stream nobody can follow; subscribe twice instead).
    """

    __slots__ = ("_closed", "_ended", "_notices", "_room", "_waiting")

    def __init__(self, buffer: float) -> None:
        if isinstance(buffer, bool) or not (isinstance(buffer, int) or buffer == math.inf):
            raise TypeError(f"buffer must be an integer or math.inf, not {buffer!r}")
        if buffer < 0:
            raise ValueError(f"buffer must be 0 or more, not {buffer}")
        self._notices: deque[Notice] = deque()
        self._room = buffer  # notices held unread at most
        self._waiting: trio.lowlevel.Task | None = None  # the task in ``receive``
        self._ended = False  # nothing more will come: the engine let go
        self._closed = False  # the subscriber let go

    @trio.lowlevel.enable_ki_protection
    def _offer(self, notice: Notice) -> bool:
        """Hand ``notice`` to the waiting task or hold it; False when there is
        no room (the subscriber fell behind) or the subscriber has closed."""
        waiting = self._waiting
        if waiting is not None:
            self._waiting = None
            trio.lowlevel.reschedule(waiting, outcome.Value(notice))
        elif len(self._notices) < self._room and not self._closed:
            self._notices.append(notice)
        else:
            return False
        return True

    @trio.lowlevel.enable_ki_protection
    def _end(self) -> None:
        """No more notices: the reader gets what is held, then EndOfChannel."""
        self._ended = True
        self._wake(trio.EndOfChannel())

    def _wake(self, error: BaseException) -> None:
        waiting = self._waiting
        if waiting is not None:
            self._waiting = None
            trio.lowlevel.reschedule(waiting, outcome.Error(error))

    @trio.lowlevel.enable_ki_protection
    def receive_nowait(self) -> Notice:
        """The next notice, or ``trio.WouldBlock`` when none is there yet."""
        if self._notices:
            return self._notices.popleft()
        if self._closed:
            raise trio.ClosedResourceError("this subscription was closed")
        if self._ended:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    @trio.lowlevel.enable_ki_protection
    async def receive(self) -> Notice:
        """The next notice, waiting for one if need be."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            notice = self.receive_nowait()
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return notice
        if self._waiting is not None:
            raise trio.BusyResourceError("another task is already receiving from this subscription")
        task = self._waiting = trio.lowlevel.current_task()

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            # Not yet handed a notice (that would have rescheduled the task,
            # and then no abort comes): forget the task, keep every notice.
            if self._waiting is task:
                self._waiting = None
            return trio.lowlevel.Abort.SUCCEEDED

        # What ``_offer`` handed over (or the error ``_wake`` did).
        return cast(Notice, await trio.lowlevel.wait_task_rescheduled(abort))

    def clone(self) -> NoReturn:
        """Refused: a subscription has one reader (subscribe again)."""
        raise TypeError("a Subscription has one reader: subscribe again for a second one")

    @trio.lowlevel.enable_ki_protection
    def close(self) -> None:
        """Stop receiving: what is held is dropped, a waiting ``receive``
        raises ``trio.ClosedResourceError`` and the engine forgets this
        subscriber at its next notice. Not a checkpoint."""
        self._closed = True
        self._notices.clear()
        self._wake(trio.ClosedResourceError("this subscription was closed"))

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


@attrs.define
class _Waiter:
    woken: trio.Event = attrs.Factory(trio.Event)
    command: Command | None = None


class Notices:
    def __init__(self) -> None:
        # Tasks in ``wait_terminal``, by command: the event that wakes them,
        # and the terminal command itself once it is committed.
        self._waiters: dict[str, _Waiter] = {}
        # A tuple, replaced whole when someone comes or goes, so that
        # ``publish`` walks it without copying it first.
        self._subscribers: tuple[Subscription, ...] = ()
        # Called with every committed command (the flow runner follows its
        # steps' commands through it).
        self.on_command: Callable[[Command], None] = lambda command: None

    @property
    def subscribed(self) -> bool:
        """True when someone listens: only then is a notice worth making."""
        return bool(self._subscribers)

    def committed(self, command: Command, event: Event | None) -> None:
        """``command`` is as ``event`` left it, durably: wake and tell.
        (``event`` is ``None`` only for a command another process ended
        while nobody here subscribes: there is no notice to make.)"""
        if command.state in TERMINAL_STATES:
            self._wake(command)
        if event is not None and self._subscribers:
            self.publish(StateChange(command, event))
        self.on_command(command)

    def progress(self, command_id: str, text: str) -> None:
        """A send's streamed text so far: a ``Progress`` notice, made only
        when someone listens (a send reports it many times a second)."""
        if self._subscribers:
            self.publish(Progress(command_id, text))

    def ended_elsewhere(self, command: Command, event: Event | None) -> None:
        """Another process ended ``command``; ``event`` is its last journal
        row, read only when someone subscribes (flows.wakeups)."""
        self.committed(command, event)

    def _wake(self, command: Command) -> None:
        waiter = self._waiters.pop(command.id, None)
        if waiter is not None:
            waiter.command = command
            waiter.woken.set()

    def publish(self, notice: Notice) -> None:
        """Give ``notice`` to every subscriber; drop one that fell behind."""
        for subscription in self._subscribers:
            if not subscription._offer(notice):
                if not subscription._closed:
                    log.warning("dropping a subscriber that fell behind")
                self._let_go(subscription)

    def _let_go(self, subscription: Subscription) -> None:
        self._subscribers = tuple(s for s in self._subscribers if s is not subscription)
        subscription._end()

    def waited_for(self, command_id: str) -> bool:
        """True when a task waits for the command to end."""
        return command_id in self._waiters

    def look_again(self) -> None:
        """Wake every waiter to read its command's row: changes may have been
        missed (the store's announcements were cut off for a while)."""
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            waiter.woken.set()

    async def wait_terminal(self, command_id: str, timeout: float) -> Command | None:
        """The command once this engine commits it terminal, or ``None``
        after ``timeout`` seconds (another process may have ended it: the
        caller reads the row)."""
        waiter = self._waiters.setdefault(command_id, _Waiter())
        with trio.move_on_after(timeout):
            await waiter.woken.wait()
        return waiter.command

    @contextmanager
    def subscribe(self, buffer: float) -> Iterator[Subscription]:
        """A new ``Subscription`` holding at most ``buffer`` unread notices
        (``math.inf``: no bound); it ends when the ``with`` block does."""
        subscription = Subscription(buffer)
        self._subscribers = (*self._subscribers, subscription)
        try:
            yield subscription
        finally:
            self._let_go(subscription)
