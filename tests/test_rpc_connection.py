"""The JSON-RPC connection itself, on in-memory streams: what a client that
sends faster than it reads gets."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import trio
import trio.testing

from editor_bridge.framing import FrameReader, encode
from editor_bridge.rpc import OUTBOX_LIMIT, Connection


async def test_a_client_that_does_not_read_is_not_read_from_until_it_does() -> None:
    handled = 0

    async def handler(
        connection: Connection,
        method: str,
        params: Any,
        is_request: bool,
        ready: Callable[[], None],
    ) -> Any:
        nonlocal handled
        handled += 1
        return params

    to_server_send, to_server_receive = trio.testing.memory_stream_one_way_pair()
    # Lockstep: the server's write returns only once the client has read it.
    from_server_send, from_server_receive = trio.testing.lockstep_stream_pair()
    connection = Connection(to_server_receive, from_server_send, handler, inline={"ping"})
    total = 3 * OUTBOX_LIMIT
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        for i in range(total):
            await to_server_send.send_all(
                encode({"jsonrpc": "2.0", "id": i, "method": "ping", "params": [i]})
            )
        await trio.testing.wait_all_tasks_blocked()
        # Backpressure: far fewer handled than sent, the rest still unread.
        assert OUTBOX_LIMIT <= handled < 2 * OUTBOX_LIMIT + 64
        reader = FrameReader(from_server_receive)
        answers = []
        while len(answers) < total:
            frame = await reader.read()
            assert frame is not None and frame.body is not None
            answers.append(json.loads(frame.body))
        await to_server_send.aclose()
    assert handled == total
    assert [a["id"] for a in answers] == list(range(total))
    assert [a["result"] for a in answers] == [[i] for i in range(total)]
