"""``dovecote run`` and ``dovecote flow ...``: flows from the command line.

A flow's definition is Python code, so commands that run a flow need the
file that defines it (``run FILE``, ``--file FILE``); built-in flows are
always there. Commands that only look (``flow list``, ``flow show``) read
the store.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path
from typing import Any

import trio

from adapters.base import Adapter, Request
from adapters.human import HumanAdapter
from flows.declared import DeclaredFlow
from flows.diagrams import dot, mermaid
from flows.engine import Engine, open_engine
from flows.location import open_store
from flows.records import FlowChange, StateChange
from flows.render import table, when
from flows.runtime import REGISTRY, ScriptedFlow
from flows.states import COMPLETED, FLOW_TERMINAL_STATES, STALLED

EXIT_FAILED = 1
EXIT_STALLED = 3


def load_file(path: str | None) -> list[str]:
    """Import a flow file; the names of the flows it registered."""
    if path is None:
        return []
    before = set(REGISTRY)
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"no such file: {path}")
    runpy.run_path(str(file), run_name=f"dovecote_flows_{file.stem}")
    return sorted(set(REGISTRY) - before) or [
        name for name, d in REGISTRY.items() if _defined_in(d, file)
    ]


def _defined_in(definition: Any, file: Path) -> bool:
    code = getattr(getattr(definition, "function", None), "__code__", None)
    return code is not None and Path(code.co_filename).resolve() == file.resolve()


def parse_params(pairs: list[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--param expects key=value, got {pair!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def terminal_asker(engine_box: list[Engine]) -> HumanAdapter:
    """A human adapter that asks on this terminal and delivers the answer."""
    adapter = HumanAdapter()

    def ask(command_id: str, request: Request) -> None:
        engine = engine_box[0]
        engine.spawn(_ask_on_terminal, engine, command_id, request)

    adapter.ask = ask
    return adapter


async def _ask_on_terminal(engine: Engine, command_id: str, request: Request) -> None:
    print(f"\n? {request.last_user_text}", file=sys.stderr, flush=True)
    answer = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
    await engine.deliver(command_id, {"text": answer.rstrip("\n")})


async def follow(engine: Engine, flow_id: str, quiet: bool = False) -> int:
    """Print a line per step until the flow ends or stalls; the exit code."""
    started = trio.current_time()

    def say(text: str) -> None:
        if not quiet:
            print(f"  [{trio.current_time() - started:5.1f}s] {text}", file=sys.stderr, flush=True)

    with engine.subscribe() as notices:
        flow = engine.get_flow(flow_id)
        while flow.state not in FLOW_TERMINAL_STATES and flow.state != STALLED:
            with trio.move_on_after(0.5):
                async for notice in notices:
                    if isinstance(notice, StateChange) and notice.command.flow_id == flow_id:
                        c = notice.command
                        if c.state in ("sent", "done", "dead", "cancelled"):
                            extra = f" ({c.reason})" if c.reason else ""
                            say(f"step {c.step}: {c.adapter} {c.state}{extra}")
                    elif (
                        isinstance(notice, FlowChange)
                        and notice.flow.id == flow_id
                        and notice.flow.state in FLOW_TERMINAL_STATES | {STALLED}
                    ):
                        say(f"flow {notice.flow.state}")
                        break
            flow = engine.get_flow(flow_id)
    if flow.state == COMPLETED:
        print(json.dumps(flow.result, ensure_ascii=False, indent=2))
        return 0
    if flow.state == STALLED:
        steps = {s.step: s for s in engine.store.flow_steps(flow_id)}
        dead = steps[flow.step].command_id if flow.step in steps else None
        print(
            f"flow {flow_id} stalled at step {flow.step}: its call {dead} was dead-lettered.\n"
            f"Resume it with: dovecote flow retry {flow_id} --file FILE "
            f"(or dovecote replay {dead})",
            file=sys.stderr,
        )
        return EXIT_STALLED
    print(f"flow {flow_id} {flow.state}: {flow.error}", file=sys.stderr)
    return EXIT_FAILED


async def run_file(args: argparse.Namespace, adapters: list[Adapter]) -> int:
    names = load_file(args.file)
    name = args.flow or (names[0] if len(names) == 1 else None)
    if name is None:
        raise ValueError(
            f"{args.file} defines {len(names)} flows ({', '.join(names) or 'none'}): "
            "choose one with --flow NAME"
        )
    params = parse_params(args.param)
    if args.adapter:
        params["adapter"] = args.adapter
    box: list[Engine] = []
    async with open_engine(args.db, adapters=[*adapters, terminal_asker(box)]) as engine:
        box.append(engine)
        flow_id = await engine.start_flow(name, **params)
        print(f"flow {flow_id} ({name}) started", file=sys.stderr)
        return await follow(engine, flow_id)


async def retry(args: argparse.Namespace, adapters: list[Adapter]) -> int:
    load_file(args.file)
    box: list[Engine] = []
    async with open_engine(args.db, adapters=[*adapters, terminal_asker(box)]) as engine:
        box.append(engine)
        flow = engine.get_flow(args.id)
        new = await engine.retry_flow(args.id, timeout=args.timeout)
        print(f"replayed step {flow.step} as {new}", file=sys.stderr)
        if flow.name not in REGISTRY:
            print(f"flow {flow.name} is not defined here: queued for a process that has it")
            return 0
        return await follow(engine, args.id)


async def fork(args: argparse.Namespace, adapters: list[Adapter]) -> int:
    load_file(args.file)
    box: list[Engine] = []
    async with open_engine(args.db, adapters=[*adapters, terminal_asker(box)]) as engine:
        box.append(engine)
        new = await engine.fork_flow(args.id, args.from_step)
        print(f"flow {new} forked from {args.id} at step {args.from_step}", file=sys.stderr)
        return await follow(engine, new)


async def cancel(args: argparse.Namespace, adapters: list[Adapter]) -> int:
    async with open_engine(args.db, adapters=adapters) as engine:
        flow = await engine.cancel_flow(args.id)
        print(f"flow {flow.id} {flow.state}")
    return 0


def show(args: argparse.Namespace) -> int:
    store = open_store(args.db, "read")
    try:
        flow = store.find_flow(args.id)
        if flow is None:
            raise ValueError(f"no flow with id {args.id!r}")
        steps = store.flow_steps(flow.id)
        events = store.flow_history(flow.id)
        commands: dict[str | None, Any] = {
            s.command_id: store.find(s.command_id) for s in steps if s.command_id
        }
        if args.json:
            print(
                json.dumps(
                    {
                        "flow": flow.to_json(),
                        "steps": [
                            {
                                **_step_json(s),
                                "state": getattr(commands.get(s.command_id), "state", None),
                            }
                            for s in steps
                        ],
                        "events": [e.to_json() for e in events],
                    },
                    ensure_ascii=False,
                    indent=2,
                )
            )
            return 0
        print(f"flow      {flow.id} ({flow.name})")
        print(f"state     {flow.state}" + (f": {flow.error}" if flow.error else ""))
        print(f"started   {when(flow.created_at)}, params {json.dumps(flow.params)}")
        if flow.forked_from:
            print(f"forked    from {flow.forked_from}")
        definition = REGISTRY.get(flow.name)
        if isinstance(definition, DeclaredFlow) or flow.stage is not None:
            path = [
                e.detail.get("to")
                for e in events
                if isinstance(e.detail, dict) and "to" in e.detail
            ]
            stages = list(definition.stages) if isinstance(definition, DeclaredFlow) else []
            print("stages    " + "  ".join(f"[{s}]" if s == flow.stage else s for s in stages))
            first = definition.initial if isinstance(definition, DeclaredFlow) else "?"
            print("path      " + " -> ".join([first, *[p for p in path if p]]))
        rows = []
        for s in steps:
            c = commands.get(s.command_id)
            what = (
                f"{c.adapter}: {c.state}" + (f" ({c.reason})" if c.reason else "")
                if c
                else json.dumps(s.value)
            )
            marker = "→" if s.step == flow.step and flow.state not in FLOW_TERMINAL_STATES else ""
            rows.append([marker, s.step, s.kind, what, s.command_id or ""])
        print()
        print(table(("", "step", "kind", "what", "command"), rows))
        if flow.result is not None:
            print("\nresult    " + json.dumps(flow.result, ensure_ascii=False))
        return 0
    finally:
        store.close()


def _step_json(step: Any) -> dict[str, Any]:
    return {
        "step": step.step,
        "kind": step.kind,
        "command_id": step.command_id,
        "value": step.value,
    }


def listing(args: argparse.Namespace) -> int:
    store = open_store(args.db, "read")
    try:
        found = store.flows(args.state or None)
    finally:
        store.close()
    if args.json:
        print(json.dumps([f.to_json() for f in found], ensure_ascii=False, indent=2))
    elif not found:
        print("no flows")
    else:
        print(
            table(
                ("id", "name", "state", "step", "stage", "started"),
                [[f.id, f.name, f.state, f.step, f.stage or "", when(f.created_at)] for f in found],
            )
        )
    return 0


def graph(args: argparse.Namespace) -> int:
    load_file(args.file)
    definition = REGISTRY.get(args.name)
    if definition is None:
        raise ValueError(f"no flow registered as {args.name!r}: pass --file FILE")
    if isinstance(definition, ScriptedFlow):
        raise ValueError(
            f"{args.name} is a scripted flow: its steps are code, not a table to draw; "
            "dovecote flow show ID lists the steps a run took"
        )
    print(dot(definition.table, definition.initial, definition.name))
    print()
    print(mermaid(definition.table, definition.initial, definition.name))
    return 0
