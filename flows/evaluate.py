"""``dovecote eval``: run a data set against adapters and judge the replies.

A data set is JSON lines, one item a line::

    {"prompt": "What is 2+2?", "expected": "4"}
    {"messages": [{"role": "user", "content": "..."}], "system": "...", "expected": ...}

``prompt`` (a user message) or ``messages`` (a conversation), optional
``system`` and ``expected`` (any JSON; what the check compares against). A
line of ``dovecote export --format chat`` is an item too: its closing
assistant message becomes ``expected``. Blank lines are skipped; any other
line that is not such an object is refused with its line number.

Every item is a call made by the scripted flow ``eval`` (one flow per item
and adapter), so a run is durable like any other work: killed half way and
started again with the same arguments, it finds its flows again by the
run's key (the data set's content hash, the adapters and the check), takes
over the unfinished ones and calls nothing that already replied. A flow
runs one step at a time, which is why an item is a flow of its own: items
then run concurrently, a bounded number at once.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from adapters.base import Request
from flows import checks
from flows.records import Command, FlowChange, StateChange, storable
from flows.runtime import FlowContext, flow
from flows.states import DONE

FLOW: Final = "eval"
ITEM_FIELDS: Final = frozenset({"prompt", "messages", "system", "expected"})


class DatasetError(ValueError):
    """A data set line that is not an item; the message names the line."""


@attrs.frozen
class Item:
    line: int
    request: Request
    expected: Any = None


def load_dataset(path: Path) -> tuple[list[Item], str]:
    """The items of the data set at ``path`` and its content hash."""
    data = path.read_bytes()
    items: list[Item] = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 (byte {exc.start})") from None
    for number, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            items.append(_item(path, number, raw))
    if not items:
        raise DatasetError(f"{path}: no items (one JSON object a line)")
    return items, hashlib.sha256(data).hexdigest()


def _item(path: Path, number: int, raw: str) -> Item:
    where = f"{path}:{number}"
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise DatasetError(f"{where}: not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: an item is a JSON object, not {type(value).__name__}")
    try:
        storable(value, "the item")
    except ValueError as exc:
        raise DatasetError(f"{where}: {exc}") from None
    unknown = set(value) - ITEM_FIELDS
    if unknown:
        raise DatasetError(
            f"{where}: unknown field(s) {', '.join(sorted(unknown))} "
            f"(an item has {', '.join(sorted(ITEM_FIELDS))})"
        )
    if ("prompt" in value) == ("messages" in value):
        raise DatasetError(f"{where}: give either prompt (a string) or messages (a list)")
    expected = value.get("expected")
    if "prompt" in value:
        if not isinstance(value["prompt"], str):
            raise DatasetError(f"{where}: prompt must be a string")
        messages: Any = [{"role": "user", "content": value["prompt"]}]
    else:
        messages = value["messages"]
        if not isinstance(messages, list):
            raise DatasetError(f"{where}: messages must be a list")
        system = [m for m in messages if isinstance(m, dict) and m.get("role") == "system"]
        if system and "system" not in value:  # an exported chat line
            value["system"] = system[0].get("content")
            messages = [m for m in messages if m not in system]
        last = messages[-1] if messages else None
        if isinstance(last, dict) and last.get("role") == "assistant" and "expected" not in value:
            expected, messages = last.get("content"), messages[:-1]
    try:
        request = Request.from_json({"messages": messages, "system": value.get("system")})
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"{where}: {exc}") from None
    return Item(number, request, expected)


def run_key(digest: str, adapters: Sequence[str], check: str) -> str:
    """What names one evaluation run: the same arguments find the same flows."""
    return hashlib.sha256(json.dumps([digest, list(adapters), check]).encode()).hexdigest()[:32]


@flow(FLOW)
async def eval_item(
    ctx: FlowContext, run: str, item: int, adapter: str, request: dict[str, Any]
) -> str:
    """One data set item on one adapter: one call, its reply the result."""
    reply = await ctx.call(adapter, request)
    return reply.text


@attrs.frozen
class Outcome:
    adapter: str
    item: Item
    command: Command | None
    score: checks.Score | None


async def evaluate(
    engine: Any, items: Sequence[Item], adapters: Sequence[str], check: str, key: str, limit: int
) -> list[Outcome]:
    """Run (or resume) the run ``key``: each item on each adapter, ``limit``
    at once; each finished reply judged by ``check``."""
    checks.needs_engine(check)  # an unknown check is refused before any call
    found = {
        (f.params["adapter"], f.params["item"]): f.id
        for f in engine.list_flows()
        if f.name == FLOW and isinstance(f.params, dict) and f.params.get("run") == key
    }
    changed: dict[str, trio.Event] = {}
    outcomes: list[Outcome] = []
    limiter = trio.CapacityLimiter(limit)

    async def watch() -> None:
        with engine.subscribe(buffer=math.inf) as notices:
            async for notice in notices:
                if isinstance(notice, FlowChange):
                    flow_id: str | None = notice.flow.id
                elif isinstance(notice, StateChange):
                    flow_id = notice.command.flow_id
                else:
                    continue
                event = changed.pop(flow_id or "", None)
                if event is not None:
                    event.set()

    async def one(adapter: str, item: Item) -> None:
        async with limiter:
            flow_id = found.get((adapter, item.line))
            if flow_id is None:
                flow_id = await engine.start_flow(
                    FLOW, run=key, item=item.line, adapter=adapter, request=item.request.to_json()
                )
            command = await _step_command(engine, flow_id, changed)
        score = None
        if command.state == DONE and command.reply is not None:
            await engine.wait_flow(flow_id)
            score = await checks.run_check(check, command.reply.text, item.expected, engine=engine)
        outcomes.append(Outcome(adapter, item, command, score))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        async with trio.open_nursery() as runs:
            for adapter in adapters:
                for item in items:
                    runs.start_soon(one, adapter, item)
        nursery.cancel_scope.cancel()
    order = {(a, i.line): n for n, (a, i) in enumerate((a, i) for a in adapters for i in items)}
    return sorted(outcomes, key=lambda o: order[(o.adapter, o.item.line)])


async def _step_command(engine: Any, flow_id: str, changed: dict[str, trio.Event]) -> Command:
    """The flow's call once it is finished (done, or a dead letter)."""
    while True:
        steps = [s for s in engine.store.flow_steps(flow_id) if s.command_id]
        if steps:
            command: Command = await engine.wait(steps[-1].command_id)
            return command
        event = changed.setdefault(flow_id, trio.Event())
        with trio.move_on_after(0.5):  # another process may be the one that moves it
            await event.wait()


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile; None of nothing."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summary(outcomes: Sequence[Outcome], adapters: Sequence[str]) -> list[dict[str, Any]]:
    """Per adapter: items, passed, pass rate, cost, p50/p95 latency (sent ->
    replied, seconds), retries (calls sent more than once), dead letters."""
    rows = []
    for adapter in adapters:
        mine = [o for o in outcomes if o.adapter == adapter]
        commands = [o.command for o in mine if o.command is not None]
        latencies = [
            c.replied_at - c.sent_at
            for c in commands
            if c.replied_at is not None and c.sent_at is not None
        ]
        passed = sum(1 for o in mine if o.score is not None and o.score.passed)
        rows.append(
            {
                "adapter": adapter,
                "items": len(mine),
                "passed": passed,
                "pass_rate": passed / len(mine) if mine else 0.0,
                "cost": sum(c.cost or 0.0 for c in commands),
                "p50_latency": percentile(latencies, 0.5),
                "p95_latency": percentile(latencies, 0.95),
                "retries": sum(1 for c in commands if c.attempt > 1),
                "dead": sum(1 for c in commands if c.state == "dead"),
            }
        )
    return rows
