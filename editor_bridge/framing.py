"""LSP base framing: ``Content-Length: N\\r\\n\\r\\n`` then N bytes of UTF-8 JSON.

Emacs' jsonrpc.el and Neovim's ``vim.lsp.rpc`` both speak it, so an editor
needs nothing but what it ships. A frame whose header is unreadable cannot
be skipped reliably (we do not know where it ends), so the reader looks for
the next ``Content-Length`` header in what follows it and goes on from
there; a frame that is too big is read past, not into memory, and reported.
Bytes that never make a header (no CRLF CRLF within ``MAX_HEADER``) are not
LSP framing at all: the reader reports them as ``fatal`` and the connection
ends there. A peer that vanishes (a reset, a broken pipe) is end of stream:
its connection ends, nothing else does.
"""

from __future__ import annotations

import json
from typing import Any, Final

import attrs
import trio

MAX_HEADER: Final = 8 * 1024
DEFAULT_MAX_FRAME: Final = 16 * 1024 * 1024
_CONTENT_LENGTH: Final = b"content-length"
_MAX_DIGITS: Final = 15
"""A Content-Length of more digits than this is no length a frame has: refused
rather than skipped (skipping it would swallow everything the peer sends)."""


@attrs.frozen
class Frame:
    """One frame's body, or why it could not be read."""

    body: bytes | None
    error: str | None = None
    too_large: bool = False
    fatal: bool = False  # not LSP framing: nothing after it can be trusted


class FrameReader:
    def __init__(self, stream: trio.abc.ReceiveStream, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self.max_frame = max_frame  # may change as the connection goes (after its token)
        self._eof = False

    async def _fill(self) -> bool:
        if self._eof:
            return False
        try:
            chunk = await self._stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            chunk = b""  # reset by the peer, or closed under us: the end
        if not chunk:
            self._eof = True
            return False
        self._buffer += chunk
        return True

    async def read(self) -> Frame | None:
        """The next frame, or ``None`` at end of stream."""
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self._buffer) > MAX_HEADER:
                self._buffer.clear()
                return Frame(
                    None,
                    f"no frame header (Content-Length: N, then CRLF CRLF) in {MAX_HEADER} bytes: "
                    "this is not LSP framing",
                    fatal=True,
                )
            if not await self._fill():
                if self._buffer.strip():
                    self._buffer.clear()
                    return Frame(None, "stream ended inside a frame header")
                return None
        header = bytes(self._buffer[:end])
        del self._buffer[: end + 4]
        length: int | None = None
        for line in header.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                return self._resync(f"malformed header line {line[:80]!r}")
            if name.strip().lower() == _CONTENT_LENGTH:
                digits = value.strip(b" \t")
                # Plain ASCII digits only: int() would also take "+2", "1_0",
                # " 12 " and other scripts' digits.
                if not digits.isdigit() or len(digits) > _MAX_DIGITS:
                    return self._resync(
                        f"Content-Length must be 1 to {_MAX_DIGITS} ASCII digits, "
                        f"got {value[:40]!r}"
                    )
                if length is not None and int(digits) != length:
                    return self._resync("frame has two different Content-Length headers")
                length = int(digits)
        if length is None:
            return self._resync("frame has no Content-Length header")
        if length > self.max_frame:
            await self._skip(length)
            return Frame(
                None,
                f"frame of {length} bytes exceeds the limit of {self.max_frame} bytes",
                too_large=True,
            )
        while len(self._buffer) < length:
            if not await self._fill():
                self._buffer.clear()
                return Frame(None, f"stream ended {length - len(self._buffer)} bytes into a frame")
        with memoryview(self._buffer) as view:  # one copy, not two
            body = bytes(view[:length])
        del self._buffer[:length]
        return Frame(body)

    async def _skip(self, length: int) -> None:
        while length > 0:
            if not self._buffer and not await self._fill():
                return
            taken = min(length, len(self._buffer))
            del self._buffer[:taken]
            length -= taken

    def _resync(self, error: str) -> Frame:
        """Drop bytes up to the next header that looks like a frame start.
        The bad header itself is already gone: what follows it may be a good
        frame, so the search starts at the first byte left."""
        at = self._buffer.lower().find(_CONTENT_LENGTH)
        if at < 0:
            self._buffer.clear()
        else:
            del self._buffer[:at]
        return Frame(None, error)


# One encoder for every frame: ``json.dumps`` with options builds a new one
# per call, a cost on every message sent.
_encoder: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def encode(message: Any) -> bytes:
    body = _encoder.encode(message).encode()
    return b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
