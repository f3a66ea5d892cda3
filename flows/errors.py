"""The exceptions the public API raises. ``IllegalTransition`` lives beside
the state table it enforces and is re-exported here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flows.states import IllegalTransition

if TYPE_CHECKING:
    from flows.records import Command

__all__ = [
    "CommandFailed",
    "EngineClosing",
    "IllegalTransition",
    "SchemaTooNew",
    "StoreError",
    "UnknownCommand",
]


class UnknownCommand(LookupError):
    """No command has this id."""

    def __init__(self, command_id: str) -> None:
        super().__init__(f"no command with id {command_id!r}")
        self.command_id = command_id


class CommandFailed(Exception):
    """``Engine.call`` ended in ``dead`` or ``cancelled``; ``command`` says why."""

    def __init__(self, command: Command) -> None:
        why = command.reason or command.state
        detail = f": {command.error.message}" if command.error else ""
        super().__init__(f"command {command.id} ended {command.state} ({why}){detail}")
        self.command = command


class StoreError(Exception):
    """The database could not do what was asked (disk full, locked, corrupt...)."""


class EngineClosing(StoreError):
    """The engine is shutting down and commits nothing more."""


class SchemaTooNew(StoreError):
    """The file was written by a newer dovecote than this one."""
