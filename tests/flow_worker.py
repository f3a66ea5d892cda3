"""A process running a three-step scripted flow, for the crash tests.

    python -m tests.flow_worker --db PATH start     # start it, print its id
    python -m tests.flow_worker --db PATH start-sample   # the sampler and typed-call flow
    python -m tests.flow_worker --db PATH start-slow-sample   # its candidates take 2 s
    python -m tests.flow_worker --db PATH resume    # resume whatever is unfinished

The flow sleeps (a journaled ``ctx.sleep``) after step 1 and prints
``after step 1`` first, so a test can kill the process between steps.
Sends are logged to ``$DOVECOTE_SCRIPTED_LOG``.
"""

from __future__ import annotations

import argparse
import json
import os

import attrs
import trio

import flows
from adapters.scripted import ScriptedAdapter


def say(text: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}]}


@flows.flow("three-steps")
async def three_steps(ctx: flows.FlowContext, topic: str) -> dict[str, object]:
    first = await ctx.call("scripted", say(f"teh first step about {topic}"))
    print("after step 1", flush=True)
    await ctx.sleep(1.0)
    picked = await ctx.random()
    second = await ctx.call("scripted", say(f"#reply\nsecond, after {first.text}"))
    third = await ctx.call("scripted", say(f"recieve the third after {second.text}"))
    return {"steps": [first.text, second.text, third.text], "picked": picked}


@flows.flow("sample-then-typed")
async def sample_then_typed(ctx: flows.FlowContext, delay: float = 0) -> dict[str, object]:
    candidates = [say(f"#delay {delay}\n#reply\n{text}") for text in ("", "a goose", "")]
    best = await ctx.sample("scripted", candidates, n=3, check="nonempty", pick="best")
    print("after sample", flush=True)
    await ctx.sleep(1.0)
    answer = json.dumps({"index": best.chosen})
    picked = await ctx.call("scripted", say(f"#replies\nnot json\n{answer}"), result=Pick)
    return {"chosen": best.chosen, "text": best.text, "typed": picked.index}


@attrs.frozen
class Pick:
    index: int


async def main(args: argparse.Namespace) -> None:
    scripted = ScriptedAdapter(call_log=os.environ.get("DOVECOTE_SCRIPTED_LOG"))
    async with flows.open_engine(args.db, adapters=[scripted], poll_interval=0.05) as engine:
        if args.action == "start":
            flow_id = await engine.start_flow("three-steps", topic="geese")
            print(f"started {flow_id}", flush=True)
        elif args.action in ("start-sample", "start-slow-sample"):
            delay = 2.0 if args.action == "start-slow-sample" else 0.0
            flow_id = await engine.start_flow("sample-then-typed", delay=delay)
            print(f"started {flow_id}", flush=True)
        else:
            [flow] = engine.list_flows()
            flow_id = flow.id
        result = await engine.wait_flow(flow_id)
        print("result " + json.dumps(result), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("action", choices=["start", "start-sample", "start-slow-sample", "resume"])
    trio.run(main, parser.parse_args())
