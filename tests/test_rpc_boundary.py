"""The boundary refuses per request, against a real ``dovecote serve --stdio``.

Each frame below once took the whole server down, hung it, or was answered
with something that is not JSON. Now each gets its JSON-RPC error (naming
the field when it is in the params), nothing reaches the store, and the same
connection goes on serving."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import trio
from hypothesis import given, settings

from editor_bridge.decode import Refused, check, decode
from tests.editor import Editor, served
from tests.test_bridge_faults import call, expect_error, read_error, still_serving
from tests.test_fuzz_protocol import wild, written


def frame(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


def surrogates(message: dict[str, Any]) -> bytes:
    """``message`` as JSON, each ``@`` in it written as the escape of a lone
    surrogate (``\\ud800``: valid JSON syntax, not valid Unicode)."""
    return json.dumps(message).replace("@", "\\ud800").encode()


def ids(editor: Editor, *wanted: int | None) -> list[list[dict[str, Any]]]:
    """Boxes for the answers to ``wanted`` ids (None: the server could not
    read one), registered before the frames are written."""
    boxes = []
    for request_id in wanted:
        event, box = trio.Event(), list[dict[str, Any]]()
        editor.waiting[request_id] = (event, box)  # type: ignore[index]
        boxes.append(box)
    return boxes


async def answered(*boxes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    with trio.fail_after(10):
        while not all(boxes):
            await trio.sleep(0.01)
    return [box[0] for box in boxes]


async def raw_error(editor: Editor, body: bytes, code: int) -> str:
    """The id-null error answer to a raw ``body`` (the server could not use its id)."""
    await editor.write_raw(frame(body))
    return str((await read_error(editor, code))["error"]["message"])


async def refused_notice(editor: Editor, body: bytes) -> dict[str, Any]:
    """The ``server/error`` a refused notification gets."""
    seen = len(editor.notifications)
    await editor.write_raw(frame(body))
    with trio.fail_after(10):
        while not any(m["method"] == "server/error" for m in editor.notifications[seen:]):
            await editor.arrived.wait()
    return dict(
        next(m for m in editor.notifications[seen:] if m["method"] == "server/error")["params"]
    )


def nothing_stored(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*) FROM commands").fetchone() == (0,)


async def test_huge_and_deep_numbers_and_non_json_constants(db_path: Path) -> None:
    async with served(db_path) as (editor, _):
        await editor.initialize()
        digits = "9" * 5000
        # More than 4,300 digits anywhere: once "Exceeds the limit", and exit.
        message = await raw_error(
            editor,
            b'{"jsonrpc":"2.0","id":%s,"method":"command/list"}' % digits.encode(),
            -32600,
        )
        assert "64 bits" in message
        body = json.dumps(call("command/list", {"limit": 1}) | {"id": 7}).replace(
            "1}", digits + "}"
        )
        await editor.write_raw(frame(body.encode()))
        await read_id(editor, 7, -32602, "command/list: limit")
        # Integers past what SQLite holds are bad params, never -32603.
        for params in ({"limit": 10**30}, {"limit": 2**63}):
            message = await expect_error(editor, call("command/list", params), -32602)
            assert message.startswith("command/list: limit"), message
        versioned = {"uri": "file:///a", "version": 2**70, "text": "hello"}
        refused = await refused_notice(
            editor, json.dumps(call("document/open", versioned)).encode()
        )
        assert refused["code"] == -32602 and "version" in refused["message"], refused
        # Nested 100,000 deep: once a RecursionError, and exit; 65 is too deep too.
        message = await raw_error(editor, b"[" * 100_000 + b"]" * 100_000, -32700)
        assert "nested deeper than 64" in message
        deep: Any = 1
        for _ in range(64):
            deep = [deep]
        message = await expect_error(editor, call("command/list", {"states": deep}), -32602)
        assert "nested deeper than 64" in message
        # NaN and Infinity are not JSON: refused, and never echoed as bare NaN.
        for constant in (b"NaN", b"Infinity", b"-Infinity"):
            await raw_error(
                editor, b'{"jsonrpc":"2.0","id":%s,"method":"command/list"}' % constant, -32700
            )
        infinite = (
            b'{"jsonrpc":"2.0","id":8,"method":"command/submit","params":{"adapter":"scripted",'
            b'"request":{"messages":[{"role":"user","content":"x"}],"temperature":1e999}}}'
        )
        await editor.write_raw(frame(infinite))
        await read_id(editor, 8, -32602, "command/submit: request.temperature: numbers must be")
        await still_serving(editor)
    nothing_stored(db_path)


async def read_id(editor: Editor, request_id: int, code: int, starts: str) -> None:
    """The error answer to a raw frame sent with ``request_id``."""
    event, box = trio.Event(), list[dict[str, Any]]()
    editor.waiting[request_id] = (event, box)
    with trio.fail_after(10):
        await event.wait()
    assert box[0]["error"]["code"] == code, box
    assert box[0]["error"]["message"].startswith(starts), box


async def test_lone_surrogates_are_refused_naming_the_field(db_path: Path) -> None:
    async with served(db_path) as (editor, _):
        await editor.initialize()
        submit = {
            "adapter": "scripted",
            "request": {"messages": [{"role": "user", "content": "hi @"}]},
        }
        await editor.write_raw(frame(surrogates(call("command/submit", submit) | {"id": 11})))
        await read_id(editor, 11, -32602, "command/submit: request.messages[0].content: text")
        reply = call("command/reply", {"commandId": "x", "reply": {"text": "@"}}) | {"id": 12}
        await editor.write_raw(frame(surrogates(reply)))
        await read_id(editor, 12, -32602, "command/reply: reply.text: text must be valid Unicode")
        # A surrogate escape in an id cannot be echoed: refused with id null.
        await raw_error(editor, b'{"jsonrpc":"2.0","id":"\\udfff","method":"shutdown"}', -32600)
        # Notifications: refused with a server/error that names the field.
        opening = call("document/open", {"uri": "file:///a", "version": 1, "text": "a@b"})
        refused = await refused_notice(editor, surrogates(opening))
        assert refused["message"] == (
            "document/open: text: text must be valid Unicode (no lone surrogates)"
        ), refused
        assert refused["uri"] == "file:///a" and refused["method"] == "document/open"
        await editor.open("file:///a", "hello")
        change = {
            "uri": "file:///a",
            "version": 2,
            "changes": [{"start": 0, "end": 0, "text": "@"}],
        }
        refused = await refused_notice(editor, surrogates(call("document/change", change)))
        assert refused["code"] == -32602
        assert refused["message"].startswith("document/change: changes[0].text"), refused
        # A valid pair is one astral character, not a surrogate: accepted.
        result = await editor.request(
            "command/submit",
            {"adapter": "scripted", "request": {"messages": [{"role": "user", "content": "🐦"}]}},
        )
        await editor.wait_state(result["commandId"])
        # Once, the committer died on the first submit and this never answered.
        await still_serving(editor)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*), max(state) FROM commands").fetchone() == (1, "done")


async def test_headers_and_encodings(db_path: Path) -> None:
    async with served(db_path) as (editor, _):
        await editor.initialize()
        good = frame(b'{"jsonrpc":"2.0","id":21,"method":"shutdown"}')
        # Only plain ASCII digits are a length; the good frame right after a
        # bad header (in the same write) is served, not thrown away.
        for value in (b"+2", b"1_0", b" 12 x", b"\xd9\xa1\xd9\xa2", b"zero", b"9" * 40, None):
            boxes = ids(editor, None, 21)
            header = b"X-Nothing: here" if value is None else b"Content-Length: " + value
            await editor.write_raw(header + b"\r\n\r\n" + good)
            error, result = await answered(*boxes)
            assert error["error"]["code"] == -32700, error
            assert "Content-Length" in error["error"]["message"], error
            assert "result" in result, result
        # Bodies are UTF-8: UTF-16 and UTF-32 JSON are refused, not guessed at.
        # (UTF-16 with its BOM is not UTF-8; without one, or in UTF-32, its
        # zero bytes are UTF-8 but not JSON: either way, a parse error.)
        for codec in ("utf-16", "utf-32", "utf-16-le"):
            body = '{"jsonrpc":"2.0","id":22,"method":"shutdown"}'.encode(codec)
            await raw_error(editor, body, -32700)
        assert "UTF-8" in await raw_error(editor, b'"caf\xe9"', -32700)
        await raw_error(editor, b"\xef\xbb\xbf{}", -32700)  # a BOM is not JSON
        await still_serving(editor)
    nothing_stored(db_path)


async def test_bytes_that_are_not_framing_close_that_connection_after_saying_so(
    db_path: Path,
) -> None:
    async with served(db_path) as (editor, process):
        await editor.initialize()
        await editor.write_raw(b"GET / HTTP/1.1\r\n" + b"x" * 9000)
        refused = await editor.wait_for(lambda m: m["method"] == "server/error")
        assert "not LSP framing" in refused["params"]["message"]
        with trio.fail_after(20):
            assert await process.wait() == 0  # stdio closed: the server ends cleanly


@given(wild)
@settings(max_examples=300)
def test_the_quick_look_that_skips_the_walk_never_misses_what_the_walk_refuses(
    value: Any,
) -> None:
    """``decode`` walks a value only when its bytes could hold something to
    refuse; whatever the full walk refuses, decode refuses too."""
    decoded = decode(written({"params": value}))
    if decoded.error is not None:
        return
    try:
        check(decoded.value)
    except Refused as refused:
        assert decoded.refused is not None and decoded.refused.why == refused.why
    else:
        assert decoded.refused is None
