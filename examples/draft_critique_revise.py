"""Draft -> critique -> revise, as a scripted flow.

    dovecote run examples/draft_critique_revise.py --param topic="dead letters"
    dovecote run examples/draft_critique_revise.py --adapter local   # a real model

Each ``await ctx.call(...)`` is one journaled step: if the process is
killed half way, the next engine opened on the same database (with this
file loaded) resumes the flow, and the finished steps return their
recorded replies without calling the model again.

On the scripted adapter (offline, the default) every prompt carries, after
a ``#reply`` directive, the answer it should get, so the flow runs the same
way without a model.
"""

from __future__ import annotations

import flows


def ask(adapter: str, prompt: str, offline_answer: str) -> dict[str, object]:
    content = f"#reply\n{offline_answer}" if adapter == "scripted" else prompt
    return {"messages": [{"role": "user", "content": content}]}


@flows.flow("draft-critique-revise")
async def draft_critique_revise(
    ctx: flows.FlowContext, topic: str = "dead letters", adapter: str = "scripted"
) -> dict[str, str]:
    draft = await ctx.call(
        adapter,
        ask(
            adapter,
            f"Write a three-sentence paragraph about {topic}.",
            f"{topic.capitalize()} are calls that missed their deadline. "
            "They are kept, never dropped. You can replay them.",
        ),
    )
    critique = await ctx.call(
        adapter,
        ask(
            adapter,
            f"Critique this paragraph in one sentence:\n\n{draft.text}",
            "It says what they are but not why keeping them matters.",
        ),
    )
    revised = await ctx.call(
        adapter,
        ask(
            adapter,
            f"Revise the paragraph.\n\nParagraph:\n{draft.text}\n\nCritique:\n{critique.text}",
            f"{topic.capitalize()} are calls that missed their deadline. They are kept, "
            "never dropped, so no work or money is lost. Replay them when the model is back.",
        ),
    )
    return {"draft": draft.text, "critique": critique.text, "revised": revised.text}
