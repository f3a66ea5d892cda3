"""Finished calls as training data: the shapes ``dovecote export`` writes.

Every call is already a record with its journal; a data set is a view of
them. Two shapes, one JSON object a line:

* ``chat`` (the OpenAI chat fine-tuning shape), one line per ``done`` call::

      {"messages": [{"role": "system", "content": ...},   # when it had one
                    {"role": "user", "content": ...}, ...,
                    {"role": "assistant", "content": <the reply's text>}]}

* ``preference`` (prompt / chosen / rejected, as DPO trainers take it), one
  line per editor correction the person changed before keeping it::

      {"prompt": [...the messages, system first...],
       "chosen": <the region's text the person finally kept>,
       "rejected": <the model's reply>}

  The person's final text is the ``final_text`` event the editor bridge
  journals on the command (on save, close, or when the region is left
  alone). Calls with no such event, or whose final text is the reply
  itself, say nothing about a preference and are skipped.
"""

from __future__ import annotations

import math
import re
import time
from datetime import datetime
from typing import Any, Final

from flows.records import Command, Event

FINAL_TEXT: Final = "final_text"
"""The journal event holding the text a person kept in a corrected region."""

FORMATS: Final = ("commands", "chat", "preference")


def prompt(command: Command) -> list[dict[str, str]]:
    """The call's conversation, its system instruction first."""
    messages = [m.to_json() for m in command.request.messages]
    if command.request.system:
        messages.insert(0, {"role": "system", "content": command.request.system})
    return messages


def chat_line(command: Command) -> dict[str, Any] | None:
    """The chat fine-tuning line of a finished call, or None (not done)."""
    if command.state != "done" or command.reply is None:
        return None
    return {"messages": [*prompt(command), {"role": "assistant", "content": command.reply.text}]}


def final_text(events: list[Event]) -> str | None:
    """The last final text recorded in a command's journal, if any."""
    for event in reversed(events):
        if event.event == FINAL_TEXT and isinstance(event.detail, dict):
            text = event.detail.get("text")
            if isinstance(text, str):
                return text
    return None


def preference_line(command: Command, events: list[Event]) -> dict[str, Any] | None:
    """prompt / chosen / rejected when the person kept something else than
    the reply; None otherwise (no reply, no final text, or the same text)."""
    kept = final_text(events)
    if command.reply is None or kept is None or kept == command.reply.text:
        return None
    return {"prompt": prompt(command), "chosen": kept, "rejected": command.reply.text}


_AGE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", re.IGNORECASE)
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def since(text: str, now: float | None = None) -> float:
    """``--since``: an age (``90s``, ``15m``, ``12h``, ``7d``, ``2w``: that
    long ago), an ISO date or time (``2026-12-01``, ``2026-12-01T09:30``,
    local time unless it says its zone) or epoch seconds -> epoch seconds."""
    now = time.time() if now is None else now
    match = _AGE.fullmatch(text)
    if match is not None:
        return now - float(match.group(1)) * _UNITS[match.group(2).lower()]
    stripped = text.strip()
    try:
        epoch = float(stripped)
    except ValueError:
        pass
    else:
        if math.isfinite(epoch):
            return epoch
    try:
        return datetime.fromisoformat(stripped.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ValueError(
            f"--since {text!r}: expected an age (90s, 15m, 12h, 7d, 2w), "
            "an ISO date (2026-12-01, 2026-12-01T09:30) or epoch seconds"
        ) from None
