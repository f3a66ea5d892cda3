"""The OpenAI Chat Completions adapter against a real HTTP server, plus the
shared plumbing it is the first user of (SSE decoding, progress throttling,
the time budget)."""

from __future__ import annotations

import email.utils
import gzip
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import attrs
import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from adapters._http import (
    ProgressThrottle,
    SSEDecoder,
    SSEEvent,
    absent_from_json,
    time_budget,
)
from adapters.base import (
    AdapterError,
    AdapterSettings,
    PermanentError,
    Request,
    RetryableError,
)
from adapters.openai import OpenAIAdapter
from tests.fake_providers import (
    HELLO,
    SECRET,
    Canned,
    FakeProvider,
    assert_secret_free,
    assert_wire,
    canned,
    context,
    json_response,
    load_fixture,
    made_by,
    refused_url,
    serve,
    sse_bytes,
    stream_response,
)

CHAT = load_fixture("openai_chat.json")
STREAM = load_fixture("openai_chat_stream.json")
ERRORS = load_fixture("openai_errors.json")


@pytest.fixture
def server() -> Iterator[FakeProvider]:
    yield from serve()


Make = Callable[..., OpenAIAdapter]


@pytest.fixture
async def make(server: FakeProvider) -> AsyncIterator[Make]:
    def build(**kwargs: Any) -> OpenAIAdapter:
        options: dict[str, Any] = {
            "base_url": server.url + "/v1",
            "model": "gpt-4o-mini",
            "api_key": SECRET,
            "stream": False,
        }
        settings = kwargs.pop("settings", AdapterSettings(name="local"))
        return OpenAIAdapter(settings, **{**options, **kwargs})

    async for factory in made_by(build):
        yield factory


# --- success ------------------------------------------------------------------------------


async def test_chat_sends_the_documented_body_and_reads_text_usage_and_raw(
    server: FakeProvider, make: Make
) -> None:
    server.queue(canned(CHAT["response"]))
    reply = await make().send(Request.from_json(CHAT["request"]), context())
    assert_wire(server.requests[0], CHAT["wire"])
    assert reply.text == CHAT["reply"]["text"]
    assert reply.usage is not None and reply.usage.to_json() == CHAT["reply"]["usage"]
    assert reply.raw == CHAT["response"]["body"]


async def test_stream_reports_progress_and_returns_one_reply_with_usage(
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
    assert len(seen) >= 3, seen
    assert seen[-1] == final and seen.count(final) == 1
    assert all(final.startswith(text) for text in seen)
    assert [len(text) for text in seen] == sorted({len(text) for text in seen})
    assert reply.raw["choices"][0]["message"]["content"] == final
    assert reply.raw["choices"][0]["finish_reason"] == "stop"
    assert reply.raw["usage"]["total_tokens"] == 38


async def test_a_server_that_ignores_stream_and_answers_whole_is_still_read(
    server: FakeProvider, make: Make
) -> None:
    server.queue(canned(CHAT["response"]))
    reply = await make(stream=True).send(HELLO, context())
    assert reply.text == CHAT["reply"]["text"]


async def test_no_key_means_no_authorization_header(server: FakeProvider, make: Make) -> None:
    server.queue(canned(CHAT["response"]))
    await make(api_key=None, model=None).send(HELLO, context())
    received = server.requests[0]
    assert "authorization" not in received.headers
    assert "model" not in received.body


async def test_the_requests_model_wins_over_the_configured_one(
    server: FakeProvider, make: Make
) -> None:
    server.queue(canned(CHAT["response"]))
    request = Request(messages=HELLO.messages, model="qwen2.5-0.5b-instruct")
    await make().send(request, context())
    assert server.requests[0].body["model"] == "qwen2.5-0.5b-instruct"


async def test_connections_are_reused_across_sends(server: FakeProvider, make: Make) -> None:
    server.queue(canned(CHAT["response"]), canned(STREAM["response"]), canned(CHAT["response"]))
    adapter = make(stream=True)
    for _ in range(3):
        await adapter.send(HELLO, context())
    assert len(server.requests) == 3
    assert len({r.peer_port for r in server.requests}) == 1, "each send opened a connection"
    assert adapter.http_client() is adapter.http_client()


# --- errors -------------------------------------------------------------------------------


async def test_429_with_retry_after_seconds_is_retryable_after_them(
    server: FakeProvider, make: Make
) -> None:
    error = ERRORS["rate_limited"]
    server.queue(json_response(error["body"], 429, {"retry-after": "7"}))
    with pytest.raises(RetryableError) as caught:
        await make().send(HELLO, context())
    assert caught.value.status == 429
    assert caught.value.retry_after == 7
    assert "Rate limit reached for gpt-4o-mini" in caught.value.message


async def test_429_with_retry_after_http_date(server: FakeProvider, make: Make) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    server.queue(json_response(ERRORS["rate_limited"]["body"], 429, {"retry-after": when}))
    with pytest.raises(RetryableError) as caught:
        await make().send(HELLO, context())
    assert caught.value.retry_after is not None and 27 <= caught.value.retry_after <= 31


async def test_retry_after_ms_is_preferred(server: FakeProvider, make: Make) -> None:
    headers = {"retry-after": "2", "retry-after-ms": "1500"}
    server.queue(json_response(ERRORS["rate_limited"]["body"], 429, headers))
    with pytest.raises(RetryableError) as caught:
        await make().send(HELLO, context())
    assert caught.value.retry_after == 1.5


async def test_500_is_retryable_with_the_providers_message(
    server: FakeProvider, make: Make
) -> None:
    server.queue(json_response(ERRORS["server_error"]["body"], 500))
    with pytest.raises(RetryableError) as caught:
        await make().send(HELLO, context())
    assert caught.value.status == 500
    assert "The server had an error" in caught.value.message


async def test_400_is_permanent_with_the_providers_message(
    server: FakeProvider, make: Make
) -> None:
    server.queue(json_response(ERRORS["bad_request"]["body"], 400))
    with pytest.raises(PermanentError) as caught:
        await make().send(HELLO, context())
    assert caught.value.status == 400
    assert caught.value.message == (
        "local: HTTP 400: Invalid value for 'temperature': expected a number between 0 and 2."
    )


async def test_401_is_permanent_and_never_shows_the_key(server: FakeProvider, make: Make) -> None:
    server.queue(json_response(ERRORS["unauthorized"]["body"], 401))
    adapter = make()
    with pytest.raises(PermanentError) as caught:
        await adapter.send(HELLO, context())
    assert caught.value.status == 401
    assert "Incorrect API key provided: [redacted]" in caught.value.message
    assert_secret_free(caught.value, adapter)


@pytest.mark.parametrize(
    ("status", "kind"),
    [(408, RetryableError), (409, RetryableError), (503, RetryableError), (529, RetryableError),
     (403, PermanentError), (404, PermanentError), (422, PermanentError), (301, PermanentError)],
)  # fmt: skip
async def test_status_classes(
    server: FakeProvider, make: Make, status: int, kind: type[AdapterError]
) -> None:
    server.queue(Canned(status=status, headers={"content-type": "text/html"}, body=b"<h1>no</h1>"))
    with pytest.raises(kind) as caught:
        await make().send(HELLO, context())
    assert caught.value.status == status
    assert "<h1>no</h1>" in caught.value.message


async def test_malformed_json_is_permanent_and_says_so(server: FakeProvider, make: Make) -> None:
    server.queue(Canned(headers={"content-type": "application/json"}, body=b'{"choices": ['))
    with pytest.raises(PermanentError) as caught:
        await make().send(HELLO, context())
    assert "the reply body is not JSON" in caught.value.message


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ({"id": "chatcmpl-1"}, "choices is missing, expected a list"),
        ({"choices": []}, "choices is an empty list"),
        ({"choices": [{"message": {"content": 42}}]}, "choices[0].message.content is a number"),
        ({"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": "3"}},
         "usage.prompt_tokens is a string"),
    ],
)  # fmt: skip
async def test_a_reply_of_the_wrong_shape_is_permanent_and_named(
    server: FakeProvider, make: Make, body: Any, complaint: str
) -> None:
    server.queue(json_response(body))
    with pytest.raises(PermanentError) as caught:
        await make().send(HELLO, context())
    assert complaint in caught.value.message


async def test_connection_refused_is_retryable() -> None:
    adapter = OpenAIAdapter(AdapterSettings(name="local"), base_url=refused_url(), api_key=SECRET)
    try:
        with pytest.raises(RetryableError) as caught:
            await adapter.send(HELLO, context())
    finally:
        await adapter.aclose()
    assert "ConnectError" in caught.value.message
    assert_secret_free(caught.value)


async def test_a_missing_key_variable_fails_without_a_request(
    server: FakeProvider, make: Make
) -> None:
    with pytest.raises(PermanentError) as caught:
        await make(api_key=None, api_key_env="LOCAL_LLM_KEY").send(HELLO, context())
    assert "LOCAL_LLM_KEY" in caught.value.message
    assert server.requests == []


# --- the key in a successful reply ----------------------------------------------------------


def _completion(content: str, **extra: Any) -> dict[str, Any]:
    body = CHAT["response"]["body"]
    message = {**body["choices"][0]["message"], "content": content}
    return {**body, "choices": [{**body["choices"][0], "message": message}], **extra}


async def test_a_reply_that_echoes_the_key_is_redacted(server: FakeProvider, make: Make) -> None:
    server.queue(json_response(_completion(f"you sent {SECRET}", echo={"auth": SECRET})))
    reply = await make().send(HELLO, context())
    assert reply.text == "you sent [redacted]"
    assert reply.raw["echo"] == {"auth": "[redacted]"}
    assert_secret_free(reply)


async def test_a_reply_that_echoes_the_key_in_escapes_is_redacted(
    server: FakeProvider, make: Make
) -> None:
    """``\\u002d`` is a ``-``: the key is not in the body's bytes, yet it is in
    the parsed reply."""
    escaped = SECRET.replace("-", "\\u002d")
    body = json.dumps(_completion("fine", echo="KEY")).replace("KEY", escaped)
    server.queue(Canned(headers={"content-type": "application/json"}, body=body.encode()))
    reply = await make().send(HELLO, context())
    assert SECRET.encode() not in body.encode()
    assert reply.raw["echo"] == "[redacted]"
    assert_secret_free(reply)


async def test_a_reply_without_the_key_is_returned_as_parsed(
    server: FakeProvider, make: Make
) -> None:
    server.queue(json_response(_completion('line one\nline "two" \u00e9 / ok')))
    reply = await make().send(HELLO, context())
    assert reply.text == 'line one\nline "two" \u00e9 / ok'
    assert reply.raw == _completion(reply.text)


_keyish = st.text(alphabet='sk-AB_/\\"\u00e9\n\u2028 01', min_size=1, max_size=6)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in [key, *_strings(item)]]
    return [json.dumps(value)]


@given(st.data())
def test_absent_from_json_is_never_wrong(data: st.DataObject) -> None:
    """When it says the key is absent, no string (nor number) of the parsed
    document contains it, however the document spells its strings."""
    key = data.draw(_keyish)
    texts = _keyish | st.tuples(_keyish, _keyish).map(lambda ends: ends[0] + key + ends[1])
    value = data.draw(
        st.recursive(
            st.none() | st.integers() | texts,
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
            max_leaves=6,
        )
    )
    ascii_only = data.draw(st.booleans())
    body = json.dumps(value, ensure_ascii=ascii_only).encode(
        data.draw(st.sampled_from(["utf-8", "utf-16", "utf-8-sig"]))
    )
    assert json.loads(body) == value
    if absent_from_json(key, body):
        assert not any(key in text for text in _strings(value))


@pytest.mark.parametrize(
    ("key", "body"),
    [
        ("ab", b'{"x": "a\\u0062"}'),
        ("a/b", b'{"x": "a\\/b"}'),
        ('a"b', b'{"x": "a\\"b"}'),
        ("a\\b", b'{"x": "a\\\\b"}'),
        ("a\tb", b'{"x": "a\\tb"}'),
        ("ab", '{"x": "ab"}'.encode("utf-16")),
        ("ab", '{"x": "ab"}'.encode("utf-32-le")),
    ],
)
def test_absent_from_json_gives_up_on_a_key_that_may_be_escaped(key: str, body: bytes) -> None:
    assert key in json.loads(body)["x"]
    assert not absent_from_json(key, body)


def test_absent_from_json_clears_an_ordinary_body() -> None:
    body = '{"x": "no key here\\n\\"quoted\\" caf\u00e9 a/b", "n": 12}'.encode()
    assert absent_from_json(SECRET, body)


# --- streams that go wrong ----------------------------------------------------------------


async def test_a_stream_cut_mid_body_is_retryable(server: FakeProvider, make: Make) -> None:
    events = STREAM["response"]["events"][:3]
    answer = stream_response(sse_bytes(events), "text/event-stream", ending="cut", chunk_delay=0.06)
    server.queue(answer)
    seen: list[str] = []
    with pytest.raises(RetryableError) as caught:
        await make(stream=True).send(HELLO, context(5, seen.append))
    assert caught.value.status is None
    assert seen and seen[-1] == "The cat"


async def test_a_whole_reply_cut_mid_body_is_retryable(server: FakeProvider, make: Make) -> None:
    """The adapter's own pool raises httpcore's errors (adapters/_http.py, ``_post``):
    a connection dropped inside the body is a transport failure, as through httpx."""
    half = json.dumps(CHAT["response"]["body"]).encode()[:40]
    server.queue(stream_response([half], "application/json", ending="cut"))
    with pytest.raises(RetryableError) as caught:
        await make().send(HELLO, context())
    assert "RemoteProtocolError talking to" in caught.value.message, caught.value.message


async def test_a_stream_that_ends_cleanly_before_done_is_retryable(
    server: FakeProvider, make: Make
) -> None:
    events = STREAM["response"]["events"][:-1]
    server.queue(stream_response(sse_bytes(events), "text/event-stream", ending="eof"))
    with pytest.raises(RetryableError) as caught:
        await make(stream=True).send(HELLO, context())
    assert "stream cut: the body ended before data: [DONE]" in caught.value.message


async def test_an_error_chunk_in_the_stream_is_classified_by_its_code(
    server: FakeProvider, make: Make
) -> None:
    bad = {"error": {"message": "This model's maximum context length is 4096", "code": 400}}
    events = [*STREAM["response"]["events"][:2], {"data": bad}]
    server.queue(stream_response(sse_bytes(events), "text/event-stream"))
    with pytest.raises(PermanentError) as caught:
        await make(stream=True).send(HELLO, context())
    assert "maximum context length" in caught.value.message


async def test_malformed_stream_data_is_permanent(server: FakeProvider, make: Make) -> None:
    server.queue(stream_response([b"data: {not json\n\n"], "text/event-stream"))
    with pytest.raises(PermanentError) as caught:
        await make(stream=True).send(HELLO, context())
    assert "a stream event's data is not JSON" in caught.value.message


# --- time ---------------------------------------------------------------------------------


async def test_a_slow_server_is_left_to_the_engine_at_the_deadline(
    server: FakeProvider, make: Make
) -> None:
    """The command's deadline is the engine's: the send does not end itself
    before it (the engine cancels it and dead-letters the command with reason
    timeout); on its own it gives up only just after the deadline."""
    server.queue(canned(CHAT["response"], delay=5), canned(CHAT["response"], delay=5))
    adapter = make()
    start = time.monotonic()
    with trio.move_on_after(0.6) as engine_timer:
        await adapter.send(HELLO, context(0.6))
    assert engine_timer.cancelled_caught and time.monotonic() - start < 0.65
    start = time.monotonic()
    with pytest.raises(RetryableError) as caught:
        await adapter.send(HELLO, context(0.3))
    assert 0.3 <= time.monotonic() - start < 0.3 + 0.25
    assert "no complete reply" in caught.value.message or "timed out" in caught.value.message


async def test_a_slow_drip_stream_cannot_outlive_the_deadline_by_much(
    server: FakeProvider, make: Make
) -> None:
    drip = sse_bytes(STREAM["response"]["events"][1:2])
    server.queue(stream_response(drip, "text/event-stream", chunk_delay=0.05, forever=True))
    start = time.monotonic()
    with pytest.raises(RetryableError):
        await make(stream=True).send(HELLO, context(0.6))
    assert time.monotonic() - start < 0.6 + 0.25


async def test_settings_timeout_caps_the_send_when_the_deadline_is_far(
    server: FakeProvider, make: Make
) -> None:
    server.queue(canned(CHAT["response"], delay=5))
    start = time.monotonic()
    with pytest.raises(RetryableError):
        await make(settings=AdapterSettings(name="local", timeout=0.3)).send(HELLO, context(60))
    assert time.monotonic() - start < 0.5


async def test_cancellation_gets_through_and_the_adapter_stays_usable(
    server: FakeProvider, make: Make
) -> None:
    server.queue(canned(CHAT["response"], delay=5), canned(CHAT["response"]))
    adapter = make()
    start = time.monotonic()
    with trio.move_on_after(0.2) as scope:
        await adapter.send(HELLO, context(10))
    assert scope.cancelled_caught
    assert time.monotonic() - start < 0.4
    reply = await adapter.send(HELLO, context())
    assert reply.text == CHAT["reply"]["text"]


async def test_no_time_left_fails_at_once(server: FakeProvider, make: Make) -> None:
    with pytest.raises(RetryableError) as caught:
        await make().send(HELLO, context(-1))
    assert "no time left" in caught.value.message
    assert server.requests == []


def test_time_budget_is_the_timeout_or_just_past_the_deadline() -> None:
    assert time_budget(deadline=1000.0, timeout=60, now=990.0) == pytest.approx(10.1)
    assert time_budget(deadline=1000.0, timeout=5, now=900.0) == 5


# --- construction -------------------------------------------------------------------------


async def test_an_injected_client_is_used_and_left_open(server: FakeProvider) -> None:
    server.queue(canned(CHAT["response"]))
    async with httpx.AsyncClient(headers={"x-trace": "t-1"}) as client:
        adapter = OpenAIAdapter(
            AdapterSettings(name="local"), base_url=server.url + "/v1/", client=client, stream=False
        )
        await adapter.send(HELLO, context())
        await adapter.aclose()
        assert not client.is_closed
    assert server.requests[0].headers["x-trace"] == "t-1"
    assert server.requests[0].path == "/v1/chat/completions"


async def test_the_adapters_own_client_sends_what_an_httpx_client_sends(
    server: FakeProvider, make: Make
) -> None:
    """The adapter's own client hands its requests straight to its pool's transport
    (adapters/_http.py, ``_post``); on the wire they are what ``httpx.AsyncClient``
    makes of the same call: the same headers, in the same order, and the same bytes."""
    request = Request.from_json(
        {"messages": [{"role": "user", "content": 'h\u00e9llo "\U0001f600" \\ /'}]}
    )
    server.queue(canned(CHAT["response"]), canned(CHAT["response"]))
    await make().send(request, context())
    async with httpx.AsyncClient(headers={"user-agent": "dovecote"}) as client:
        await make(client=client).send(request, context())
    ours, httpxs = server.requests
    assert ours.raw == httpxs.raw
    assert list(ours.headers.items()) == list(httpxs.headers.items())
    assert ours.headers["content-type"] == "application/json"
    assert ours.headers["authorization"] == f"Bearer {SECRET}"


async def test_a_cookie_a_reply_sets_is_not_sent_with_the_next_request(
    server: FakeProvider, make: Make
) -> None:
    """Every command stands alone: what one reply sets cannot change another's request."""
    set_cookie = {"set-cookie": "session=from-the-first-reply; Path=/"}
    first = attrs.evolve(
        canned(CHAT["response"]), headers={"content-type": "application/json", **set_cookie}
    )
    server.queue(first, canned(CHAT["response"]))
    adapter = make()
    await adapter.send(HELLO, context())
    await adapter.send(HELLO, context())
    assert "cookie" not in server.requests[1].headers


async def test_a_gzip_encoded_reply_is_decoded(server: FakeProvider, make: Make) -> None:
    body = json.dumps(CHAT["response"]["body"]).encode()
    server.queue(
        Canned(
            headers={"content-type": "application/json", "content-encoding": "gzip"},
            body=gzip.compress(body),
        )
    )
    reply = await make().send(HELLO, context())
    assert reply.text == CHAT["reply"]["text"]
    assert "gzip" in server.requests[0].headers["accept-encoding"]


async def test_aclose_closes_the_adapters_own_client(make: Make) -> None:
    adapter = make()
    client = adapter.http_client()
    await adapter.aclose()
    assert client.is_closed


def test_repr_hides_the_key() -> None:
    adapter = OpenAIAdapter(AdapterSettings(name="local"), api_key=SECRET)
    assert_secret_free(adapter)
    assert "https://api.openai.com/v1" in repr(adapter)


# --- SSE and progress, the shared pieces ---------------------------------------------------

_names = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), min_size=1)
_line = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"))


@given(st.lists(st.tuples(st.none() | _names, st.lists(_line, min_size=1, max_size=4))))
def test_sse_decoder_returns_what_was_encoded(events: list[tuple[str | None, list[str]]]) -> None:
    lines = [": a comment the decoder skips"]
    for name, data in events:
        if name is not None:
            lines.append(f"event: {name}")
        lines.append("id: 7")
        lines += [f"data: {piece}" for piece in data]
        lines.append("")
    decoder = SSEDecoder()
    decoded = [event for line in lines if (event := decoder.feed(line)) is not None]
    expected = [SSEEvent(name or "message", "\n".join(data)) for name, data in events]
    assert decoded == expected


def test_sse_decoder_keeps_an_unfinished_event_back() -> None:
    decoder = SSEDecoder()
    assert decoder.feed("data:{}") is None
    assert decoder.feed("data: x") is None
    assert decoder.feed("") == SSEEvent("message", "{}\nx")


def test_progress_is_throttled_in_time_and_the_final_text_is_reported_once() -> None:
    now = [0.0]
    seen: list[str] = []
    throttle = ProgressThrottle(seen.append, interval=0.05, clock=lambda: now[0])
    for step, text in enumerate(["a", "ab", "abc", "abcd", "abcde"]):
        now[0] = step * 0.02
        throttle.update(text)
    assert seen == ["a", "abcd"]  # at 0.00 and 0.06
    throttle.finish("abcdef")
    throttle.finish("abcdef")
    assert seen == ["a", "abcd", "abcdef"]
