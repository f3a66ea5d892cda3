"""A person approves what the model wrote, as one step of the flow.

    echo yes | dovecote run examples/approval.py --param subject="the release"

``ctx.ask_human`` is a call served by the ``human`` adapter: from the
command line the question is asked on the terminal; from an editor it
arrives as ``human/ask`` and the answer comes back as ``command/reply``.
It has a deadline, a dead letter and a replay like any model call.
"""

from __future__ import annotations

import flows


@flows.flow("approval")
async def approval(
    ctx: flows.FlowContext, subject: str = "the release", adapter: str = "scripted"
) -> dict[str, object]:
    prompt = f"Write a one-line announcement of {subject}."
    offline = f"#reply\nWe are happy to announce {subject}."
    draft = await ctx.call(
        adapter,
        {"messages": [{"role": "user", "content": offline if adapter == "scripted" else prompt}]},
    )
    answer = await ctx.ask_human(f"Publish this announcement? (yes/no)\n  {draft.text}")
    approved = answer.strip().lower().startswith("y")
    return {"announcement": draft.text, "approved": approved, "answer": answer}
