"""Reply handlers, registered by name.

A command stores the NAME of the handler that will receive its reply, and
JSON arguments for it, never a closure: the process that runs the handler
may not be the one that made the call (it crashed; another engine took
over). Any process that imports the module defining a handler can finish
the work.

A handler is called as ``handler(engine, command)`` once the command is
``replied``; ``command.reply`` is the reply and ``command.handler_args`` its
arguments. It may be a plain or an ``async`` function; what it returns, if
not ``None``, must be JSON and is journaled with the ``finish`` transition
(the editor bridge records its merge and conflicts there). After a crash it can
run again for the same command, so it must be idempotent: it gets the
command id to make that easy (write results keyed by it). If it raises, the
command is dead-lettered with reason ``handler_error``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from flows.engine import Engine
    from flows.records import Command

Handler = Callable[["Engine", "Command"], Awaitable[Any] | Any]
H = TypeVar("H", bound=Callable[..., Any])

REGISTRY: dict[str, Handler] = {}


def handler(name: str) -> Callable[[H], H]:
    """Register the decorated function as the reply handler called ``name``."""

    def register(fn: H) -> H:
        existing = REGISTRY.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"a different handler is already registered as {name!r}")
        REGISTRY[name] = fn
        return fn

    return register
