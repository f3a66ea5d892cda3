"""The response cache: an identical call is answered from an earlier reply.

    dovecote run examples/cache.py        # twice: the second run's call is a hit
    python examples/cache.py              # the same, in one process

A call opts in with ``cache=True`` (or its adapter with ``cache = true`` in
dovecote.toml). A hit is still a command with its journal: ``dovecote show
ID`` prints ``pending -> replied`` by ``resolve``, with the id of the call
whose reply it reused, at cost 0. ``dovecote cache stats`` counts the hits.
"""

from __future__ import annotations

from typing import Any

import trio

import flows


@flows.flow("cached-correction")
async def cached_correction(
    ctx: flows.FlowContext, text: str = "I recieve teh letter.", adapter: str = "scripted"
) -> dict[str, Any]:
    reply = await ctx.call(adapter, {"messages": [{"role": "user", "content": text}]}, cache=True)
    return {"text": reply.text}


async def main() -> None:
    async with flows.open_engine() as engine:
        request = {"messages": [{"role": "user", "content": "I recieve teh letter."}]}
        for turn in ("first", "second"):
            command = await engine.wait(await engine.submit("scripted", request, cache=True))
            resolved = [e for e in engine.history(command.id) if e.event == "resolve"]
            source = resolved[0].detail["cached_from"] if resolved else "the model"
            print(f"{turn}: {command.id} answered by {source}, cost {command.cost}")


if __name__ == "__main__":
    trio.run(main)
