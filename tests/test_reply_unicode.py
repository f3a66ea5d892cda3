"""A provider's reply that is not valid Unicode still reaches the person.

JSON may spell a lone surrogate (``"\\ud800"``), and Python decodes it into a
string that no UTF-8 encoder accepts: not SQLite's, not a log file's, not an
editor's. The adapters replace each with U+FFFD, so the person keeps the rest
of their text, and say so in the reply's ``raw["dovecote"]`` (and a warning).
Each provider answers from a local 127.0.0.1 server, streamed and not, and
the engine must store the reply, publish valid progress, and go on serving
the next command. An error message with a lone surrogate is cleaned the same.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import trio

import flows
from adapters.base import AdapterError
from flows.engine import Notice
from tests.fake_providers import HELLO, Canned, context, json_response
from tests.test_key_echoes import adapter_for, stream_chunks, whole_body
from tests.test_no_key_leaks import error_body
from tests.test_providers_e2e import PROVIDERS, Provider, Server

LONE = "one \ud800 two \udc00\ud801 three"
SHOWN = "one \ufffd two \ufffd\ufffd three"
REPLACED = 3


def answer(provider: Provider, how: str) -> Canned:
    """The reply ``LONE`` as ``how`` says: a JSON body with ``\\uXXXX`` escapes,
    one whose UTF-8 encodes the surrogates themselves (``json.loads`` lets
    them through), or a stream with them escaped in one of its pieces."""
    if how == "escaped":
        return json_response(whole_body(provider.kind, LONE))
    if how == "raw-bytes":
        body = json.dumps(whole_body(provider.kind, LONE), ensure_ascii=False)
        return Canned(
            headers={"content-type": "application/json"},
            body=body.encode("utf-8", "surrogatepass"),
        )
    chunks, content_type = stream_chunks(provider.kind, ["one ", LONE[4:]])
    return Canned(headers={"content-type": content_type}, chunks=chunks)


async def run(db: Path, provider: Provider, canned: Canned, stream: bool) -> tuple[Any, ...]:
    """One command answered by ``canned``, then one answered well; both
    commands and the notifications seen.

    First the adapter alone answers ``canned``: what it gives back must encode
    as UTF-8. (Before the fix the engine's committer then died on it, and the
    engine could not even close: this check makes that a failure, not a hang.)"""
    good = json_response(whole_body(provider.kind, "fine"))
    notices: list[Notice] = []
    with Server() as server:
        server.queue(canned, canned, good)
        adapter = adapter_for(provider, server.url, "sk-unused", stream)
        try:
            reply = await adapter.send(HELLO, context())
            said = json.dumps(reply.to_json(), ensure_ascii=False)
        except AdapterError as error:
            said = f"{error} {error.args}"
        said.encode("utf-8")
        with trio.fail_after(10):  # before the fix the committer died, and nothing answered
            async with flows.open_engine(db, adapters=[adapter]) as engine:
                with engine.subscribe() as channel:
                    request = {"messages": [{"role": "user", "content": "hi"}]}
                    first = await engine.wait(await engine.submit("p", request, max_attempts=1))
                    second = await engine.wait(await engine.submit("p", request))
                    while True:
                        try:
                            notices.append(channel.receive_nowait())
                        except trio.WouldBlock:
                            break
    return first, second, notices


def assert_valid_everywhere(db: Path, notices: list[Notice]) -> None:
    for notice in notices:
        repr(notice).encode("utf-8")
        if isinstance(notice, flows.Progress):
            notice.text.encode("utf-8")
    store = flows.Store.existing(db)
    try:
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        store.close()


@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.kind)
@pytest.mark.parametrize("how", ["escaped", "raw-bytes", "streamed"])
async def test_lone_surrogates_in_a_reply_become_u_fffd_and_are_recorded(
    provider: Provider, how: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    db = tmp_path / "dovecote.db"
    first, second, notices = await run(db, provider, answer(provider, how), how == "streamed")
    assert first.state == "done", first
    assert first.reply.text == SHOWN
    assert first.reply.raw["dovecote"]["lone_surrogates_replaced"]["text"] == REPLACED
    assert "lone surrogate" in caplog.text
    assert second.state == "done" and second.reply.text == "fine", second
    assert "dovecote" not in second.reply.raw
    if how == "streamed":
        progress = [n.text for n in notices if isinstance(n, flows.Progress)]
        assert progress and progress[-1] == SHOWN, progress
    assert_valid_everywhere(db, notices)
    stored = flows.Store.existing(db)
    try:
        assert stored.get(first.id).reply == first.reply
    finally:
        stored.close()


@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.kind)
async def test_a_lone_surrogate_in_an_error_message_is_replaced(
    provider: Provider, tmp_path: Path
) -> None:
    db = tmp_path / "dovecote.db"
    error = json_response(error_body(provider.kind, LONE), 400)
    first, second, notices = await run(db, provider, error, False)
    assert first.state == "dead" and first.error is not None, first
    assert SHOWN in first.error.message
    assert second.state == "done", second
    assert_valid_everywhere(db, notices)
