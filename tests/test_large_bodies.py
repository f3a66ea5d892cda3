"""A large body decoded in turns (``editor_bridge.large``) means exactly what
``editor_bridge.decode.decode`` makes of it, whatever the strings hold and
wherever the pieces are cut; and it really takes turns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

import editor_bridge.large as large
from editor_bridge.decode import decode
from editor_bridge.large import decode_large
from tests.editor import served
from tests.test_bridge_faults import call, still_serving
from tests.test_rpc_boundary import frame, refused_notice, surrogates

# Characters that make the cutting hard: escapes, their tails, multibyte and
# astral characters (two \u escapes when ASCII-encoded), controls, quotes.
TRICKY = st.sampled_from(
    [*'\\"/bfnrtu0123456789abcdefABCDEF ,:{}[]\n\t\x00\x1fé€🦆', "\U0010ffff", "x"]
)
STRINGS = st.text(TRICKY, max_size=60) | st.text(max_size=30)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | STRINGS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(STRINGS, inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(autouse=True)
def tiny_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of a few bytes, so that every kind of place gets cut."""
    monkeypatch.setattr(large, "LARGE_STRING", 8)
    monkeypatch.setattr(large, "PIECE", 5)
    monkeypatch.setattr(large, "SCAN", 7)


def same(body: bytes) -> None:
    expected = decode(body)
    got = trio.run(decode_large, body)
    assert (got.error is None) == (expected.error is None), (got, expected)
    assert (got.refused is None) == (expected.refused is None), (got, expected)
    if expected.error is None and expected.refused is None:
        assert got.value == expected.value or json.dumps(got.value) == json.dumps(expected.value)


@settings(max_examples=300, deadline=None)
@given(VALUES, st.booleans())
def test_a_value_decodes_the_same_in_pieces(value: Any, ascii_only: bool) -> None:
    same(json.dumps(value, ensure_ascii=ascii_only, allow_nan=True).encode())


@settings(max_examples=300, deadline=None)
@given(VALUES, st.data())
@example(value="x" * 40, data=None)
def test_a_mangled_body_is_refused_the_same(value: Any, data: st.DataObject | None) -> None:
    body = bytearray(json.dumps(value, ensure_ascii=False, allow_nan=True).encode())
    if data is not None and body:
        at = data.draw(st.integers(0, len(body) - 1))
        body[at] = data.draw(st.sampled_from([*b'"\\\x00\xff\xc3\xed{', 0x80]))
    same(bytes(body))


@pytest.mark.parametrize(
    "body",
    [
        b'{"text": "' + b"a" * 30 + b"\\ud800" + b'"}',  # a lone surrogate, escaped
        b'{"text": "' + b"a" * 30 + b"\\ud83d\\ude00" + b'"}',  # a pair: fine
        b'{"text": "' + b"a" * 30 + b'\xed\xa0\x80"}',  # a surrogate in UTF-8: not UTF-8
        b'{"text": "' + b"a" * 30 + b"\xff" + b'"}',
        b'{"text": "' + b"a" * 30,  # never closed
        b'{"text": "' + b"a" * 30 + b"\\",
        b'{"' + b"k" * 30 + b'": 1}',  # a large key stays in the skeleton
        b'["' + b"a" * 30 + b'", "' + b"b" * 30 + b'"]',
    ],
)
def test_edges(body: bytes) -> None:
    same(body)


def test_a_refused_big_string_is_named_by_its_path() -> None:
    body = b'{"params": {"text": "' + b"a" * 30 + b'\\udc00"}}'
    refused = trio.run(decode_large, body).refused
    assert refused is not None and refused.where() == "params.text"


async def test_a_big_string_is_decoded_in_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another task runs between the pieces: the loop is never held for the
    whole string."""
    monkeypatch.setattr(large, "PIECE", 1000)
    monkeypatch.setattr(large, "LARGE_STRING", 1000)
    body = json.dumps({"text": "naïve 🦆 " * 10_000}, ensure_ascii=False).encode()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await trio.lowlevel.checkpoint()
            ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        decoded = await decode_large(body)
        nursery.cancel_scope.cancel()
    assert decoded.value == json.loads(body)
    assert ticks >= len(body) // 1000 // 2


async def test_a_real_server_refuses_a_large_document_by_name_and_serves_on(
    db_path: Path,
) -> None:
    """Through ``dovecote serve``: a 2 MB document with one lone surrogate
    escaped at its end is refused naming the field; the same document, with
    escapes, quotes, pairs and multibyte text everywhere, is taken exactly (a
    correction in its middle lands where it should); the connection serves on."""
    text = ('naïve "quoted" \\ back\n 🦆 €\t' * 80_000)[:2_000_000]
    uri = "file:///big"
    async with served(db_path) as (editor, _):
        await editor.initialize()
        bad = call("document/open", {"uri": uri, "version": 1, "text": text + "@"})
        refused = await refused_notice(editor, surrogates(bad))
        assert refused["message"] == (
            "document/open: text: text must be valid Unicode (no lone surrogates)"
        ), refused
        editor.documents[uri] = [1, text]
        good = call("document/open", {"uri": uri, "version": 1, "text": text})
        await editor.write_raw(frame(json.dumps(good).encode()))  # ASCII: each é an escape
        at = text.index("naïve", 1_000_000)
        result = await editor.request(
            "command/submit",
            {
                "adapter": "scripted",
                "request": {"messages": [{"role": "user", "content": "#reply\nNAÏVE"}]},
                "target": {"uri": uri, "start": at, "end": at + 5},
                "onConflict": "theirs",
            },
        )
        assert (await editor.wait_state(result["commandId"]))["state"] == "done"
        assert editor.text(uri) == text[:at] + "NAÏVE" + text[at + 5 :]
        await still_serving(editor)
