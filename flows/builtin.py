"""Flows every engine has."""

from __future__ import annotations

from typing import Any

from flows.runtime import FlowContext, flow

CORRECTIONS_INSTRUCTION = (
    "Correct the spelling and grammar of the user's text. Change nothing else: keep its "
    "wording, line breaks and formatting. Reply with the corrected text only."
)
APPLY_HANDLER = "editor.apply"


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
        {"system": instruction, "messages": [{"role": "user", "content": text}]},
        timeout=timeout,
        handler=APPLY_HANDLER if target else None,
        handler_args={"policy": target.get("policy", "drop")} if target else None,
        snapshot_id=target["snapshot"] if target else None,
    )
    return {"text": reply.text}
