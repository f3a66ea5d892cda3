"""Budgets: a flow that may spend so much, and no more.

    python examples/budget.py

The scripted adapter is given a price here (a dollar a token, so that the
numbers are easy to follow); the flow asks for three corrections with a
budget of 4.5. The first two cost 2 each; the third would pass the budget
by its estimate, so it dies before it is sent, with reason ``budget``, and
the flow stalls on it, as on any dead step. ``dovecote stats`` shows the
spend against the budget; ``dovecote flow retry`` would try it again (and,
while the budget is spent, it dies again). An adapter's ceiling per UTC day
is ``budget_per_day`` in dovecote.toml.
"""

from __future__ import annotations

import attrs
import trio

import flows
from adapters.base import Price
from adapters.scripted import ScriptedAdapter


@flows.flow("three-corrections")
async def three_corrections(ctx: flows.FlowContext, adapter: str = "scripted") -> list[str]:
    texts = ("teh", "recieve", "adress")
    return [
        (await ctx.call(adapter, {"messages": [{"role": "user", "content": t}]})).text
        for t in texts
    ]


async def main() -> None:
    scripted = ScriptedAdapter()
    scripted.settings = attrs.evolve(scripted.settings, price=Price(input=1e6, output=1e6))
    async with flows.open_engine(adapters=[scripted]) as engine:
        flow_id = await engine.start_flow("three-corrections", budget=4.5)
        while engine.get_flow(flow_id).state not in ("stalled", "completed"):
            await trio.sleep(0.05)
        print(f"flow {flow_id}: {engine.get_flow(flow_id).state}")
        for step in engine.store.flow_steps(flow_id):
            command = engine.get(step.command_id or "")
            print(f"  step {step.step}: {command.state} {command.reason or ''} cost {command.cost}")


if __name__ == "__main__":
    trio.run(main)
