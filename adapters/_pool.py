"""A connection pool that costs the same per request with 1 or 1,000 connections.

httpx's default transport pools its connections in httpcore's
``AsyncConnectionPool``, which on every request and on every release walks all
its connections (and, for each idle one, all of them again) and all queued
requests (encode/httpcore#1035). With the few connections most programs keep
that is free; with an adapter's ``max_in_flight`` in the hundreds it costs more
CPU than the calls themselves: at 1,000 connections a round of 1,000 calls takes
tens of seconds on a local server that answers each in 50 ms.

``StackPool`` keeps what httpcore does per connection (its HTTP/1.1
``AsyncHTTPConnection``: connecting, TLS, framing, keep-alive expiry, noticing
a server that hung up) and replaces only the bookkeeping:

* the idle connections of each origin are a stack: a request takes the most
  recently used one, which is the likeliest still to be open, after checking
  that it is (``has_expired``: keep-alive expired, or the server closed it);
  a response closed after a complete exchange puts its connection back on
  top; one closed before (an error, a cancellation, a body not read to its
  end) or ended by ``Connection: close`` closes it;
* ``max_connections`` is a ``trio.Semaphore``: a request holds a slot from
  before it takes a connection until its response is closed, and waits in
  FIFO order when all are taken (up to the request's ``pool`` timeout, if it
  has one); a connection is opened only when its origin has no idle one, so
  one origin never has more than ``max_connections`` connections (nor all
  origins together: an idle connection of another origin is closed first);
* connections idle for longer than ``keepalive_expiry`` are closed from the
  bottom of the stack as requests come and go, a few at a time, instead of
  staying open until the next burst reaches them.

Every step is O(1) (the pruning amortised). It is HTTP/1.1 only (HTTP/2
multiplexes requests on one connection, which a stack of exclusive connections
does not model) and trio only, like the adapters. ``PooledTransport`` is
httpx's own ``AsyncHTTPTransport`` (its request and response conversion and
its mapping of httpcore's errors to httpx's) with a ``StackPool`` in place of
httpcore's; ``HttpAdapter.http_client`` uses it unless a proxy is configured in
the environment (see there).
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator

import httpcore
import httpx
import trio

KEEPALIVE_EXPIRY = 5.0
"""Seconds an idle connection is kept, as httpx's default ``Limits``."""

_Key = tuple[bytes, bytes, int]


def _key(origin: httpcore.Origin) -> _Key:
    """``httpcore.Origin`` compares by value but is not hashable."""
    return (origin.scheme, origin.host, origin.port)


class StackPool(httpcore.AsyncConnectionPool):
    """``StackPool(max_connections, *, ssl_context=None, keepalive_expiry=5.0,
    network_backend=None)``: an httpcore pool for HTTP/1.1 whose every step is
    O(1) (module docstring).

    It subclasses httpcore's pool only for its constructor's settings and
    ``create_connection``, so that a connection is made exactly as httpcore
    would make it; none of the base class's scheduling is used.
    """

    def __init__(
        self,
        max_connections: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        keepalive_expiry: float | None = KEEPALIVE_EXPIRY,
        network_backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        super().__init__(
            ssl_context=ssl_context,
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=network_backend,
        )
        self._size = max_connections
        self._expiry = keepalive_expiry
        self._slots = trio.Semaphore(max_connections)
        # Per origin, (idle since, connection), the most recently released last.
        self._idle: dict[_Key, deque[tuple[float, httpcore.AsyncConnectionInterface]]] = {}
        self._idle_count = 0
        self._busy: set[httpcore.AsyncConnectionInterface] = set()
        self._closed = False

    @property
    def connections(self) -> list[httpcore.AsyncConnectionInterface]:
        """The open connections: idle ones, then those serving a request."""
        idle = [connection for stack in self._idle.values() for _, connection in stack]
        return idle + list(self._busy)

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        if self._closed:
            raise RuntimeError("the connection pool is closed")
        if request.url.scheme not in (b"http", b"https"):
            scheme = request.url.scheme.decode("ascii", "replace")
            raise httpcore.UnsupportedProtocol(
                f"Request URL has an unsupported protocol '{scheme}://'."
            )
        origin = request.url.origin
        await self._acquire_slot(request.extensions.get("timeout", {}).get("pool"))
        connection: httpcore.AsyncConnectionInterface | None = None
        try:
            while True:
                connection = await self._checkout(origin)
                try:
                    response = await connection.handle_async_request(request)
                except httpcore.ConnectionNotAvailable:
                    # A kept-alive connection that turned out not to be
                    # usable after all; a new one never raises this.
                    self._busy.discard(connection)
                    await _close(connection)
                    continue
                break
        except BaseException:
            if connection is not None:
                self._busy.discard(connection)
                await _close(connection)
            self._slots.release()
            raise
        assert isinstance(response.stream, AsyncIterable)
        return httpcore.Response(
            status=response.status,
            headers=response.headers,
            content=_ReleasingStream(self, origin, connection, response.stream),
            extensions=response.extensions,
        )

    async def _acquire_slot(self, timeout: float | None) -> None:
        # Without waiting when a slot is free (no one can be queued then:
        # a released slot goes straight to the first waiter), which spares a
        # trip through the scheduler and, with a pool timeout, a deadline.
        try:
            self._slots.acquire_nowait()
            return
        except trio.WouldBlock:
            pass
        if timeout is None:
            await self._slots.acquire()
            return
        with trio.move_on_after(timeout):
            await self._slots.acquire()
            return
        raise httpcore.PoolTimeout(f"no connection free within {timeout}s")

    async def _checkout(self, origin: httpcore.Origin) -> httpcore.AsyncConnectionInterface:
        """An open idle connection to ``origin``, or a new one; marked busy."""
        stack = self._idle.get(_key(origin))
        while stack:
            _, connection = stack.pop()
            self._idle_count -= 1
            if connection.is_idle() and not connection.has_expired():
                break
            await _close(connection)
        else:
            if self._idle_count + len(self._busy) >= self._size:
                await self._evict_one()
            connection = self.create_connection(origin)
        self._busy.add(connection)
        return connection

    async def _evict_one(self) -> None:
        """Close the oldest idle connection of another origin, to stay within
        ``max_connections`` in all (only a pool shared by origins gets here)."""
        for key, stack in self._idle.items():
            if stack:
                _, connection = stack.popleft()
                self._idle_count -= 1
                if not stack:
                    del self._idle[key]
                await _close(connection)
                return

    async def _release(
        self, origin: httpcore.Origin, connection: httpcore.AsyncConnectionInterface
    ) -> None:
        """Called once per response, when it is closed."""
        self._busy.discard(connection)
        try:
            if not self._closed and connection.is_idle():
                now = time.monotonic()
                stack = self._idle.setdefault(_key(origin), deque())
                stack.append((now, connection))
                self._idle_count += 1
                await self._prune(stack, now)
            else:
                await _close(connection)
        finally:
            self._slots.release()

    async def _prune(
        self, stack: deque[tuple[float, httpcore.AsyncConnectionInterface]], now: float
    ) -> None:
        """Close up to two connections idle past their keep-alive from the
        bottom of ``stack``: more than the one each release adds, so an idle
        tail drains while requests come, but never a long pause for one."""
        if self._expiry is None:
            return
        for _ in range(2):
            if not stack or now - stack[0][0] <= self._expiry:
                return
            _, connection = stack.popleft()
            self._idle_count -= 1
            await _close(connection)

    async def aclose(self) -> None:
        """Close every connection, idle or serving a request (whose response
        then fails); later requests raise ``RuntimeError``."""
        self._closed = True
        connections = self.connections
        self._idle.clear()
        self._idle_count = 0
        self._busy.clear()
        for connection in connections:
            await _close(connection)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} [{len(self._busy)} busy, {self._idle_count} idle, "
            f"max {self._size}]>"
        )


async def _close(connection: httpcore.AsyncConnectionInterface) -> None:
    """Close ``connection``, even inside a cancelled scope (a socket close does
    not wait on the network, and leaving it open would leak it)."""
    # A connection that is being dropped has nothing left to fail.
    with trio.CancelScope(shield=True), contextlib.suppress(httpcore.NetworkError, OSError):
        await connection.aclose()


class _ReleasingStream(httpx.AsyncByteStream):
    """A response body that gives its connection back to the pool once closed.

    An ``httpx.AsyncByteStream`` too, so that a caller of ``StackPool`` may
    read a response as an ``httpx.Response`` without another layer around
    the body (``PooledTransport.pool``)."""

    def __init__(
        self,
        pool: StackPool,
        origin: httpcore.Origin,
        connection: httpcore.AsyncConnectionInterface,
        body: AsyncIterable[bytes],
    ) -> None:
        self._pool = pool
        self._origin = origin
        self._connection = connection
        self._body = body
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._body:
                yield part
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # httpcore decides here whether the connection can be reused (a
            # complete exchange) or must be closed; it must get to decide
            # even when the response is closed by a cancellation.
            aclose = getattr(self._body, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True):
                    await aclose()
        finally:
            await self._pool._release(self._origin, self._connection)


class PooledTransport(httpx.AsyncHTTPTransport):
    """``PooledTransport(max_connections, *, verify=True, trust_env=True,
    keepalive_expiry=5.0)``: httpx's HTTP transport over a ``StackPool``.

    ``verify`` and ``trust_env`` mean what they mean to httpx (certificates,
    ``SSL_CERT_FILE``); proxies are not supported here (an ``AsyncClient``
    given a transport ignores the proxy variables anyway).
    """

    def __init__(
        self,
        max_connections: int,
        *,
        verify: ssl.SSLContext | bool = True,
        trust_env: bool = True,
        keepalive_expiry: float | None = KEEPALIVE_EXPIRY,
    ) -> None:
        ssl_context = httpx.create_ssl_context(verify=verify, trust_env=trust_env)
        super().__init__(verify=ssl_context, trust_env=trust_env)
        # httpx keeps its pool in ``_pool`` (since 0.18); it is the one thing
        # replaced, and tests/test_adapter_pool.py checks that it is used.
        self._pool = self.pool = StackPool(
            max_connections, ssl_context=ssl_context, keepalive_expiry=keepalive_expiry
        )
        """The pool itself, for a caller that makes its requests in httpcore's
        form (``HttpAdapter._post``): it raises httpcore's errors, not httpx's."""
