"""What one engine holds in memory of the commands it works on.

The pending table is the truth; this is the engine's hand on it. Three
kinds of holding, each with one owner of its entries:

* **unsent**: commands this engine submitted that have not moved yet, so
  that the dispatcher claims them without decoding their rows (bounded:
  past ``UNSENT_KEPT``, rows are decoded as for any other process's);
* **sending**: a send in flight, with the cancel scope that stops it. A
  timeout, a cancel, a reply delivered by another path or a lease lost to
  another engine *stops* it (``stop``); the send task itself *ends* it;
* **handling**: replied commands whose handler runs here (leased too).

Every leased command of this engine is in ``sending`` or ``handling``: the
keeper renews exactly those.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import trio

from flows.records import Command

UNSENT_KEPT: Final = 10_000


class Held:
    def __init__(self, adapters: Iterable[str]) -> None:
        self.unsent: dict[str, Command] = {}
        self._sending: dict[str, tuple[Command, trio.CancelScope]] = {}
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
        """A claimed command's send begins; the scope that stops it."""
        scope = trio.CancelScope()
        self._sending[command.id] = (command, scope)
        self._per_adapter[command.adapter] += 1
        return scope

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
        in_flight[1].cancel()
        return True

    def ended(self, command: Command) -> None:
        """The send task of ``command`` returned, however it ended."""
        in_flight = self._sending.get(command.id)
        if in_flight is not None and in_flight[0] is command:
            del self._sending[command.id]
        self._per_adapter[command.adapter] -= 1

    def sends(self) -> dict[str, Command]:
        """The sends in flight now (a copy)."""
        return {command_id: held[0] for command_id, held in self._sending.items()}

    def holds(self, command_id: str) -> bool:
        """True when this engine still has the command in hand."""
        return command_id in self._sending or command_id in self.handling
