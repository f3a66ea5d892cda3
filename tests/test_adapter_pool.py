"""``adapters/_pool.py``: the O(1) connection pool an adapter's own client uses,
against real HTTP/1.1 servers on 127.0.0.1 (reuse, the connection cap, servers
that hang up, cancellation, the pool timeout, keep-alive expiry, closing)."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Iterator

import attrs
import httpx
import pytest
import trio

from adapters._pool import PooledTransport, StackPool
from adapters.base import AdapterSettings
from adapters.openai import OpenAIAdapter
from tests.fake_providers import (
    HELLO,
    Canned,
    FakeProvider,
    context,
    json_response,
    refused_url,
    serve,
    stream_response,
)

OK = {"ok": True}


def slow(seconds: float) -> Canned:
    return attrs.evolve(json_response(OK), delay=seconds)


@pytest.fixture
def server() -> Iterator[FakeProvider]:
    yield from serve()


def pooled(size: int, keepalive_expiry: float = 5.0) -> tuple[httpx.AsyncClient, StackPool]:
    transport = PooledTransport(size, keepalive_expiry=keepalive_expiry)
    pool = transport._pool
    assert isinstance(pool, StackPool)
    return httpx.AsyncClient(transport=transport), pool


async def post(client: httpx.AsyncClient, url: str, **kwargs: object) -> httpx.Response:
    response = await client.post(url, json={"q": 1}, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    return response


def ports(server: FakeProvider) -> list[int]:
    return [request.peer_port for request in server.requests]


async def test_sequential_requests_reuse_one_connection(server: FakeProvider) -> None:
    server.queue(*[json_response(OK) for _ in range(5)])
    client, pool = pooled(4)
    async with client:
        for _ in range(5):
            assert (await post(client, server.url)).json() == OK
        assert len(pool.connections) == 1
    assert len(set(ports(server))) == 1


async def test_concurrent_requests_never_exceed_max_connections(server: FakeProvider) -> None:
    server.queue(*[slow(0.1) for _ in range(18)])
    client, pool = pooled(3)
    busiest = 0

    async def one() -> None:
        nonlocal busiest
        await post(client, server.url)
        busiest = max(busiest, len(pool.connections))

    async with client:
        async with trio.open_nursery() as nursery:
            for _ in range(9):
                nursery.start_soon(one)
        assert busiest <= 3 and len(pool.connections) == 3
        async with trio.open_nursery() as nursery:  # the same three again
            for _ in range(9):
                nursery.start_soon(one)
    assert len(server.requests) == 18
    assert len(set(ports(server))) == 3


async def test_a_connection_the_server_closes_is_not_reused(server: FakeProvider) -> None:
    closing = json_response(OK, headers={"connection": "close"})
    server.queue(closing, json_response(OK), json_response(OK))
    client, pool = pooled(2)
    async with client:
        for _ in range(3):
            await post(client, server.url)
        assert len(pool.connections) == 1
    first, second, third = ports(server)
    assert first != second == third


async def test_an_idle_connection_the_server_dropped_is_replaced() -> None:
    """A server that answers one request per connection and then hangs up
    without saying so: the next request notices and opens a new connection."""
    body = b'{"ok": true}'
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    answer += b"content-length: %d\r\n\r\n%s" % (len(body), body)
    accepted = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        received = b""
        while b"\r\n\r\n" not in received or not received.endswith(b"}"):
            received += await stream.receive_some(65536)
        await stream.send_all(answer)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        serve_tcp = functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        (listener,) = await nursery.start(serve_tcp)
        url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}/"
        client, _ = pooled(2)
        async with client:
            for _ in range(3):
                await post(client, url)
                await trio.sleep(0.05)  # the server's FIN arrives
        nursery.cancel_scope.cancel()
    assert accepted == 3


async def test_a_body_not_read_to_its_end_closes_its_connection(server: FakeProvider) -> None:
    chunks = [b"x" * 100] * 5
    server.queue(
        stream_response(chunks, "text/plain", chunk_delay=0.02),
        json_response(OK),
        json_response(OK),
    )
    client, pool = pooled(1)
    async with client:
        async with client.stream("POST", server.url, json={}) as response:
            async for _ in response.aiter_bytes():
                break
        assert pool.connections == []
        for _ in range(2):
            await post(client, server.url)
    first, second, third = ports(server)
    assert first != second == third


async def test_a_cancelled_request_gives_its_slot_and_connection_back(
    server: FakeProvider,
) -> None:
    server.queue(slow(5), json_response(OK))
    client, pool = pooled(1)
    async with client:
        with trio.move_on_after(0.2) as scope:
            await post(client, server.url)
        assert scope.cancelled_caught
        assert pool.connections == []
        start = time.monotonic()
        await post(client, server.url)
        assert time.monotonic() - start < 1.0


async def test_a_full_pool_waits_until_the_pool_timeout(server: FakeProvider) -> None:
    server.queue(slow(1.0), json_response(OK))
    client, _ = pooled(1)
    async with client, trio.open_nursery() as nursery:
        nursery.start_soon(post, client, server.url)
        await trio.sleep(0.1)
        start = time.monotonic()
        with pytest.raises(httpx.PoolTimeout):
            await post(client, server.url, timeout=httpx.Timeout(None, pool=0.2))
        assert 0.2 <= time.monotonic() - start < 0.6


async def test_errors_are_httpx_errors_and_free_their_slot() -> None:
    client, pool = pooled(1)
    async with client:
        for _ in range(2):
            with trio.fail_after(2), pytest.raises(httpx.ConnectError):
                await client.post(refused_url(), json={})
        assert pool.connections == []


async def test_a_cut_body_is_a_read_error_and_drops_the_connection(server: FakeProvider) -> None:
    server.queue(
        stream_response([b"part"] * 3, "text/plain", ending="cut"),
        json_response(OK),
    )
    client, pool = pooled(1)
    async with client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(server.url, json={})
        assert pool.connections == []
        await post(client, server.url)


async def test_connections_idle_past_their_keepalive_are_closed(server: FakeProvider) -> None:
    """Three connections opened by a burst; then one at a time, always on the
    most recent: the two at the bottom of the stack are closed once expired,
    without waiting for a burst to reach them."""
    server.queue(slow(0.1), slow(0.1), slow(0.1), *[json_response(OK) for _ in range(10)])
    client, pool = pooled(3, keepalive_expiry=0.2)
    async with client:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(post, client, server.url)
        bottom = pool.connections[:2]
        assert len(pool.connections) == 3
        for _ in range(10):
            await post(client, server.url)
            await trio.sleep(0.04)
        assert len(pool.connections) == 1
        assert all(connection.is_closed() for connection in bottom)


async def test_aclose_closes_every_connection(server: FakeProvider) -> None:
    server.queue(stream_response([b"x"] * 3, "text/plain", chunk_delay=0.5), json_response(OK))
    client, pool = pooled(2)
    async with client, client.stream("POST", server.url, json={}) as response:
        await post(client, server.url)  # on a second connection, idle after
        connections = pool.connections
        assert len(connections) == 2
        await client.aclose()
        assert pool.connections == []
        assert all(connection.is_closed() for connection in connections)
        with pytest.raises(httpx.HTTPError):
            await response.aread()


# --- what an adapter gets -------------------------------------------------------------------


@pytest.fixture
async def adapter(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OpenAIAdapter]:
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    made = OpenAIAdapter(AdapterSettings(name="local", max_in_flight=7), stream=False)
    yield made
    await made.aclose()


async def test_an_adapters_own_client_pools_in_a_stack_pool(adapter: OpenAIAdapter) -> None:
    transport = adapter.http_client()._transport
    assert isinstance(transport, PooledTransport)
    assert isinstance(transport._pool, StackPool)
    assert "max 7" in repr(transport._pool)


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "all_proxy"])
async def test_with_a_proxy_in_the_environment_httpx_keeps_its_own_transport(
    adapter: OpenAIAdapter, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "http://127.0.0.1:3128")
    transport = adapter.http_client()._transport
    assert type(transport) is httpx.AsyncHTTPTransport


async def test_with_a_proxy_in_the_environment_a_send_goes_through_it(
    server: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adapter's own pool (and its straight path to it) is for direct
    connections only: with a proxy named, the request reaches the proxy, asking it
    for the provider's absolute URL."""
    for name in ("no_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", server.url)
    server.queue(json_response({"choices": [{"message": {"role": "assistant", "content": "via"}}]}))
    adapter = OpenAIAdapter(
        AdapterSettings(name="local"), base_url="http://provider.invalid/v1", stream=False
    )
    try:
        reply = await adapter.send(HELLO, context())
    finally:
        await adapter.aclose()
    assert reply.text == "via"
    assert server.requests[0].path == "http://provider.invalid/v1/chat/completions"
