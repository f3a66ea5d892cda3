"""Bad input, other transports and crashes, against real server processes.

Every bad message gets the right JSON-RPC error, changes nothing stored,
and leaves the connection serving; sockets need the token; a server
killed with 100 calls in flight loses none of them."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio

import flows
from tests.conftest import DOVECOTE, ROOT
from tests.editor import Editor, RemoteError, served


async def expect_error(editor: Editor, message: dict[str, Any], code: int) -> str:
    answer = await editor.request_message(message)
    assert "error" in answer, answer
    assert answer["error"]["code"] == code, answer
    return str(answer["error"]["message"])


async def still_serving(editor: Editor) -> None:
    assert (await editor.request("command/list", {}))["commands"] is not None


async def read_error(editor: Editor, code: int) -> dict[str, Any]:
    """An error answer with id null (the server could not read an id)."""
    box: list[dict[str, Any]] = []
    event = trio.Event()
    editor.waiting[None] = (event, box)  # type: ignore[index]
    with trio.fail_after(10):
        await event.wait()
    assert box[0]["error"]["code"] == code, box
    return box[0]


def call(method: str, params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


async def test_every_bad_message_gets_its_error_and_the_connection_goes_on(
    db_path: Path,
) -> None:
    async with served(db_path, "--max-frame", "4096") as (editor, _):
        # Before initialize, nothing but initialize.
        message = await expect_error(editor, call("command/list", {}), -32004)
        assert "initialize" in message
        await editor.initialize()

        # Framing and JSON.
        await editor.write_raw(b"Content-Length: 7\r\n\r\n{oops!}")
        assert "JSON" in (await read_error(editor, -32700))["error"]["message"]
        await editor.write_raw(b"Content-Length: zero\r\n\r\n")
        await read_error(editor, -32700)
        await editor.write_raw(b"Content-Length: 2\r\n\r\n[]")
        assert "batch" in (await read_error(editor, -32600))["error"]["message"]
        await editor.write_raw(b"Content-Length: 2\r\n\r\n42")
        await read_error(editor, -32600)
        big = (
            b'{"jsonrpc":"2.0","id":99,"method":"command/list","params":{"x":"'
            + b"x" * 5000
            + b'"}}'
        )
        await editor.write_raw(b"Content-Length: %d\r\n\r\n%s" % (len(big), big))
        assert "4096" in (await read_error(editor, -32600))["error"]["message"]
        await still_serving(editor)

        # Requests that are not requests.
        await expect_error(editor, {"method": "command/list"}, -32600)  # no jsonrpc
        await expect_error(editor, {"jsonrpc": "2.0", "method": 7}, -32600)
        await expect_error(
            editor, {"jsonrpc": "2.0", "method": "command/list", "params": 3}, -32600
        )
        await expect_error(editor, call("command/frobnicate", {}), -32601)

        # Wrong types and values.
        ask = {"messages": [{"role": "user", "content": "x"}]}
        bad_submits: list[dict[str, Any]] = [
            {},
            {"adapter": 3, "request": ask},
            {"adapter": "scripted", "request": "x"},
            {"adapter": "scripted", "request": {"messages": "x"}},
            {"adapter": "scripted", "request": {"messages": [{"role": "bot", "content": "x"}]}},
            {"adapter": "scripted", "request": ask, "timeout": -1},
            {"adapter": "scripted", "request": ask, "timeout": 1e12},
            {"adapter": "scripted", "request": ask, "timeout": "soon"},
            {"adapter": "scripted", "request": ask, "maxAttempts": 0},
            {"adapter": "scripted", "request": ask, "onConflict": "merge"},
            {"adapter": "nope", "request": ask},
        ]
        for params in bad_submits:
            message = await expect_error(editor, call("command/submit", params), -32602)
            assert message.startswith("command/submit"), message
        target = {"uri": "file:///nowhere", "start": 0, "end": 1}
        await expect_error(
            editor,
            call("command/submit", {"adapter": "scripted", "request": ask, "target": target}),
            -32002,
        )
        await expect_error(editor, call("command/list", {"states": ["sleeping"]}), -32602)

        # Unknown ids.
        for method, params in [
            ("command/show", {"commandId": "no-such"}),
            ("command/cancel", {"commandId": "no-such"}),
            ("command/reply", {"commandId": "no-such", "reply": {"text": "x"}}),
            ("deadletter/replay", {"commandIds": ["no-such"]}),
        ]:
            assert "no-such" in await expect_error(editor, call(method, params), -32000)

        # Documents: unknown, backwards, out of bounds; nothing changes.
        await editor.open("file:///a", "hello")
        refusals: list[dict[str, Any]] = []
        for params in [
            {"uri": "file:///b", "version": 2, "changes": []},
            {"uri": "file:///a", "version": 1, "changes": [{"start": 0, "end": 0, "text": "x"}]},
            {
                "uri": "file:///a",
                "version": 5,
                "changes": [
                    {"start": 0, "end": 0, "text": "x"},
                    {"start": 3, "end": 99, "text": ""},
                ],
            },
        ]:
            await editor.notify("document/change", params)
            count = len(refusals) + 1
            await editor.wait_for(
                lambda m, n=count: m["method"] == "server/error" and _nth(editor, n)
            )
            refusals = [m for m in editor.notifications if m["method"] == "server/error"]
        # The same as a request gets a real answer.
        await expect_error(
            editor,
            call("document/change", {"uri": "file:///a", "version": 1, "changes": []}),
            -32005,
        )
        # Had a refused change reached the mirror, this merge would see it.
        hello = {"messages": [{"role": "user", "content": "#reply\nhello!"}]}
        target = {"uri": "file:///a", "start": 0, "end": 5}
        result = await editor.request(
            "command/submit", {"adapter": "scripted", "request": hello, "target": target}
        )
        await editor.wait_state(result["commandId"])
        assert editor.text("file:///a") == "hello!"
        shown = await editor.request("command/show", {"commandId": result["commandId"]})
        assert shown["conflicts"] == [] and shown["merge"]["tries"] == 1

    codes = [m["params"]["code"] for m in refusals]
    assert codes == [-32002, -32005, -32005]
    store = flows.Store(db_path)
    assert [c.id for c in store.list()] == [result["commandId"]]  # nothing else was stored
    store.close()


def _nth(editor: Editor, count: int) -> bool:
    return sum(m["method"] == "server/error" for m in editor.notifications) >= count


async def start_listener(db: Path, *listen: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [DOVECOTE, "serve", "--db", str(db), *(a for spec in listen for a in ("--listen", spec))],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    token = db.with_name(db.name + ".token")
    with trio.fail_after(20):
        while not token.exists() or process.stderr is None:
            await trio.sleep(0.05)
        assert process.stderr is not None
        while b"listening" not in process.stderr.readline():
            await trio.sleep(0.01)
    return process


async def try_initialize(stream: trio.abc.Stream, token: str | None) -> Any:
    editor = Editor(stream, stream)
    outcome: list[Any] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(editor.run)
        try:
            outcome.append(await editor.initialize(token))
            await still_serving(editor)
        except RemoteError as exc:
            outcome.append(exc)
        nursery.cancel_scope.cancel()
    if isinstance(outcome[0], RemoteError):
        raise outcome[0]
    return outcome[0]


async def test_unix_socket_and_tcp_need_the_token(tmp_path: Path) -> None:
    db = tmp_path / "dovecote.db"
    path = str(tmp_path / "dovecote.sock")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = await start_listener(db, f"unix:{path}", f"tcp:127.0.0.1:{port}")
    try:
        token_file = db.with_name(db.name + ".token")
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        token = token_file.read_text().strip()
        for connect in (
            lambda: trio.open_unix_socket(path),
            lambda: trio.open_tcp_stream("127.0.0.1", port),
        ):
            for wrong in (None, "not-the-token"):
                with pytest.raises(RemoteError) as caught:
                    await try_initialize(await connect(), wrong)
                assert caught.value.code == -32003
            result = await try_initialize(await connect(), token)
            assert result["serverInfo"]["name"] == "dovecote"
        # Several clients at once.
        streams = [await trio.open_unix_socket(path) for _ in range(3)]
        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(try_initialize, stream, token)
    finally:
        process.kill()
        process.wait()


def test_tcp_refuses_a_non_loopback_address_without_allow_remote(tmp_path: Path) -> None:
    result = subprocess.run(
        [DOVECOTE, "serve", "--db", str(tmp_path / "db"), "--listen", "tcp:0.0.0.0:7717"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--allow-remote" in result.stderr


async def test_kill_9_server_with_100_in_flight(db_path: Path) -> None:
    ask = {"messages": [{"role": "user", "content": "#delay 2\nteh end"}]}
    async with served(db_path) as (editor, process):
        await editor.initialize()
        ids = [
            (await editor.request("command/submit", {"adapter": "scripted", "request": ask}))[
                "commandId"
            ]
            for _ in range(100)
        ]
        with trio.fail_after(20):
            while (
                len((await editor.request("command/list", {"states": ["sent"]}))["commands"]) < 100
            ):
                await trio.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    started = time.monotonic()
    async with served(db_path) as (editor, _):
        await editor.initialize()
        with trio.fail_after(30):
            while True:
                done = (await editor.request("command/list", {"states": ["done"]}))["commands"]
                if len(done) == 100:
                    break
                await trio.sleep(0.1)
    assert sorted(c["id"] for c in done) == sorted(ids)
    assert {c["reply"]["text"] for c in done} == {"the end"}
    assert {c["attempt"] for c in done} == {2}
    assert time.monotonic() - started < 15
