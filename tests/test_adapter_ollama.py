"""The native Ollama adapter against a real HTTP server."""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import trio

from adapters.base import AdapterSettings, PermanentError, Request, RetryableError
from adapters.ollama import OllamaAdapter
from tests.fake_providers import (
    HELLO,
    SECRET,
    Canned,
    FakeProvider,
    assert_wire,
    canned,
    context,
    fails,
    json_response,
    load_fixture,
    made_by,
    ndjson_bytes,
    refused_url,
    serve,
    stream_response,
)

CHAT = load_fixture("ollama_chat.json")
STREAM = load_fixture("ollama_chat_stream.json")
ERRORS = load_fixture("ollama_errors.json")
NDJSON = "application/x-ndjson"


@pytest.fixture
def server() -> Iterator[FakeProvider]:
    yield from serve()


Make = Callable[..., OllamaAdapter]


@pytest.fixture
async def make(server: FakeProvider) -> AsyncIterator[Make]:
    def build(**kwargs: Any) -> OllamaAdapter:
        options: dict[str, Any] = {"base_url": server.url, "model": "llama3.2", "stream": False}
        return OllamaAdapter(AdapterSettings(name="ollama"), **{**options, **kwargs})

    async for factory in made_by(build):
        yield factory


# --- success ------------------------------------------------------------------------------


async def test_chat_sends_the_documented_body_and_reads_the_counts(
    server: FakeProvider, make: Make
) -> None:
    server.queue(canned(CHAT["response"]))
    reply = await make().send(Request.from_json(CHAT["request"]), context())
    assert_wire(server.requests[0], CHAT["wire"])
    assert "authorization" not in server.requests[0].headers
    assert reply.text == CHAT["reply"]["text"]
    assert reply.usage is not None and reply.usage.to_json() == CHAT["reply"]["usage"]
    assert reply.raw == CHAT["response"]["body"]


async def test_stream_is_ndjson_with_counts_on_the_done_line(
    server: FakeProvider, make: Make
) -> None:
    server.queue(canned(STREAM["response"], chunk_delay=0.06))
    seen: list[str] = []
    reply = await make(stream=True).send(
        Request.from_json(STREAM["request"]), context(5, seen.append)
    )
    assert_wire(server.requests[0], STREAM["wire"])
    final = STREAM["reply"]["text"]
    assert reply.text == final
    assert reply.usage is not None and reply.usage.to_json() == STREAM["reply"]["usage"]
    assert len(seen) >= 3 and seen[-1] == final and seen.count(final) == 1
    assert reply.raw["message"]["content"] == final and reply.raw["done_reason"] == "stop"


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ("json", "json"),
        ({"type": "json_object"}, "json"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
         {"type": "object"}),
        ({"type": "text"}, None),
    ],
)  # fmt: skip
async def test_response_format_maps_to_format(
    server: FakeProvider, make: Make, response_format: Any, expected: Any
) -> None:
    server.queue(canned(CHAT["response"]))
    await make().send(Request(messages=HELLO.messages, response_format=response_format), context())
    assert server.requests[0].body.get("format") == expected


async def test_an_unmappable_response_format_is_refused_before_sending(
    server: FakeProvider, make: Make
) -> None:
    request = Request(messages=HELLO.messages, response_format={"type": "grammar"})
    error = await fails(make(), request)
    assert isinstance(error, PermanentError) and "no Ollama equivalent" in error.message
    assert server.requests == []


async def test_a_cached_prompt_without_prompt_eval_count_counts_zero(
    server: FakeProvider, make: Make
) -> None:
    body = {**CHAT["response"]["body"]}
    del body["prompt_eval_count"]
    server.queue(json_response(body))
    reply = await make().send(HELLO, context())
    assert reply.usage is not None and reply.usage.to_json() == {
        "input_tokens": 0,
        "output_tokens": 14,
    }


async def test_a_key_is_sent_as_bearer_for_a_proxy(server: FakeProvider, make: Make) -> None:
    server.queue(canned(CHAT["response"]))
    await make(api_key=SECRET).send(HELLO, context())
    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"


# --- errors -------------------------------------------------------------------------------


async def test_404_model_not_found_is_permanent_with_ollamas_message(
    server: FakeProvider, make: Make
) -> None:
    server.queue(json_response(ERRORS["not_found"]["body"], 404))
    error = await fails(make())
    assert isinstance(error, PermanentError) and error.status == 404
    assert error.message == 'ollama: HTTP 404: model "llama3.2" not found, try pulling it first'


async def test_400_is_permanent(server: FakeProvider, make: Make) -> None:
    server.queue(json_response(ERRORS["bad_request"]["body"], 400))
    error = await fails(make())
    assert isinstance(error, PermanentError) and "num_predict must be an integer" in error.message


async def test_401_from_a_proxy_is_permanent_and_never_shows_the_key(
    server: FakeProvider, make: Make
) -> None:
    server.queue(json_response(ERRORS["unauthorized"]["body"], 401))
    error = await fails(make(api_key=SECRET))
    assert isinstance(error, PermanentError) and error.status == 401
    assert "bearer [redacted] is not valid" in error.message


async def test_500_is_retryable(server: FakeProvider, make: Make) -> None:
    server.queue(json_response(ERRORS["server_error"]["body"], 500))
    error = await fails(make())
    assert isinstance(error, RetryableError) and "llama runner process" in error.message


@pytest.mark.parametrize("form", ["seconds", "date"])
async def test_429_with_retry_after(server: FakeProvider, make: Make, form: str) -> None:
    value = "3" if form == "seconds" else email.utils.formatdate(time.time() + 3, usegmt=True)
    server.queue(json_response({"error": "server busy"}, 429, {"retry-after": value}))
    error = await fails(make())
    assert isinstance(error, RetryableError) and error.retry_after is not None
    assert 1 <= error.retry_after <= 3


async def test_malformed_json_is_permanent(server: FakeProvider, make: Make) -> None:
    server.queue(Canned(headers={"content-type": "application/json"}, body=b"<html>"))
    error = await fails(make())
    assert isinstance(error, PermanentError)
    assert "the reply body is not JSON" in error.message and "<html>" in error.message


async def test_a_reply_without_message_is_permanent_and_named(
    server: FakeProvider, make: Make
) -> None:
    server.queue(json_response({"model": "llama3.2", "done": True}))
    error = await fails(make())
    assert isinstance(error, PermanentError) and "message is missing" in error.message


async def test_connection_refused_is_retryable() -> None:
    adapter = OllamaAdapter(AdapterSettings(name="ollama"), base_url=refused_url(), model="m")
    try:
        error = await fails(adapter)
    finally:
        await adapter.aclose()
    assert isinstance(error, RetryableError)


# --- streams that go wrong ----------------------------------------------------------------


async def test_an_error_line_in_the_stream_is_retryable(server: FakeProvider, make: Make) -> None:
    lines = [*STREAM["response"]["lines"][:2], ERRORS["stream_error"]]
    server.queue(stream_response(ndjson_bytes(lines), NDJSON))
    error = await fails(make(stream=True))
    assert isinstance(error, RetryableError) and "unexpected EOF" in error.message


async def test_a_stream_cut_mid_body_is_retryable(server: FakeProvider, make: Make) -> None:
    lines = STREAM["response"]["lines"][:2]
    server.queue(stream_response(ndjson_bytes(lines), NDJSON, ending="cut"))
    error = await fails(make(stream=True))
    assert isinstance(error, RetryableError)


async def test_a_stream_without_the_done_line_is_retryable(
    server: FakeProvider, make: Make
) -> None:
    lines = STREAM["response"]["lines"][:-1]
    server.queue(stream_response(ndjson_bytes(lines), NDJSON, ending="eof"))
    error = await fails(make(stream=True))
    assert isinstance(error, RetryableError) and '"done": true' in error.message


async def test_a_malformed_stream_line_is_permanent(server: FakeProvider, make: Make) -> None:
    server.queue(stream_response([b'{"message": {"content": "x"}\n'], NDJSON))
    error = await fails(make(stream=True))
    assert isinstance(error, PermanentError) and "a stream line is not JSON" in error.message


async def test_cancellation_while_streaming_gets_through_promptly(
    server: FakeProvider, make: Make
) -> None:
    drip = ndjson_bytes(STREAM["response"]["lines"][:1])
    server.queue(stream_response(drip, NDJSON, chunk_delay=0.05, forever=True))
    start = time.monotonic()
    with trio.move_on_after(0.3) as scope:
        await make(stream=True).send(HELLO, context(10))
    assert scope.cancelled_caught and time.monotonic() - start < 0.5


async def test_a_slow_server_is_left_to_the_engine_at_the_deadline(
    server: FakeProvider, make: Make
) -> None:
    """The command's deadline is the engine's: the send does not end itself
    before it (the engine cancels it and dead-letters the command with reason
    timeout); on its own it gives up only just after the deadline."""
    server.queue(canned(CHAT["response"], delay=5), canned(CHAT["response"], delay=5))
    adapter = make()
    start = time.monotonic()
    with trio.move_on_after(0.5) as engine_timer:
        await adapter.send(HELLO, context(0.5))
    assert engine_timer.cancelled_caught and time.monotonic() - start < 0.55
    start = time.monotonic()
    error = await fails(adapter, seconds=0.3)
    assert isinstance(error, RetryableError)
    assert 0.3 <= time.monotonic() - start < 0.3 + 0.25


def test_defaults() -> None:
    adapter = OllamaAdapter(AdapterSettings(name="ollama"), model="llama3.2")
    assert adapter.endpoint() == "http://127.0.0.1:11434/api/chat"
    assert adapter.stream is True
