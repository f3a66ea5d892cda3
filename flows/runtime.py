"""Flows: multi-step work that survives a crash without paying twice.

Two ways to write a flow, one runtime, one table (``flows``), one machine
(``FLOW_TRANSITIONS`` in flows/states.py):

* **scripted**: ``@flows.flow("name")`` on ``async def f(ctx, **params)``.
  Each ``await ctx.call(...)`` is a step: a command whose ``flow_id`` and
  ``step`` tie it to the flow, recorded in ``flow_steps`` in the same
  transaction that stores the command. After a crash the script runs again
  from the top; a step already recorded returns its recorded reply (or
  waits for its command still in flight) instead of calling the model, so
  the script runs on from the first unfinished step. ``ctx.now()``,
  ``ctx.random()`` and ``ctx.sleep()`` are journaled the same way, so the
  script takes the same path again. A script that changed so that step N
  is no longer what was recorded is stopped, its flow ``failed`` with an
  error naming the step.
* **declared** (flows.declared): stages and transitions as data; entering a
  stage submits its command with the ``flow.advance`` reply handler, which
  picks the event from the reply and enters the next stage. No task, no
  closure: everything needed to go on is in the database.

A step that is dead-lettered leaves its flow ``stalled``. Replaying the
dead letter (``dovecote replay``, ``deadletter/replay``, ``flow retry``)
makes a command that takes over the step, and the flow resumes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

import attrs
import trio

from adapters.base import Reply, Request
from flows import checks, sampling, typed
from flows.options import CallOptions
from flows.records import Command, Flow, FlowChange, FlowStep, new_id, storable
from flows.snapshots import Snapshot
from flows.states import (
    CANCEL,
    CANCELLABLE_STATES,
    CANCELLED,
    COMPLETE,
    COMPLETED,
    DEAD,
    DONE,
    FAIL,
    FLOW_FOLLOWS_STEP,
    FLOW_TERMINAL_STATES,
    FLOW_TRANSITIONS,
    RESUME,
    RUNNING,
    STEP_DEAD,
    STEP_DONE,
    WAIT,
    WAITING,
    IllegalTransition,
    LostRace,
    next_state,
)
from flows.store import (
    CopySteps,
    Insert,
    InsertFlow,
    MoveFlow,
    Operation,
    RecordStep,
    TakeOverFlow,
    owner_is_gone,
)

if TYPE_CHECKING:
    from flows.engine import Engine

log = logging.getLogger("dovecote.flows")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
T = TypeVar("T")


@attrs.frozen
class ScriptedFlow:
    name: str
    function: Callable[..., Awaitable[Any]]


REGISTRY: dict[str, Any] = {}
"""Flow definitions by name: ``ScriptedFlow`` or ``flows.declared.DeclaredFlow``."""


def register(definition: Any) -> None:
    existing = REGISTRY.get(definition.name)
    if existing is not None and existing != definition:
        raise ValueError(f"a different flow is already registered as {definition.name!r}")
    REGISTRY[definition.name] = definition


def flow(name: str) -> Callable[[F], F]:
    """Register ``async def f(ctx, **params)`` as the scripted flow ``name``."""

    def decorate(function: F) -> F:
        register(ScriptedFlow(name, function))
        return function

    return decorate


class FlowFailed(Exception):
    """``wait_flow`` on a flow that failed or was cancelled; ``flow`` says why."""

    def __init__(self, flow: Flow) -> None:
        super().__init__(f"flow {flow.id} ({flow.name}) {flow.state}: {flow.error or flow.state}")
        self.flow = flow


class JournalMismatch(Exception):
    """The script no longer does what its journal recorded at a step."""


class StepCancelled(Exception):
    """A step's command was cancelled: the flow cannot go on."""


class FlowContext:
    """What a scripted flow's steps go through. Every method is a journaled
    step: on a resumed run it returns what the first run got."""

    def __init__(self, runner: FlowRunner, flow: Flow) -> None:
        self._runner = runner
        self._engine = runner.engine
        self.flow_id = flow.id
        self.params: Mapping[str, Any] = flow.params or {}
        self._step = 0
        self._recorded = {s.step: s for s in self._engine.store.flow_steps(flow.id)}

    def _next(self, kind: str) -> tuple[int, FlowStep | None]:
        self._step += 1
        recorded = self._recorded.get(self._step)
        if recorded is not None and recorded.kind != kind:
            raise JournalMismatch(
                f"step {self._step} was a {recorded.kind} when this flow first ran, and is "
                f"now a {kind}: the script changed in a way its journal cannot follow"
            )
        return self._step, recorded

    @overload
    async def call(
        self,
        adapter: str,
        request: Request | Mapping[str, Any],
        *,
        result: None = None,
        max_reasks: int = ...,
        **options: Any,
    ) -> Reply: ...

    @overload
    async def call(
        self,
        adapter: str,
        request: Request | Mapping[str, Any],
        *,
        result: type[T],
        max_reasks: int = ...,
        **options: Any,
    ) -> T: ...

    async def call(
        self,
        adapter: str,
        request: Request | Mapping[str, Any],
        *,
        result: type[T] | None = None,
        max_reasks: int = typed.DEFAULT_MAX_REASKS,
        **options: Any,
    ) -> Reply | T:
        """One model call as one step; its reply (recorded, after a crash).

        Options are ``Engine.submit``'s: ``timeout``, ``max_attempts``,
        ``handler``, ``handler_args``, ``snapshot_id``, ``cache``. With
        ``result=SomeAttrsClass`` the reply is an instance of it, and each
        re-ask of a reply that does not fit is a step of its own (see
        flows/typed.py), so a resumed flow pays for none of them again."""
        if not isinstance(request, Request):
            request = Request.from_json(request)
        if result is None:
            return (await self._call_step(adapter, request, None, options))[1]

        async def ask(asked: Request, detail: Any) -> tuple[str, Reply]:
            return await self._call_step(adapter, asked, detail, options)

        return await typed.ask_until_valid(result, request, max_reasks, ask)

    async def _call_step(
        self, adapter: str, request: Request, detail: Any, options: Mapping[str, Any]
    ) -> tuple[str, Reply]:
        """The next step as a call: submitted now, or the recorded one."""
        step, command_id = await self._submitted([(adapter, request, detail)], options)
        return command_id[0], await self._runner.await_step(self.flow_id, step[0], command_id[0])

    async def _submitted(
        self, calls: Sequence[tuple[str, Request, Any]], options: Mapping[str, Any]
    ) -> tuple[list[int], list[str]]:
        """The next ``len(calls)`` steps as calls ``(adapter, request, submit
        detail)``: those recorded (checked against the journal) and the
        rest stored now, in one transaction, so that all are out at once.
        (Some but not all are recorded in a fork that reuses part of a
        sample.) Their steps and command ids."""
        steps, ids, missing = [], [], []
        for adapter, request, detail in calls:
            step, found = self._next("call")
            steps.append(step)
            if found is None:
                missing.append((step, (adapter, request, detail)))
                ids.append("")
                continue
            assert found.command_id is not None
            first = self._engine.store.get(found.command_id)
            if (first.adapter, first.request) != (adapter, request):
                raise JournalMismatch(
                    f"step {step} called {first.adapter!r} with a different request when this "
                    "flow first ran: the script changed, so its recorded replies no longer fit"
                )
            ids.append(found.command_id)
        if missing:
            fresh = iter(await self._runner.submit_steps(self.flow_id, missing, **options))
            ids = [command_id or next(fresh) for command_id in ids]
        return steps, ids

    async def sample(
        self,
        adapter: str,
        request: Request | Mapping[str, Any] | Sequence[Request | Mapping[str, Any]],
        *,
        n: int,
        check: str,
        pick: str = "best",
        expected: Any = None,
        **options: Any,
    ) -> sampling.Sample:
        """``n`` candidate replies judged by the check ``check``; the chosen
        one (see flows/sampling.py). ``request`` is one request for every
        candidate, or a list of ``n``, one each."""
        requests = sampling.candidate_requests(request, n)
        sampling.check_pick(pick)
        # An unknown check name fails here, before anything is sent.
        engine = self._engine if checks.needs_engine(check) else None
        candidates: list[Command] = []
        scores: list[checks.Score] = []
        batches = [requests] if pick == "best" else [[r] for r in requests]
        for batch in batches:
            asked = [
                (adapter, r, {"sample": {"check": check, "pick": pick, "candidate": i}})
                for i, r in enumerate(batch, start=len(candidates))
            ]
            steps, ids = await self._submitted(asked, options)
            done = await self._runner.await_commands(self.flow_id, steps, ids)
            candidates.extend(done)
            recorded = self._recorded.get(self._step + 1)
            if recorded is not None and recorded.kind == "sample":
                self._next("sample")
                return sampling.from_record(self._engine.store, recorded.value)
            judged = await sampling.judge_all(check, done, expected, engine)
            scores.extend(judged)
            if pick == "first" and judged[0].passed:
                break
        chosen = sampling.choose(pick, candidates, scores)
        value = sampling.record(pick, check, candidates, scores, chosen)
        step, _ = self._next("sample")
        await self._runner.record(
            FlowStep(self.flow_id, step, "sample", None, value, self._engine.now())
        )
        return sampling.from_record(self._engine.store, value)

    async def now(self) -> float:
        """Wall-clock time, the same on every run of this step."""
        return float(await self._value("now", self._engine.now))

    async def random(self) -> float:
        """A random float in [0, 1), the same on every run of this step."""
        return float(await self._value("random", random.random))

    async def sleep(self, seconds: float) -> None:
        """Sleep until a wake-up time fixed on the first run: a resumed
        flow sleeps only what is left."""
        wake_at = float(await self._value("sleep", lambda: self._engine.now() + seconds))
        await trio.sleep_until(self._engine.clock.trio_time(wake_at))

    async def ask_human(
        self, question: str, *, adapter: str = "human", timeout: float = 3600.0
    ) -> str:
        """A step served by a person (the ``human`` adapter)."""
        reply = await self.call(
            adapter, {"messages": [{"role": "user", "content": question}]}, timeout=timeout
        )
        return reply.text

    async def _value(self, kind: str, make: Callable[[], float]) -> Any:
        step, recorded = self._next(kind)
        if recorded is not None:
            return recorded.value
        value = make()
        await self._runner.record(
            FlowStep(self.flow_id, step, kind, None, value, self._engine.now())
        )
        return value


class FlowRunner:
    """Runs the flows of one engine; the engine's flow methods delegate here."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._tasks: dict[str, trio.CancelScope] = {}
        self._changed: dict[str, trio.Event] = {}

    def running(self) -> tuple[str, ...]:
        """The flows whose script runs in this engine now."""
        return tuple(self._tasks)

    # --- public, via the engine ----------------------------------------------

    async def start(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        *,
        snapshot: Snapshot | None = None,
        forked_from: str | None = None,
        reuse_before: int | None = None,
        budget: float | None = None,
    ) -> str:
        if budget is not None and (
            isinstance(budget, bool)
            or not isinstance(budget, int | float)
            or not 0 <= budget < float("inf")
        ):
            raise ValueError(f"a flow's budget must be a number, 0 or more, not {budget!r}")
        definition = REGISTRY.get(name)
        if definition is None:
            known = ", ".join(sorted(REGISTRY)) or "none"
            raise ValueError(f"no flow registered as {name!r} (registered: {known})")
        params = dict(params or {})
        try:
            json.dumps(params)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"flow params must be JSON: {exc}") from None
        storable(params, "the flow params")
        storable(snapshot, "the snapshot")
        now = self.engine.now()
        scripted = isinstance(definition, ScriptedFlow)
        flow = Flow(
            id=new_id(),
            name=name,
            state=RUNNING,
            created_at=now,
            updated_at=now,
            params=params,
            vars={} if not scripted else None,
            forked_from=forked_from,
            budget=None if budget is None else float(budget),
            owner=self.engine.owner if scripted else None,
            lease_until=now + self.engine.lease if scripted else None,
        )
        operations: list[Operation] = [InsertFlow(flow, snapshot)]
        if forked_from is not None and reuse_before is not None:
            operations.append(CopySteps(forked_from, flow.id, reuse_before))
        results = await self.engine.committer.commit_together(operations)
        self._published(flow, results[0])
        if scripted:
            self.engine.spawn(self._run, flow)
        else:
            await definition.enter(self, flow, definition.initial)
        return flow.id

    async def wait(self, flow_id: str) -> Any:
        flow = self.get(flow_id)
        while flow.state not in FLOW_TERMINAL_STATES:
            await self._wait_change(flow_id)
            flow = self.get(flow_id)
        if flow.state != COMPLETED:
            raise FlowFailed(flow)
        return flow.result

    async def cancel(self, flow_id: str) -> Flow:
        while True:
            flow = self.get(flow_id)
            next_state(flow.state, CANCEL, command_id=flow.id, table=FLOW_TRANSITIONS, what="flow")
            try:
                cancelled = await self.move(flow, CANCEL, error="cancelled", owner=None)
                break
            except LostRace:
                continue
        scope = self._tasks.pop(flow_id, None)
        if scope is not None:
            scope.cancel()
        for command in self.engine.store.list(sorted(CANCELLABLE_STATES), flow_id=flow_id):
            with contextlib.suppress(IllegalTransition):  # it finished meanwhile
                await self.engine.cancel(command.id)
        return cancelled

    def get(self, flow_id: str) -> Flow:
        flow = self.engine.store.find_flow(flow_id)
        if flow is None:
            raise UnknownFlow(flow_id)
        return flow

    # --- steps ---------------------------------------------------------------

    async def submit_steps(
        self,
        flow_id: str,
        calls: Sequence[tuple[int, tuple[str, Request, Any]]],
        **options: Any,
    ) -> list[str]:
        """Store the steps' commands ``(step, (adapter, request, submit
        detail))`` and move the flow to ``waiting``, in one transaction;
        their ids."""
        snapshot_id = options.pop("snapshot_id", None)
        chosen = CallOptions(**options)
        commands = [
            command
            for step, (adapter, request, _) in calls
            for command in self.engine.new_commands(
                adapter, [request], chosen, flow_id=flow_id, step=step, snapshot_id=snapshot_id
            )
        ]
        steps = [step for step, _ in calls]
        detail = {"step": steps[0]} if len(steps) == 1 else {"steps": steps}
        details = [submit_detail for _, (_, _, submit_detail) in calls]
        await self.wait_on(
            self.get(flow_id), commands, detail, submit_details=details, cache=chosen.cache
        )
        return [command.id for command in commands]

    async def wait_on(
        self,
        flow: Flow,
        commands: Command | Sequence[Command],
        detail: Any,
        *,
        submit_details: Sequence[Any] = (),
        cache: bool | str | None = None,
        **changes: Any,
    ) -> None:
        """Move ``flow`` to ``waiting`` and store its steps' ``commands``
        (each journaled with its ``submit_details``, if any), in one
        transaction: a crash never leaves one without the other. A cached
        call's entry, or its resolution from the cache, is in that
        transaction too."""
        if isinstance(commands, Command):
            commands = [commands]
        details = list(submit_details) or [None] * len(commands)
        assert commands and all(c.step is not None for c in commands)
        moved = attrs.evolve(
            flow,
            state=next_state(flow.state, WAIT, table=FLOW_TRANSITIONS, what="flow"),
            step=max(c.step or 0 for c in commands),
            updated_at=self.engine.now(),
            **changes,
        )
        # Together or not at all: a flow cancelled meanwhile refuses the
        # move, and then its step's command must not be stored either.
        results = await self.engine.insert_cached(
            cache,
            [MoveFlow(flow, moved, WAIT, detail)]
            + [Insert(c, detail=d) for c, d in zip(commands, details, strict=True)],
        )
        self._published(moved, results[0])

    async def await_commands(
        self, flow_id: str, steps: Sequence[int], command_ids: Sequence[str]
    ) -> list[Command]:
        """The steps' commands once every one is terminal, and the flow
        ``running`` again. Unlike ``await_step``, a dead one does not stall
        the flow: a sampler scores it as a failed candidate."""
        done: list[Command | None] = [None] * len(command_ids)

        async def one(index: int, command_id: str) -> None:
            done[index] = await self.engine.wait(command_id)

        async with trio.open_nursery() as nursery:
            for index, command_id in enumerate(command_ids):
                nursery.start_soon(one, index, command_id)
        flow = self.get(flow_id)
        if flow.state == WAITING:
            await self.move(flow, RESUME, {"steps": list(steps)})
        return [command for command in done if command is not None]

    async def await_step(self, flow_id: str, step: int, command_id: str) -> Reply:
        """The reply of step ``step``, following replays of its command:
        ``waiting`` while it is out, ``stalled`` while it is a dead letter."""
        while True:
            command = await self.engine.wait(command_id)
            if command.state == CANCELLED:
                raise StepCancelled(f"step {step}'s command {command.id} was cancelled")
            flow = self.get(flow_id)
            if command.state == DONE and command.reply is not None:
                await self.follow(flow, STEP_DONE, command, step)
                return command.reply
            await self.follow(flow, STEP_DEAD, command, step)
            command_id = await self._replacement(flow_id, step, command_id)

    async def _replacement(self, flow_id: str, step: int, dead_id: str) -> str:
        """Wait until a replay takes over the dead step; its command id."""
        while True:
            for recorded in self.engine.store.flow_steps(flow_id):
                if recorded.step == step and recorded.command_id not in (None, dead_id):
                    return recorded.command_id
            await self._wait_change(flow_id)

    async def record(self, step: FlowStep) -> None:
        flow = self.get(step.flow_id)
        await self.engine.committer.commit(RecordStep(step, flow))

    async def follow(
        self, flow: Flow, what: str, command: Command, step: int | None = None
    ) -> Flow:
        """Move ``flow`` as its step's command ``command`` says (``what``:
        ``STEP_DONE``, ``STEP_DEAD``, ``STEP_REPLAYED``), by the table
        ``FLOW_FOLLOWS_STEP``; the flow after."""
        detail = {"command": command.id} if step is None else {"step": step, "command": command.id}
        for event in FLOW_FOLLOWS_STEP.get((what, flow.state), ()):
            flow = await self.move(flow, event, detail)
        return flow

    async def move(self, flow: Flow, event: str, detail: Any = None, **changes: Any) -> Flow:
        after = attrs.evolve(
            flow,
            state=next_state(
                flow.state, event, command_id=flow.id, table=FLOW_TRANSITIONS, what="flow"
            ),
            updated_at=self.engine.now(),
            **changes,
        )
        journal = await self.engine.committer.commit(MoveFlow(flow, after, event, detail))
        self._published(after, journal)
        return after

    # --- running scripts -----------------------------------------------------

    async def _run(self, flow: Flow) -> None:
        definition = REGISTRY[flow.name]
        with trio.CancelScope() as scope:
            self._tasks[flow.id] = scope
            try:
                result = await definition.function(FlowContext(self, flow), **(flow.params or {}))
                json.dumps(result)
                storable(result, "the flow's result")
            except (JournalMismatch, StepCancelled) as exc:
                await self._fail(flow.id, str(exc))
            except Exception as exc:
                log.exception("flow %s (%s) failed", flow.id, flow.name)
                await self._fail(flow.id, f"{type(exc).__name__}: {exc}")
            else:
                current = self.get(flow.id)
                await self.move(current, COMPLETE, result=result, owner=None, lease_until=None)
            finally:
                self._tasks.pop(flow.id, None)

    async def _fail(self, flow_id: str, error: str) -> None:
        current = self.get(flow_id)
        if current.state not in FLOW_TERMINAL_STATES:
            await self.move(
                current, FAIL, {"error": error}, error=error, owner=None, lease_until=None
            )

    async def resume(self) -> int:
        """Take over the scripted flows whose runner is gone; run them again."""
        now = self.engine.now()
        taken = 0
        for flow in self.engine.store.abandoned_flows(self.engine.owner, now, owner_is_gone):
            if not isinstance(REGISTRY.get(flow.name), ScriptedFlow) or flow.id in self._tasks:
                continue
            until = now + self.engine.lease
            mine = attrs.evolve(flow, owner=self.engine.owner, lease_until=until, updated_at=now)
            try:
                await self.engine.committer.commit(
                    TakeOverFlow(flow, self.engine.owner, until, now)
                )
            except LostRace:  # another engine took it first
                continue
            taken += 1
            self.engine.spawn(self._run, mine)
        return taken

    # --- change notices ------------------------------------------------------

    def _published(self, flow: Flow, event: Any) -> None:
        self._wake(flow.id)
        if event is not None:
            self.engine.notices.publish(FlowChange(flow, event))

    def on_command(self, command: Command) -> None:
        """Called for every committed command transition."""
        if command.flow_id is None:
            return
        self._wake(command.flow_id)
        if command.state != DEAD and command.replay_of is None:
            return
        # A declared flow has no task watching its steps: tell its definition.
        flow = self.engine.store.find_flow(command.flow_id)
        definition = REGISTRY.get(flow.name) if flow else None
        if definition is not None and not isinstance(definition, ScriptedFlow):
            self.engine.spawn(definition.step_changed, self, command)

    def _wake(self, flow_id: str) -> None:
        event = self._changed.pop(flow_id, None)
        if event is not None:
            event.set()

    async def _wait_change(self, flow_id: str) -> None:
        event = self._changed.setdefault(flow_id, trio.Event())
        with trio.move_on_after(self.engine.poll_interval):
            await event.wait()


class UnknownFlow(LookupError):
    def __init__(self, flow_id: str) -> None:
        super().__init__(f"no flow with id {flow_id!r}")
        self.flow_id = flow_id
