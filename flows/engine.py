"""The engine: sends pending commands, matches replies, times out the late.

``Engine`` is the public face; the work is done by parts with one job each,
around one store (their shared record is flows.core.Core):

* the **committer** (flows.commit) turns transitions into transactions, many
  at a time;
* the **dispatcher** (flows.dispatch) claims ``pending`` commands (highest
  priority, then oldest) up to each adapter's ``max_in_flight``;
* the **send path** (flows.sending) runs each claimed command's send, commits
  its reply or error, and runs reply handlers;
* the **timers** (flows.timers) ring at deadlines, expiries and due retries,
  and the **keeper** (flows.keeper) acts on them, renews this engine's
  leases and takes over work that a dead engine left behind;
* the **flow runner** (flows.runtime) runs multi-step flows;
* the **wake-ups** (flows.wakeups), on a store that announces what other
  processes commit (PostgreSQL), wake the dispatcher and the waiters at once.

Every reply, whether a send returns it, a person types it or another
process delivers it, enters through ``deliver``, which matches it to its
command by id. Every state change goes through the committer first and is
acted on (sends stopped, handlers run, waiters woken, subscribers told) only
after it is committed (flows.core.Mover).

Several engines may share one file. A command is claimed by a compare-and-
set that names its owner and a lease; the owner renews the lease while the
send is in flight. An engine that dies leaves its leases to run out, or, if
it ran on this host, to be noticed at once (its pid is gone), and another
engine re-queues its work.
"""

from __future__ import annotations

import builtins
import logging
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

import trio

from adapters.base import Adapter, Reply, Request
from adapters.scripted import ScriptedAdapter
from flows import cache as flows_cache
from flows import handlers as handler_registry
from flows import typed
from flows.commit import Committer
from flows.core import Clock, Core, Mover, moved, name_of
from flows.dispatch import Dispatcher
from flows.errors import CommandFailed, EngineClosing, StoreError
from flows.held import Held
from flows.keeper import Keeper
from flows.location import location, open_store
from flows.notices import Notice, Notices, Progress, Subscription
from flows.options import (
    PRIORITY_BATCH,
    PRIORITY_INTERACTIVE,
    CallOptions,
    check_timeout,
)
from flows.records import Command, Delivery, Event, Flow, new_id, storable
from flows.runtime import FlowRunner
from flows.sending import Backoff, Sender
from flows.snapshots import Snapshot
from flows.states import (
    CANCEL,
    DEAD,
    DONE,
    PENDING,
    REASON_CANCELLED_BY_USER,
    RESOLVE,
    SENT,
    IllegalTransition,
    LostRace,
    next_state,
)
from flows.storage import StoreProtocol
from flows.store import (
    AddCacheEntry,
    AddLateReply,
    CountCacheHit,
    Insert,
    Move,
    Note,
    Operation,
    ReleaseLeases,
    UseLateReply,
    make_owner,
)
from flows.timers import EXPIRY, Timers
from flows.wakeups import Wakeups, feed_of

log = logging.getLogger("dovecote")
T = TypeVar("T")

DEFAULT_DB: Final = Path(".dovecote") / "dovecote.db"
SERVICE_RESTART: Final = 1.0  # seconds before a task the store stopped runs again
DEFAULT_BACKOFF: Final = Backoff()
DEFAULT_OPTIONS: Final = CallOptions()

__all__ = [
    "PRIORITY_BATCH",
    "PRIORITY_INTERACTIVE",
    "Backoff",
    "CallOptions",
    "Engine",
    "Notice",
    "Progress",
    "Subscription",
    "default_db_path",
    "open_engine",
]


def default_db_path(cwd: Path | None = None) -> str | Path:
    """The database when no ``--db`` is given: one rule for the CLI, ``dovecote serve``
    and so the editors, so that ``dovecote dead`` in a shell shows an editor's calls.

    ``$DOVECOTE_DB`` (a path, or a ``postgresql://`` URL: flows.location); else the
    nearest ``.dovecote/dovecote.db`` in ``cwd`` (the current
    directory) or its parents, as git finds ``.git`` (a project's own database, made by
    ``mkdir .dovecote``); else ``$XDG_DATA_HOME/dovecote/dovecote.db``, by default under
    ``~/.local/share`` (a relative ``$XDG_DATA_HOME`` is ignored, as the XDG spec says).
    """
    if env := os.environ.get("DOVECOTE_DB"):
        return location(env)
    here = (cwd or Path.cwd()).absolute()
    for directory in (here, *here.parents):
        if (directory / DEFAULT_DB.parent).is_dir():
            return directory / DEFAULT_DB
    return user_data_dir() / DEFAULT_DB.name


def user_data_dir() -> Path:
    """dovecote's directory under ``$XDG_DATA_HOME`` (an absolute one), by
    default ``~/.local/share/dovecote``."""
    data = os.environ.get("XDG_DATA_HOME", "")
    home = Path(data) if os.path.isabs(data) else Path.home() / ".local" / "share"
    return home / "dovecote"


class Engine:
    """Use ``open_engine`` to make one; see the module docstring."""

    def __init__(
        self,
        store: StoreProtocol,
        nursery: trio.Nursery,
        adapters: Iterable[Adapter],
        *,
        handlers: Mapping[str, handler_registry.Handler] | None = None,
        lease: float = 30.0,
        poll_interval: float = 1.0,
        backoff: Backoff = DEFAULT_BACKOFF,
        wall_clock: Callable[[], float] = time.time,
        seed: int | None = None,
    ) -> None:
        self.store = store
        self.adapters: dict[str, Adapter] = {a.settings.name: a for a in adapters}
        self.owner = make_owner(new_id()[-12:])
        self.clock = Clock(wall_clock)
        self.committer = Committer(store)
        self.notices = Notices()
        held = Held(self.adapters)
        self._core = core = Core(
            store=store,
            committer=self.committer,
            timers=Timers(self._ring),
            clock=self.clock,
            notices=self.notices,
            held=held,
            mover=Mover(self.committer, self.clock, self.notices, held),
            adapters=self.adapters,
            handlers=dict(handlers or {}),
            nursery=nursery,
            owner=self.owner,
            lease=lease,
            poll_interval=poll_interval,
        )
        self.flow_runner = FlowRunner(self)
        self.notices.on_command = self.flow_runner.on_command
        self._sender = Sender(
            core, self, backoff=backoff, rng=random.Random(seed), on_send_ended=self._wake
        )
        self._dispatcher = Dispatcher(core, self._sender.start)
        self._keeper = Keeper(
            core,
            complete=self._sender.complete,
            wake_dispatcher=self._wake,
            running_flows=self.flow_runner.running,
            resume_flows=self.flow_runner.resume,
        )
        feed = feed_of(store)
        self._wakeups = Wakeups(core, feed, self._wake) if feed is not None else None

    def _ring(self, alarms: Any) -> Awaitable[None]:
        return self._keeper.ring(alarms)

    def _wake(self) -> None:
        self._dispatcher.wake()

    # --- what the flow runner and the bridge build on ------------------------

    @property
    def lease(self) -> float:
        """Seconds a claim or a flow's script is held before others may take it."""
        return self._core.lease

    @property
    def poll_interval(self) -> float:
        """Seconds between looks at the file for other processes' changes."""
        return self._core.poll_interval

    def now(self) -> float:
        """Wall-clock time (epoch seconds) as this engine sees it: trio's
        clock plus a fixed offset, so a ``MockClock`` moves it too."""
        return self.clock.now()

    def spawn(self, function: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``function(*args)`` as one of the engine's background tasks.
        A task the engine's closing catches half way just ends: what it had
        committed stands, and recovery finishes the rest next time."""
        self._core.spawn(function, *args)

    def can_serve(self, command: Command) -> bool:
        """True when this engine has the command's adapter and its handler."""
        return command.adapter in self.adapters and self._core.can_handle(command)

    def new_commands(
        self,
        adapter: str,
        requests: Iterable[Request | Mapping[str, Any]],
        options: CallOptions = DEFAULT_OPTIONS,
        *,
        flow_id: str | None = None,
        step: int | None = None,
        snapshot_id: str | None = None,
    ) -> builtins.list[Command]:
        """New pending commands, one per request, made with ``options``
        (checked when the record was made) and this engine's adapters and
        handlers (checked here), not yet stored: a flow stores them with its
        own move (``insert_cached``)."""
        if adapter not in self.adapters:
            known = ", ".join(sorted(self.adapters))
            raise ValueError(f"unknown adapter {adapter!r}; this engine has: {known}")
        if options.handler is not None and self._core.handler(options.handler) is None:
            raise ValueError(f"no reply handler registered as {options.handler!r}")
        timeout = options.timeout
        if timeout is None:
            timeout = self.adapters[adapter].settings.timeout
            check_timeout(timeout)
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
                max_attempts=options.max_attempts,
                handler=options.handler,
                handler_args=options.handler_args,
                priority=options.priority,
                expires_at=options.expires_at,
                flow_id=flow_id,
                step=step,
                snapshot_id=snapshot_id,
            )
            for request in requests
        ]

    # --- public API ----------------------------------------------------------

    async def submit(
        self,
        adapter: str,
        request: Request | Mapping[str, Any],
        *,
        flow_id: str | None = None,
        step: int | None = None,
        snapshot: Snapshot | None = None,
        detail: Any = None,
        options: CallOptions | None = None,
        **call_options: Any,
    ) -> str:
        """Put a call in the pending table and return its id at once.

        The call's options are ``CallOptions``' fields (``timeout``,
        ``max_attempts``, ``handler``, ``handler_args``, ``priority``,
        ``expires_at``, ``cache``), given as keywords or as one ``options``
        record. ``snapshot``, the region a reply will be merged into, is
        stored in the same transaction. ``detail`` (JSON) is journaled with
        the submit: what this call is to another (a typed call's re-ask).
        Everything is validated before anything is stored: a bad argument
        raises ``ValueError`` (or ``TypeError``) and changes nothing."""
        chosen = _options(options, call_options)
        (command,) = self.new_commands(
            adapter,
            [request],
            chosen,
            flow_id=flow_id,
            step=step,
            snapshot_id=snapshot.id if snapshot else None,
        )
        storable(snapshot, "the snapshot")
        await self.insert_cached(chosen.cache, [Insert(command, detail=detail, snapshot=snapshot)])
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
            hit = self._resolved(command, source.reply, 0.0, now)
            resolved.append((len(operations) + len(extra), hit))
            extra.append(Move(command, hit, RESOLVE, now, {"cached_from": source.id}))
            extra.append(CountCacheHit(source.id, now))
        together = [*operations, *extra]
        # One operation needs no group (and its savepoint) to be all or nothing.
        commit = self.committer.commit_all if len(together) == 1 else self.committer.commit_together
        results = await commit(together)
        self._submitted([c for _, c in inserts], [results[at] for at, _ in inserts])
        for at, hit in resolved:
            self._core.mover.committed(hit, results[at])
            self.spawn(self._sender.complete, hit)
        return results

    async def submit_many(
        self,
        adapter: str,
        requests: Iterable[Request | Mapping[str, Any]],
        *,
        options: CallOptions | None = None,
        **call_options: Any,
    ) -> builtins.list[str]:
        """``submit`` for a batch of requests with the same options, stored
        in one transaction, in order. Every request is validated first: one
        bad request raises and stores nothing. A script with a thousand calls
        to make pays for one commit, not a thousand."""
        commands = self.new_commands(adapter, requests, _options(options, call_options))
        if not commands:
            return []
        events = await self.committer.commit_together([Insert(command) for command in commands])
        self._submitted(commands, events)
        return [command.id for command in commands]

    def _resolved(self, command: Command, reply: Reply, cost: float | None, now: float) -> Command:
        """``pending -> replied`` without a send (a cache hit, a late reply),
        held by this engine, which runs its handler next."""
        changes = {"reply": reply, "replied_at": now, "cost": cost}
        lease = {"owner": self.owner, "lease_until": now + self.lease}
        return moved(command, RESOLVE, now, {**changes, **lease})

    def _submitted(self, commands: Sequence[Command], events: Sequence[Event]) -> None:
        core = self._core
        for command, event in zip(commands, events, strict=True):
            core.held.submitted(command)
            core.mover.committed(command, event)
            if command.expires_at is not None:
                core.timers.schedule(self.clock.trio_time(command.expires_at), EXPIRY, command.id)
        self._wake()

    async def wait(self, command_id: str) -> Command:
        """The command once it is terminal (``done``, ``dead`` or ``cancelled``).

        Transitions made by this engine wake the waiter at once; those made
        by another process are seen at once on a store that announces them
        (PostgreSQL, flows.wakeups), else by polling (SQLite)."""
        # One this engine holds is not terminal: no need to read it to know.
        command = self._core.held.known(command_id) or self.store.get(command_id)
        while not command.is_terminal:
            ended = await self.notices.wait_terminal(command_id, self.poll_interval)
            command = ended or self.store.get(command_id)
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
                await self.committer.commit(AddLateReply(command.id, reply, self.now()))
                return Delivery(accepted=False, late=True)
            try:
                replied = await self._sender.accept(command, reply)
            except LostRace:
                continue  # it moved meanwhile: look again
            self._core.held.stop(command.id)
            self.spawn(self._sender.complete, replied)
            return Delivery(accepted=True, late=False)

    async def note(self, command_id: str, event: str, detail: Any = None) -> Event:
        """Journal ``event`` on a command without moving it (the bridge's
        ``final_text``): a fact about the call, kept with its history."""
        event_row: Event = await self.committer.commit(Note(command_id, event, self.now(), detail))
        return event_row

    async def cancel(self, command_id: str) -> Command:
        """Cancel a ``pending`` or ``sent`` command (its send is cancelled)."""
        while True:
            command = self.store.get(command_id)
            next_state(command.state, CANCEL, command_id=command.id)
            try:
                cancelled = await self._core.mover.move(
                    command, CANCEL, reason=REASON_CANCELLED_BY_USER
                )
            except LostRace:
                continue
            self._core.held.stop(command.id)
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
            check_timeout(timeout)
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
            now = self.now()
            fresh = command.replayed(new_id(), now, timeout)
            late = self.store.late_replies(command.id, unused_only=True) if use_late_reply else []
            operations: builtins.list[Operation] = [Insert(fresh, detail={"replay_of": command.id})]
            if late:
                reply = late[0].reply
                cost = self._sender.cost(fresh.adapter, reply)
                resolved = self._resolved(fresh, reply, cost, now)
                operations.append(Move(fresh, resolved, RESOLVE, now, {"late_reply": late[0].id}))
                operations.append(UseLateReply(late[0].id, fresh.id))
            # All or nothing: of two replays racing for one late reply, the
            # loser must leave no command behind, resolved with a reply that
            # was not its to use.
            results = await self.committer.commit_together(operations)
            self._core.mover.committed(fresh, results[0])
            if late:
                self._core.mover.committed(resolved, results[1])
                self.spawn(self._sender.complete, resolved)
            new_ids.append(fresh.id)
        self._wake()
        return new_ids

    # --- flows ---------------------------------------------------------------

    async def start_flow(self, name: str, /, *, budget: float | None = None, **params: Any) -> str:
        """Start the registered flow ``name`` with ``params``; its id.
        ``budget`` bounds what its calls may cost together (flows.budget)."""
        return await self.flow_runner.start(name, params, budget=budget)

    async def wait_flow(self, flow_id: str) -> Any:
        """The flow's result once it completes; ``FlowFailed`` if it failed
        or was cancelled."""
        return await self.flow_runner.wait(flow_id)

    async def cancel_flow(self, flow_id: str) -> Flow:
        """Cancel a flow and its unfinished commands."""
        return await self.flow_runner.cancel(flow_id)

    def get_flow(self, flow_id: str) -> Flow:
        return self.flow_runner.get(flow_id)

    def list_flows(
        self, states: Iterable[str] | None = None, limit: int | None = None
    ) -> builtins.list[Flow]:
        return self.store.flows(states, limit=limit)

    def flow_history(self, flow_id: str) -> builtins.list[Event]:
        self.flow_runner.get(flow_id)
        return self.store.flow_history(flow_id)

    async def retry_flow(self, flow_id: str, timeout: float | None = None) -> str:
        """Replay the dead letter a stalled flow is waiting on; the new id."""
        flow = self.flow_runner.get(flow_id)
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
        flow = self.flow_runner.get(flow_id)
        if from_step < 1:
            raise ValueError(f"from_step must be 1 or more, not {from_step}")
        return await self.flow_runner.start(
            flow.name, flow.params, forked_from=flow.id, reuse_before=from_step, budget=flow.budget
        )

    @contextmanager
    def subscribe(self, buffer: float = 10_000) -> Iterator[Subscription]:
        """Every committed transition (``StateChange``) and streamed partial
        reply (``Progress``) from now on. A subscriber that falls ``buffer``
        notices behind is dropped (its channel ends) rather than slowing the
        engine; it can catch up from the store. ``buffer=math.inf`` is for a
        subscriber that must miss nothing and whose loop never waits on
        anything but the channel (the editor bridge: it only queues each
        notice for its clients), so that it always catches up: one commit can
        publish thousands of notices at once (a replay of many)."""
        with self.notices.subscribe(buffer) as receive:
            yield receive

    # --- running ---------------------------------------------------------------

    async def run(self) -> None:
        """Start the parts in the engine's nursery (``open_engine`` does)."""
        core = self._core
        self._keeper.schedule_stored()
        await core.nursery.start(self.committer.run)
        await core.nursery.start(_service, core.timers.run)
        if self._wakeups is not None:
            # Listening before recovery reads the table: nothing falls between.
            await core.nursery.start(_service, self._wakeups.run)
        await self._keeper.recover()
        await self.flow_runner.resume()
        await core.nursery.start(_service, self._dispatcher.run)
        await core.nursery.start(_service, self._keeper.run)

    async def recover(self) -> int:
        """Take over commands whose owner is gone; return how many.

        ``sent`` ones go back to ``pending`` (attempt + 1) if their adapter's
        policy allows and attempts are left, else they are dead-lettered as
        ``interrupted``; ``replied`` ones have their handler run again."""
        return await self._keeper.recover()

    def release(self) -> None:
        """On a clean close, hand our in-flight work back at once rather
        than make the next engine wait for our leases to run out."""
        self.store.commit([ReleaseLeases(self.owner)])


def _options(options: CallOptions | None, call_options: Mapping[str, Any]) -> CallOptions:
    """One ``CallOptions`` from a record or keywords (not both)."""
    if options is None:
        return CallOptions(**call_options)
    if call_options:
        raise TypeError(f"give call options as keywords or as options=, not both: {call_options}")
    return options


@asynccontextmanager
async def open_engine(
    path: str | os.PathLike[str] | None = None,
    *,
    adapters: Iterable[Adapter] = (),
    **options: Any,
) -> AsyncIterator[Engine]:
    """Open the database at ``path``, a file or a ``postgresql://`` URL
    (default ``$DOVECOTE_DB`` or ``./.dovecote/dovecote.db``), and run an
    engine on it until the block ends. The scripted adapter is always
    present; ``adapters`` add to it or replace it by name. Options:
    ``handlers``, ``lease``, ``poll_interval``, ``backoff``, ``wall_clock``,
    ``seed``."""
    store = open_store(path if path is not None else default_db_path())
    chosen: dict[str, Adapter] = {"scripted": ScriptedAdapter.from_env()}
    for adapter in adapters:
        chosen[adapter.settings.name] = adapter
    try:
        async with trio.open_nursery() as nursery:
            engine = Engine(store, nursery, chosen.values(), **options)
            await engine.run()
            try:
                yield engine
            finally:
                nursery.cancel_scope.cancel()
                engine.release()
    finally:
        with trio.CancelScope(shield=True):
            for adapter in chosen.values():
                await adapter.aclose()
        store.close()


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
            log.error("%s: %s; going on in %s s", name_of(run), exc, SERVICE_RESTART)
        status = trio.TASK_STATUS_IGNORED  # it reported started the first time
        await trio.sleep(SERVICE_RESTART)
