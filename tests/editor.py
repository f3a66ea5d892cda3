"""A scriptable editor for the bridge tests: a real JSON-RPC client over
LSP framing that keeps its own copy of each document, types into it,
reports every change with ``document/change``, and answers
``document/applyEdit`` as an editor does (applied only at a matching
version). It runs against ``dovecote serve --stdio`` in a subprocess, or
against an in-process server over memory streams."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio
import trio.testing

from editor_bridge.framing import FrameReader, encode
from editor_bridge.server import Server
from tests.conftest import DOVECOTE, ROOT


class RemoteError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Editor:
    def __init__(self, receive: trio.abc.ReceiveStream, send: trio.abc.SendStream) -> None:
        self.reader = FrameReader(receive)
        self.send_stream = send
        self.next_id = 0
        self.waiting: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self.notifications: list[dict[str, Any]] = []
        self.arrived = trio.Event()
        self.documents: dict[str, list[Any]] = {}  # uri -> [version, text]
        self.applied: list[dict[str, Any]] = []
        self.refused: list[dict[str, Any]] = []
        # Called with the applyEdit params before answering: lets a test type
        # "just as" the edit arrives, making it stale.
        self.before_apply: Callable[[dict[str, Any]], None] | None = None
        self.answer_human: Callable[[dict[str, Any]], str | None] | None = None
        self._nursery: trio.Nursery | None = None
        self._write_lock = trio.Lock()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                frame = await self.reader.read()
                if frame is None:
                    break
                assert frame.body is not None, frame.error
                message = json.loads(frame.body)
                if "method" in message and "id" in message:
                    await self._serve(message)
                elif "method" in message:
                    self.notifications.append(message)
                    if message["method"] == "human/ask" and self.answer_human:
                        answer = self.answer_human(message["params"])
                        if answer is not None:
                            nursery.start_soon(self._answer, message["params"], answer)
                    self.arrived.set()
                    self.arrived = trio.Event()
                else:
                    event, box = self.waiting.pop(message["id"])
                    box.append(message)
                    event.set()
            for event, _ in self.waiting.values():
                event.set()

    async def _answer(self, params: dict[str, Any], text: str) -> None:
        await self.request(
            "command/reply", {"commandId": params["commandId"], "reply": {"text": text}}
        )

    async def _serve(self, message: dict[str, Any]) -> None:
        params = message["params"]
        if message["method"] != "document/applyEdit":
            await self.write({"jsonrpc": "2.0", "id": message["id"], "result": None})
            return
        if self.before_apply is not None:
            self.before_apply(params)
        version, text = self.documents[params["uri"]]
        if params["version"] != version:
            self.refused.append(params)
            await self.write({"jsonrpc": "2.0", "id": message["id"], "result": {"applied": False}})
            return
        changes = params["edits"]
        for edit in changes:  # last first: each refers to the original text
            text = text[: edit["start"]] + edit["text"] + text[edit["end"] :]
        self.documents[params["uri"]] = [version + 1, text]
        self.applied.append(params)
        # An editor's change hooks report the edit before the request returns.
        await self.notify(
            "document/change", {"uri": params["uri"], "version": version + 1, "changes": changes}
        )
        await self.write({"jsonrpc": "2.0", "id": message["id"], "result": {"applied": True}})

    async def write(self, message: dict[str, Any]) -> None:
        await self.write_raw(encode(message))

    async def write_raw(self, data: bytes) -> None:
        async with self._write_lock:
            await self.send_stream.send_all(data)

    async def request(self, method: str, params: Any = None) -> Any:
        answer = await self.request_message(
            {
                "jsonrpc": "2.0",
                "method": method,
                **({"params": params} if params is not None else {}),
            }
        )
        if "error" in answer:
            raise RemoteError(answer["error"]["code"], answer["error"]["message"])
        return answer["result"]

    async def request_message(self, message: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        request_id = self.next_id
        event, box = trio.Event(), list[dict[str, Any]]()
        self.waiting[request_id] = (event, box)
        await self.write({**message, "id": request_id})
        with trio.fail_after(30):
            await event.wait()
        assert box, "the server closed the connection"
        return box[0]

    async def notify(self, method: str, params: Any) -> None:
        await self.write({"jsonrpc": "2.0", "method": method, "params": params})

    async def initialize(self, token: str | None = None) -> Any:
        params: dict[str, Any] = {"clientInfo": {"name": "test-editor"}}
        if token is not None:
            params["token"] = token
        return await self.request("initialize", params)

    async def open(self, uri: str, text: str) -> None:
        self.documents[uri] = [1, text]
        await self.notify("document/open", {"uri": uri, "version": 1, "text": text})

    def text(self, uri: str) -> str:
        return str(self.documents[uri][1])

    async def type(self, uri: str, start: int, end: int, text: str) -> None:
        """A person's edit: replace [start, end) with ``text``."""
        version, old = self.documents[uri]
        self.documents[uri] = [version + 1, old[:start] + text + old[end:]]
        await self.notify(
            "document/change",
            {
                "uri": uri,
                "version": version + 1,
                "changes": [{"start": start, "end": end, "text": text}],
            },
        )

    def type_now(self, uri: str, start: int, end: int, text: str) -> None:
        """``type`` from a synchronous hook (before_apply)."""
        assert self._nursery is not None
        version, old = self.documents[uri]
        self.documents[uri] = [version + 1, old[:start] + text + old[end:]]
        self._nursery.start_soon(
            self.notify,
            "document/change",
            {
                "uri": uri,
                "version": version + 1,
                "changes": [{"start": start, "end": end, "text": text}],
            },
        )

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30
    ) -> dict[str, Any]:
        """The first notification (already arrived or to come) matching ``predicate``."""
        with trio.fail_after(timeout):
            seen = 0
            while True:
                for message in self.notifications[seen:]:
                    if predicate(message):
                        return message
                seen = len(self.notifications)
                await self.arrived.wait()

    async def wait_state(
        self,
        command_id: str,
        states: tuple[str, ...] = ("done", "dead", "cancelled"),
        timeout: float = 30,
    ) -> dict[str, Any]:
        message = await self.wait_for(
            lambda m: (
                m["method"] == "command/state"
                and m["params"]["commandId"] == command_id
                and m["params"]["state"] in states
            ),
            timeout,
        )
        return dict(message["params"])

    async def wait_flow_state(self, flow_id: str, state: str) -> dict[str, Any]:
        """The ``flow/state`` notification of ``flow_id`` reaching ``state``."""
        message = await self.wait_for(
            lambda m: (
                m["method"] == "flow/state"
                and m["params"]["flowId"] == flow_id
                and m["params"]["state"] == state
            )
        )
        return dict(message["params"])


@asynccontextmanager
async def served(
    db: Path | str, *extra: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[Editor, trio.Process]]:
    """``dovecote serve --stdio`` in a subprocess, and an initialized editor on it."""
    process = await trio.lowlevel.open_process(
        [DOVECOTE, "serve", "--stdio", "--db", str(db), *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert process.stdin is not None and process.stdout is not None
    editor = Editor(process.stdout, process.stdin)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(editor.run)
            yield editor, process
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


@asynccontextmanager
async def bridged(server: Server, editor_class: type[Editor] = Editor) -> AsyncIterator[Editor]:
    """An initialized editor on ``server`` in this process, over memory streams."""
    client_end, server_end = trio.testing.memory_stream_pair()
    editor = editor_class(client_end, client_end)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        nursery.start_soon(partial(server.serve, server_end, server_end, needs_token=False))
        await nursery.start(editor.run)
        await editor.initialize()
        yield editor
        nursery.cancel_scope.cancel()
