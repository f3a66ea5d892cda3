"""The editing session that closes ``dovecote demo``.

A person asks for corrections of a paragraph, then keeps typing while the
model thinks: before the paragraph, inside it, after it, and once right
over a word the model is fixing. The session runs through a real server
(in this process, over a memory stream, speaking the same JSON-RPC as an
editor) and prints the document before and after, with the model's merged
edits in ⟦ ⟧ and the collision in ⟪ ⟫.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any, TextIO

import trio
import trio.testing

from editor_bridge.rpc import Connection
from editor_bridge.server import Server
from flows.engine import Engine

URI = "buffer://letter"
LETTER = (
    "Dear Ann,\n"
    "I recieve your letter and beleive every word. Teh garden is wierd in winter.\n"
    "See you soon, Bob\n"
)


class Person:
    """An editor's side: a document copy, a version, and the edits applied."""

    def __init__(self) -> None:
        self.text = LETTER
        self.version = 1
        self.applied: list[dict[str, Any]] = []
        self.connection: Connection | None = None

    async def handle(
        self,
        connection: Connection,
        method: str,
        params: Any,
        request: bool,
        ready: Callable[[], None],
    ) -> Any:
        ready()
        if method != "document/applyEdit":
            return None
        if params["version"] != self.version:
            return {"applied": False}
        for edit in params["edits"]:  # last first: each refers to the text before
            self.text = self.text[: edit["start"]] + edit["text"] + self.text[edit["end"] :]
            self.applied.append(edit)
        self.version += 1
        connection.notify(
            "document/change", {"uri": URI, "version": self.version, "changes": params["edits"]}
        )
        return {"applied": True}

    async def type(self, at: str, replacement: str, *, after: bool = False) -> None:
        assert self.connection is not None
        start = self.text.index(at) + (len(at) if after else 0)
        end = start if after or not at else start + len(at)
        if not at:
            start = end = 0
        self.text = self.text[:start] + replacement + self.text[end:]
        self.version += 1
        self.connection.notify(
            "document/change",
            {
                "uri": URI,
                "version": self.version,
                "changes": [{"start": start, "end": end, "text": replacement}],
            },
        )


async def editing_session(engine: Engine, out: TextIO = sys.stdout) -> None:
    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    server = Server(engine)
    person = Person()
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        nursery.start_soon(partial(server.serve, server_end, server_end, needs_token=False))
        connection = Connection(client_end, client_end, person.handle)
        person.connection = connection
        nursery.start_soon(connection.run)
        await connection.request("initialize", {"clientInfo": {"name": "demo"}}, 10)
        connection.notify("document/open", {"uri": URI, "version": 1, "text": LETTER})
        start = LETTER.index("I recieve")
        end = LETTER.index("\nSee you")
        say("5. An editing session through the JSON-RPC server. The document:")
        say()
        say(_indent(LETTER))
        say("   The person asks for corrections of the second line (the model takes 1 s),")
        say("   then types before, inside and after it, and over 'wierd' (the model fixes")
        say("   it too: a collision).")
        result = await connection.request(
            "command/submit",
            {
                "adapter": "scripted",
                "request": {
                    "system": "Correct the spelling. Change nothing else.",
                    "messages": [{"role": "user", "content": "#delay 1\n" + LETTER[start:end]}],
                },
                "target": {"uri": URI, "start": start, "end": end},
                "onConflict": "drop",
            },
            10,
        )
        command_id = result["commandId"]
        await trio.sleep(0.2)
        await person.type("", "Hi! ")
        await person.type("every word", "each word")
        await person.type("wierd", "odd")
        await person.type("See you soon", " at noon", after=True)
        await engine.wait(command_id)
        with trio.move_on_after(2):
            while not person.applied:
                await trio.sleep(0.05)
        shown = await connection.request("command/show", {"commandId": command_id}, 10)
        nursery.cancel_scope.cancel()
    say()
    say("   After (the model's edits merged in ⟦ ⟧, the collision in ⟪ ⟫):")
    say()
    say(_indent(_marked(person.text, person.applied, shown.get("conflicts", []))))
    for conflict in shown.get("conflicts", []):
        say(
            f"   Collision: the person wrote {conflict['ours']!r} where the model wanted "
            f"{conflict['theirs']!r} (was {conflict['base']!r});\n"
            "   policy 'drop' kept the person's text and recorded the conflict."
        )
    say(f"   Every keystroke kept; the command is {engine.get(command_id).state}.")


def _marked(text: str, edits: list[dict[str, Any]], conflicts: list[dict[str, Any]]) -> str:
    """``text`` with each applied edit's new text in ⟦ ⟧ and each kept
    conflict (the person's text) in ⟪ ⟫."""
    spans: list[tuple[int, int, str, str]] = []
    # The edits were applied last first, so their starts refer to the text
    # as it is now once shifted by the edits applied before them (later ones).
    shift = 0
    for edit in reversed(edits):
        begin = edit["start"] + shift
        spans.append((begin, begin + len(edit["text"]), "⟦", "⟧"))
        shift += len(edit["text"]) - (edit["end"] - edit["start"])
    for conflict in conflicts:
        at = text.find(conflict["ours"])
        if at >= 0:
            spans.append((at, at + len(conflict["ours"]), "⟪", "⟫"))
    for begin, finish, left, right in sorted(spans, reverse=True):
        text = text[:begin] + left + text[begin:finish] + right + text[finish:]
    return text


def _indent(text: str) -> str:
    return "\n".join("     " + line for line in text.rstrip("\n").split("\n")) + "\n"
