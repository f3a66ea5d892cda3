"""Sampling: several candidate replies, the best one picked by a check.

    dovecote run examples/sample.py --param topic="geese"

``ctx.sample`` asks for ``n`` candidates at once (each its own command),
judges each with a check registered by name, and returns the best; every
score and the choice are journaled (``dovecote flow show ID`` lists them),
so a resumed flow returns the same choice without calling the model again.
``pick="first"`` asks one at a time instead and stops at the first that
passes.

Offline (the scripted adapter), each candidate is told what to say, so the
check has something to choose between.
"""

from __future__ import annotations

from typing import Any

import flows
from flows.checks import check


@check("example.short-title")
def short_title(text: str, expected: Any | None) -> float:
    """A title scores higher the closer it is to five words."""
    words = len(text.split())
    return 0.0 if words == 0 else 1.0 / (1 + abs(words - 5))


OFFLINE_TITLES = [
    "Geese",
    "Why geese fly in a V",
    "An exhaustive and unreasonably long history of every goose that ever lived",
]


@flows.flow("sample-title")
async def sample_title(
    ctx: flows.FlowContext, topic: str = "geese", adapter: str = "scripted", n: int = 3
) -> dict[str, Any]:
    prompt = f"Suggest a title for a short essay about {topic}. Reply with the title only."
    requests: Any = {"messages": [{"role": "user", "content": prompt}], "temperature": 1.0}
    if adapter == "scripted":
        titles = OFFLINE_TITLES[:n]
        requests = [{"messages": [{"role": "user", "content": f"#reply\n{t}"}]} for t in titles]
    best = await ctx.sample(adapter, requests, n=n, check="example.short-title", pick="best")
    first = await ctx.sample(adapter, requests, n=n, check="nonempty", pick="first")
    return {
        "best": best.text,
        "scores": [s.score for s in best.scores],
        "first_that_passed": first.text,
    }
