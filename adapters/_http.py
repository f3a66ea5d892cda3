"""What the HTTP adapters share: the client, the time budget, error mapping,
and the two line formats providers stream in (SSE and NDJSON).

Every provider module is a subclass of ``HttpAdapter`` that only knows its own
dialect: the endpoint, the headers, the body, and how to read a reply or a
stream. The rules that must hold for *every* provider live here once:

* the command's deadline belongs to the engine: when it passes, the engine's
  timer dead-letters the command with reason ``timeout`` (not retried) and
  cancels the send, which lets the cancellation through. The adapter's own
  limit, ``settings.timeout``, applies when it is nearer than the deadline:
  then a silent server, a slow-drip stream or a full pool ends in a
  ``RetryableError`` and the engine tries again. That one trio scope is the
  only clock of a send: httpx's per-operation timeouts are switched off for
  these requests (``NO_TIMEOUT``), since one of the same budget, started
  later, could never fire first, and each would cost a trio deadline per
  socket read and write;
* failures are classified the same way for everyone (``error_for_status``),
  with the provider's own words in the message;
* what a send gives back is free of the API key and is valid Unicode: the
  reply, each progress report and every error (its message, its args, its
  cause), since a misconfigured local server may echo the header it received
  and JSON may spell a lone surrogate (``adapters/_redact.py`` says how). Texts
  are cleaned before they are cut short, and ``send`` cleans every error that
  leaves it, whatever raised it.
"""

from __future__ import annotations

import json
import logging
import math
import time
import traceback
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

import attrs
import httpcore
import httpx
import trio

from adapters._pool import PooledTransport
from adapters._redact import NO_SECRET, Redactor, clean_json, redact_http_logs, repair
from adapters.base import (
    AdapterError,
    AdapterSettings,
    PermanentError,
    Reply,
    Request,
    RetryableError,
    SendContext,
    error_for_status,
    parse_retry_after,
)

DEADLINE_MARGIN = 0.1
"""Seconds past the command's deadline before a send gives up by itself. The
engine's timer fires first; the margin only matters to a caller with no
engine behind it, which then gets a ``RetryableError`` just after the
deadline instead of a send that never ends."""

PROGRESS_INTERVAL = 0.05
"""At most ~20 progress reports a second: the engine journals and publishes
each one, and an editor does not need to redraw faster than that."""

DRAIN_GRACE = 0.25
"""After a stream's terminal event, how long to wait for the body's end so
the connection can go back to the pool; past it the connection is dropped."""

SNIPPET = 200

NO_TIMEOUT = httpx.Timeout(None)
"""What a send asks of httpx: no timeouts of its own (see the module docstring)."""

_NO_TIMEOUT_EXTENSIONS = {"timeout": NO_TIMEOUT.as_dict()}

_POOL_ERRORS = (
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.ProxyError,
    httpcore.UnsupportedProtocol,
)
"""What the pool raises that httpx calls a ``TransportError`` (its timeouts
aside): a send through the pool fails with them as through httpx."""

T = TypeVar("T")

log = logging.getLogger(__name__)


# --- time ---------------------------------------------------------------------------------


def time_budget(deadline: float, timeout: float, now: float | None = None) -> float:
    """Seconds one send may take: ``timeout`` when it ends before the
    command's deadline; otherwise a little past the deadline, which the
    engine enforces itself (see the module docstring).

    ``deadline`` is wall-clock (epoch seconds) because the engine stores it;
    the budget is turned into a relative trio deadline at once, so a clock
    step during the send cannot stretch it.
    """
    remaining = deadline - (time.time() if now is None else now)
    return timeout if timeout < remaining else remaining + DEADLINE_MARGIN


@attrs.define
class ProgressThrottle:
    """Forwards the text so far to ``report`` at most once per ``interval``,
    cleaned by ``redactor`` (see ``adapters/_redact.py``).

    Time-based rather than count-based because providers differ by an order
    of magnitude in how many tokens they put in one event. While the text
    grows, an end that could be the start of the key is held back: the key
    may be split across two events. ``finish`` makes sure the last report
    carries the whole final text, exactly once.
    """

    report: Callable[[str], None]
    redactor: Redactor = NO_SECRET
    interval: float = PROGRESS_INTERVAL
    clock: Callable[[], float] = time.monotonic
    _last_time: float = -math.inf
    _last_text: str | None = None

    def update(self, text: str) -> None:
        now = self.clock()
        if now - self._last_time >= self.interval:
            shown = self._shown(text)
            shown = shown[: len(shown) - self.redactor.unsafe_tail(shown)]
            if shown and shown != self._last_text:
                self._emit(shown, now)

    def finish(self, text: str) -> None:
        shown = self._shown(text)
        if shown != self._last_text:
            self._emit(shown, self.clock())

    def _shown(self, text: str) -> str:
        return self.redactor.text(repair(text)[0])

    def _emit(self, text: str, now: float) -> None:
        self._last_time = now
        self._last_text = text
        self.report(text)


# --- typed access to JSON -----------------------------------------------------------------


class Malformed(ValueError):
    """A reply that is not what the provider documents. The adapter turns it
    into a ``PermanentError``: sending the same request again would get the
    same unreadable answer.

    ``sample`` is the unreadable text, kept whole: the adapter cleans it
    before it cuts it to a snippet for the message (``shown``)."""

    def __init__(self, message: str, sample: str | None = None) -> None:
        super().__init__(message)
        self.sample = sample

    def shown(self, clean: Callable[[str], str]) -> str:
        if self.sample is None:
            return clean(str(self))
        return clean(f"{self}; it starts {snippet(clean(self.sample))!r}")


MISSING: Any = object()


def member(obj: Mapping[str, Any], key: str) -> Any:
    """``obj[key]``, or ``MISSING`` so the error can say "missing" rather than "null"."""
    return obj.get(key, MISSING)


def describe(value: object) -> str:
    if value is MISSING:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _expect(value: object, kind: type[T], expected: str, where: str) -> T:
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise Malformed(f"{where} is {describe(value)}, expected {expected}")


def as_dict(value: object, where: str) -> dict[str, Any]:
    return _expect(value, dict, "an object", where)


def as_list(value: object, where: str) -> list[Any]:
    return _expect(value, list, "a list", where)


def as_str(value: object, where: str) -> str:
    return _expect(value, str, "a string", where)


def as_count(value: object, where: str, default: int | None = None) -> int:
    """A token count: a non-negative integer (``default`` when absent or null)."""
    if default is not None and (value is MISSING or value is None):
        return default
    count = _expect(value, int, "a non-negative integer", where)
    if count < 0:
        raise Malformed(f"{where} is {count}, expected a non-negative integer")
    return count


def parse_json(raw: bytes | str, where: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        raise Malformed(f"{where} is not JSON ({exc})", sample=text) from None


def snippet(text: str) -> str:
    text = text.strip()
    return text if len(text) <= SNIPPET else text[:SNIPPET] + "..."


# --- line formats -------------------------------------------------------------------------


@attrs.frozen
class SSEEvent:
    event: str
    data: str


@attrs.define
class SSEDecoder:
    """Server-sent events, one line at a time (WHATWG HTML, "event stream
    interpretation"), for lines as ``httpx.Response.aiter_lines`` yields them.

    Synchronous on purpose: the caller keeps the ``async for`` over the
    response, so there is no async generator to finalize when a stream is
    abandoned half-way (which trio does not do for us). An event not yet
    ended by a blank line when the body ends is never returned: that is how
    a cut stream looks from here.
    """

    _event: str = ""
    _data: list[str] = attrs.field(factory=list)

    def feed(self, line: str) -> SSEEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = SSEEvent(self._event or "message", "\n".join(self._data))
            self._event = ""
            self._data = []
            return event
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None


async def drain(lines: AsyncIterator[str]) -> None:
    """Read what is left of a finished stream so its connection can be reused.

    The reply is already complete, so nothing here may fail the send: a
    server that keeps the body open or closes it rudely only costs us the
    connection.
    """
    with trio.move_on_after(DRAIN_GRACE):
        try:
            async for _ in lines:
                pass
        except httpx.HTTPError:
            pass


# --- the adapter --------------------------------------------------------------------------


def strip_slash(value: str) -> str:
    return value.rstrip("/")


def environment_proxies() -> bool:
    """Whether httpx would send some requests through a proxy named by the
    environment (or, on macOS and Windows, the system settings)."""
    proxies = urllib.request.getproxies()
    return any(proxies.get(scheme) for scheme in ("http", "https", "all"))


@attrs.frozen
class _Target:
    """An adapter's endpoint and headers as given, and as a request needs them."""

    endpoint: str
    headers: dict[str, str]
    url: httpx.URL
    parsed: httpx.Headers
    core_url: httpcore.URL
    before_length: list[tuple[bytes, bytes]]
    after_length: list[tuple[bytes, bytes]]


@attrs.define(eq=False)
class HttpAdapter:
    """The part of every HTTP adapter that is not a provider's dialect.

    ``client`` may be injected (tests, a shared proxy configuration); an
    injected client belongs to its caller and ``aclose`` leaves it open.
    Otherwise one client per adapter is created on first use, so that calls
    share a connection pool sized to ``settings.max_in_flight``, and closed by
    ``aclose``.

    ``api_key_env`` only names the variable the key came from, for the error
    a send raises when a key was expected but the variable was not set.
    """

    KIND = "http"

    settings: AdapterSettings
    base_url: str = attrs.field(kw_only=True, converter=strip_slash)
    model: str | None = attrs.field(default=None, kw_only=True)
    api_key: str | None = attrs.field(default=None, kw_only=True, repr=False)
    api_key_env: str | None = attrs.field(default=None, kw_only=True)
    stream: bool = attrs.field(default=True, kw_only=True)
    _client: httpx.AsyncClient | None = attrs.field(
        default=None, kw_only=True, alias="client", repr=False
    )
    _owns_client: bool = attrs.field(default=False, init=False, repr=False)
    _transport: PooledTransport | None = attrs.field(default=None, init=False, repr=False)
    _parsed_target: _Target | None = attrs.field(default=None, init=False, repr=False)
    _redactor: Redactor | None = attrs.field(default=None, init=False, repr=False)

    # -- what a provider module supplies --

    def endpoint(self) -> str:
        raise NotImplementedError

    def headers(self) -> dict[str, str]:
        raise NotImplementedError

    def body(self, request: Request) -> dict[str, Any]:
        """The JSON body for ``request``; raises ``PermanentError`` for a
        request this provider cannot express."""
        raise NotImplementedError

    def parse_reply(self, data: Any) -> Reply:
        """A whole (non-streamed) reply; raises ``Malformed``."""
        raise NotImplementedError

    async def read_stream(self, lines: AsyncIterator[str], progress: ProgressThrottle) -> Reply:
        """A streamed reply, from the body's lines; raises ``Malformed``,
        ``AdapterError`` for an error inside the stream, and ``StreamCut``
        when the body ends before the provider's terminal event."""
        raise NotImplementedError

    def error_message(self, data: Any) -> str | None:
        """The provider's own message in an error body, if it has one."""
        raise NotImplementedError

    # -- the shared protocol --

    async def send(self, request: Request, context: SendContext) -> Reply:
        try:
            return await self._send(request, context)
        except AdapterError as exc:
            self._scrub(exc)
            raise
        except Exception as exc:
            # Not a failure this module foresaw (a key httpx cannot put in a
            # header raises UnicodeEncodeError with the header in its args):
            # sending it again would meet it again.
            message = self._clean(f"{self.settings.name}: {type(exc).__name__}: {exc}")
            log.error("unexpected failure of a send: %s", message)
            raise PermanentError(message) from None

    async def _send(self, request: Request, context: SendContext) -> Reply:
        if self.api_key is None and self.api_key_env is not None:
            raise PermanentError(
                f"{self.settings.name}: the environment variable {self.api_key_env} "
                "named by api_key_env is not set"
            )
        body = self.body(request)
        self.redactor()  # before the first request: it also guards httpx's logs
        budget = time_budget(context.deadline, self.settings.timeout)
        if budget <= 0:
            raise RetryableError(f"{self.settings.name}: no time left before the deadline")
        with trio.move_on_after(budget):
            return await self._exchange(body, context)
        raise RetryableError(
            f"{self.settings.name}: no complete reply from {self.safe_url()} "
            f"within {budget:.2f}s (the command's deadline or the adapter's timeout)"
        )

    async def aclose(self) -> None:
        client, self._client = self._client, None
        self._transport = self._parsed_target = None
        if client is not None and self._owns_client:
            self._owns_client = False
            await client.aclose()

    def http_client(self) -> httpx.AsyncClient:
        """The injected client, or this adapter's own: ``max_in_flight``
        connections pooled in a ``StackPool`` (``adapters/_pool.py``), whose
        cost per request does not grow with the number of connections as
        httpcore's pool's does. When the environment names a proxy
        (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, as httpx reads them),
        httpx's own transport is kept, since only it routes through proxies."""
        if self._client is None:
            size = max(1, self.settings.max_in_flight)
            transport = None if environment_proxies() else PooledTransport(size)
            self._client = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
                headers={"user-agent": "dovecote"},
                transport=transport,
            )
            self._owns_client = True
            self._transport = transport
        return self._client

    def safe_url(self) -> str:
        """The endpoint without user-info or query, which may hold secrets."""
        url = httpx.URL(self.endpoint())
        port = f":{url.port}" if url.port is not None else ""
        return f"{url.scheme}://{url.host}{port}{url.path}"

    def _target(self, client: httpx.AsyncClient) -> _Target:
        """The endpoint and the headers of a request, parsed once and kept
        while ``endpoint()`` and ``headers()`` give the same: httpx parses a
        URL given as a string and normalises a dict of headers on every
        request. For a request that goes straight to the pool (``_post``)
        they are made in httpcore's form from a request httpx builds once,
        so they are what ``client.build_request`` would send: the client's
        headers updated with the adapter's, ``Host``, and around the body's
        length (``Content-Length``) the JSON content type."""
        endpoint, headers = self.endpoint(), self.headers()
        target = self._parsed_target
        if target is None or target.endpoint != endpoint or target.headers != headers:
            url = httpx.URL(endpoint)
            model = client.build_request("POST", url, json={}, headers=headers).headers.raw
            at = next(i for i, (k, _) in enumerate(model) if k.lower() == b"content-length")
            target = self._parsed_target = _Target(
                endpoint=endpoint,
                headers=headers,
                url=url,
                parsed=httpx.Headers(headers),
                core_url=httpcore.URL(
                    scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
                ),
                before_length=model[:at],
                after_length=model[at + 1 :],
            )
        return target

    async def _post(self, body: dict[str, Any]) -> httpx.Response:
        """POST ``body`` as JSON; the response's body is not read yet.

        With the adapter's own client the request goes straight to its pool
        (``PooledTransport.pool``), made in httpcore's form from headers made
        once (``_target``), and its answer is read as an ``httpx.Response``:
        what ``AsyncClient.send`` and the transport add around the pool
        (auth, redirects, event hooks, cookies, timing, a log line, a second
        form of every request, headers normalised twice) is nothing this
        client is configured to do, and it cost about a quarter of the CPU of
        a call (bench/overhead.py, "adapter alone" against raw httpx). The
        pool raises httpcore's errors, which ``_exchange`` classifies as it
        does httpx's. The one difference on the wire: cookies a server sets
        are not sent back, so one command's reply cannot change another's
        request. An injected client, or the proxy-aware one, gets the whole
        of ``send``: its configuration belongs to its owner."""
        client = self.http_client()
        target = self._target(client)
        transport = self._transport
        if transport is None:
            request = client.build_request(
                "POST", target.url, json=body, headers=target.parsed, timeout=NO_TIMEOUT
            )
            return await client.send(request, stream=True)
        # The bytes httpx's ``json=`` makes (httpx._content.encode_json).
        content = json.dumps(
            body, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode("utf-8")
        length = (b"Content-Length", str(len(content)).encode("ascii"))
        answer = await transport.pool.handle_async_request(
            httpcore.Request(
                b"POST",
                target.core_url,
                headers=[*target.before_length, length, *target.after_length],
                content=content,
                extensions=_NO_TIMEOUT_EXTENSIONS,
            )
        )
        assert isinstance(answer.stream, httpx.AsyncByteStream)  # the pool's own body
        return httpx.Response(
            answer.status,
            headers=answer.headers,
            stream=answer.stream,
            extensions=answer.extensions,
        )

    async def _exchange(self, body: dict[str, Any], context: SendContext) -> Reply:
        name = self.settings.name
        try:
            response = await self._post(body)
            try:
                if not 200 <= response.status_code <= 299:
                    raise self.status_error(response, await response.aread())
                # A server may ignore "stream": true and answer whole; read
                # what it sent rather than fail on a missing terminal event.
                if self.stream and not response.headers.get("content-type", "").startswith(
                    "application/json"
                ):
                    progress = ProgressThrottle(context.report_progress, self.redactor())
                    reply = await self.read_stream(response.aiter_lines(), progress)
                    return self._cleaned(reply)
                raw = await response.aread()
                reply = self.parse_reply(parse_json(raw, "the reply body"))
                return self._cleaned(reply, raw)
            finally:
                await response.aclose()
        except Malformed as exc:
            raise PermanentError(f"{name}: malformed reply: {exc.shown(self._clean)}") from None
        except StreamCut as exc:
            raise RetryableError(f"{name}: stream cut: {exc}") from None
        except (httpx.TimeoutException, httpcore.TimeoutException) as exc:
            raise RetryableError(
                f"{name}: timed out talking to {self.safe_url()} ({type(exc).__name__})"
            ) from exc
        except (httpx.TransportError, *_POOL_ERRORS) as exc:
            raise RetryableError(
                f"{name}: {type(exc).__name__} talking to {self.safe_url()}: "
                f"{str(exc) or 'no detail'}"
            ) from exc
        except httpx.DecodingError as exc:
            raise PermanentError(f"{name}: malformed reply: undecodable body: {exc}") from exc

    def status_error(self, response: httpx.Response, raw: bytes) -> AdapterError:
        status = response.status_code
        message: str | None = None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = None
        if data is not None:
            try:
                message = self.error_message(data)
            except Malformed:
                message = None
        if not message:
            text = self._clean(raw.decode("utf-8", "replace"))
            message = snippet(text) or response.reason_phrase
        if 300 <= status <= 399:
            message += f" (redirected to {response.headers.get('location', '?')}; check base_url)"
        return error_for_status(
            status,
            f"{self.settings.name}: HTTP {status}: {message}",
            retry_after=retry_after(response.headers, time.time()),
        )

    def stream_error(self, message: str, status: int | None) -> AdapterError:
        """An error a provider reported inside a 200 stream. Without a status
        it is taken as the server's fault: the request was accepted."""
        text = f"{self.settings.name}: error in stream: {message}"
        if status is None:
            return RetryableError(text)
        return error_for_status(status, text)

    # -- what leaves a send: no key, valid Unicode (``adapters/_redact.py``) --

    def redactor(self) -> Redactor:
        """The ``Redactor`` of this adapter's key, built once per key."""
        if self._redactor is None or self._redactor.secret != self.api_key:
            self._redactor = Redactor(self.api_key)
            redact_http_logs(self._redactor)
        return self._redactor

    def _clean(self, text: str) -> str:
        return self.redactor().text(repair(text)[0])

    def _clean_counted(self, text: str) -> tuple[str, int]:
        repaired, count = repair(text)
        return self.redactor().text(repaired), count

    def _scrub(self, error: AdapterError) -> None:
        """Cleans ``error``'s message, and drops its cause when the
        cause's traceback would show the key (httpx quotes a header it refuses)."""
        message = self._clean(error.message)
        if message != error.message:
            error.message = message
            error.args = (message,)
        cause = error.__cause__
        if cause is not None:
            shown = "".join(traceback.format_exception(cause))
            if self._clean(shown) != shown:
                error.__cause__ = None
                error.__suppress_context__ = True

    def _cleaned(self, reply: Reply, body: bytes | None = None) -> Reply:
        """``reply`` without the key (a debugging proxy or an echo server may
        put it in ``raw``) and with valid Unicode; lone surrogates replaced by
        U+FFFD are counted in ``raw["dovecote"]`` and logged.

        ``body`` is the JSON text ``reply.raw`` was parsed from, when it was:
        without ``\\u`` escapes and UTF-8 that could encode a surrogate, and
        without the key spelled in any way (``absent_from_json``, and no mark
        of another spelling: ``Redactor.marks``), every string in ``raw`` is
        clean already, which spares walking it; ``text`` is still looked at,
        since pieces joined may spell the key."""
        key = self.api_key
        if (
            body is not None
            and b"\xed" not in body
            and (absent_from_json(key, body) if key else b"\\u" not in body)
            and not self.redactor().marks(body)
        ):
            text = self.redactor().text(reply.text)
            return reply if text == reply.text else attrs.evolve(reply, text=text)
        text, in_text = self._clean_counted(reply.text)
        raw = clean_json(reply.raw, self._clean_counted)
        if not (in_text or raw.repaired):
            return attrs.evolve(reply, text=text, raw=raw.value)
        log.warning(
            "%s: replaced %d lone surrogate(s) in a reply's text, %d in its raw body",
            self.settings.name,
            in_text,
            raw.repaired,
        )
        note = {"lone_surrogates_replaced": {"text": in_text, "raw": raw.repaired}}
        kept = raw.value if isinstance(raw.value, dict) else {"provider": raw.value}
        return attrs.evolve(reply, text=text, raw={**kept, "dovecote": note})


def absent_from_json(text: str, body: bytes) -> bool:
    """True when no string (or number) in the JSON document ``body`` can contain
    ``text``; False when it may.

    A JSON string spells a character either literally or as an escape: ``\\uXXXX``
    (any character) or one of ``\\" \\\\ \\/ \\b \\f \\n \\r \\t``. When ``body`` has no
    ``\\u`` and ``text`` holds none of the characters the short escapes stand for,
    every occurrence of ``text`` in a decoded string is spelled literally in
    ``body``, so looking for its UTF-8 bytes in ``body`` settles it (a body
    ``json.loads`` would read as UTF-16 or UTF-32 gets False).
    """
    if '"' in text or "\\" in text or "/" in text or not text.isprintable():
        return False
    if text.encode() in body or b"\\u" in body:
        return False
    return json.detect_encoding(body) in ("utf-8", "utf-8-sig")


class StreamCut(Exception):
    """The body ended before the provider's terminal event."""


def retry_after(headers: httpx.Headers, now: float) -> float | None:
    """``Retry-After`` (seconds or HTTP date), preferring OpenAI's finer
    ``retry-after-ms`` when a server sends it."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    return parse_retry_after(headers.get("retry-after"), now)
