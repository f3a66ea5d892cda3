"""What leaves an HTTP adapter is free of its API key and is valid Unicode.

A provider, a proxy or a misconfigured local server may echo the key it
received: in an error body, in a ``Location`` header, in the text it streams.
Whatever the adapter then says (a reply, a progress report, an error message)
reaches the database, the journal, logs and editors, so every string is
passed through one ``Redactor`` on its way out, *before* anything cuts it
short: a key cut at 200 characters is no longer the key and would slip past a
search for it, though all but a character of it would be shown.

A key is found however the text spells it, not only literally: a JSON string
may write any character as ``\\uXXXX`` (or ``/`` as ``\\/``), a Python repr
writes a newline as ``\\n`` and a control character as ``\\xNN`` (httpx puts a
header it refuses in its message that way), a URL percent-encodes. A text
that has neither the key nor a backslash nor a percent sign, which is nearly
every text, costs one substring search.

Lone surrogates are the other thing no string may carry out: JSON can spell
one (``"\\ud800"``) and Python decodes it, but it cannot be encoded as UTF-8,
so the store, a log file or an editor would fail on it later and far from
here. ``repair`` replaces each with U+FFFD (the person keeps the rest of
their text) and counts them, so the adapter can record that it did.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import attrs

REDACTED = "[redacted]"
REPLACEMENT = "\ufffd"

_SURROGATE = re.compile("[\ud800-\udfff]")
_SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "/": "\\/",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _hex(value: int, width: int) -> str:
    """``value`` in hex digits, either case."""
    return "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in format(value, f"0{width}x"))


def _spellings(char: str) -> str:
    """A pattern for every way the texts we see may write ``char``."""
    code = ord(char)
    forms = [re.escape(char)]
    if code < 0x10000:
        forms.append(r"\\u" + _hex(code, 4))
    else:
        high, low = 0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)
        forms.append(r"\\u" + _hex(high, 4) + r"\\u" + _hex(low, 4))
    if code < 0x100:
        forms.append(r"\\x" + _hex(code, 2))
    forms.append("".join("%" + _hex(byte, 2) for byte in char.encode()))
    if char in _SHORT_ESCAPES:
        forms.append(re.escape(_SHORT_ESCAPES[char]))
    return "(?:" + "|".join(forms) + ")"


def _pattern(secret: str) -> str:
    return "".join(_spellings(char) for char in secret)


@attrs.frozen
class Redactor:
    """Removes one secret from texts. ``Redactor(None)`` removes nothing.

    A key with surrounding white space (read from a file with its newline) is
    looked for both as it is and stripped, since a server may echo either."""

    secret: str | None
    _secrets: tuple[str, ...] = attrs.field(init=False)
    _pattern: re.Pattern[str] | None = attrs.field(init=False)
    _markers: tuple[str, ...] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        secrets = tuple(dict.fromkeys(s for s in (self.secret, (self.secret or "").strip()) if s))
        longest_first = sorted(secrets, key=len, reverse=True)
        pattern = re.compile("|".join(map(_pattern, longest_first))) if secrets else None
        # What any spelling but the literal one must hold somewhere: a text
        # with none of these (and not the secret itself) needs no pattern.
        short = {_SHORT_ESCAPES[c] for c in "".join(secrets) if c in _SHORT_ESCAPES}
        object.__setattr__(self, "_secrets", secrets)
        object.__setattr__(self, "_pattern", pattern)
        object.__setattr__(self, "_markers", ("\\u", "\\x", "%", *sorted(short)))

    def text(self, text: str) -> str:
        """``text`` with every spelling of the secret replaced by ``[redacted]``."""
        if self._pattern is None:
            return text
        if not any(m in text for m in self._markers) and not any(s in text for s in self._secrets):
            return text
        return self._pattern.sub(REDACTED, text)

    def marks(self, data: bytes) -> bool:
        """Whether ``data`` holds the secret or a mark an escaped spelling of it needs."""
        if self._pattern is None:
            return False
        return any(m.encode() in data for m in (*self._markers, *self._secrets))

    def unsafe_tail(self, text: str) -> int:
        """How many characters at the end of ``text`` could be the start of
        the secret: a stream must hold them back until the next piece says
        whether the secret follows."""
        longest = 0
        for secret in self._secrets:
            for size in range(min(len(secret) - 1, len(text)), longest, -1):
                if text.endswith(secret[:size]):
                    longest = size
                    break
        return longest


NO_SECRET = Redactor(None)

HTTP_LOGGERS = (
    "httpx",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "httpcore.socks",
)
"""Where httpx and httpcore log. At DEBUG httpcore logs every response's
headers, so a ``Location`` that echoes the key would be logged with it."""


class _LogRedaction(logging.Filter):
    """Cleans the records of ``HTTP_LOGGERS`` of every key an adapter holds.
    A filter on each logger (not a handler): it runs before any handler sees
    the record, whoever configured the handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.redactors: dict[str, Redactor] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = message
        # Longest first: a key inside another, removed first, would leave the
        # rest of the longer one where it no longer matches.
        for secret in sorted(self.redactors, key=len, reverse=True):
            cleaned = self.redactors[secret].text(cleaned)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_LOG_REDACTION = _LogRedaction()


def redact_http_logs(redactor: Redactor) -> None:
    """From now on, keep ``redactor``'s secret out of httpx's and httpcore's logs."""
    if redactor.secret is None:
        return
    _LOG_REDACTION.redactors[redactor.secret] = redactor
    for name in HTTP_LOGGERS:
        logger = logging.getLogger(name)
        if _LOG_REDACTION not in logger.filters:
            logger.addFilter(_LOG_REDACTION)


def repair(text: str) -> tuple[str, int]:
    """``text`` with each lone surrogate replaced by U+FFFD, and how many were."""
    if text.isascii():
        return text, 0
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.subn(REPLACEMENT, text)
    return text, 0


@attrs.frozen
class Cleaned:
    value: Any
    repaired: int


def clean_json(value: Any, clean: Callable[[str], tuple[str, int]]) -> Cleaned:
    """``value`` (decoded JSON) with ``clean`` applied to every string in it,
    keys included; the count of repairs summed. Iterative: a provider's body
    may be nested as deep as ``json.loads`` allowed, with no stack to spare."""
    repaired = 0

    def one(text: str) -> str:
        nonlocal repaired
        cleaned, count = clean(text)
        repaired += count
        return cleaned

    def shallow(item: Any) -> Any:
        if isinstance(item, str):
            return one(item)
        if isinstance(item, dict):
            return {one(k) if isinstance(k, str) else k: v for k, v in item.items()}
        if isinstance(item, list):
            return list(item)
        return item

    root = shallow(value)
    stack = [root] if isinstance(root, dict | list) else []
    while stack:
        container = stack.pop()
        keys = container.keys() if isinstance(container, dict) else range(len(container))
        for key in keys:
            child = shallow(container[key])
            container[key] = child
            if isinstance(child, dict | list):
                stack.append(child)
    return Cleaned(root, repaired)
