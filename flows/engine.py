"""The engine: sends pending commands, matches replies, times out the late.

An engine is a handful of trio tasks around one store:

* the **committer** (flows.commit) turns transitions into SQLite
  transactions, many at a time;
* the **dispatcher** claims ``pending`` commands (highest priority, then
  oldest) up to each adapter's ``max_in_flight`` and starts one send task per
  claimed command;
* the **timers** (flows.timers) dead-letter commands whose deadline passed,
  cancelling their sends, expire pending ones and wake the dispatcher when a
  backed-off retry is due;
* the **keeper** renews this engine's leases and takes over work that a
  dead engine left behind.

Every reply, whether a send returns it, a person types it or another
process delivers it, enters through ``deliver``, which matches it to its
command by id. Every state change goes through the committer first and is
acted on (tasks cancelled, handlers run, subscribers told) only after it is
committed.

Several engines may share one file. A command is claimed by a compare-and-
set that names its owner and a lease; the owner renews the lease while the
send is in flight. An engine that dies leaves its leases to run out, or, if
it ran on this host, to be noticed at once (its pid is gone), and another
engine re-queues its work.
"""

from __future__ import annotations

import builtins
import inspect
import json
import logging
import math
import os
import random
import sqlite3
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar, overload

import attrs
import trio

from adapters.base import (
    Adapter,
    AdapterError,
    Reply,
    Request,
    RetryableError,
    SendContext,
)
from adapters.scripted import ScriptedAdapter
from flows import budget, typed
from flows import cache as flows_cache
from flows import handlers as handler_registry
from flows.commit import Committer
from flows.errors import CommandFailed, EngineClosing, StoreError
from flows.ratelimit import RateLimit, estimate_tokens
from flows.records import (
    Command,
    CommandError,
    Delivery,
    Event,
    Flow,
    FlowChange,
    StateChange,
    new_id,
    storable,
    storable_int,
)
from flows.runtime import FlowRunner
from flows.snapshots import Snapshot
from flows.states import (
    CANCEL,
    DEAD,
    DISPATCH,
    DONE,
    EXPIRE,
    FAIL,
    FINISH,
    PENDING,
    REASON_BUDGET,
    REASON_CANCELLED_BY_USER,
    REASON_ERROR,
    REASON_EXPIRED,
    REASON_HANDLER_ERROR,
    REASON_INTERRUPTED,
    REASON_RETRIES_EXHAUSTED,
    REASON_TIMEOUT,
    REFUSE,
    REPLIED,
    REPLY,
    RESOLVE,
    RETRY,
    SENT,
    TERMINAL_STATES,
    TIMEOUT,
    IllegalTransition,
    next_state,
)
from flows.store import (
    AddCacheEntry,
    AddLateReply,
    Chain,
    CountCacheHit,
    Insert,
    Move,
    Note,
    Operation,
    ReleaseLeases,
    RenewFlowLeases,
    RenewLeases,
    Store,
    TakeOver,
    UseLateReply,
    make_owner,
    owner_is_gone,
)
from flows.timers import DEADLINE, EXPIRY, Alarm, Timers
from flows.timers import RETRY as RETRY_ALARM

log = logging.getLogger("dovecote")
T = TypeVar("T")

DEFAULT_DB: Final = Path(".dovecote") / "dovecote.db"
MAX_TIMEOUT: Final = 30 * 24 * 3600.0  # a month: a person may be the provider
MAX_ATTEMPTS: Final = 100
UNSENT_KEPT: Final = 10_000  # submitted commands kept in memory until claimed
CLAIM_BATCH: Final = 1024  # most commands claimed in one dispatcher round
RENEW_BATCH: Final = 1024  # most leases renewed in one transaction
SERVICE_RESTART: Final = 1.0  # seconds before a task the store stopped runs again
DEFAULT_MAX_ATTEMPTS: Final = 3
PRIORITY_INTERACTIVE: Final = 10
PRIORITY_BATCH: Final = 0


def default_db_path(cwd: Path | None = None) -> Path:
    """The database when no ``--db`` is given: one rule for the CLI, ``dovecote serve``
    and so the editors, so that ``dovecote dead`` in a shell shows an editor's calls.

    ``$DOVECOTE_DB``; else the nearest ``.dovecote/dovecote.db`` in ``cwd`` (the current
    directory) or its parents, as git finds ``.git`` (a project's own database, made by
    ``mkdir .dovecote``); else ``$XDG_DATA_HOME/dovecote/dovecote.db``, by default under
    ``~/.local/share`` (a relative ``$XDG_DATA_HOME`` is ignored, as the XDG spec says).
    """
    if env := os.environ.get("DOVECOTE_DB"):
        return Path(env)
    here = (cwd or Path.cwd()).absolute()
    for directory in (here, *here.parents):
        if (directory / DEFAULT_DB.parent).is_dir():
            return directory / DEFAULT_DB
    data = os.environ.get("XDG_DATA_HOME", "")
    home = Path(data) if os.path.isabs(data) else Path.home() / ".local" / "share"
    return home / "dovecote" / DEFAULT_DB.name


@attrs.frozen
class Progress:
    """Streamed partial text of a command's reply (the whole text so far)."""

    command_id: str
    text: str


Notice = StateChange | Progress | FlowChange


@attrs.frozen
class Backoff:
    """Exponential backoff with jitter: attempt n waits a random time in
    [d/2, d] where d = base * 2**(n-1), capped. A ``Retry-After`` from the
    provider is honoured: we never come back sooner than it asks."""

    base: float = 0.5
    cap: float = 60.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        full = min(self.cap, self.base * 2.0 ** max(0, attempt - 1))
        jittered = full / 2 + rng.random() * full / 2
        return max(jittered, retry_after or 0.0, 0.0)


class Engine:
    """Use ``open_engine`` to make one; see the module docstring."""

    def __init__(
        self,
        store: Store,
        nursery: trio.Nursery,
        adapters: Iterable[Adapter],
        *,
        handlers: Mapping[str, handler_registry.Handler] | None = None,
        lease: float = 30.0,
        poll_interval: float = 1.0,
        backoff: Backoff = Backoff(),
        wall_clock: Callable[[], float] = time.time,
        seed: int | None = None,
    ) -> None:
        self.store = store
        self._nursery = nursery
        self.adapters: dict[str, Adapter] = {}
        for adapter in adapters:
            self.adapters[adapter.settings.name] = adapter
        self._handlers = dict(handlers or {})
        self.owner = make_owner(new_id()[-12:])
        self._lease = lease
        self._poll_interval = poll_interval
        self._backoff = backoff
        self._rng = random.Random(seed)
        self._epoch = wall_clock() - trio.current_time()
        self._committer = Committer(store)
        self._timers = Timers(self._ring)
        # Sends in flight in this engine: command as claimed, and the scope
        # that cancels its send.
        self._sending: dict[str, tuple[Command, trio.CancelScope]] = {}
        self._sending_per_adapter: dict[str, int] = dict.fromkeys(self.adapters, 0)
        self._limits = {
            name: RateLimit(a.settings.requests_per_minute, a.settings.tokens_per_minute)
            for name, a in self.adapters.items()
            if a.settings.requests_per_minute or a.settings.tokens_per_minute
        }
        # Commands this engine submitted that have not moved yet, so that the
        # dispatcher claims them without decoding their rows (bounded: past
        # that, rows are decoded as for any other process's commands).
        self._unsent: dict[str, Command] = {}
        self._claiming: set[str] = set()
        # Replied commands whose handler runs in this engine: leased too.
        self._handling: set[str] = set()
        self._dispatch_wanted = trio.Event()
        # Tasks in ``wait``, by command: the event that wakes them, and the
        # terminal command itself once this engine has committed it.
        self._waiters: dict[str, _Waiter] = {}
        self._subscribers: builtins.list[trio.MemorySendChannel[Notice]] = []
        self._flows = FlowRunner(self)
        # Each flow's budget, once read: it never changes.
        self._flow_budgets: dict[str, float | None] = {}

    # --- clock ---------------------------------------------------------------

    def now(self) -> float:
        """Wall-clock time (epoch seconds) as this engine sees it: trio's
        clock plus a fixed offset, so a ``MockClock`` moves it too."""
        return self._epoch + trio.current_time()

    def _trio_time(self, wall: float) -> float:
        return wall - self._epoch

    # --- public API ----------------------------------------------------------

    async def submit(
        self,
        adapter: str,
        request: Request | Mapping[str, Any],
        *,
        timeout: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        handler: str | None = None,
        handler_args: Any = None,
        priority: int = PRIORITY_BATCH,
        expires_at: float | None = None,
        flow_id: str | None = None,
        step: int | None = None,
        snapshot: Snapshot | None = None,
        detail: Any = None,
        cache: bool | str | None = None,
    ) -> str:
        """Put a call in the pending table and return its id at once.

        ``snapshot``, the region a reply will be merged into, is stored in
        the same transaction. ``detail`` (JSON) is journaled with the submit:
        what this call is to another (a typed call's re-ask). ``cache``:
        ``True`` to reuse the reply of an identical earlier call (not when
        sampling, ``temperature > 0``), ``"always"`` even then, ``False``
        never, ``None`` as the adapter's ``cache`` setting says (flows.cache).
        Everything is validated before anything is stored: a bad argument
        raises ``ValueError`` (or ``TypeError``) and changes nothing."""
        flows_cache.check_option(cache)
        command = self._new_command(
            adapter,
            request,
            timeout=timeout,
            max_attempts=max_attempts,
            handler=handler,
            handler_args=handler_args,
            priority=priority,
            expires_at=expires_at,
            flow_id=flow_id,
            step=step,
            snapshot_id=snapshot.id if snapshot else None,
        )
        storable(snapshot, "the snapshot")
        await self.insert_cached(cache, [Insert(command, detail=detail, snapshot=snapshot)])
        return command.id

    async def insert_cached(
        self, cache: bool | str | None, operations: Sequence[Operation]
    ) -> builtins.list[Any]:
        """Commit ``operations``, with what the cache makes of each command
        they insert: an entry under its key (a miss), or its resolution from
        an earlier command's reply (a hit: ``pending -> replied`` at cost 0,
        the source's id in the journal, and its handler run as for any
        reply). No cache wanted: the operations alone."""
        inserts = [(at, op.command) for at, op in enumerate(operations) if isinstance(op, Insert)]
        assert inserts, "insert_cached commits the insert of at least one command"
        extra: builtins.list[Operation] = []
        resolved: builtins.list[tuple[int, Command]] = []  # (its Move's place, command)
        now = self.now()
        for _, command in inserts:
            adapter = self.adapters[command.adapter]
            if not flows_cache.wanted(cache, adapter.settings, command.request):
                continue
            key = flows_cache.key(adapter, command.request)
            source = self.store.cached(key, now - adapter.settings.cache_ttl)
            if source is None:
                extra.append(AddCacheEntry(key, command.adapter, command.id, now))
                continue
            assert source.reply is not None
            hit = command.evolve(
                state=REPLIED,
                reply=source.reply,
                replied_at=now,
                cost=0.0,
                owner=self.owner,
                lease_until=now + self._lease,
            )
            resolved.append((len(operations) + len(extra), hit))
            extra.append(Move(command, hit, RESOLVE, now, {"cached_from": source.id}))
            extra.append(CountCacheHit(source.id, now))
        together = [*operations, *extra]
        # One operation needs no group (and its savepoint) to be all or nothing.
        commit = (
            self._committer.commit_all if len(together) == 1 else self._committer.commit_together
        )
        results = await commit(together)
        self._submitted([c for _, c in inserts], [results[at] for at, _ in inserts])
        for at, hit in resolved:
            self._committed(hit, results[at])
            self.spawn(self._complete, hit)
        return results

    async def submit_many(
        self,
        adapter: str,
        requests: Iterable[Request | Mapping[str, Any]],
        *,
        timeout: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        handler: str | None = None,
        handler_args: Any = None,
        priority: int = PRIORITY_BATCH,
        expires_at: float | None = None,
    ) -> builtins.list[str]:
        """``submit`` for a batch of requests with the same options, stored
        in one transaction, in order. Every request is validated first: one
        bad request raises and stores nothing. A script with a thousand calls
        to make pays for one commit, not a thousand."""
        commands = self._new_commands(
            adapter,
            requests,
            timeout=timeout,
            max_attempts=max_attempts,
            handler=handler,
            handler_args=handler_args,
            priority=priority,
            expires_at=expires_at,
        )
        if not commands:
            return []
        events = await self._committer.commit_together([Insert(command) for command in commands])
        self._submitted(commands, events)
        return [command.id for command in commands]

    def _submitted(self, commands: Sequence[Command], events: Sequence[Event]) -> None:
        for command, event in zip(commands, events, strict=True):
            if len(self._unsent) < UNSENT_KEPT:
                self._unsent[command.id] = command
            self._committed(command, event)
            if command.expires_at is not None:
                self._timers.schedule(self._trio_time(command.expires_at), EXPIRY, command.id)
        self._dispatch_wanted.set()

    async def wait(self, command_id: str) -> Command:
        """The command once it is terminal (``done``, ``dead`` or ``cancelled``).

        Transitions made by this engine wake the waiter at once; those made
        by another process on the same file are seen by polling."""
        known = self._unsent.get(command_id) or self._sending.get(command_id, (None,))[0]
        # One this engine holds is not terminal: no need to read it to know.
        command = known or self.store.get(command_id)
        while not command.is_terminal:
            waiter = self._waiters.setdefault(command_id, _Waiter())
            with trio.move_on_after(self._poll_interval):
                await waiter.woken.wait()
            command = waiter.command or self.store.get(command_id)
        return command

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
        """Submit, wait, and return the reply; ``CommandFailed`` unless done.

        With ``result=SomeAttrsClass`` the reply is an instance of it (see
        flows/typed.py): a reply that does not fit is re-asked, each re-ask
        its own command, at most ``max_reasks`` times, then ``ResultInvalid``."""
        if not isinstance(request, Request):
            request = Request.from_json(request)
        if result is None:
            return await self._reply(await self.submit(adapter, request, **options))

        async def ask(asked: Request, detail: Any) -> tuple[str, Reply]:
            command_id = await self.submit(adapter, asked, detail=detail, **options)
            return command_id, await self._reply(command_id)

        return await typed.ask_until_valid(result, request, max_reasks, ask)

    async def _reply(self, command_id: str) -> Reply:
        command = await self.wait(command_id)
        if command.state != DONE or command.reply is None:
            raise CommandFailed(command)
        return command.reply

    def get(self, command_id: str) -> Command:
        return self.store.get(command_id)

    def list(
        self,
        states: Iterable[str] | None = None,
        limit: int | None = None,
        *,
        flow_id: str | None = None,
        adapter: str | None = None,
        reason: str | None = None,
    ) -> builtins.list[Command]:
        return self.store.list(states, limit=limit, flow_id=flow_id, adapter=adapter, reason=reason)

    def history(self, command_id: str) -> builtins.list[Event]:
        self.store.get(command_id)
        return self.store.history(command_id)

    async def deliver(self, command_id: str, reply: Reply | Mapping[str, Any]) -> Delivery:
        """Match a reply to its command by id.

        A ``sent`` command takes it and moves to ``replied``; its handler
        then runs. Any other state makes it a *late reply*: stored in
        ``late_replies``, not applied. ``UnknownCommand`` for an unknown id."""
        if not isinstance(reply, Reply):
            reply = Reply.from_json(reply)
        storable(reply, "the reply")
        while True:
            command = self.store.get(command_id)
            if command.state != SENT:
                await self._committer.commit(AddLateReply(command.id, reply, self.now()))
                return Delivery(accepted=False, late=True)
            try:
                replied = await self._accept(command, reply)
            except IllegalTransition:
                continue  # it moved meanwhile: look again
            in_flight = self._sending.pop(command.id, None)
            if in_flight is not None:
                in_flight[1].cancel()
            self.spawn(self._complete, replied)
            return Delivery(accepted=True, late=False)

    async def note(self, command_id: str, event: str, detail: Any = None) -> Event:
        """Journal ``event`` on a command without moving it (the bridge's
        ``final_text``): a fact about the call, kept with its history."""
        event_row: Event = await self._committer.commit(Note(command_id, event, self.now(), detail))
        return event_row

    async def cancel(self, command_id: str) -> Command:
        """Cancel a ``pending`` or ``sent`` command (its send is cancelled)."""
        while True:
            command = self.store.get(command_id)
            next_state(command.state, CANCEL, command_id=command.id)
            try:
                cancelled = await self._move(
                    command,
                    CANCEL,
                    reason=REASON_CANCELLED_BY_USER,
                    finished_at=self.now(),
                    owner=None,
                    lease_until=None,
                )
            except IllegalTransition:
                continue
            in_flight = self._sending.pop(command.id, None)
            if in_flight is not None:
                in_flight[1].cancel()
            return cancelled

    async def replay(
        self, ids: Sequence[str], timeout: float | None = None, use_late_reply: bool = False
    ) -> builtins.list[str]:
        """Make a new pending command for each dead one; return their ids.

        With ``use_late_reply``, a dead command that has an unused late reply
        is resolved with it (the new command goes ``pending -> replied``
        without calling the model); the others are sent again. All ids are
        checked before anything is stored."""
        if timeout is not None:
            _check_timeout(timeout)
        dead = [self.store.get(command_id) for command_id in ids]
        for command in dead:
            if command.state != DEAD:
                raise IllegalTransition(
                    f"command {command.id} is {command.state}: only dead commands are replayed",
                    command_id=command.id,
                    state=command.state,
                    event="replay",
                )
        new_ids = []
        for command in dead:
            fresh = command.replayed(new_id(), self.now(), timeout)
            late = self.store.late_replies(command.id, unused_only=True) if use_late_reply else []
            operations: builtins.list[Operation] = [Insert(fresh, detail={"replay_of": command.id})]
            if late:
                resolved = attrs.evolve(
                    fresh,
                    state=REPLIED,
                    reply=late[0].reply,
                    replied_at=self.now(),
                    cost=self._cost(fresh.adapter, late[0].reply),
                    owner=self.owner,
                    lease_until=self.now() + self._lease,
                )
                operations.append(
                    Move(fresh, resolved, RESOLVE, self.now(), {"late_reply": late[0].id})
                )
                operations.append(UseLateReply(late[0].id, fresh.id))
            # All or nothing: of two replays racing for one late reply, the
            # loser must leave no command behind, resolved with a reply that
            # was not its to use.
            results = await self._committer.commit_together(operations)
            self._committed(fresh, results[0])
            if late:
                self._committed(resolved, results[1])
                self.spawn(self._complete, resolved)
            new_ids.append(fresh.id)
        self._dispatch_wanted.set()
        return new_ids

    # --- flows ---------------------------------------------------------------

    async def start_flow(self, name: str, /, *, budget: float | None = None, **params: Any) -> str:
        """Start the registered flow ``name`` with ``params``; its id.
        ``budget`` bounds what its calls may cost together (flows.budget)."""
        return await self._flows.start(name, params, budget=budget)

    async def wait_flow(self, flow_id: str) -> Any:
        """The flow's result once it completes; ``FlowFailed`` if it failed
        or was cancelled."""
        return await self._flows.wait(flow_id)

    async def cancel_flow(self, flow_id: str) -> Flow:
        """Cancel a flow and its unfinished commands."""
        return await self._flows.cancel(flow_id)

    def get_flow(self, flow_id: str) -> Flow:
        return self._flows.get(flow_id)

    def list_flows(
        self, states: Iterable[str] | None = None, limit: int | None = None
    ) -> builtins.list[Flow]:
        return self.store.flows(states, limit=limit)

    def flow_history(self, flow_id: str) -> builtins.list[Event]:
        self._flows.get(flow_id)
        return self.store.flow_history(flow_id)

    async def retry_flow(self, flow_id: str, timeout: float | None = None) -> str:
        """Replay the dead letter a stalled flow is waiting on; the new id."""
        flow = self._flows.get(flow_id)
        if flow.state != "stalled":
            raise IllegalTransition(
                f"flow {flow_id} is {flow.state}: only a stalled flow has a step to retry",
                command_id=flow_id,
                state=flow.state,
                event="retry",
            )
        steps = {s.step: s for s in self.store.flow_steps(flow_id)}
        dead = steps[flow.step].command_id
        assert dead is not None
        [new] = await self.replay([dead], timeout=timeout)
        return new

    async def fork_flow(self, flow_id: str, from_step: int) -> str:
        """A new flow like ``flow_id`` that reuses its steps before
        ``from_step`` (their recorded replies) and runs the rest anew, with
        the same budget (what the reused steps cost is the old flow's)."""
        flow = self._flows.get(flow_id)
        if from_step < 1:
            raise ValueError(f"from_step must be 1 or more, not {from_step}")
        return await self._flows.start(
            flow.name, flow.params, forked_from=flow.id, reuse_before=from_step, budget=flow.budget
        )

    @contextmanager
    def subscribe(self, buffer: float = 10_000) -> Iterator[trio.MemoryReceiveChannel[Notice]]:
        """Every committed transition (``StateChange``) and streamed partial
        reply (``Progress``) from now on. A subscriber that falls ``buffer``
        notices behind is dropped (its channel ends) rather than slowing the
        engine; it can catch up from the store. ``buffer=math.inf`` is for a
        subscriber that must miss nothing and whose loop never waits on
        anything but the channel (the editor bridge: it only queues each
        notice for its clients), so that it always catches up: one commit can
        publish thousands of notices at once (a replay of many)."""
        send, receive = trio.open_memory_channel[Notice](buffer)
        self._subscribers.append(send)
        try:
            yield receive
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
            send.close()

    # --- validation ----------------------------------------------------------

    def _new_command(
        self, adapter: str, request: Request | Mapping[str, Any], **options: Any
    ) -> Command:
        (command,) = self._new_commands(adapter, [request], **options)
        return command

    def _new_commands(
        self,
        adapter: str,
        requests: Iterable[Request | Mapping[str, Any]],
        *,
        timeout: float | None,
        max_attempts: int,
        handler: str | None,
        handler_args: Any,
        priority: int,
        expires_at: float | None,
        flow_id: str | None = None,
        step: int | None = None,
        snapshot_id: str | None = None,
    ) -> builtins.list[Command]:
        """New pending commands, one per request, with the same options:
        the options are checked once, every request on its own."""
        if adapter not in self.adapters:
            known = ", ".join(sorted(self.adapters))
            raise ValueError(f"unknown adapter {adapter!r}; this engine has: {known}")
        if timeout is None:
            timeout = self.adapters[adapter].settings.timeout
        _check_timeout(timeout)
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
            raise TypeError(f"max_attempts must be an integer, not {max_attempts!r}")
        if not 1 <= max_attempts <= MAX_ATTEMPTS:
            raise ValueError(f"max_attempts must be from 1 to {MAX_ATTEMPTS}, not {max_attempts}")
        if handler is not None and self._handler(handler) is None:
            raise ValueError(f"no reply handler registered as {handler!r}")
        try:
            json.dumps(handler_args)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"handler_args must be JSON: {exc}") from None
        storable(handler_args, "handler_args")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an integer, not {priority!r}")
        storable_int(priority, "priority")
        if expires_at is not None and not (
            isinstance(expires_at, int | float) and math.isfinite(expires_at)
        ):
            raise ValueError(f"expires_at must be epoch seconds, not {expires_at!r}")
        now = self.now()
        return [
            Command(
                id=new_id(),
                adapter=adapter,
                request=storable(
                    request if isinstance(request, Request) else Request.from_json(request),
                    "the request",
                ),
                state=PENDING,
                created_at=now,
                timeout=float(timeout),
                max_attempts=max_attempts,
                handler=handler,
                handler_args=handler_args,
                priority=priority,
                expires_at=expires_at,
                flow_id=flow_id,
                step=step,
                snapshot_id=snapshot_id,
            )
            for request in requests
        ]

    def spawn(self, function: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``function(*args)`` as one of the engine's background tasks.
        A task the engine's closing catches half way just ends: what it had
        committed stands, and recovery finishes the rest next time."""
        self._nursery.start_soon(_until_closing, function, *args)

    def can_serve(self, command: Command) -> bool:
        """True when this engine has the command's adapter and its handler."""
        return command.adapter in self.adapters and (
            command.handler is None or self._handler(command.handler) is not None
        )

    def _handler(self, name: str) -> handler_registry.Handler | None:
        return self._handlers.get(name) or handler_registry.REGISTRY.get(name)

    def _handler_names(self) -> set[str]:
        return set(self._handlers) | set(handler_registry.REGISTRY)

    # --- transitions ---------------------------------------------------------

    async def _move(
        self, command: Command, event: str, detail: Any = None, **changes: Any
    ) -> Command:
        """Commit one transition of ``command`` and act on it."""
        after = command.evolve(
            state=next_state(command.state, event, command_id=command.id), **changes
        )
        journal = await self._committer.commit(Move(command, after, event, self.now(), detail))
        self._committed(after, journal)
        return after

    async def _move_many(
        self,
        moves: Sequence[tuple[Command, str, dict[str, Any]]],
        detail: Any = None,
        refused: builtins.list[Command] | None = None,
    ) -> builtins.list[Command | None]:
        """Commit several transitions together; ``None`` for each one lost
        to a concurrent change or refused by the store. The refused ones (a
        full disk, say: worth trying again later) are added to ``refused``,
        as they were before the move."""
        now = self.now()
        afters = [
            c.evolve(state=next_state(c.state, e, command_id=c.id), **changes)
            for c, e, changes in moves
        ]
        results = await self._committer.commit_many(
            [
                Move(c, a, e, now, detail(c) if callable(detail) else detail)
                for (c, e, _), a in zip(moves, afters, strict=True)
            ]
        )
        out: builtins.list[Command | None] = []
        for (before, _, _), after, result in zip(moves, afters, results, strict=True):
            if isinstance(result, IllegalTransition):
                out.append(None)
            elif isinstance(result, BaseException):
                log.error("could not commit a transition of %s: %s", after.id, result)
                out.append(None)
                if refused is not None:
                    refused.append(before)
            else:
                self._committed(after, result)
                out.append(after)
        return out

    def _committed(self, command: Command, event: Event) -> None:
        """Everything that follows a committed transition: wake waiters,
        tell subscribers."""
        if event.from_state is not None:
            self._unsent.pop(command.id, None)
        if command.state in TERMINAL_STATES:
            waiter = self._waiters.pop(command.id, None)
            if waiter is not None:
                waiter.command = command
                waiter.woken.set()
        self._publish(StateChange(command, event))
        self._flows.on_command(command)

    def _publish(self, notice: Notice) -> None:
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(notice)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                log.warning("dropping a subscriber that fell behind")
                self._subscribers.remove(channel)
                channel.close()

    def _cost(self, adapter: str, reply: Reply) -> float | None:
        known = self.adapters.get(adapter)
        price = known.settings.price if known else None
        return price.cost(reply.usage) if price and reply.usage else None

    async def _accept(self, command: Command, reply: Reply) -> Command:
        """sent -> replied, taking ownership for the handler."""
        runnable = command.handler is None or self._handler(command.handler) is not None
        return await self._move(
            command,
            REPLY,
            reply=reply,
            replied_at=self.now(),
            cost=self._cost(command.adapter, reply),
            # An engine that cannot run the handler leaves the command for
            # one that can (no owner: any engine may take it over).
            owner=self.owner if runnable else None,
            lease_until=self.now() + self._lease if runnable else None,
        )

    # --- dispatching and sending --------------------------------------------

    async def _dispatcher(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            self._dispatch_wanted = trio.Event()
            if await self._dispatch_once():
                await trio.lowlevel.checkpoint()
                continue
            with trio.move_on_after(self._poll_interval):
                await self._dispatch_wanted.wait()

    async def _dispatch_once(self) -> bool:
        """Claim what may be sent now; True if an adapter may have more."""
        more = False
        handlers = self._handler_names()
        for name, adapter in self.adapters.items():
            room = adapter.settings.max_in_flight - self._sending_per_adapter[name]
            if room <= 0:
                continue
            # A round claims a bounded batch: claiming a hundred thousand at
            # once would hold the loop (and every timer) for seconds.
            room = min(room, CLAIM_BATCH)
            now = self.now()
            ready = [
                c
                for c in self.store.ready_to_send(name, now, room, handlers, self._unsent)
                if c.id not in self._claiming
            ]
            more = more or len(ready) == room
            ready = await self._within_budget(adapter, ready)
            limit = self._limits.get(name)
            if limit is not None:
                ready, more = self._within_limit(limit, ready, more)
            if not ready:
                continue
            self._claiming.update(c.id for c in ready)
            try:
                claims = []
                for command in ready:
                    deadline = now + command.timeout
                    if command.expires_at is not None:
                        deadline = min(deadline, command.expires_at)
                    claims.append(
                        (
                            command,
                            DISPATCH,
                            {
                                "sent_at": now,
                                "deadline": deadline,
                                "not_before": None,
                                "owner": self.owner,
                                "lease_until": now + self._lease,
                            },
                        )
                    )
                refused: builtins.list[Command] = []
                claimed = await self._move_many(
                    claims, detail={"owner": self.owner}, refused=refused
                )
                if refused:
                    more = False  # the store refuses claims: wait, do not spin
            finally:
                self._claiming.difference_update(c.id for c in ready)
            for won in claimed:
                if won is None:
                    continue  # another engine was faster
                command = won
                scope = trio.CancelScope()
                self._sending[command.id] = (command, scope)
                self._sending_per_adapter[name] += 1
                assert command.deadline is not None
                self._timers.schedule(
                    self._trio_time(command.deadline), DEADLINE, command.id, command.attempt
                )
                self.spawn(self._send, adapter, command, scope)
        return more

    async def _within_budget(
        self, adapter: Adapter, ready: builtins.list[Command]
    ) -> builtins.list[Command]:
        """The commands of ``ready`` that no budget refuses; the others are
        dead-lettered with reason ``budget`` (flows.budget)."""
        daily = adapter.settings.budget_per_day
        if not ready:
            return ready
        if len(self._flow_budgets) > UNSENT_KEPT:
            self._flow_budgets.clear()  # read again when needed: a long life sees many flows
        flow_budgets = {}
        for flow_id in {c.flow_id for c in ready if c.flow_id is not None}:
            if flow_id not in self._flow_budgets:
                flow = self.store.find_flow(flow_id)
                self._flow_budgets[flow_id] = flow.budget if flow else None
            if self._flow_budgets[flow_id] is not None:
                flow_budgets[flow_id] = self._flow_budgets[flow_id]
        if daily is None and not flow_budgets:
            return ready
        name = adapter.settings.name
        now = self.now()
        today = self.store.spent(name, budget.day_start(now)) if daily is not None else 0.0
        spent = {flow_id: self.store.flow_spent(flow_id) for flow_id in flow_budgets}
        admitted: builtins.list[Command] = []
        refused: builtins.list[tuple[Command, str, dict[str, Any]]] = []
        why: dict[str, Any] = {}
        for command in ready:
            estimate = budget.estimate(command.request, adapter.settings.price)
            ceiling = flow_budgets.get(command.flow_id or "")
            if daily is not None and today + estimate > daily:
                why[command.id] = {"budget": daily, "per": "day", "spent": today}
            elif ceiling is not None and spent[command.flow_id or ""] + estimate > ceiling:
                why[command.id] = {
                    "budget": ceiling,
                    "per": "flow",
                    "spent": spent[command.flow_id or ""],
                }
            else:
                admitted.append(command)
                today += estimate
                if ceiling is not None:
                    spent[command.flow_id or ""] += estimate
                continue
            why[command.id]["estimate"] = estimate
            changes = {
                "reason": REASON_BUDGET,
                "finished_at": now,
                "owner": None,
                "lease_until": None,
            }
            refused.append((command, REFUSE, changes))
        if refused:
            await self._move_many(refused, detail=lambda c: why[c.id])
        return admitted

    def _within_limit(
        self, limit: RateLimit, ready: builtins.list[Command], more: bool
    ) -> tuple[builtins.list[Command], bool]:
        """The head of ``ready`` that the rate limit admits now; when it
        stops admitting, an alarm wakes the dispatcher when it will."""
        now = trio.current_time()
        for index, command in enumerate(ready):
            later = limit.admit(now, estimate_tokens(command.request))
            if later is not None:
                self._timers.schedule(later, RETRY_ALARM, command.id)
                return ready[:index], False
        return ready, more

    async def _send(self, adapter: Adapter, command: Command, scope: trio.CancelScope) -> None:
        assert command.deadline is not None
        context = SendContext(
            command_id=command.id,
            attempt=command.attempt,
            deadline=command.deadline,
            report_progress=lambda text: self._publish(Progress(command.id, text)),
        )
        reply: Reply | None = None
        failure: BaseException | None = None
        try:
            with scope:
                try:
                    # A reply the store cannot hold fails the send, here,
                    # rather than every commit that would carry it.
                    reply = storable(await adapter.send(command.request, context), "the reply")
                except Exception as exc:
                    failure = exc
        finally:
            if self._sending.get(command.id, (None,))[0] is command:
                del self._sending[command.id]
            self._sending_per_adapter[adapter.settings.name] -= 1
            self._dispatch_wanted.set()
        if scope.cancelled_caught:
            return  # timed out, cancelled or answered elsewhere: they moved it
        if reply is not None:
            try:
                if command.handler is None:
                    await self._reply_and_finish(command, reply)
                    return
                replied = await self._accept(command, reply)
            except IllegalTransition:
                # It stopped waiting meanwhile (timeout, cancel): keep the reply.
                await self._committer.commit(AddLateReply(command.id, reply, self.now()))
                return
            await self._complete(replied)
        elif failure is not None:
            await self._failed(command, failure)

    async def _reply_and_finish(self, command: Command, reply: Reply) -> None:
        """sent -> replied -> done in one commit, for a command with no
        handler: both transitions journaled, one transaction, one wait."""
        now = self.now()
        replied = command.evolve(
            state=REPLIED,
            reply=reply,
            replied_at=now,
            cost=self._cost(command.adapter, reply),
        )
        done = replied.evolve(state=DONE, finished_at=now, owner=None, lease_until=None)
        (journal,) = await self._committer.commit_all(
            [Chain((Move(command, replied, REPLY, now), Move(replied, done, FINISH, now)))]
        )
        self._committed(replied, journal[0])
        self._committed(done, journal[1])

    async def _failed(self, command: Command, failure: BaseException) -> None:
        error = CommandError(
            type=type(failure).__name__,
            message=str(failure),
            status=failure.status if isinstance(failure, AdapterError) else None,
        )
        if not isinstance(failure, AdapterError):
            log.error("adapter %s raised %r for %s", command.adapter, failure, command.id)
        try:
            if isinstance(failure, RetryableError):
                if command.attempt < command.max_attempts:
                    delay = self._backoff.delay(command.attempt, failure.retry_after, self._rng)
                    retry = await self._move(
                        command,
                        RETRY,
                        {"error": error.to_json(), "delay": delay},
                        attempt=command.attempt + 1,
                        not_before=self.now() + delay,
                        error=error,
                        owner=None,
                        lease_until=None,
                    )
                    assert retry.not_before is not None
                    self._timers.schedule(self._trio_time(retry.not_before), RETRY_ALARM, retry.id)
                    return
                reason = REASON_RETRIES_EXHAUSTED
            else:
                reason = REASON_ERROR
            await self._dead_letter(command, reason, error)
        except IllegalTransition:
            pass  # it was timed out or cancelled meanwhile

    async def _dead_letter(self, command: Command, reason: str, error: CommandError) -> None:
        await self._move(
            command,
            FAIL,
            {"error": error.to_json()},
            reason=reason,
            error=error,
            finished_at=self.now(),
            owner=None,
            lease_until=None,
        )

    async def _complete(self, command: Command) -> None:
        """Run a replied command's handler; done, or dead with handler_error.
        Its lease is renewed meanwhile: a handler may take its time."""
        self._handling.add(command.id)
        try:
            await self._handle(command)
        finally:
            self._handling.discard(command.id)

    async def _handle(self, command: Command) -> None:
        error: CommandError | None = None
        outcome: Any = None
        if command.handler is not None:
            handler = self._handler(command.handler)
            try:
                if handler is None:
                    raise LookupError(f"no reply handler registered as {command.handler!r}")
                outcome = handler(self, command)
                if inspect.isawaitable(outcome):
                    outcome = await outcome
                json.dumps(outcome)
                storable(outcome, "the handler's result")
            except Exception as exc:
                log.exception("handler %s failed for %s", command.handler, command.id)
                error = CommandError(type=type(exc).__name__, message=str(exc))
        try:
            if error is None:
                await self._move(
                    command,
                    FINISH,
                    {"result": outcome} if outcome is not None else None,
                    finished_at=self.now(),
                    owner=None,
                    lease_until=None,
                )
            else:
                await self._dead_letter(command, REASON_HANDLER_ERROR, error)
        except IllegalTransition:
            pass  # another engine took it over meanwhile and will finish it

    # --- timers --------------------------------------------------------------

    async def _ring(self, alarms: builtins.list[Alarm]) -> None:
        timeouts: builtins.list[tuple[Command, str, dict[str, Any]]] = []
        for alarm in alarms:
            if alarm.kind == DEADLINE:
                in_flight = self._sending.get(alarm.command_id)
                if in_flight is None or in_flight[0].attempt != alarm.attempt:
                    continue  # answered, cancelled or re-sent since
                command = in_flight[0]
                expired = command.expires_at is not None and command.deadline == command.expires_at
                timeouts.append(
                    (
                        command,
                        TIMEOUT,
                        {
                            "reason": REASON_EXPIRED if expired else REASON_TIMEOUT,
                            "finished_at": self.now(),
                            "owner": None,
                            "lease_until": None,
                        },
                    )
                )
            elif alarm.kind == EXPIRY:
                pending = self.store.find(alarm.command_id)
                if pending is not None and pending.state == PENDING:
                    timeouts.append(
                        (
                            pending,
                            EXPIRE,
                            {"reason": REASON_EXPIRED, "finished_at": self.now()},
                        )
                    )
            else:
                self._dispatch_wanted.set()
        if not timeouts:
            return
        refused: builtins.list[Command] = []
        for after in await self._move_many(timeouts, refused=refused):
            if after is not None:
                in_flight = self._sending.pop(after.id, None)
                if in_flight is not None:
                    in_flight[1].cancel()
        # A timeout the store refused (a full disk) is not forgotten: its
        # alarm rings again, until the disk takes it.
        later = trio.current_time() + self._poll_interval
        for command in refused:
            if command.state == SENT:
                self._timers.schedule(later, DEADLINE, command.id, command.attempt)
            else:
                self._timers.schedule(later, EXPIRY, command.id)

    # --- leases and recovery -------------------------------------------------

    async def _keeper(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Renew our leases; take over what dead engines left."""
        task_status.started()
        while True:
            await trio.sleep(self._lease / 3)
            await self._renew_leases()
            await self.recover()
            await self._flows.resume()

    async def _renew_leases(self) -> None:
        """Renew the lease of every flow this engine runs, and of every send
        in flight and handler running, a slice per transaction; stop the
        sends another process took."""
        # Only sends claimed before a slice's renewal can be judged by it: a
        # claim committed later is not in ``held`` yet may be in ``_sending``
        # by the time we resume.
        sending = dict(self._sending)
        ids = [*sending, *self._handling]
        until = self.now() + self._lease
        await self._committer.commit(RenewFlowLeases(self.owner, until, self._flows.running()))
        for first in range(0, len(ids), RENEW_BATCH):
            chunk = tuple(ids[first : first + RENEW_BATCH])
            held = await self._committer.commit(RenewLeases(self.owner, until, chunk))
            for command_id in chunk:
                in_flight = sending.get(command_id)
                if in_flight is None or command_id in held:
                    continue
                if self._sending.get(command_id) is in_flight:
                    # Cancelled or answered by another process: stop sending.
                    del self._sending[command_id]
                    in_flight[1].cancel()

    async def recover(self) -> int:
        """Take over commands whose owner is gone; return how many.

        ``sent`` ones go back to ``pending`` (attempt + 1) if their adapter's
        policy allows and attempts are left, else they are dead-lettered as
        ``interrupted``; ``replied`` ones have their handler run again."""
        now = self.now()
        handlers = self._handler_names()
        moves: builtins.list[tuple[Command, str, dict[str, Any]]] = []
        takeovers: builtins.list[Command] = []
        for command in self.store.abandoned(self.owner, now, owner_is_gone):
            if command.id in self._sending or command.id in self._handling:
                continue  # ours, still in hand (its lease renewal was refused)
            if command.state == SENT:
                adapter = self.adapters.get(command.adapter)
                policy = adapter.settings.on_interrupt if adapter else "retry"
                if policy == "retry" and command.attempt < command.max_attempts:
                    moves.append(
                        (
                            command,
                            RETRY,
                            {
                                "attempt": command.attempt + 1,
                                "reason": None,
                                "owner": None,
                                "lease_until": None,
                                "not_before": None,
                            },
                        )
                    )
                else:
                    moves.append(
                        (
                            command,
                            FAIL,
                            {
                                "reason": REASON_INTERRUPTED,
                                "finished_at": now,
                                "owner": None,
                                "lease_until": None,
                            },
                        )
                    )
            elif command.handler is None or command.handler in handlers:
                takeovers.append(command)
        await self._move_many(
            moves, detail=lambda c: {"reason": REASON_INTERRUPTED, "owner": c.owner}
        )
        taken = 0
        for command in takeovers:
            try:
                await self._committer.commit(TakeOver(command, self.owner, now + self._lease))
            except IllegalTransition:
                continue
            taken += 1
            self.spawn(
                self._complete,
                attrs.evolve(command, owner=self.owner, lease_until=now + self._lease),
            )
        if moves:
            self._dispatch_wanted.set()
        return len(moves) + taken

    async def _start(self) -> None:
        for command_id, expires_at, not_before in self.store.timed_pending():
            if expires_at is not None:
                self._timers.schedule(self._trio_time(expires_at), EXPIRY, command_id)
            if not_before is not None:
                self._timers.schedule(self._trio_time(not_before), RETRY_ALARM, command_id)
        await self._nursery.start(self._committer.run)
        await self._nursery.start(_service, self._timers.run)
        await self.recover()
        await self._flows.resume()
        await self._nursery.start(_service, self._dispatcher)
        await self._nursery.start(_service, self._keeper)

    def _release(self) -> None:
        """On a clean close, hand our in-flight work back at once rather
        than make the next engine wait for our leases to run out."""
        self.store.commit([ReleaseLeases(self.owner)])


@asynccontextmanager
async def open_engine(
    path: str | os.PathLike[str] | None = None,
    *,
    adapters: Iterable[Adapter] = (),
    **options: Any,
) -> AsyncIterator[Engine]:
    """Open the database at ``path`` (default ``$DOVECOTE_DB`` or
    ``./.dovecote/dovecote.db``) and run an engine on it until the block
    ends. The scripted adapter is always present; ``adapters`` add to it or
    replace it by name. Options: ``handlers``, ``lease``, ``poll_interval``,
    ``backoff``, ``wall_clock``, ``seed``."""
    store = Store(path if path is not None else default_db_path())
    chosen: dict[str, Adapter] = {"scripted": ScriptedAdapter.from_env()}
    for adapter in adapters:
        chosen[adapter.settings.name] = adapter
    try:
        async with trio.open_nursery() as nursery:
            engine = Engine(store, nursery, chosen.values(), **options)
            await engine._start()
            try:
                yield engine
            finally:
                nursery.cancel_scope.cancel()
                engine._release()
    finally:
        with trio.CancelScope(shield=True):
            for adapter in chosen.values():
                await adapter.aclose()
        store.close()


@attrs.define
class _Waiter:
    woken: trio.Event = attrs.Factory(trio.Event)
    command: Command | None = None


async def _service(
    run: Callable[..., Awaitable[None]], *, task_status: trio.TaskStatus[None]
) -> None:
    """One of the engine's long-running tasks (dispatcher, timers, keeper),
    which just ends if the engine's closing catches it about to commit.

    A store that refuses a write (a full disk, a lock held too long) must
    not stop the engine: the task says so and runs again a moment later,
    and the work it could not commit is still in the table, to be done when
    the store takes writes again."""
    status: Any = task_status
    while True:
        try:
            await run(task_status=status)
            return
        except EngineClosing:
            return
        except (StoreError, sqlite3.Error) as exc:
            log.error("%s: %s; going on in %s s", _name(run), exc, SERVICE_RESTART)
        status = trio.TASK_STATUS_IGNORED  # it reported started the first time
        await trio.sleep(SERVICE_RESTART)


async def _until_closing(function: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """One background step (a send, a handler, a flow's script). If the store
    refuses its commit, the step ends and says so; what it held is found
    again by recovery (its lease runs out) and done again."""
    try:
        await function(*args)
    except EngineClosing:
        pass
    except (StoreError, sqlite3.Error) as exc:
        log.error("%s: %s", _name(function), exc)


def _name(function: Callable[..., Any]) -> str:
    return getattr(function, "__qualname__", None) or repr(function)


def _check_timeout(timeout: Any) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds, not {timeout!r}")
    if not math.isfinite(timeout) or timeout <= 0 or timeout > MAX_TIMEOUT:
        raise ValueError(
            f"timeout must be more than 0 and at most {MAX_TIMEOUT:.0f} s, not {timeout}"
        )
