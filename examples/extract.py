"""Structured extraction: typed results from a model, validated, retried.

    dovecote run examples/extract.py --param text="Ada Lovelace, 36, London"

The model is asked for JSON; the reply is validated against an attrs class.
A reply that does not fit is sent back with the validation error, and the
model tries again (at most three times). Every attempt is a journaled step.

Offline (the scripted adapter), the first answer gets the age wrong on
purpose ("thirty-six"), so the retry path runs.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

import flows


@attrs.frozen
class Person:
    name: str = attrs.field(validator=attrs.validators.instance_of(str))
    age: int = attrs.field(validator=[attrs.validators.instance_of(int), attrs.validators.ge(0)])
    city: str = attrs.field(validator=attrs.validators.instance_of(str))


def parse(text: str) -> Person:
    """A ``Person`` from the model's reply, or ``ValueError`` saying why not."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    unknown = set(data) - {"name", "age", "city"}
    if unknown:
        raise ValueError(f"unexpected keys: {sorted(unknown)}")
    try:
        return Person(**data)
    except (TypeError, ValueError) as exc:
        # attrs puts the readable sentence first in its validators' errors.
        raise ValueError(exc.args[0] if exc.args else str(exc)) from None


OFFLINE_ANSWERS = [
    '{"name": "Ada Lovelace", "age": "thirty-six", "city": "London"}',
    '{"name": "Ada Lovelace", "age": 36, "city": "London"}',
]


@flows.flow("extract-person")
async def extract_person(
    ctx: flows.FlowContext,
    text: str = "Ada Lovelace, 36, London",
    adapter: str = "scripted",
    attempts: int = 3,
) -> dict[str, Any]:
    prompt = (
        'Reply with only a JSON object {"name": str, "age": int, "city": str} '
        f"for the person in this text:\n\n{text}"
    )
    messages: list[dict[str, str]] = [{"role": "user", "content": prompt}]
    problems: list[str] = []
    for attempt in range(attempts):
        if adapter == "scripted":
            canned = OFFLINE_ANSWERS[min(attempt, len(OFFLINE_ANSWERS) - 1)]
            messages[-1] = {"role": "user", "content": f"#reply\n{canned}"}
        reply = await ctx.call(
            adapter, {"messages": messages, "response_format": {"type": "json_object"}}
        )
        try:
            person = parse(reply.text)
        except ValueError as exc:
            problems.append(str(exc))
            messages = [
                *messages,
                {"role": "assistant", "content": reply.text},
                {
                    "role": "user",
                    "content": f"That does not fit: {exc}. Reply with corrected JSON only.",
                },
            ]
            continue
        return {"person": attrs.asdict(person), "attempts": attempt + 1, "problems": problems}
    raise ValueError(f"no valid answer after {attempts} attempts: {problems}")
