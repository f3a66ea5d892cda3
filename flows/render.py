"""Text for people: tables, ages, one-line summaries of commands."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

from flows.records import Command, Event


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def age(seconds: float) -> str:
    """``42s``, ``3m``, ``5h``, ``2d``: how long ago, in the largest unit."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"


def when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.datetime.fromtimestamp(epoch).isoformat(sep=" ", timespec="milliseconds")


def first_line(text: str, width: int = 48) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def prompt_of(command: Command) -> str:
    """The first line of what was asked, without scripted directives."""
    text = command.request.last_user_text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    while lines and lines[0].startswith("#") and len(lines) > 1:
        lines.pop(0)
    return first_line("\n".join(lines))


def command_rows(commands: Sequence[Command], now: float) -> list[list[Any]]:
    return [
        [
            c.id,
            c.adapter,
            c.state,
            c.reason or "",
            f"{c.attempt}/{c.max_attempts}",
            age(now - c.created_at),
            prompt_of(c),
        ]
        for c in commands
    ]


COMMAND_HEADERS = ("id", "adapter", "state", "reason", "attempt", "age", "prompt")


def show(command: Command, events: Sequence[Event]) -> str:
    """A command and its journal, for ``dovecote show``."""
    c = command
    lines = [
        f"command   {c.id}",
        f"adapter   {c.adapter}",
        f"state     {c.state}" + (f" ({c.reason})" if c.reason else ""),
        f"attempt   {c.attempt} of {c.max_attempts}",
        f"timeout   {c.timeout:g} s" + (f", expires {when(c.expires_at)}" if c.expires_at else ""),
        f"created   {when(c.created_at)}",
    ]
    for label, value in (
        ("sent", c.sent_at),
        ("deadline", c.deadline),
        ("replied", c.replied_at),
        ("finished", c.finished_at),
    ):
        if value is not None:
            lines.append(f"{label:<9} {when(value)}")
    for label, name in (
        ("handler", c.handler),
        ("flow", c.flow_id),
        ("snapshot", c.snapshot_id),
        ("replay of", c.replay_of),
    ):
        if name is not None:
            lines.append(f"{label:<9} {name}")
    if c.handler_args is not None:
        lines.append(f"args      {json.dumps(c.handler_args, ensure_ascii=False)}")
    if c.request.system:
        lines.append("system    " + first_line(c.request.system, 70))
    for message in c.request.messages:
        lines.append(f"{message.role:<9} " + indent(message.content))
    if c.reply is not None:
        lines.append("reply     " + indent(c.reply.text))
        if c.reply.usage:
            u = c.reply.usage
            cost = f", ${c.cost:.6f}" if c.cost is not None else ""
            lines.append(f"usage     {u.input_tokens} in, {u.output_tokens} out{cost}")
    if c.error is not None:
        status = f" (HTTP {c.error.status})" if c.error.status else ""
        lines.append(f"error     {c.error.type}{status}: {c.error.message}")
    lines.append("")
    lines.append("journal")
    lines.append(
        table(
            ("at", "from", "to", "event", "detail"),
            [
                [
                    when(e.at),
                    e.from_state or "-",
                    e.to_state,
                    e.event,
                    json.dumps(e.detail, ensure_ascii=False) if e.detail is not None else "",
                ]
                for e in events
            ],
        )
    )
    return "\n".join(lines)


def indent(text: str, pad: int = 10) -> str:
    return text.replace("\n", "\n" + " " * pad)
