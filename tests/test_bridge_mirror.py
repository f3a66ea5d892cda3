"""Random interleavings of a person's edits, model replies and refused
applyEdits, against an in-process server over memory streams.

After every step the server's mirror equals the editor's text, and every
live region sits where a reference marker (the editor's own bookkeeping of
the same region through the same changes) says it is. Once all replies are
in, every correction that did not collide with a person's edit is in the
text."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flows
from editor_bridge.server import Server
from flows.snapshots import Change, move_region
from tests.editor import Editor, bridged

URI = "file:///doc"
WORDS = ["alpha", "beta", "gamma", "delta", "teh", "recieve", "wierd", "🦆", "ñandú", "x"]


class TrackingEditor(Editor):
    """Keeps a reference position for each region, moved by every change the
    editor makes or applies: the markers an editor would hold."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.markers: dict[str, list[int]] = {}

    def _move(self, start: int, end: int, text: str) -> None:
        for marker in self.markers.values():
            marker[:] = move_region(marker[0], marker[1], Change(start, end, text))

    async def type(self, uri: str, start: int, end: int, text: str) -> None:
        self._move(start, end, text)
        await super().type(uri, start, end, text)

    def type_now(self, uri: str, start: int, end: int, text: str) -> None:
        self._move(start, end, text)
        super().type_now(uri, start, end, text)

    async def _serve(self, message: dict[str, Any]) -> None:
        params = message["params"]
        if self.before_apply is not None:
            self.before_apply(params)
        if params["version"] == self.documents[params["uri"]][0]:
            for edit in params["edits"]:
                self._move(edit["start"], edit["end"], edit["text"])
        await super()._serve({**message, "params": params})


async def scenario(data: st.DataObject, db: Path) -> None:
    words = data.draw(st.lists(st.sampled_from(WORDS), min_size=4, max_size=14), label="words")
    text = " ".join(words)
    async with flows.open_engine(db) as engine:
        server = Server(engine, apply_timeout=5)
        async with bridged(server, TrackingEditor) as editor:
            assert isinstance(editor, TrackingEditor)
            await editor.open(URI, text)
            pending: dict[str, str] = {}
            for _ in range(data.draw(st.integers(1, 3), label="calls")):
                current = editor.text(URI)
                start = data.draw(st.integers(0, len(current)), label="start")
                end = data.draw(st.integers(start, len(current)), label="end")
                result = await editor.request(
                    "command/submit",
                    {
                        "adapter": "scripted",
                        "request": {"messages": [{"role": "user", "content": "#hang\n"}]},
                        "target": {"uri": URI, "start": start, "end": end},
                        "timeout": 600,
                    },
                )
                command = engine.get(result["commandId"])
                assert command.snapshot_id is not None
                editor.markers[command.snapshot_id] = [start, end]
                pending[result["commandId"]] = current[start:end]
            await settle(engine, editor, server)
            for _ in range(data.draw(st.integers(1, 8), label="steps")):
                action = data.draw(
                    st.sampled_from(["type", "reply", "stale-reply"]), label="action"
                )
                if action == "type" or not pending:
                    current = editor.text(URI)
                    start = data.draw(st.integers(0, len(current)), label="at")
                    end = data.draw(st.integers(start, min(len(current), start + 6)), label="to")
                    insert = data.draw(st.sampled_from(["", "z", " new ", "ü", "🌊"]), label="text")
                    await editor.type(URI, start, end, insert)
                else:
                    command_id = data.draw(st.sampled_from(sorted(pending)), label="which")
                    base = pending.pop(command_id)
                    reply = base.replace("teh", "the").replace("wierd", "weird") + "!"
                    if action == "stale-reply":
                        typed: list[bool] = []

                        def type_first(params: dict[str, Any], typed: list[bool] = typed) -> None:
                            if not typed:
                                typed.append(True)
                                editor.type_now(URI, 0, 0, "~")

                        editor.before_apply = type_first
                    while engine.get(command_id).state != "sent":
                        await trio.sleep(0.001)
                    await engine.deliver(command_id, {"text": "#reply\n" + reply})
                    done = await engine.wait(command_id)
                    editor.before_apply = None
                    assert done.state == "done", done
                await settle(engine, editor, server)
                check(editor, server)


async def settle(engine: flows.Engine, editor: Editor, server: Server) -> None:
    """Until every notification and change in flight has been handled."""
    with trio.fail_after(10):
        while server.mirror.documents[URI].version != editor.documents[URI][0]:
            await trio.sleep(0.001)
    await trio.testing.wait_all_tasks_blocked()


def check(editor: TrackingEditor, server: Server) -> None:
    document = server.mirror.documents[URI]
    assert document.text == editor.text(URI)
    assert document.version == editor.documents[URI][0]
    for key, (start, end) in document.regions.items():
        if key in editor.markers:
            assert [start, end] == editor.markers[key], key


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_interleavings_keep_mirror_and_regions_true(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(scenario, data, Path(tmp) / "dovecote.db")
