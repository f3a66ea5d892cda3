"""The JSON-RPC connection itself, on in-memory streams: what a client that
sends faster than it reads gets, what cannot be encoded, a flood of notices."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import trio.testing

import flows
from adapters.human import HumanAdapter
from editor_bridge.framing import FrameReader, encode
from editor_bridge.rpc import FELL_BEHIND, Connection
from editor_bridge.server import Server
from tests.conftest import ask
from tests.editor import bridged

LIMIT = 64 * 1024


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
    connection = Connection(
        to_server_receive, from_server_send, handler, inline={"ping"}, max_outbox=LIMIT
    )
    answer = len(encode({"jsonrpc": "2.0", "id": 1000, "result": [1000]}))
    total = 3 * LIMIT // answer
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        for i in range(total):
            await to_server_send.send_all(
                encode({"jsonrpc": "2.0", "id": i, "method": "ping", "params": [i]})
            )
        await trio.testing.wait_all_tasks_blocked()
        # Backpressure: reading stops once a quarter of the bound is queued;
        # far fewer handled than sent, the rest still unread.
        assert LIMIT // 4 <= handled * answer < LIMIT // 2
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


async def test_a_client_that_falls_behind_is_told_and_disconnected() -> None:
    async def handler(*args: Any) -> Any:
        return None

    _, to_server_receive = trio.testing.memory_stream_one_way_pair()
    from_server_send, from_server_receive = trio.testing.lockstep_stream_pair()
    connection = Connection(to_server_receive, from_server_send, handler, max_outbox=LIMIT)
    notice = {"commandId": "x" * 100, "state": "sent"}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5):
            posted = 0
            while not connection.fell_behind:
                connection.notify("command/state", notice)  # never waits
                posted += 1
        size = len(encode({"jsonrpc": "2.0", "method": "command/state", "params": notice}))
        assert (posted - 1) * size <= LIMIT < posted * size
        # What was queued is dropped; what it is told instead is why.
        told = await FrameReader(from_server_receive).read()
        assert told is not None and told.body is not None
        message = json.loads(told.body)
        assert message["method"] == "server/error"
        assert message["params"]["code"] == FELL_BEHIND
        assert "fell behind" in message["params"]["message"]
        with trio.fail_after(5):
            while not connection.closed:
                await trio.sleep(0.01)
        connection.notify("command/state", notice)  # dropped, and no error


async def test_what_cannot_be_encoded_fails_its_own_message_alone() -> None:
    """A lone surrogate from inside (a provider's reply) goes out as U+FFFD; a
    NaN fails its answer with -32603; neither ends the connection."""

    async def handler(
        connection: Connection, method: str, params: Any, is_request: bool, ready: Any
    ) -> Any:
        return {"surrogate": "a\ud800b", "nan": [float("nan")], "ok": "fine"}[method]

    client, server = trio.testing.memory_stream_pair()
    connection = Connection(server, server, handler, inline={"surrogate", "nan", "ok"})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        for i, method in enumerate(("surrogate", "nan", "ok")):
            await client.send_all(encode({"jsonrpc": "2.0", "id": i, "method": method}))
        reader = FrameReader(client)
        answers = []
        for _ in range(3):
            frame = await reader.read()
            assert frame is not None and frame.body is not None
            answers.append(json.loads(frame.body, parse_constant=lambda name: 1 / 0))
        nursery.cancel_scope.cancel()
    assert answers[0] == {"jsonrpc": "2.0", "id": 0, "result": "a\ufffdb"}
    assert answers[1]["id"] == 1 and answers[1]["error"]["code"] == -32603
    assert answers[2]["result"] == "fine"


async def test_one_commit_of_thousands_of_notices_does_not_cut_the_bridge_off(
    tmp_path: Path,
) -> None:
    """10,001 notices published at once (a bulk submit) once overflowed the
    bridge's one subscription: the engine dropped it, nobody got another
    notification, and every human command died ('Nursery is closed')."""
    async with (
        flows.open_engine(tmp_path / "db", adapters=[HumanAdapter()]) as engine,
        bridged(Server(engine)) as editor,
    ):
        await engine.submit_many("scripted", [ask("#delay 600\nx")] * 10_001)
        editor.answer_human = lambda params: "yes"
        human = await editor.request(
            "command/submit", {"adapter": "human", "request": ask("well?")}
        )
        assert (await editor.wait_state(human["commandId"]))["state"] == "done"
