"""Declared flows: stages and transitions as data.

A declared flow is a small state machine of its own, written as tables the
way flows/states.py writes the engine's: ``transitions[stage][event] ->
next stage``. Entering a stage with a ``prompt`` submits one command whose
reply handler, ``flow.advance``, is stored by name with the flow id and the
stage as arguments; when the reply comes, the handler picks the event from
the reply (``choose``), saves the reply text in the flow's ``vars``
(``save_as``) and enters the next stage. A stage with no transitions out is
final: the flow completes with its ``vars`` as result. No task runs in
between and no closure is kept: any engine that has the definition
registered can carry the flow on, after a crash as before it.

``dovecote flow graph NAME`` draws the stages from the tables.
"""

from __future__ import annotations

import contextlib
import string
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from flows.handlers import handler
from flows.options import CallOptions
from flows.runtime import REGISTRY, FlowRunner, register
from flows.states import (
    COMPLETE,
    DEAD,
    FAIL,
    FLOW_TERMINAL_STATES,
    RESUME,
    RETRY,
    STALLED,
    STEP_DEAD,
    STEP_REPLAYED,
    IllegalTransition,
    LostRace,
    next_state,
)

if TYPE_CHECKING:
    from flows.engine import Engine
    from flows.records import Command, Flow

ADVANCE = "flow.advance"
REPLIED = "replied"


@attrs.frozen
class Stage:
    """What entering a stage does. ``prompt`` and ``system`` are
    ``str.format`` templates over the flow's params and vars."""

    prompt: str | None = None
    system: str | None = None
    adapter: str = "scripted"
    save_as: str | None = None
    choose: Mapping[str, str] = attrs.field(factory=dict)
    timeout: float = 60.0

    def event_for(self, reply: str) -> str:
        """The first ``choose`` key the reply starts with (case and spaces
        ignored) names the event; else ``replied``."""
        head = reply.strip().lower()
        for prefix, event in self.choose.items():
            if head.startswith(prefix.lower()):
                return event
        return REPLIED


@attrs.frozen
class DeclaredFlow:
    name: str
    initial: str
    stages: Mapping[str, Stage]
    transitions: Mapping[str, Mapping[str, str]]

    def __attrs_post_init__(self) -> None:
        if self.initial not in self.stages:
            raise ValueError(f"flow {self.name}: initial stage {self.initial!r} is not a stage")
        for stage, moves in self.transitions.items():
            if stage not in self.stages:
                raise ValueError(f"flow {self.name}: transitions from unknown stage {stage!r}")
            for event, target in moves.items():
                if target not in self.stages:
                    raise ValueError(
                        f"flow {self.name}: {stage} --{event}--> {target!r}: no such stage"
                    )
        for name, entered in self.stages.items():
            if self.transitions.get(name) and entered.prompt is None:
                raise ValueError(f"flow {self.name}: stage {name!r} has transitions but no prompt")

    @property
    def table(self) -> dict[str, dict[str, str]]:
        """Every stage, final ones with no moves: the shape diagrams draw."""
        return {s: dict(self.transitions.get(s, {})) for s in self.stages}

    def next_stage(self, stage: str, event: str) -> str:
        return next_state(stage, event, table=self.table, what=f"flow {self.name} stage")

    async def enter(self, runner: FlowRunner, flow: Flow, stage_name: str) -> None:
        """Enter ``stage_name``: submit its command (moving the flow to
        ``waiting`` in the same transaction), or complete if it is final."""
        engine = runner.engine
        stage = self.stages[stage_name]
        if not self.transitions.get(stage_name):
            await runner.move(
                flow, COMPLETE, {"stage": stage_name}, stage=stage_name, result=flow.vars
            )
            return
        assert stage.prompt is not None
        values = {**(flow.params or {}), **(flow.vars or {})}
        request: dict[str, Any] = {
            "messages": [{"role": "user", "content": _fill(stage.prompt, values)}]
        }
        if stage.system:
            request["system"] = _fill(stage.system, values)
        step = flow.step + 1
        options = CallOptions(
            timeout=stage.timeout,
            handler=ADVANCE,
            handler_args={"flow": flow.id, "stage": stage_name},
        )
        (command,) = engine.new_commands(
            stage.adapter, [request], options, flow_id=flow.id, step=step
        )
        await runner.wait_on(flow, command, {"stage": stage_name, "step": step}, stage=stage_name)

    async def advance(self, runner: FlowRunner, command: Command) -> Any:
        """The reply to a stage's command arrived: take the event it names."""
        assert command.reply is not None
        args = command.handler_args or {}
        flow = runner.get(args["flow"])
        if flow.state in FLOW_TERMINAL_STATES or flow.stage != args["stage"]:
            return {"ignored": f"flow is {flow.state} at stage {flow.stage}"}
        stage = self.stages[args["stage"]]
        event = stage.event_for(command.reply.text)
        if flow.state == STALLED:
            flow = await runner.move(flow, RETRY, {"command": command.id})
        try:
            target = self.next_stage(args["stage"], event)
        except IllegalTransition as exc:
            await runner.move(flow, FAIL, {"error": str(exc)}, error=str(exc))
            return {"event": event, "refused": str(exc)}
        variables = dict(flow.vars or {})
        if stage.save_as:
            variables[stage.save_as] = command.reply.text
        flow = await runner.move(
            flow, RESUME, {"event": event, "from": args["stage"], "to": target}, vars=variables
        )
        await self.enter(runner, flow, target)
        return {"event": event, "stage": target}

    async def step_changed(self, runner: FlowRunner, command: Command) -> None:
        """A stage's command died (stall) or a replay took it over (retry)."""
        flow = runner.get(command.flow_id or "")
        what = STEP_DEAD if command.state == DEAD else STEP_REPLAYED
        with contextlib.suppress(LostRace):  # moved meanwhile by the handler: it knows better
            await runner.follow(flow, what, command)


def _fill(template: str, values: Mapping[str, Any]) -> str:
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    missing = fields - set(values)
    if missing:
        raise ValueError(f"template needs {', '.join(sorted(missing))}: {template[:60]!r}")
    return template.format(**values)


def declare(
    name: str,
    *,
    initial: str,
    stages: Mapping[str, Stage],
    transitions: Mapping[str, Mapping[str, str]],
) -> DeclaredFlow:
    """Define and register a declared flow."""
    definition = DeclaredFlow(
        name, initial, dict(stages), {k: dict(v) for k, v in transitions.items()}
    )
    register(definition)
    return definition


@handler(ADVANCE)
async def _advance(engine: Engine, command: Command) -> Any:
    flow = engine.flow_runner.get((command.handler_args or {})["flow"])
    definition = REGISTRY.get(flow.name)
    if not isinstance(definition, DeclaredFlow):
        raise LookupError(f"no declared flow registered as {flow.name!r}")
    return await definition.advance(engine.flow_runner, command)
