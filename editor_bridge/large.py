"""Decoding a large body in turns, so that one client's megabytes never hold
up another client's answer.

A document of 15 MB arrives as one frame whose body is almost all one JSON
string (``document/open``'s ``text``). ``json.loads`` of it takes about
90 ms, all in C, holding the interpreter: in a worker thread too, so
another client's answer waits as long either way. What is slow is the big
strings, so they are cut out: the rest of the body (its skeleton, small) is
decoded as any body is (``editor_bridge.decode.decode``), and each big
string is decoded piece by piece, with a checkpoint between the pieces.

A piece may only end where a string can be cut without changing what it
means: never inside an escape (``\\n``, ``\\u00e9``, the two halves of
``\\ud83d\\ude00``) nor inside a UTF-8 sequence. Such a place is after an
ASCII byte that no escape contains, or before the lead byte of a multibyte
character that follows another one. A string with no such place near a cut
is decoded in larger pieces, at worst whole; the result is the same value
``decode`` would give, and the same refusals (a lone surrogate, bytes that
are not UTF-8), only found in turns.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
from typing import Any, Final

import trio

from editor_bridge.decode import (
    ESCAPED_SURROGATE,
    SURROGATE,
    UNICODE,
    Decoded,
    Refused,
    decode,
)

LARGE_STRING: Final = 64 * 1024
"""Bytes of one string literal from which it is decoded apart, in pieces."""
PIECE: Final = 256 * 1024
"""Bytes decoded between two checkpoints: about 1-2 ms."""
SCAN: Final = 1024 * 1024
"""Bytes scanned for strings between two checkpoints."""
_LOOK_BACK: Final = 256
"""How far back from a piece's planned end a safe cut is looked for."""

_STRING_BODY: Final = re.compile(rb'(?:[^"\\]++|\\.)*+', re.DOTALL)
"""The inside of a JSON string, up to its closing quote: an escape is taken
whole, so a match never ends between a backslash and what it escapes
(except where the window given to it ends: then the next window goes on)."""
_KEY: Final = re.compile(rb"[ \t\r\n]*+:")
"""What follows a string that is an object's key (kept in the skeleton)."""
_ESCAPE_TAIL: Final = frozenset(b'\\"/bfnrtu0123456789abcdefABCDEF')
_strings: Final = json.JSONDecoder()


class _Bad(Exception):
    """The body is not UTF-8 JSON."""


async def decode_large(body: bytes) -> Decoded:
    """``decode(body)``, taking turns with the rest of the server."""
    try:
        skeleton, spans, nonce = await _cut_out(body)
    except _Bad as exc:
        return Decoded(error=str(exc))
    if not spans:  # large for many small values: the parser's own speed
        return await trio.to_thread.run_sync(decode, body)
    decoded = decode(skeleton)
    if decoded.error is not None:
        return decoded
    strings: dict[str, str | Refused] = {}
    try:  # a body that is not JSON is that before anything is refused in it
        for index, (start, end) in enumerate(spans):
            strings[f"\0{nonce}{index}"] = await _string(body, start, end)
    except _Bad as exc:
        return Decoded(error=str(exc))
    if decoded.refused is not None:
        return decoded
    try:
        return Decoded(_put_back(decoded.value, strings))
    except Refused as refused:
        return Decoded(decoded.value, refused=refused)


async def _cut_out(body: bytes) -> tuple[bytes, list[tuple[int, int]], str]:
    """The body with each large string literal replaced by a placeholder (a
    string no client can guess), and where each one's inside is."""
    nonce = secrets.token_hex(8)
    parts: list[bytes] = []
    spans: list[tuple[int, int]] = []
    copied = at = 0
    scanned_since_turn = 0
    while (opening := body.find(b'"', at)) >= 0:
        start = at = opening + 1
        while True:  # to the closing quote, a window at a time
            match = _STRING_BODY.match(body, at, min(len(body), at + SCAN))
            assert match is not None  # the pattern matches the empty string
            scanned_since_turn += match.end() - at + 1
            at = match.end()
            if at < len(body) and body[at] == 0x22:  # '"'
                break
            if at >= len(body) - 1:
                raise _Bad("not valid JSON: a string is not closed before the end of the body")
            if scanned_since_turn >= SCAN:
                scanned_since_turn = 0
                await trio.lowlevel.checkpoint()
        end, at = at, at + 1
        if end - start >= LARGE_STRING and not _KEY.match(body, at):
            placeholder = f'"\\u0000{nonce}{len(spans)}"'.encode()
            parts += (body[copied:opening], placeholder)
            copied = at
            spans.append((start, end))
        if scanned_since_turn >= SCAN:
            scanned_since_turn = 0
            await trio.lowlevel.checkpoint()
    parts.append(body[copied:])
    return b"".join(parts), spans, nonce


def _cuts(body: bytes, start: int, end: int) -> list[int]:
    """Where the string inside ``body[start:end]`` is cut into pieces."""
    cuts = [start]
    target = start + PIECE
    while target < end:
        for at in range(target, max(cuts[-1], target - _LOOK_BACK), -1):
            before, after = body[at - 1], body[at]
            if (before < 0x80 and before not in _ESCAPE_TAIL) or (
                after >= 0xC0 and 0x80 <= before < 0xC0
            ):
                cuts.append(at)
                break
        target = max(cuts[-1], target) + PIECE
    cuts.append(end)
    return cuts


async def _string(body: bytes, start: int, end: int) -> str | Refused:
    """The string whose inside is ``body[start:end]``, decoded in pieces, or
    why it is refused (``_Bad`` when it is not UTF-8 JSON at all)."""
    cuts = _cuts(body, start, end)
    pieces: list[str] = []
    for a, b in itertools.pairwise(cuts):
        raw = body[a:b]
        try:
            piece = _strings.decode('"' + raw.decode("utf-8") + '"')
        except UnicodeDecodeError as exc:
            raise _Bad(
                f"the body is not UTF-8 (byte {a + exc.start}): frames are UTF-8 JSON"
            ) from None
        except ValueError as exc:
            raise _Bad(f"not valid JSON: {exc}") from None
        if ESCAPED_SURROGATE.search(raw) and SURROGATE.search(piece):
            return Refused(UNICODE)
        pieces.append(piece)
        await trio.lowlevel.checkpoint()
    return "".join(pieces)


def _put_back(value: Any, strings: dict[str, str | Refused]) -> Any:
    """``value`` with each placeholder replaced by its string; the first
    refused string is raised, with its path."""
    if type(value) is str:
        found = strings.get(value, value) if value.startswith("\0") else value
        if isinstance(found, Refused):
            raise Refused(found.why)
        return found
    if type(value) is dict:
        items: Any = value.items()
    elif type(value) is list:
        items = enumerate(value)
    else:
        return value
    for key, item in items:
        try:
            value[key] = _put_back(item, strings)
        except Refused as refused:
            refused.path.append(key)
            raise
    return value
