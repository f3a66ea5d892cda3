"""The engine with each real HTTP adapter (OpenAI-compatible, Anthropic, Ollama)
against fake provider servers on 127.0.0.1: what a user relies on, end to end.

Each adapter is built the way a user gets one, from a ``dovecote.toml`` text
(``parse_config`` + ``build_adapter``), and talks real HTTP to a
``tests.fake_providers`` server in a thread. Time is real but small: the
engine's own backoff is shrunk (``Backoff(base=0.01)``) so that what a test
measures is the provider's ``Retry-After``, the command's timeout or the rate
limit, not the jitter.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import flows
from adapters._http import HttpAdapter
from adapters.base import Usage
from adapters.config import build_adapter, parse_config
from flows.engine import Backoff
from tests.fake_providers import (
    SECRET,
    Canned,
    FakeProvider,
    Recorded,
    canned,
    json_response,
    load_fixture,
    ndjson_bytes,
    sse_bytes,
    stream_response,
)

FAST_RETRIES = Backoff(base=0.01, cap=0.05)
PRICE = "{ input = 0.15, output = 0.60 }"


class Server(FakeProvider):
    """A ``FakeProvider`` that also notes when each request arrived
    (``time.monotonic``) and, when no canned answer is queued, answers with
    ``default(request)`` (so concurrent callers need not be served in order)."""

    def __init__(self, default: Callable[[Recorded], Canned] | None = None) -> None:
        super().__init__()
        self.default = default
        self.arrived: list[float] = []
        self._queued: deque[Canned] = deque()
        self._mine = threading.Lock()

    def __enter__(self) -> Server:
        super().__enter__()
        return self

    def queue(self, *answers: Canned) -> None:
        with self._mine:
            self._queued.extend(answers)

    def record(self, request: Recorded) -> Canned:
        with self._mine:
            self.requests.append(request)
            self.arrived.append(time.monotonic())
            if self._queued:
                return self._queued.popleft()
        if self.default is not None:
            return self.default(request)
        return json_response({"error": "the test queued no answer"}, status=418)


@attrs.frozen
class Provider:
    """One provider kind: how to configure it, and its fixtures."""

    kind: str
    path: str  # what base_url adds to the server's root
    model: str
    chat: dict[str, Any]
    stream: dict[str, Any]
    errors: dict[str, Any]
    bad_request_words: str  # the provider's own message in its 400 body

    def toml(self, url: str, name: str = "p", **extra: Any) -> str:
        lines = [
            f"[adapters.{name}]",
            f'kind = "{self.kind}"',
            f'base_url = "{url}{self.path}"',
            f'model = "{self.model}"',
            f"price_per_mtok = {PRICE}",
        ]
        lines += [f"{key} = {value}" for key, value in extra.items()]
        return "\n".join(lines) + "\n"

    def adapter(self, url: str, *, stream: bool = False, **extra: Any) -> HttpAdapter:
        text = self.toml(url, stream=str(stream).lower(), **extra)
        config = parse_config(text, Path("dovecote.toml"))
        adapter = build_adapter(config.providers[0], {})
        assert adapter is not None
        return adapter

    def stream_chunks(self) -> list[bytes]:
        response = self.stream["response"]
        if "events" in response:
            return sse_bytes(response["events"])
        return ndjson_bytes(response["lines"])

    def cut_stream(self, ending: str = "cut") -> Canned:
        """The streamed reply, dropped after half its events (before the terminal one)."""
        chunks = self.stream_chunks()
        return stream_response(
            chunks[: len(chunks) // 2 + 1],
            self.stream["response"]["content_type"],
            ending=ending,
        )

    def error(self, key: str, **headers: str) -> Canned:
        error = self.errors[key]
        return json_response(error["body"], error["status"], headers)


OPENAI = Provider(
    "openai",
    "/v1",
    "gpt-4o-mini",
    load_fixture("openai_chat.json"),
    load_fixture("openai_chat_stream.json"),
    load_fixture("openai_errors.json"),
    "Invalid value for 'temperature'",
)
ANTHROPIC = Provider(
    "anthropic",
    "",
    "claude-sonnet-4-20250514",
    load_fixture("anthropic_messages.json"),
    load_fixture("anthropic_messages_stream.json"),
    load_fixture("anthropic_errors.json"),
    'messages: roles must alternate between "user" and "assistant"',
)
OLLAMA = Provider(
    "ollama",
    "",
    "llama3.2",
    load_fixture("ollama_chat.json"),
    load_fixture("ollama_chat_stream.json"),
    load_fixture("ollama_errors.json"),
    "invalid options: num_predict must be an integer",
)
PROVIDERS = [OPENAI, ANTHROPIC, OLLAMA]
# The usage each fixture's provider reports, and what it costs at 0.15 / 0.60 $ per Mtok.
CHAT_USAGE = {"openai": (31, 12), "anthropic": (25, 9), "ollama": (26, 14)}
CHAT_COST = {"openai": 1.185e-05, "anthropic": 9.15e-06, "ollama": 1.23e-05}
STREAM_USAGE = {"openai": (31, 7), "anthropic": (25, 9), "ollama": (26, 7)}

by_kind = pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.kind)


@pytest.fixture
def server() -> Iterator[Server]:
    with Server() as fake:
        yield fake


def ok(provider: Provider) -> Canned:
    return canned(provider.chat["response"])


def transitions(engine: flows.Engine, command_id: str) -> list[tuple[str | None, str]]:
    return [(e.from_state, e.to_state) for e in engine.history(command_id)]


# --- success --------------------------------------------------------------------------------


@by_kind
async def test_success_stores_reply_usage_and_cost(
    provider: Provider, server: Server, db_path: Path
) -> None:
    server.queue(ok(provider))
    adapter = provider.adapter(server.url)
    async with flows.open_engine(db_path, adapters=[adapter]) as engine:
        command_id = await engine.submit("p", provider.chat["request"], timeout=5)
        command = await engine.wait(command_id)
    assert command.state == "done" and command.attempt == 1, command
    assert command.reply is not None
    assert command.reply.text == provider.chat["reply"]["text"]
    assert command.reply.usage == Usage(*CHAT_USAGE[provider.kind])
    assert command.cost == pytest.approx(CHAT_COST[provider.kind], rel=1e-12)
    assert len(server.requests) == 1
    assert server.requests[0].body["model"] == provider.model
    # What a later process reads back from the file is the same.
    store = flows.Store(db_path)
    try:
        stored = store.get(command_id)
    finally:
        store.close()
    assert stored.reply == command.reply and stored.cost == command.cost


@by_kind
async def test_stream_publishes_growing_progress_and_stores_the_reply_once(
    provider: Provider, server: Server, db_path: Path
) -> None:
    server.queue(canned(provider.stream["response"], chunk_delay=0.06))
    adapter = provider.adapter(server.url, stream=True)
    final = provider.stream["reply"]["text"]
    seen: list[str] = []
    async with flows.open_engine(db_path, adapters=[adapter]) as engine:
        with engine.subscribe() as notices:
            command_id = await engine.submit("p", provider.stream["request"], timeout=5)
            with trio.fail_after(5):
                async for notice in notices:
                    if isinstance(notice, flows.Progress):
                        assert notice.command_id == command_id
                        seen.append(notice.text)
                    elif (
                        isinstance(notice, flows.StateChange)
                        and notice.command.id == command_id
                        and notice.command.is_terminal
                    ):
                        break
        command = await engine.wait(command_id)
        history = engine.history(command_id)
    assert server.requests[0].body["stream"] is True
    assert len(seen) >= 3, seen
    assert all(final.startswith(text) for text in seen), seen
    assert [len(t) for t in seen] == sorted({len(t) for t in seen}), "text must grow"
    assert seen[-1] == final and seen.count(final) == 1
    assert command.state == "done" and command.reply is not None
    assert command.reply.text == final
    assert command.reply.usage == Usage(*STREAM_USAGE[provider.kind])
    assert [(e.from_state, e.to_state) for e in history] == [
        (None, "pending"),
        ("pending", "sent"),
        ("sent", "replied"),
        ("replied", "done"),
    ]


# --- retries --------------------------------------------------------------------------------


@by_kind
async def test_429_with_retry_after_is_honoured_then_succeeds(
    provider: Provider, server: Server, db_path: Path
) -> None:
    if provider.kind == "ollama":  # its fixtures have no 429: what a full queue says
        busy = {"error": "server busy, please try again.  maximum pending requests exceeded"}
        limited = json_response(busy, 429, {"retry-after": "1"})
    else:
        limited = provider.error("rate_limited", **{"retry-after": "1"})
    server.queue(limited, ok(provider))
    adapter = provider.adapter(server.url)
    async with flows.open_engine(db_path, adapters=[adapter], backoff=FAST_RETRIES) as engine:
        command = await engine.wait(await engine.submit("p", provider.chat["request"], timeout=5))
        history = engine.history(command.id)
    assert command.state == "done" and command.attempt == 2, command
    assert command.reply is not None and command.reply.usage == Usage(*CHAT_USAGE[provider.kind])
    # The error of the first attempt is kept on the record.
    assert command.error is not None and command.error.status == 429
    retry = [e for e in history if e.event == "retry"]
    assert len(retry) == 1 and retry[0].detail["delay"] >= 1.0
    assert retry[0].detail["error"]["status"] == 429
    first, second = server.arrived
    assert second - first >= 1.0 - 1e-3, "came back sooner than Retry-After: 1"
    assert second - first < 2.0


@by_kind
async def test_500_then_success(provider: Provider, server: Server, db_path: Path) -> None:
    if provider.kind == "anthropic":  # its fixtures have 529 overloaded, not a 500
        body = {"type": "error", "error": {"type": "api_error", "message": "Internal error"}}
        answer = json_response(body, 500)
    else:
        answer = provider.error("server_error")
    assert answer.status == 500
    server.queue(answer, ok(provider))
    adapter = provider.adapter(server.url)
    async with flows.open_engine(db_path, adapters=[adapter], backoff=FAST_RETRIES) as engine:
        command = await engine.wait(await engine.submit("p", provider.chat["request"], timeout=5))
    assert command.state == "done" and command.attempt == 2, command
    assert command.reply is not None and command.reply.text == provider.chat["reply"]["text"]
    assert command.cost == pytest.approx(CHAT_COST[provider.kind], rel=1e-12)
    assert len(server.requests) == 2


@by_kind
async def test_400_is_dead_at_once_with_the_providers_message(
    provider: Provider, server: Server, db_path: Path
) -> None:
    server.queue(provider.error("bad_request"), ok(provider))
    adapter = provider.adapter(server.url)
    async with flows.open_engine(db_path, adapters=[adapter], backoff=FAST_RETRIES) as engine:
        command = await engine.wait(await engine.submit("p", provider.chat["request"], timeout=5))
        dead = engine.store.dead_letters()
    assert command.state == "dead" and command.reason == "error", command
    assert command.attempt == 1 and len(server.requests) == 1, "a 400 is not retried"
    assert command.error is not None and command.error.status == 400
    assert provider.bad_request_words in command.error.message
    assert command.error.message.startswith("p: HTTP 400")
    assert [c.id for c, _, _ in dead] == [command.id]


@by_kind
@pytest.mark.parametrize("ending", ["cut", "eof"])
async def test_a_stream_cut_in_the_middle_is_retried(
    provider: Provider, ending: str, server: Server, db_path: Path
) -> None:
    server.queue(provider.cut_stream(ending), canned(provider.stream["response"]))
    adapter = provider.adapter(server.url, stream=True)
    async with flows.open_engine(db_path, adapters=[adapter], backoff=FAST_RETRIES) as engine:
        command = await engine.wait(await engine.submit("p", provider.stream["request"], timeout=5))
        replied = [e for e in engine.history(command.id) if e.to_state == "replied"]
    assert command.state == "done" and command.attempt == 2, command
    assert command.reply is not None and command.reply.text == provider.stream["reply"]["text"]
    assert len(replied) == 1, "the cut attempt's partial text is not a reply"


@by_kind
async def test_a_stream_cut_every_time_is_dead_with_retries_exhausted(
    provider: Provider, server: Server, db_path: Path
) -> None:
    server.queue(*(provider.cut_stream() for _ in range(3)), canned(provider.stream["response"]))
    adapter = provider.adapter(server.url, stream=True)
    async with flows.open_engine(db_path, adapters=[adapter], backoff=FAST_RETRIES) as engine:
        command = await engine.wait(
            await engine.submit("p", provider.stream["request"], timeout=5, max_attempts=3)
        )
    assert command.state == "dead" and command.reason == "retries_exhausted", command
    assert command.attempt == 3 and len(server.requests) == 3
    assert command.reply is None
    assert command.error is not None and command.error.type == "RetryableError"


# --- deadlines, dead letters and replay ----------------------------------------------------


@by_kind
async def test_a_slow_server_is_dead_lettered_then_replay_with_a_longer_timeout_succeeds(
    provider: Provider, server: Server, db_path: Path
) -> None:
    server.queue(attrs.evolve(ok(provider), delay=1.5), attrs.evolve(ok(provider), delay=0.3))
    adapter = provider.adapter(server.url)
    async with flows.open_engine(db_path, adapters=[adapter], backoff=FAST_RETRIES) as engine:
        started = time.monotonic()
        command = await engine.wait(
            await engine.submit("p", provider.chat["request"], timeout=0.5, max_attempts=1)
        )
        took = time.monotonic() - started
        assert command.state == "dead" and command.reason == "timeout", command
        assert command.reply is None and command.sent_at is not None
        assert command.finished_at is not None
        assert command.finished_at - command.sent_at <= 0.5 + 0.05
        assert took < 1.0, "the command waited for the slow server instead of its timeout"
        assert [c.id for c, _, _ in engine.store.dead_letters()] == [command.id]
        # The server is fast now (0.3 s); the replay gets 2 s.
        (new_id,) = await engine.replay([command.id], timeout=2.0)
        replayed = await engine.wait(new_id)
    assert replayed.state == "done" and replayed.replay_of == command.id, replayed
    assert replayed.timeout == 2.0 and replayed.attempt == 1
    assert replayed.reply is not None and replayed.reply.text == provider.chat["reply"]["text"]
    assert replayed.cost == pytest.approx(CHAT_COST[provider.kind], rel=1e-12)
    assert len(server.requests) == 2


async def test_a_slow_server_beyond_the_timeout_is_dead_with_reason_timeout(
    server: Server, db_path: Path
) -> None:
    server.queue(*(attrs.evolve(ok(OPENAI), delay=1.5) for _ in range(3)))
    adapter = OPENAI.adapter(server.url)
    async with flows.open_engine(db_path, adapters=[adapter], backoff=FAST_RETRIES) as engine:
        command = await engine.wait(
            await engine.submit("p", OPENAI.chat["request"], timeout=0.3, max_attempts=3)
        )
    assert command.state == "dead"
    assert (command.reason, command.attempt, len(server.requests)) == ("timeout", 1, 1)


MALFORMED = [
    (b'{"choices": [{"message": ', "the reply body is not JSON"),
    (b"<html>502 Bad Gateway</html>", "the reply body is not JSON"),
]
MISSING = {
    "openai": "choices is missing, expected a list",
    "anthropic": "content is missing, expected a list",
    "ollama": "message is missing, expected an object",
}


@by_kind
@pytest.mark.parametrize("body, words", [*MALFORMED, (b"{}", "")], ids=["cut", "html", "empty"])
async def test_a_malformed_reply_is_dead_with_error_naming_what_was_wrong(
    provider: Provider, body: bytes, words: str, server: Server, db_path: Path
) -> None:
    words = words or MISSING[provider.kind]
    server.queue(Canned(headers={"content-type": "application/json"}, body=body), ok(provider))
    adapter = provider.adapter(server.url)
    async with flows.open_engine(db_path, adapters=[adapter], backoff=FAST_RETRIES) as engine:
        command = await engine.wait(await engine.submit("p", provider.chat["request"], timeout=5))
    assert command.state == "dead" and command.reason == "error", command
    assert command.attempt == 1 and len(server.requests) == 1
    assert command.error is not None and command.error.type == "PermanentError"
    assert command.error.message.startswith("p: malformed reply: "), command.error.message
    assert words in command.error.message


async def test_cancelling_an_in_flight_call_stops_it_at_once(server: Server, db_path: Path) -> None:
    server.queue(attrs.evolve(ok(OPENAI), delay=3.0))
    adapter = OPENAI.adapter(server.url)
    async with flows.open_engine(db_path, adapters=[adapter], backoff=FAST_RETRIES) as engine:
        with engine.subscribe() as notices:
            command_id = await engine.submit("p", OPENAI.chat["request"], timeout=10)
            with trio.fail_after(5):
                async for notice in notices:
                    if isinstance(notice, flows.StateChange) and notice.command.state == "sent":
                        break
        while not server.requests:  # the request is on the wire
            await trio.sleep(0.01)
        started = time.monotonic()
        cancelled = await engine.cancel(command_id)
        command = await engine.wait(command_id)
        took = time.monotonic() - started
        await trio.sleep(0.3)
    assert cancelled.state == command.state == "cancelled", command
    assert command.reason == "cancelled_by_user" and command.attempt == 1
    assert took < 0.5
    assert len(server.requests) == 1, "a cancelled call is not sent again"


async def test_max_in_flight_bounds_the_calls_a_server_sees_at_once(
    server: Server, db_path: Path
) -> None:
    server.default = lambda request: attrs.evolve(ok(OPENAI), delay=0.25)
    adapter = OPENAI.adapter(server.url, max_in_flight=2)
    async with flows.open_engine(db_path, adapters=[adapter]) as engine:
        ids = [await engine.submit("p", OPENAI.chat["request"], timeout=10) for _ in range(6)]
        commands = [await engine.wait(i) for i in ids]
    assert all(c.state == "done" for c in commands)
    times = sorted(server.arrived)
    assert len(times) == 6
    # Two at a time: the third call can only start when one of the first two ended.
    assert all(times[i + 2] - times[i] >= 0.25 - 0.02 for i in range(4)), times
    assert times[1] - times[0] < 0.1, "the two slots were not used together"


# --- rate limits ----------------------------------------------------------------------------


async def test_requests_per_minute_spreads_quick_commands(server: Server, db_path: Path) -> None:
    """120 requests a minute is one every 0.5 s after a 1 s burst (GCRA, burst 1 s):
    five commands submitted at once reach the server at about 0, 0, 0, 0.5 and 1.0 s."""
    server.default = lambda request: ok(OPENAI)
    adapter = OPENAI.adapter(server.url, requests_per_minute=120)
    async with flows.open_engine(db_path, adapters=[adapter]) as engine:
        ids = [await engine.submit("p", OPENAI.chat["request"], timeout=10) for _ in range(5)]
        commands = [await engine.wait(i) for i in ids]
    assert all(c.state == "done" for c in commands), commands
    assert len(server.requests) == 5
    # slack: the burst's first requests each open a connection (tens of ms)
    # and so arrive later than a request reusing one.
    interval, burst, slack = 0.5, 1.0, 0.1
    for times in (sorted(server.arrived), sorted(c.sent_at or 0.0 for c in commands)):
        # Never more in any window than the budget: 1 + (burst + window) / interval.
        for i, j in itertools.combinations(range(len(times)), 2):
            window = times[j] - times[i]
            assert j - i + 1 <= 1 + (burst + window + slack) / interval, (i, j, times)
        assert times[2] - times[0] < 0.3, "the burst was not used"
        assert times[3] - times[0] >= interval - slack
        assert times[4] - times[3] >= interval - slack
        assert times[4] - times[0] < 2 * interval + 0.5, "throttled more than the budget"


async def test_key_reaches_the_server_only_in_its_header(server: Server, db_path: Path) -> None:
    """The key configured by variable name goes out in the provider's header, and nowhere
    in what the engine stores."""
    server.queue(ok(OPENAI), ok(ANTHROPIC))
    config = parse_config(
        OPENAI.toml(server.url, "o", api_key_env='"O_KEY"')
        + ANTHROPIC.toml(server.url, "a", api_key_env='"A_KEY"'),
        Path("dovecote.toml"),
    )
    env = {"O_KEY": SECRET, "A_KEY": SECRET + "-a"}
    adapters = [build_adapter(p, env) for p in config.providers]
    async with flows.open_engine(db_path, adapters=[a for a in adapters if a]) as engine:
        first = await engine.wait(await engine.submit("o", OPENAI.chat["request"], timeout=5))
        second = await engine.wait(await engine.submit("a", ANTHROPIC.chat["request"], timeout=5))
    assert first.state == second.state == "done"
    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"
    assert server.requests[1].headers["x-api-key"] == SECRET + "-a"
    for path in db_path.parent.glob(db_path.name + "*"):
        assert SECRET.encode() not in path.read_bytes(), path
