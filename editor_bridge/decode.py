"""From a frame's body to a JSON value the rest of the server can trust.

``json.loads`` accepts more than JSON, and more than the store can hold:
bytes in UTF-16 or UTF-32, ``NaN`` and ``Infinity``, ``1e999`` (infinity
again), integers of thousands of digits (past 4,300 it raises an error of
its own), lone surrogates written as ``\\ud800`` (which no UTF-8 encoder, and
so neither SQLite nor the reply to the client, can take), and nesting as deep
as the interpreter's stack. Each of those, let through, has taken the whole
server down somewhere behind the boundary. So the boundary decides, once:
the body must be UTF-8 JSON, and the value it holds has strings of valid
Unicode, integers SQLite can store (64-bit), finite numbers, and at most
``MAX_DEPTH`` levels of nesting. What fails is refused with the path of the
value that failed, so that the request carrying it fails alone, with a
message that says which field to mend.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final

import attrs

from flows.records import INT64_MAX, INT64_MIN  # what an SQLite INTEGER holds

MAX_DEPTH: Final = 64
"""Arrays and objects inside each other, the message itself counting as one:
far more than any method's params need, far less than the stack allows."""
UNICODE: Final = "text must be valid Unicode (no lone surrogates)"
_RANGE: Final = "integers must fit in 64 bits (-2**63 to 2**63 - 1)"

ESCAPED_SURROGATE: Final = re.compile(rb"\\u[dD][89abcdefABCDEF]")
"""In a body: the escape that may spell a lone surrogate."""
_MAY_REFUSE: Final = re.compile(rb"\\u[dD][89abcdefABCDEF]|[0-9]{19}|[eE][+-]?[0-9]{3}")
"""What a body must hold for ``check`` to find anything: a surrogate's
escape, an integer of 19 digits or more (or a float that many digits long:
it may be infinite), an exponent of three digits; else, fewer brackets than
``MAX_DEPTH`` (below which no nesting is too deep). Most messages hold none
of these, and skip the walk."""
_QUICK_LOOK_BYTES: Final = 4096
"""Only small bodies get the quick look: it is a regular expression of
alternatives, scanned byte by byte, which on megabytes costs more than the
walk (and holds the interpreter, in a worker thread too)."""
SURROGATE: Final = re.compile("[\ud800-\udfff]")
"""In a decoded string: a lone surrogate (a valid pair decodes to one code point)."""
_LONGEST_INT: Final = len(str(INT64_MIN))


class _Huge:
    """An integer literal too long to be one the store holds, kept unconverted
    (converting it costs time quadratic in its digits, and past 4,300 of them
    Python refuses) until the check below refuses it by name."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _integer(literal: str) -> Any:
    return int(literal) if len(literal) <= _LONGEST_INT else _Huge(len(literal))


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for every frame: ``json.loads`` with options builds a new one
# per call, a cost on every message received.
_decoder: Final = json.JSONDecoder(parse_int=_integer, parse_constant=_constant)


class Refused(Exception):
    """A value the boundary will not pass on; ``path`` says where it is, as
    the keys and indexes from the message down (``params``, ``request``,
    ``messages``, 0, ``content``)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why
        self.path: list[str | int] = []

    @property
    def top(self) -> str | int | None:
        """The message's own key it is under (``id``, ``params``...)."""
        return self.path[-1] if self.path else None

    def where(self, skip: int = 0) -> str:
        """``request.messages[0].content``: the path, without its first
        ``skip`` parts (``params`` in a message about a method's params)."""
        out = ""
        for part in list(reversed(self.path))[skip:]:
            if isinstance(part, int):
                out += f"[{part}]"
            else:
                out += ("." if out else "") + ascii(part)[1:-1]
        return out or "the message"


@attrs.frozen
class Decoded:
    """A body's value, or why it is not JSON (``error``), or the value and
    the one part of it that is refused (``refused``)."""

    value: Any = None
    error: str | None = None
    refused: Refused | None = None


def decode(body: bytes) -> Decoded:
    """``body`` as a checked JSON value. Pure and thread-safe: a large body
    is decoded off the event loop."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Decoded(error=f"the body is not UTF-8 (byte {exc.start}): frames are UTF-8 JSON")
    try:
        value = _decoder.decode(text)
    except RecursionError:
        return Decoded(error=f"JSON nested deeper than {MAX_DEPTH} levels")
    except ValueError as exc:  # JSONDecodeError, or NaN / Infinity
        return Decoded(error=f"not valid JSON: {exc}")
    if (
        len(body) > _QUICK_LOOK_BYTES
        or _MAY_REFUSE.search(body)
        or body.count(b"[") + body.count(b"{") >= MAX_DEPTH
    ):
        try:
            check(value, surrogates=ESCAPED_SURROGATE.search(body) is not None)
        except Refused as refused:
            return Decoded(value, refused=refused)
    return Decoded(value)


def check(value: Any, *, surrogates: bool = True, depth: int = 1) -> None:
    """Raise ``Refused`` for the first part of ``value`` the store or an
    encoder cannot take. ``surrogates=False`` skips looking for lone
    surrogates, when the body had no escape that could have made one."""
    kind = type(value)
    if kind is dict:
        items: Any = value.items()
    elif kind is list:
        items = enumerate(value)
    else:
        _scalar(value, surrogates)
        return
    if depth >= MAX_DEPTH:
        raise Refused(f"nested deeper than {MAX_DEPTH} levels")
    for key, item in items:
        try:
            if surrogates and type(key) is str and SURROGATE.search(key):
                raise Refused(UNICODE + " in a key")
            if type(item) is dict or type(item) is list:
                check(item, surrogates=surrogates, depth=depth + 1)
            else:
                _scalar(item, surrogates)
        except Refused as refused:
            refused.path.append(key)
            raise


def _scalar(value: Any, surrogates: bool) -> None:
    kind = type(value)
    if kind is str:
        if surrogates and not value.isascii() and SURROGATE.search(value):
            raise Refused(UNICODE)
    elif kind is int:
        if not INT64_MIN <= value <= INT64_MAX:
            raise Refused(_RANGE)
    elif kind is float:
        if not math.isfinite(value):
            raise Refused("numbers must be finite")
    elif kind is _Huge:
        raise Refused(f"{_RANGE} (got one of {value.digits} digits)")
