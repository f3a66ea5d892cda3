"""The Anthropic Messages adapter against a real HTTP server."""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import trio

from adapters.anthropic import AnthropicAdapter
from adapters.base import (
    AdapterError,
    AdapterSettings,
    Message,
    PermanentError,
    Request,
    RetryableError,
)
from tests.fake_providers import (
    HELLO,
    SECRET,
    Canned,
    FakeProvider,
    assert_secret_free,
    assert_wire,
    canned,
    context,
    fails,
    json_response,
    load_fixture,
    made_by,
    refused_url,
    serve,
    sse_bytes,
    stream_response,
)

MESSAGES = load_fixture("anthropic_messages.json")
STREAM = load_fixture("anthropic_messages_stream.json")
ERRORS = load_fixture("anthropic_errors.json")
SSE = "text/event-stream"


@pytest.fixture
def server() -> Iterator[FakeProvider]:
    yield from serve()


Make = Callable[..., AnthropicAdapter]


@pytest.fixture
async def make(server: FakeProvider) -> AsyncIterator[Make]:
    def build(**kwargs: Any) -> AnthropicAdapter:
        options: dict[str, Any] = {
            "base_url": server.url + "/",
            "model": "claude-sonnet-4-20250514",
            "api_key": SECRET,
            "stream": False,
        }
        return AnthropicAdapter(AdapterSettings(name="claude"), **{**options, **kwargs})

    async for factory in made_by(build):
        yield factory


# --- success ------------------------------------------------------------------------------


async def test_messages_sends_the_documented_body_and_joins_the_text_blocks(
    server: FakeProvider, make: Make
) -> None:
    server.queue(canned(MESSAGES["response"]))
    reply = await make().send(Request.from_json(MESSAGES["request"]), context())
    assert_wire(server.requests[0], MESSAGES["wire"])
    assert reply.text == MESSAGES["reply"]["text"]
    assert reply.usage is not None and reply.usage.to_json() == MESSAGES["reply"]["usage"]
    assert reply.raw == MESSAGES["response"]["body"]


async def test_stream_reports_progress_and_takes_usage_from_start_and_delta(
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
    assert all(final.startswith(text) for text in seen)
    assert reply.raw["id"] == "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"
    assert reply.raw["stop_reason"] == "end_turn"
    assert reply.raw["content"] == [{"type": "text", "text": final}]


async def test_max_tokens_defaults_because_the_api_requires_it(
    server: FakeProvider, make: Make
) -> None:
    server.queue(canned(MESSAGES["response"]), canned(MESSAGES["response"]))
    await make().send(HELLO, context())
    await make(default_max_tokens=300).send(HELLO, context())
    assert [r.body["max_tokens"] for r in server.requests] == [1024, 300]


async def test_system_messages_join_the_top_level_system_and_response_format_is_dropped(
    server: FakeProvider, make: Make
) -> None:
    server.queue(canned(MESSAGES["response"]))
    request = Request(
        system="Be brief.",
        messages=(Message("system", "Use British spelling."), Message("user", "colour?")),
        response_format={"type": "json_object"},
    )
    await make().send(request, context())
    body = server.requests[0].body
    assert body["system"] == "Be brief.\n\nUse British spelling."
    assert body["messages"] == [{"role": "user", "content": "colour?"}]
    assert "response_format" not in body


async def test_only_system_text_is_refused_before_sending(server: FakeProvider, make: Make) -> None:
    error = await fails(make(), Request(messages=(Message("system", "x"),)))
    assert isinstance(error, PermanentError)
    assert server.requests == []


# --- errors -------------------------------------------------------------------------------


async def test_429_with_retry_after_seconds(server: FakeProvider, make: Make) -> None:
    server.queue(json_response(ERRORS["rate_limited"]["body"], 429, {"retry-after": "12"}))
    error = await fails(make())
    assert isinstance(error, RetryableError)
    assert (error.status, error.retry_after) == (429, 12)
    assert "rate_limit_error: This request would exceed the rate limit" in error.message


async def test_429_with_retry_after_http_date(server: FakeProvider, make: Make) -> None:
    when = email.utils.formatdate(time.time() + 20, usegmt=True)
    server.queue(json_response(ERRORS["rate_limited"]["body"], 429, {"retry-after": when}))
    error = await fails(make())
    assert isinstance(error, RetryableError)
    assert error.retry_after is not None and 17 <= error.retry_after <= 21


@pytest.mark.parametrize("status", [500, 529])
async def test_server_errors_and_overload_are_retryable(
    server: FakeProvider, make: Make, status: int
) -> None:
    server.queue(json_response(ERRORS["overloaded"]["body"], status))
    error = await fails(make())
    assert isinstance(error, RetryableError) and error.status == status


async def test_400_is_permanent_with_the_providers_message(
    server: FakeProvider, make: Make
) -> None:
    server.queue(json_response(ERRORS["bad_request"]["body"], 400))
    error = await fails(make())
    assert isinstance(error, PermanentError) and error.status == 400
    assert "invalid_request_error: messages: roles must alternate" in error.message


async def test_401_is_permanent_and_never_shows_the_key(server: FakeProvider, make: Make) -> None:
    server.queue(json_response(ERRORS["unauthorized"]["body"], 401))
    error = await fails(make())
    assert isinstance(error, PermanentError) and error.status == 401
    assert error.message == "claude: HTTP 401: authentication_error: invalid x-api-key: [redacted]"
    assert server.requests[0].headers["x-api-key"] == SECRET


async def test_malformed_json_is_permanent(server: FakeProvider, make: Make) -> None:
    server.queue(Canned(headers={"content-type": "application/json"}, body=b'{"content": [{"ty'))
    error = await fails(make())
    assert isinstance(error, PermanentError)
    assert "the reply body is not JSON" in error.message


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ({"type": "message"}, "content is missing, expected a list"),
        ({"content": [{"type": "text", "text": None}], "usage": {}}, "content[0].text is null"),
        ({"content": [], "usage": {"input_tokens": 1}}, "usage.output_tokens is missing"),
    ],
)
async def test_a_reply_of_the_wrong_shape_is_permanent_and_named(
    server: FakeProvider, make: Make, body: Any, complaint: str
) -> None:
    server.queue(json_response(body))
    error = await fails(make())
    assert isinstance(error, PermanentError) and complaint in error.message


async def test_connection_refused_is_retryable() -> None:
    adapter = AnthropicAdapter(
        AdapterSettings(name="claude"), base_url=refused_url(), model="m", api_key=SECRET
    )
    try:
        error = await fails(adapter)
    finally:
        await adapter.aclose()
    assert isinstance(error, RetryableError)


# --- streams that go wrong ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "kind", "status"),
    [("stream_overloaded", RetryableError, 529), ("stream_invalid", PermanentError, 400)],
)
async def test_an_error_event_is_classified_like_its_status(
    server: FakeProvider, make: Make, which: str, kind: type[AdapterError], status: int
) -> None:
    events = [*STREAM["response"]["events"][:4], ERRORS[which]]
    server.queue(stream_response(sse_bytes(events), SSE))
    error = await fails(make(stream=True))
    assert isinstance(error, kind) and error.status == status
    assert ERRORS[which]["data"]["error"]["message"] in error.message


async def test_a_stream_cut_mid_body_is_retryable(server: FakeProvider, make: Make) -> None:
    events = STREAM["response"]["events"][:5]
    server.queue(stream_response(sse_bytes(events), SSE, ending="cut"))
    error = await fails(make(stream=True))
    assert isinstance(error, RetryableError) and error.status is None


async def test_a_stream_without_message_stop_is_retryable(server: FakeProvider, make: Make) -> None:
    events = STREAM["response"]["events"][:-1]
    server.queue(stream_response(sse_bytes(events), SSE, ending="eof"))
    error = await fails(make(stream=True))
    assert isinstance(error, RetryableError)
    assert "before the message_stop event" in error.message


async def test_a_slow_server_is_left_to_the_engine_at_the_deadline(
    server: FakeProvider, make: Make
) -> None:
    """The command's deadline is the engine's: the send does not end itself
    before it (the engine cancels it and dead-letters the command with reason
    timeout); on its own it gives up only just after the deadline."""
    server.queue(canned(STREAM["response"], delay=5), canned(STREAM["response"], delay=5))
    adapter = make(stream=True)
    start = time.monotonic()
    with trio.move_on_after(0.5) as engine_timer:
        await adapter.send(HELLO, context(0.5))
    assert engine_timer.cancelled_caught and time.monotonic() - start < 0.55
    start = time.monotonic()
    error = await fails(adapter, seconds=0.3)
    assert isinstance(error, RetryableError)
    assert 0.3 <= time.monotonic() - start < 0.3 + 0.25


def test_model_is_required_and_repr_hides_the_key() -> None:
    with pytest.raises(TypeError):
        AnthropicAdapter(AdapterSettings(name="claude"))  # type: ignore[call-arg]
    adapter = AnthropicAdapter(AdapterSettings(name="claude"), model="m", api_key=SECRET)
    assert adapter.endpoint() == "https://api.anthropic.com/v1/messages"
    assert_secret_free(adapter)
