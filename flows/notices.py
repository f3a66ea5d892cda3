"""Telling the world what was committed: waiters and subscribers.

Every committed transition passes through ``Notices.committed``: a task
waiting for that command to end is woken with the terminal command itself
(no read of the row), and every subscriber gets a ``StateChange``. Nothing
is told before the transition is durable: the engine calls this only after
the committer returns.

Nothing is built per transition that nobody asked for: with no subscriber no
notice record is made, and a waiter costs a dict entry only while a task
waits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import attrs
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


@attrs.define
class _Waiter:
    woken: trio.Event = attrs.Factory(trio.Event)
    command: Command | None = None


class Notices:
    def __init__(self) -> None:
        # Tasks in ``wait_terminal``, by command: the event that wakes them,
        # and the terminal command itself once it is committed.
        self._waiters: dict[str, _Waiter] = {}
        self._subscribers: list[trio.MemorySendChannel[Notice]] = []
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
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(notice)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                log.warning("dropping a subscriber that fell behind")
                self._subscribers.remove(channel)
                channel.close()

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
    def subscribe(self, buffer: float) -> Iterator[trio.MemoryReceiveChannel[Notice]]:
        send, receive = trio.open_memory_channel[Notice](buffer)
        self._subscribers.append(send)
        try:
            yield receive
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
            send.close()
