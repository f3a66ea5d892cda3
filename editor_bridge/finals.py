"""What the person finally kept of a corrected region: the ``final_text`` event.

A correction's reply is merged into its region and the command is ``done``;
but what the person does next says whether the model was right. So the
region stays live in the mirror after its edit is applied, and its text is
journaled on the command, once, as ``final_text`` ``{text}`` when:

* the document is saved (``document/save``),
* the document is closed (``document/close``, or its last client goes), or
* the region has been left alone for ``idle`` seconds (no change touched it).

Then the region is let go. ``dovecote export --format preference`` reads
these events (flows/datasets.py). Deadlines are on trio's clock, so a test
can move time with a ``MockClock``.

The journal write waits for the committer, and the methods that settle a
region never wait (they run inline, in the editor's order): so they take the
text at once and hand it to ``run``'s task, which writes it.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Final

import attrs
import trio

from editor_bridge.mirror import Mirror
from flows.datasets import FINAL_TEXT

log = logging.getLogger("dovecote.bridge")

IDLE: Final = 60.0
"""Seconds a corrected region is left alone before its text counts as final."""


@attrs.define
class _Watched:
    command_id: str
    uri: str
    idle_at: float


class FinalTexts:
    def __init__(self, mirror: Mirror, engine: Any, idle: float = IDLE) -> None:
        self.mirror = mirror
        self.engine = engine
        self.idle = idle
        self.watched: dict[str, _Watched] = {}
        """By the region's key in the mirror (its snapshot's id)."""
        self._send, self._receive = trio.open_memory_channel[tuple[str, str]](math.inf)
        self._moved = trio.Event()

    def watch(self, key: str, command_id: str, uri: str) -> None:
        """Keep the corrected region ``key`` live until its final text is recorded."""
        self.watched[key] = _Watched(command_id, uri, trio.current_time() + self.idle)
        self._wake()

    def touched(self, keys: set[str]) -> None:
        """A change met these regions: their idle time starts again."""
        for key in keys & self.watched.keys():
            self.watched[key].idle_at = trio.current_time() + self.idle
        self._wake()

    def settle(self, uri: str) -> None:
        """Record the final text of every corrected region of ``uri`` (saved, closing)."""
        for key in [k for k, w in self.watched.items() if w.uri == uri]:
            self._record(key)

    def _record(self, key: str) -> None:
        watched = self.watched.pop(key)
        document = self.mirror.documents.get(watched.uri)
        region = document.regions.get(key) if document else None
        if document is not None and region is not None:
            self._send.send_nowait((watched.command_id, document.slice(*region)))
        self.mirror.untrack(watched.uri, key)

    def _wake(self) -> None:
        self._moved.set()
        self._moved = trio.Event()

    async def run(self) -> None:
        """Record idle regions as their time comes, and write what is recorded."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write)
            while True:
                now = trio.current_time()
                for key in [k for k, w in self.watched.items() if w.idle_at <= now]:
                    self._record(key)
                soonest = min((w.idle_at for w in self.watched.values()), default=math.inf)
                with trio.move_on_at(soonest):
                    await self._moved.wait()

    async def _write(self) -> None:
        async for command_id, text in self._receive:
            await self._note(command_id, text)

    async def drain(self) -> None:
        """Write what is recorded and not yet written, now: a client that
        goes (and may take the server with it) loses no final text."""
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            while True:
                try:
                    command_id, text = self._receive.receive_nowait()
                except trio.WouldBlock:
                    return
                await self._note(command_id, text)

    async def _note(self, command_id: str, text: str) -> None:
        try:
            await self.engine.note(command_id, FINAL_TEXT, {"text": text})
        except Exception:  # one lost event, not the bridge
            log.exception("could not record the final text of %s", command_id)
