"""Structured extraction: typed results from a model, validated, re-asked.

    dovecote run examples/extract.py --param text="Ada Lovelace, 36, London"

``ctx.call(..., result=Person)`` sends ``Person``'s JSON schema to the
provider's structured output and returns a ``Person``. A reply that does not
fit is sent back with the validation error, and the model tries again (at
most ``max_reasks`` times). Every attempt is a journaled step.

Offline (the scripted adapter), the first answer gets the age wrong on
purpose ("thirty-six"), so the re-ask path runs.
"""

from __future__ import annotations

from typing import Any

import attrs

import flows


@attrs.frozen
class Person:
    name: str
    age: int = attrs.field(validator=attrs.validators.ge(0))
    city: str


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
    prompt = f"Reply with only a JSON object for the person in this text:\n\n{text}"
    if adapter == "scripted":  # the scripted model answers as told, one line per turn
        prompt = "#replies\n" + "\n".join(OFFLINE_ANSWERS)
    person = await ctx.call(
        adapter,
        {"messages": [{"role": "user", "content": prompt}]},
        result=Person,
        max_reasks=attempts - 1,
    )
    return {"person": attrs.asdict(person)}
