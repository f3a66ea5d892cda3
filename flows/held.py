"""What one engine holds in memory of the commands it works on.

The pending table is the truth; this is the engine's hand on it. Three
kinds of holding, each with one owner of its entries:

* **unsent**: commands this engine submitted that have not moved yet, so
  that the dispatcher claims them without decoding their rows (bounded:
  past ``UNSENT_KEPT``, rows are decoded as for any other process's);
* **sending**: a send in flight, with what stops it: its own cancel scope
  (a send in a task of its own), or the ``SendBatch`` it is one of (an
  adapter's ``send_many``: one task, one scope for many requests, cancelled
  once none of them waits any more). A timeout, a cancel, a reply delivered
  by another path or a lease lost to another engine *stops* it (``stop``);
  its task *ends* it (``ended``), or, in a batch, its answer does
  (``answered``);
* **handling**: replied commands whose handler runs here (leased too).

Every leased command of this engine is in ``sending`` or ``handling``: the
keeper renews exactly those.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import trio

from flows import collector
from flows.records import Command

UNSENT_KEPT: Final = 10_000


class SendBatch:
    """The commands of one ``send_many`` call and the one cancel scope that
    stops it. The call is cancelled when none of them waits for an answer
    any more (each answered or stopped), so that an adapter that has nothing
    left to say is not kept running; one scope for the batch instead of one
    per command is most of what a send in flight costs (flows.sending)."""

    __slots__ = ("commands", "scope", "waiting")

    def __init__(self, commands: list[Command]) -> None:
        self.commands = commands
        self.scope = trio.CancelScope()
        self.waiting = len(commands)

    def let_go(self) -> None:
        """One of its commands waits no more."""
        self.waiting -= 1
        if self.waiting <= 0:
            self.scope.cancel()


class Held:
    def __init__(self, adapters: Iterable[str]) -> None:
        self.unsent: dict[str, Command] = {}
        self._sending: dict[str, tuple[Command, trio.CancelScope | SendBatch]] = {}
        self._per_adapter: dict[str, int] = dict.fromkeys(adapters, 0)
        self.claiming: set[str] = set()
        self.handling: set[str] = set()

    # --- unsent ----------------------------------------------------------------

    def submitted(self, command: Command) -> None:
        if len(self.unsent) < UNSENT_KEPT:
            self.unsent[command.id] = command

    def moved(self, command_id: str) -> None:
        """The command left the state it was submitted in."""
        self.unsent.pop(command_id, None)

    def known(self, command_id: str) -> Command | None:
        """The command as this engine holds it unfinished, if it does."""
        found = self.unsent.get(command_id)
        if found is None:
            in_flight = self._sending.get(command_id)
            found = in_flight[0] if in_flight else None
        return found

    # --- sending ---------------------------------------------------------------

    def room(self, adapter: str, max_in_flight: int) -> int:
        return max_in_flight - self._per_adapter[adapter]

    def start(self, command: Command) -> trio.CancelScope:
        """A claimed command's send begins; the scope that stops it. The
        collector is told of every start and end (flows.collector)."""
        scope = trio.CancelScope()
        self._sending[command.id] = (command, scope)
        self._per_adapter[command.adapter] += 1
        collector.started()
        return scope

    def start_batch(self, commands: list[Command]) -> SendBatch:
        """The sends of ``commands`` begin, as one ``send_many`` call."""
        batch = SendBatch(commands)
        for command in commands:
            self._sending[command.id] = (command, batch)
            self._per_adapter[command.adapter] += 1
            collector.started()
        return batch

    def answered(self, command: Command) -> bool:
        """A batch's answer for ``command`` came (or the batch ended without
        one): True if it still waited for it, and then its send ends here;
        False if it was stopped meanwhile or answered already."""
        in_flight = self._sending.get(command.id)
        if in_flight is None or in_flight[0] is not command:
            return False
        del self._sending[command.id]
        self._left(command)
        stopper = in_flight[1]
        assert isinstance(stopper, SendBatch), "only a batch's sends are answered"
        stopper.let_go()
        return True

    def sending(self, command_id: str) -> Command | None:
        """The command whose send is in flight here, as claimed."""
        in_flight = self._sending.get(command_id)
        return in_flight[0] if in_flight else None

    def stop(self, command_id: str, only: Command | None = None) -> bool:
        """Stop the send of ``command_id`` (only if it is still the send of
        ``only``, when given): the command moved on without it."""
        in_flight = self._sending.get(command_id)
        if in_flight is None or (only is not None and in_flight[0] is not only):
            return False
        del self._sending[command_id]
        command, stopper = in_flight
        if isinstance(stopper, SendBatch):
            # Its batch goes on for the others; this one is done here.
            self._left(command)
            stopper.let_go()
        else:
            stopper.cancel()  # its task ends it (``ended``)
        return True

    def ended(self, command: Command) -> None:
        """The send task of ``command`` (a send of its own) returned, however
        it ended."""
        in_flight = self._sending.get(command.id)
        if in_flight is not None and in_flight[0] is command:
            del self._sending[command.id]
        self._left(command)

    def _left(self, command: Command) -> None:
        self._per_adapter[command.adapter] -= 1
        collector.ended()

    def sends(self) -> dict[str, Command]:
        """The sends in flight now (a copy)."""
        return {command_id: held[0] for command_id, held in self._sending.items()}

    def holds(self, command_id: str) -> bool:
        """True when this engine still has the command in hand."""
        return command_id in self._sending or command_id in self.handling
