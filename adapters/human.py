"""People as providers: a command served by a person.

A human command is sent like any other: it gets a deadline, retries, dead
letters and replay. Sending it only *asks*: ``ask(command_id, request)`` is
called (the editor bridge turns it into a ``human/ask`` notification to the
editor that owns the command) and the send then waits. The answer does not
come back through ``send``: it arrives as ``command/reply``, which the
engine matches to the command by id exactly as it would a model's reply,
and which ends the wait.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from adapters.base import AdapterSettings, Reply, Request, SendContext

Ask = Callable[[str, Request], None]


def _nobody(command_id: str, request: Request) -> None:
    """Without a bridge there is nobody to ask; the call waits for its
    deadline, or for a reply delivered by other means (``engine.deliver``)."""


class HumanAdapter:
    def __init__(self, name: str = "human", *, timeout: float = 3600.0, ask: Ask = _nobody) -> None:
        self.settings = AdapterSettings(
            name=name, max_in_flight=10_000, timeout=timeout, on_interrupt="retry"
        )
        self.ask = ask

    async def send(self, request: Request, context: SendContext) -> Reply:
        self.ask(context.command_id, request)
        await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        pass
