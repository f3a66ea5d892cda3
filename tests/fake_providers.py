"""Real HTTP servers on 127.0.0.1 that play an LLM provider for the adapter tests.

A ``FakeProvider`` is a ``ThreadingHTTPServer`` on an ephemeral port, in a
thread: the adapters under test talk to it over real sockets with real HTTP,
so what is tested includes httpx, framing, keep-alive and timeouts, not a
mock of them. Each test queues ``Canned`` answers and then reads back what
the server received (``requests``).

A canned answer can be delayed, streamed chunk by chunk, dripped forever, or
cut: ``ending="cut"`` drops the connection inside a chunked body (what a
crashed upstream looks like), ``ending="eof"`` ends a body that has no
framing cleanly but early (what a proxy that closes politely looks like).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs
import pytest

from adapters.base import Adapter, Message, PermanentError, Request, RetryableError, SendContext

FIXTURES = Path(__file__).parent / "fixtures" / "providers"

SECRET = "sk-test-DOVECOTE-secret-4f1c9e2a7b"
"""The API key every adapter test configures; it must never show up in an
error, a repr or a traceback."""


@attrs.frozen
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    raw: bytes
    peer_port: int

    @property
    def body(self) -> Any:
        return json.loads(self.raw)


@attrs.frozen
class Canned:
    status: int = 200
    headers: Mapping[str, str] = attrs.field(factory=dict)
    body: bytes = b""
    chunks: Sequence[bytes] | None = None
    chunk_delay: float = 0.0
    delay: float = 0.0
    ending: Literal["complete", "cut", "eof"] = "complete"
    forever: bool = False


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] = {}) -> Canned:
    return Canned(
        status=status,
        headers={"content-type": "application/json", **headers},
        body=json.dumps(data).encode(),
    )


def sse_bytes(events: Sequence[Mapping[str, Any]]) -> list[bytes]:
    """One chunk per event: ``{"event": name?, "data": object or raw string}``."""
    chunks = []
    for event in events:
        data = event["data"]
        text = data if isinstance(data, str) else json.dumps(data)
        head = f"event: {event['event']}\n" if event.get("event") else ""
        chunks.append(f"{head}data: {text}\n\n".encode())
    return chunks


def ndjson_bytes(lines: Sequence[Any]) -> list[bytes]:
    return [(json.dumps(line) + "\n").encode() for line in lines]


def stream_response(chunks: Sequence[bytes], content_type: str, **kwargs: Any) -> Canned:
    return Canned(headers={"content-type": content_type}, chunks=chunks, **kwargs)


def load_fixture(name: str) -> Any:
    """A file of ``tests/fixtures/providers``, with ``{api_key}`` standing for ``SECRET``."""
    return json.loads((FIXTURES / name).read_text().replace("{api_key}", SECRET))


def canned(response: Mapping[str, Any], **kwargs: Any) -> Canned:
    """The ``response`` of a fixture as the server will send it: a JSON body,
    SSE ``events`` or NDJSON ``lines``, one chunk per event or line."""
    if "events" in response:
        return stream_response(sse_bytes(response["events"]), response["content_type"], **kwargs)
    if "lines" in response:
        return stream_response(ndjson_bytes(response["lines"]), response["content_type"], **kwargs)
    return attrs.evolve(json_response(response["body"], response.get("status", 200)), **kwargs)


def assert_wire(received: Recorded, wire: Mapping[str, Any]) -> None:
    """The request the server got is the fixture's, exactly for the body and
    the path, and for the headers the fixture names."""
    assert received.method == wire["method"]
    assert received.path == wire["path"]
    assert received.body == wire["body"]
    for key, value in wire["headers"].items():
        assert received.headers.get(key, "").split(";")[0] == value, key


def context(seconds: float = 5.0, progress: Callable[[str], None] | None = None) -> SendContext:
    return SendContext(
        command_id="cmd-1",
        attempt=1,
        deadline=time.time() + seconds,
        report_progress=progress or (lambda text: None),
    )


def refused_url() -> str:
    """A URL on which nothing listens: bind a port, then let it go."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def assert_secret_free(*things: object, secret: str = SECRET) -> None:
    """Everything a user might see of these objects: str, repr, args and,
    for exceptions, the whole formatted traceback with its causes."""
    for thing in things:
        shown = [str(thing), repr(thing)]
        if isinstance(thing, BaseException):
            shown += [repr(thing.args), "".join(traceback.format_exception(thing))]
        for text in shown:
            assert secret not in text, f"the API key leaked into {text!r}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeProvider

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up on a slow answer is what some tests do


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        fake = self.server.fake
        raw = self.rfile.read(int(self.headers.get("content-length", "0")))
        headers = {key.lower(): value for key, value in self.headers.items()}
        canned = fake.record(
            Recorded(self.command, self.path, headers, raw, self.client_address[1])
        )
        try:
            self._answer(canned)
        except OSError:
            self.close_connection = True

    do_GET = do_POST

    def _answer(self, canned: Canned) -> None:
        stopping = self.server.fake.stopping
        if canned.delay and stopping.wait(canned.delay):
            self.close_connection = True
            return
        self.send_response(canned.status)
        for key, value in canned.headers.items():
            self.send_header(key, value)
        if canned.chunks is None:
            self.send_header("content-length", str(len(canned.body)))
            self.end_headers()
            self.wfile.write(canned.body)
            return
        if canned.ending == "eof":
            self.send_header("connection", "close")
        else:
            self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        while True:
            for chunk in canned.chunks:
                if canned.ending == "eof":
                    self.wfile.write(chunk)
                else:
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                if canned.chunk_delay and stopping.wait(canned.chunk_delay):
                    self.close_connection = True
                    return
            if not canned.forever:
                break
        if canned.ending == "complete":
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.close_connection = True


class FakeProvider:
    """``with FakeProvider() as server: server.queue(...); ... server.requests``."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.stopping = threading.Event()
        self._answers: deque[Canned] = deque()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def queue(self, *answers: Canned) -> None:
        with self._lock:
            self._answers.extend(answers)

    def record(self, request: Recorded) -> Canned:
        with self._lock:
            self.requests.append(request)
            if self._answers:
                return self._answers.popleft()
        return json_response({"error": "the test queued no answer"}, status=418)

    def __enter__(self) -> FakeProvider:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


A = TypeVar("A", bound=Adapter)

HELLO = Request(messages=(Message("user", "hello"),))


async def made_by(build: Callable[..., A]) -> AsyncIterator[Callable[..., A]]:
    """The body of each test module's ``make`` fixture: a factory of adapters
    (``build(**overrides)``), every one closed after the test."""
    made: list[A] = []

    def factory(**kwargs: Any) -> A:
        adapter = build(**kwargs)
        made.append(adapter)
        return adapter

    yield factory
    for adapter in made:
        await adapter.aclose()


async def fails(adapter: Adapter, request: Request = HELLO, seconds: float = 5) -> Any:
    """The error ``adapter.send`` raises, checked to carry no key."""
    with pytest.raises((RetryableError, PermanentError)) as caught:
        await adapter.send(request, context(seconds))
    assert_secret_free(caught.value, adapter)
    return caught.value


def serve() -> Iterator[FakeProvider]:
    """The body of each test module's ``server`` fixture."""
    with FakeProvider() as fake:
        yield fake
