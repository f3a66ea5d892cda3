"""Flows every engine has."""

from __future__ import annotations

from typing import Any

from flows.runtime import FlowContext, flow

CORRECTIONS_INSTRUCTION = (
    "Rewrite the text with its spelling corrected. Keep its wording, line breaks and "
    "formatting. Reply with the rewritten text only."
)
"""Worded for the smallest model dovecote runs (SmolLM2-135M, ``make
demo-model``): of the instructions tried on the demo's texts at temperature 0,
"rewrite ... corrected" made it answer with the text far more often than
"correct ..." (which it takes for a question to discuss), and asking for
grammar too made it fix fewer words. Larger models follow it as well."""
APPLY_HANDLER = "editor.apply"


def correction_request(text: str, instruction: str = CORRECTIONS_INSTRUCTION) -> dict[str, Any]:
    """What the flow asks a model for ``text``.

    Temperature 0: a correction is the model's likeliest text, not a sample.
    ``max_tokens`` is twice the text's length in characters, and some: more
    than any correction of it needs (a token is rarely less than a character),
    and a bound on a small model that starts talking instead and never stops.
    """
    return {
        "system": instruction,
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        "max_tokens": 64 + 2 * len(text),
    }


@flow("corrections")
async def corrections(
    ctx: FlowContext,
    text: str,
    instruction: str = CORRECTIONS_INSTRUCTION,
    adapter: str = "scripted",
    timeout: float | None = None,
    target: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The instruction as ``system``, the text, unchanged, as the one user
    message. With a ``target`` (an editor region: ``{"snapshot": id,
    "policy": ...}``, set by the editor bridge) the reply replaces the region
    through the three-way merge; the bridge's ``editor.apply`` handler does
    that, named here, never imported."""
    reply = await ctx.call(
        adapter,
        correction_request(text, instruction),
        timeout=timeout,
        handler=APPLY_HANDLER if target else None,
        handler_args={"policy": target.get("policy", "drop")} if target else None,
        snapshot_id=target["snapshot"] if target else None,
    )
    return {"text": reply.text}
