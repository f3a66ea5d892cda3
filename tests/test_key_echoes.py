"""A key a server echoes back is nowhere, however the server spells it.

A local server on 127.0.0.1 plays each provider and echoes the key it
received in one shape per test: in a JSON error body as the provider writes
it, JSON-escaped (``\\u0073k-...``, ``\\/``), straddling the 200-character cut
of an error snippet, in a plain-text body, percent-encoded in a redirect's
``Location`` or in a successful reply's body, with a ``Retry-After``, in a
streamed reply (whole in one event, split across two events, split across two
HTTP chunks), in a stream event that is not JSON. Two more shapes need no
server: a key that httpx cannot put in a header (a newline read from a file,
a non-ASCII character) makes httpx or the codec quote it in an exception.

Each command runs through the engine with a real database, and then the key
is searched everywhere a person or a program could see it: the database file
with its WAL, the journal, every notification (``command/progress`` text
included), every log record at DEBUG, and what ``dovecote show`` and
``dovecote export`` print. The search finds the key whole or any 12
characters of it, literally or spelled with escapes, so "34 of 35 characters"
counts as a leak.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import flows
from adapters.config import build_adapter, parse_config
from flows.cli import main as cli_main
from flows.engine import Backoff, Notice
from tests.fake_providers import Canned, json_response, ndjson_bytes, sse_bytes
from tests.test_no_key_leaks import error_body, received_key
from tests.test_providers_e2e import PROVIDERS, Provider, Server

KEY = "sk-test/DO-NOT-LEAK+1234567890abcdef"
PLAIN_KEY = "sk-test-DO-NOT-LEAK-1234567890abcdef"  # the search finds it too: same tail
KEY_ENV = "DOVECOTE_TEST_ECHOED_KEY"
WINDOW = 12
CUT = 200  # adapters._http.SNIPPET: where an error's snippet is cut


# --- the search -------------------------------------------------------------------------


def unescaped(text: str) -> str:
    """``text`` with the escapes JSON, Python reprs and URLs use spelled out."""
    text = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m[1], 16)), text)
    text = re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m[1], 16)), text)
    text = re.sub(r"%([0-9a-fA-F]{2})", lambda m: chr(int(m[1], 16)), text)
    return text.replace("\\/", "/")


def assert_no_key(where: str, data: str | bytes) -> None:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    for seen in (text, unescaped(text)):
        for start in range(len(KEY) - WINDOW + 1):
            part = KEY[start : start + WINDOW]
            assert part not in seen, f"{WINDOW} characters of the key ({part!r}) in {where}"


# --- what the server says, by shape ---------------------------------------------------------


def unknown_json(spelled: str, status: int = 401) -> Canned:
    """An error body in no shape the adapter knows: it is shown as a snippet of the raw text."""
    body = '{"trace": "' + spelled + '"}'
    return Canned(status=status, headers={"content-type": "application/json"}, body=body.encode())


def at_the_cut(key: str, before: str) -> str:
    """Padding that puts ``key`` across character 200 of a snippet that starts
    with ``before``: 24 of its characters before the cut, the rest after."""
    return "x" * (CUT - 24 - len(before)) + key


def text_body(text: str, status: int, **headers: str) -> Canned:
    return Canned(
        status=status, headers={"content-type": "text/html", **headers}, body=text.encode()
    )


def whole_body(kind: str, text: str) -> dict[str, Any]:
    if kind == "openai":
        message = {"role": "assistant", "content": text}
        return {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
    if kind == "anthropic":
        usage = {"input_tokens": 1, "output_tokens": 1}
        return {"content": [{"type": "text", "text": text}], "usage": usage}
    return {"message": {"role": "assistant", "content": text}, "done": True}


def stream_chunks(kind: str, pieces: list[str]) -> tuple[list[bytes], str]:
    """A complete streamed reply of ``pieces``, one chunk per event (line), in the
    provider's own format; and its content type."""
    if kind == "openai":
        events: list[dict[str, Any]] = [
            {"data": {"id": "c", "choices": [{"index": 0, "delta": {"content": piece}}]}}
            for piece in pieces
        ]
        events += [
            {"data": {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}},
            {"data": "[DONE]"},
        ]
        return sse_bytes(events), "text/event-stream"
    if kind == "anthropic":
        start = {
            "type": "message_start",
            "message": {"id": "m", "role": "assistant", "usage": {"input_tokens": 3}},
        }
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}
        events = [{"event": "message_start", "data": start}]
        events.append({"event": "content_block_start", "data": block})
        for piece in pieces:
            delta = {"type": "text_delta", "text": piece}
            data = {"type": "content_block_delta", "index": 0, "delta": delta}
            events.append({"event": "content_block_delta", "data": data})
        usage = {"output_tokens": len(pieces)}
        end = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage}
        events.append({"event": "message_delta", "data": end})
        events.append({"event": "message_stop", "data": {"type": "message_stop"}})
        return sse_bytes(events), "text/event-stream"
    lines: list[Any] = [
        {"message": {"role": "assistant", "content": piece}, "done": False} for piece in pieces
    ]
    lines.append({"message": {"role": "assistant", "content": ""}, "done": True})
    return ndjson_bytes(lines), "application/x-ndjson"


def streamed(kind: str, pieces: list[str], split_at: str | None = None) -> Canned:
    """``pieces`` streamed 60 ms apart (each gets its own progress report); with
    ``split_at``, the chunk holding it is cut in two just before it."""
    chunks, content_type = stream_chunks(kind, pieces)
    if split_at is not None:
        marker = split_at.encode()
        index = next(i for i, chunk in enumerate(chunks) if marker in chunk)
        cut = chunks[index].index(marker)
        chunks[index : index + 1] = [chunks[index][:cut], chunks[index][cut:]]
    return Canned(headers={"content-type": content_type}, chunks=chunks, chunk_delay=0.06)


def not_json_event(kind: str, key: str) -> Canned:
    data = "oops " + at_the_cut(key, "oops ")
    if kind == "ollama":
        line = f"{data}\n".encode()
        return Canned(headers={"content-type": "application/x-ndjson"}, chunks=[line])
    chunk = f"event: content_block_delta\ndata: {data}\n\n".encode()
    return Canned(headers={"content-type": "text/event-stream"}, chunks=[chunk])


@attrs.frozen
class Shape:
    answer: Callable[[Provider, str], Canned]
    stream: bool = False
    state: str = "dead"
    key: str = KEY  # what the adapter is configured with
    reaches_server: bool = True
    progress: bool = False  # the reply streams in more than one progress report


def percent_encoded(key: str) -> str:
    return "".join(f"%{byte:02X}" for byte in key.encode())


def escaped(key: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in key)


SHAPES = {
    "json": Shape(lambda p, k: json_response(error_body(p.kind, f"Incorrect API key: {k}"), 401)),
    "json-escaped": Shape(lambda p, k: unknown_json(f"auth failed for {escaped(k)}")),
    "json-slash-escaped": Shape(
        lambda p, k: unknown_json("auth failed for " + k.replace("/", "\\/"))
    ),
    "json-across-the-cut": Shape(lambda p, k: unknown_json(at_the_cut(k, '{"trace": "'))),
    "text-across-the-cut": Shape(lambda p, k: text_body("<p>" + at_the_cut(k, "<p>"), 401)),
    "text-with-retry-after": Shape(
        lambda p, k: text_body("<p>" + at_the_cut(k, "<p>"), 429, **{"retry-after": "0"})
    ),
    "redirect-percent-encoded": Shape(
        lambda p, k: text_body(
            "moved", 302, location="http://elsewhere/?key=" + urllib.parse.quote(k, safe="")
        )
    ),
    "reply-percent-encoded": Shape(
        lambda p, k: json_response(
            {**whole_body(p.kind, "hi"), "debug": "GET /?key=" + percent_encoded(k)}
        ),
        state="done",
        key=PLAIN_KEY,  # no "/" in it: the reply takes the adapter's fast path
    ),
    "stream-text": Shape(
        lambda p, k: streamed(p.kind, ["Your key ", f"is {k}", ", kept."]),
        stream=True,
        state="done",
        progress=True,
    ),
    "stream-split-across-events": Shape(
        lambda p, k: streamed(p.kind, ["Your key is ", k[:18], k[18:], ", kept."]),
        stream=True,
        state="done",
        progress=True,
    ),
    "stream-split-across-chunks": Shape(
        lambda p, k: streamed(p.kind, ["Your key ", f"is {k}", ", kept."], split_at=k[18:]),
        stream=True,
        state="done",
        progress=True,
    ),
    "stream-event-not-json": Shape(lambda p, k: not_json_event(p.kind, k), stream=True),
    "header-with-a-newline": Shape(
        lambda p, k: json_response({}), key=KEY + "\n", reaches_server=False
    ),
    "header-not-ascii": Shape(
        lambda p, k: json_response({}), key=KEY + "\u00e9", reaches_server=False
    ),
}


# --- the test -------------------------------------------------------------------------------


def adapter_for(provider: Provider, url: str, key: str, stream: bool) -> Any:
    text = provider.toml(url, api_key_env=f'"{KEY_ENV}"', stream=str(stream).lower(), timeout=5)
    adapter = build_adapter(parse_config(text, Path("dovecote.toml")).providers[0], {KEY_ENV: key})
    assert adapter is not None
    return adapter


def printed(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli_main(list(argv)) == 0, argv
    out, err = capsys.readouterr()
    return out + err


@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.kind)
@pytest.mark.parametrize("shape_name", list(SHAPES))
async def test_an_echoed_key_is_nowhere(
    provider: Provider,
    shape_name: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    shape = SHAPES[shape_name]
    db = tmp_path / "dovecote.db"
    notices: list[Notice] = []
    with Server(default=lambda request: shape.answer(provider, received_key(request))) as server:
        adapter = adapter_for(provider, server.url, shape.key, shape.stream)
        backoff = Backoff(base=0.01, cap=0.05)
        async with flows.open_engine(db, adapters=[adapter], backoff=backoff) as engine:
            with engine.subscribe() as channel:
                request = {"messages": [{"role": "user", "content": "hello"}]}
                command_id = await engine.submit("p", request, timeout=5, max_attempts=2)
                with trio.fail_after(10):
                    async for notice in channel:
                        notices.append(notice)
                        if isinstance(notice, flows.StateChange) and notice.command.is_terminal:
                            break
            command = await engine.wait(command_id)
            journal = engine.history(command_id)
    assert command.state == shape.state, command
    if shape.reaches_server:
        received = [received_key(r) for r in server.requests]
        assert received == [shape.key] * len(received) != [], received
    else:
        assert not server.requests and command.error is not None, command
    if shape.state == "done":
        assert command.reply is not None, command
        assert "[redacted]" in json.dumps(command.reply.to_json()), command.reply
    progress = [n.text for n in notices if isinstance(n, flows.Progress)]
    if shape.progress:
        assert len(progress) >= 2, progress

    assert_no_key("the command", json.dumps(command.to_json()) + repr(command))
    assert_no_key("the journal", json.dumps([e.to_json() for e in journal]))
    for notice in notices:
        assert_no_key(f"a notification {type(notice).__name__}", repr(notice))
    for record in caplog.records:
        assert_no_key(f"log record {record.name}", caplog.handler.format(record))
        assert_no_key(f"log record {record.name} args", repr(record.args))
    common = ["--db", str(db)]
    assert_no_key("dovecote show", printed(capsys, "show", command_id, *common))
    assert_no_key("dovecote show --json", printed(capsys, "show", command_id, "--json", *common))
    assert_no_key("dovecote export", printed(capsys, "export", *common))
    files = sorted(p for p in tmp_path.iterdir() if p.is_file())
    assert "dovecote.db" in {p.name for p in files}
    for path in files:
        assert_no_key(str(path.name), path.read_bytes())
