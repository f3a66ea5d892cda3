"""The JSON-RPC server that editors talk to.

One ``Server`` wraps one engine. Each editor connection is a ``Session``;
it owns the commands it submits or replays, and receives their
``command/state`` and ``command/progress`` notifications and the
``human/ask`` questions they raise.

Snapshot-isolated edits
-----------------------

``command/submit`` with a ``target`` stores a snapshot of the region (with
the command, in one transaction) and starts tracking the region in the
document mirror. The command's reply handler, ``editor.apply``, runs when
the reply arrives: it merges ``three_way(snapshot, region now, reply)``,
applies the conflict policy, and asks the editor to apply the difference
with ``document/applyEdit`` at the version it was computed against. An
editor that has moved on answers ``{applied: false}``; the server waits
for the newer text to reach its mirror and merges again, a bounded number
of times. The command is ``done`` only once the edit is applied (or there
was nothing to change); the merge, its conflicts and the number of tries
are journaled with the ``finish`` transition, where ``command/show`` finds
them.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import math
import weakref
from collections.abc import Callable
from typing import Any, Final

import attrs
import trio

from adapters.base import Request
from adapters.human import HumanAdapter
from editor_bridge import wire
from editor_bridge.finals import IDLE, FinalTexts
from editor_bridge.framing import DEFAULT_MAX_FRAME
from editor_bridge.mirror import Document, DocumentError, Mirror, edits_between, rebase
from editor_bridge.rpc import (
    DEFAULT_MAX_OUTBOX,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    Connection,
    RpcError,
)
from editor_bridge.wire import Params
from flows.engine import Engine, Progress
from flows.errors import IllegalTransition, StoreError, UnknownCommand
from flows.handlers import handler
from flows.merge import Conflict, apply_policy, three_way, whole_lines
from flows.options import DEFAULT_MAX_ATTEMPTS, PRIORITY_INTERACTIVE, CallOptions
from flows.records import Command, FlowChange, StateChange, new_id
from flows.runtime import REGISTRY as FLOWS
from flows.runtime import UnknownFlow
from flows.snapshots import CONTEXT, Change, Snapshot
from flows.states import COMMAND_STATES

log = logging.getLogger("dovecote.bridge")

SERVER_NAME: Final = "dovecote"
APPLY_HANDLER: Final = "editor.apply"
POLICIES: Final = ("drop", "ask", "markers", "theirs")
UNAUTHORIZED_MAX_FRAME: Final = 64 * 1024
"""The largest frame read from a socket client before its token: whoever can
reach the socket gets no more than this parsed until it proves it may."""
ORDERED: Final = frozenset({"command/submit", "flow/start", "document/open"})
"""Methods whose snapshot must be taken, or whose text must reach the mirror,
before the next frame is read."""

_servers: weakref.WeakKeyDictionary[Engine, Server] = weakref.WeakKeyDictionary()


@handler(APPLY_HANDLER)
async def _apply(engine: Engine, command: Command) -> Any:
    server = _servers.get(engine)
    if server is None:
        raise LookupError("no editor bridge runs in this process to apply the edit")
    return await server.apply_reply(command)


class EditNotApplied(Exception):
    """The editor never took the merged edit; the command is dead-lettered."""


@attrs.define
class Session:
    connection: Connection
    needs_token: bool
    initialized: bool = False
    authorized: bool = False
    client: str = ""
    uris: set[str] = attrs.field(factory=set)


@attrs.frozen
class KeptConflict:
    """A conflict kept with ``onConflict: ask``, waiting for ``conflict/resolve``.
    ``key`` names its live region in the mirror."""

    key: str
    uri: str
    conflict: Conflict
    index: int  # its place in command/show's conflicts, stable as others resolve


Method = Callable[[Session, Params], Any]
"""A method: a plain function when it never waits (it only reads and
computes), which the connection then runs inline, with no task of its own;
a coroutine function otherwise."""


class Server:
    def __init__(
        self,
        engine: Engine,
        *,
        token: str | None = None,
        version: str = "0.1.0",
        apply_timeout: float = 10.0,
        apply_tries: int = 5,
        document_wait: float = 30.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_outbox: int = DEFAULT_MAX_OUTBOX,
        final_idle: float = IDLE,
    ) -> None:
        self.engine = engine
        self.max_frame = max_frame
        self.max_outbox = max_outbox
        self.token = token
        self.version = version
        self.apply_timeout = apply_timeout
        self.apply_tries = apply_tries
        self.document_wait = document_wait
        self.mirror = Mirror()
        self.finals = FinalTexts(self.mirror, engine, final_idle)
        self.sessions: list[Session] = []
        self.owner_of: dict[str, Session] = {}
        self.flow_owner: dict[str, Session] = {}
        self.kept: dict[str, list[KeptConflict]] = {}
        self._opened = trio.Event()
        _servers[engine] = self
        for adapter in engine.adapters.values():
            if isinstance(adapter, HumanAdapter):
                adapter.ask = self._ask_human
        self.methods: dict[str, Method] = {
            "initialize": self.initialize,
            "shutdown": self.shutdown,
            "exit": self.exit,
            "document/open": self.document_open,
            "document/change": self.document_change,
            "document/close": self.document_close,
            "document/save": self.document_save,
            "command/submit": self.command_submit,
            "command/cancel": self.command_cancel,
            "command/reply": self.command_reply,
            "command/list": self.command_list,
            "command/show": self.command_show,
            "command/watch": self.command_watch,
            "deadletter/list": self.deadletter_list,
            "deadletter/replay": self.deadletter_replay,
            "conflict/resolve": self.conflict_resolve,
            "flow/start": self.flow_start,
            "flow/list": self.flow_list,
            "flow/show": self.flow_show,
            "flow/cancel": self.flow_cancel,
            "flow/watch": self.flow_watch,
        }
        self.inline = frozenset(
            name for name, run in self.methods.items() if not inspect.iscoroutinefunction(run)
        )

    # --- running -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forward engine notices to the sessions that own the commands.

        The one subscription for every client: unbounded, since forwarding
        never waits (each connection queues what it is sent, bounded in
        bytes, and drops a client that falls behind), so it is never the
        subscription that falls behind because one client does."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.finals.run)
            with self.engine.subscribe(buffer=math.inf) as notices:
                task_status.started()
                async for notice in notices:
                    try:
                        self._forward(notice)
                    except Exception:  # one notice lost, not every later one
                        log.exception("could not forward %r", notice)

    async def serve(
        self, receive: trio.abc.ReceiveStream, send: trio.abc.SendStream, *, needs_token: bool
    ) -> None:
        """Serve one editor connection until it closes."""
        session = Session(
            Connection(
                receive,
                send,
                self._dispatch,
                inline=self.inline,
                max_frame=self.max_frame,
                max_outbox=self.max_outbox,
            ),
            needs_token,
        )
        session.authorized = not needs_token
        if needs_token:
            session.connection.max_frame = min(self.max_frame, UNAUTHORIZED_MAX_FRAME)
        self.sessions.append(session)
        try:
            await session.connection.run()
        finally:
            self.sessions.remove(session)
            for command_id in [i for i, s in self.owner_of.items() if s is session]:
                del self.owner_of[command_id]
            for flow_id in [i for i, s in self.flow_owner.items() if s is session]:
                del self.flow_owner[flow_id]
            for uri in session.uris:
                self._closed(uri)
            await self.finals.drain()

    async def _dispatch(
        self,
        connection: Connection,
        method: str,
        params: Any,
        request: bool,
        ready: Callable[[], None],
    ) -> Any:
        session = next(s for s in self.sessions if s.connection is connection)
        if method not in ORDERED:
            ready()
        run = self.methods.get(method)
        if run is None:
            raise RpcError(METHOD_NOT_FOUND, f"no method {method!r}; see the dovecote protocol")
        if method not in ("initialize", "exit"):
            if not session.authorized:
                raise RpcError(
                    wire.UNAUTHORIZED, "unauthorized: initialize with the server's token"
                )
            if not session.initialized:
                raise RpcError(wire.NOT_INITIALIZED, f"{method}: send initialize first")
        try:
            result = run(session, Params(method, params, ready))
            return await result if inspect.iscoroutine(result) else result
        except UnknownCommand as exc:
            raise RpcError(wire.UNKNOWN_COMMAND, str(exc)) from None
        except UnknownFlow as exc:
            raise RpcError(wire.UNKNOWN_FLOW, str(exc)) from None
        except IllegalTransition as exc:
            raise RpcError(wire.ILLEGAL_TRANSITION, str(exc)) from None
        except DocumentError as exc:
            code = wire.UNKNOWN_DOCUMENT if exc.unknown else wire.DOCUMENT_REFUSED
            raise RpcError(code, str(exc)) from None
        except StoreError as exc:
            raise RpcError(wire.STORE_FAILED, str(exc)) from None
        except (ValueError, TypeError, OverflowError) as exc:
            raise RpcError(INVALID_PARAMS, f"{method}: {exc}") from None

    def _forward(self, notice: StateChange | Progress | FlowChange) -> None:
        if isinstance(notice, FlowChange):
            session = self.flow_owner.get(notice.flow.id)
            if session is not None:
                session.connection.notify(
                    "flow/state",
                    {
                        "flowId": notice.flow.id,
                        "state": notice.flow.state,
                        "step": notice.flow.step,
                        "stage": notice.flow.stage,
                    },
                )
            return
        if isinstance(notice, Progress):
            session = self.owner_of.get(notice.command_id)
            if session is not None:
                session.connection.notify(
                    "command/progress", {"commandId": notice.command_id, "text": notice.text}
                )
            return
        command = notice.command
        params: dict[str, Any] = {
            "commandId": command.id,
            "state": command.state,
            "attempt": command.attempt,
        }
        if command.reason:
            params["reason"] = command.reason
        if command.flow_id:
            params["flowId"] = command.flow_id
        if command.replay_of:
            params["replayOf"] = command.replay_of
        for session in self._audience(command):
            session.connection.notify("command/state", params)

    def _audience(self, command: Command) -> list[Session]:
        """Who hears about ``command``: its owner; failing that (the server
        restarted, the editor reconnected) whoever has its document open."""
        owner = self.owner_of.get(command.id)
        if owner is not None:
            return [owner]
        snapshot = self.engine.store.snapshot(command.snapshot_id) if command.snapshot_id else None
        if snapshot is None:
            return []
        return [s for s in self.sessions if snapshot.uri in s.uris]

    def _own(self, session: Session, command_id: str) -> None:
        self.owner_of[command_id] = session

    # --- lifecycle methods ---------------------------------------------------

    def initialize(self, session: Session, p: Params) -> Any:
        if session.needs_token:
            token = p.raw.get("token")
            if (
                not isinstance(token, str)
                or self.token is None
                or not hmac.compare_digest(token.encode(), self.token.encode())
            ):
                raise RpcError(
                    wire.UNAUTHORIZED,
                    "unauthorized: a missing or wrong token (it is in the token file "
                    "next to the database)",
                )
            session.authorized = True
            session.connection.max_frame = self.max_frame
        info = p.section("clientInfo", optional=True)
        session.client = (info.string("name", optional=True) if info else None) or "client"
        session.initialized = True
        return {
            "serverInfo": {"name": SERVER_NAME, "version": self.version},
            "adapters": sorted(self.engine.adapters),
            "flows": sorted(FLOWS),
        }

    def shutdown(self, session: Session, p: Params) -> Any:
        return None

    async def exit(self, session: Session, p: Params) -> Any:
        await session.connection.close()
        return None

    # --- documents -----------------------------------------------------------

    async def document_open(self, session: Session, p: Params) -> Any:
        uri, version = p.string("uri"), p.integer("version")
        text = p.raw.get("text")
        if not isinstance(text, str):
            raise RpcError(INVALID_PARAMS, "document/open: text must be a string")
        await self.mirror.open(uri, version, text)
        p.ready()
        session.uris.add(uri)
        self._opened.set()
        self._opened = trio.Event()
        return None

    def document_change(self, session: Session, p: Params) -> Any:
        uri, version = p.string("uri"), p.integer("version")
        raw = p.raw.get("changes")
        if not isinstance(raw, list):
            raise RpcError(INVALID_PARAMS, "document/change: changes must be an array")
        changes = []
        for index, item in enumerate(raw):
            c = Params(f"document/change: changes[{index}]", item)
            try:
                changes.append(Change(c.integer("start"), c.integer("end"), c.text("text")))
            except ValueError as exc:
                raise RpcError(
                    INVALID_PARAMS, f"document/change: changes[{index}]: {exc}"
                ) from None
        touched: set[str] = set()
        self.mirror.change(uri, version, changes, touched)
        if touched:
            self.finals.touched(touched)
        return None

    def document_close(self, session: Session, p: Params) -> Any:
        uri = p.string("uri")
        session.uris.discard(uri)
        self._closed(uri)
        return None

    def _closed(self, uri: str) -> None:
        """A client let ``uri`` go: when it was the last, its corrected
        regions' texts are final and the mirror forgets the document."""
        if not any(uri in s.uris for s in self.sessions):
            self.finals.settle(uri)
            self.mirror.close(uri)

    def document_save(self, session: Session, p: Params) -> Any:
        """The editor saved ``uri``: what its corrected regions hold is what
        the person kept (journaled as ``final_text``)."""
        uri = p.string("uri")
        version = p.integer("version", optional=True)
        document = self.mirror.get(uri)
        if version is not None and version > document.version:
            raise DocumentError(
                f"document/save: {uri!r} is at version {document.version}, not {version}: "
                "send the changes before saving"
            )
        self.finals.settle(uri)
        return None

    # --- commands ------------------------------------------------------------

    def _snapshot(self, target: Params | None) -> Snapshot | None:
        """Take the region's snapshot and start moving it with the text; the
        caller stores it with its command or flow, in one transaction."""
        if target is None:
            return None
        uri, start, end = target.string("uri"), target.integer("start"), target.integer("end")
        version = target.integer("version", optional=True)
        document = self.mirror.get(uri)
        if version is not None and version != document.version:
            raise DocumentError(
                f"target refers to version {version} of {uri!r}, which is at version "
                f"{document.version}: send the changes in between first"
            )
        if not start <= end <= len(document):
            raise DocumentError(
                f"target [{start}, {end}) is outside {uri!r} ({len(document)} code points)"
            )
        before, after = max(0, start - CONTEXT), min(len(document), end + CONTEXT)
        snapshot = Snapshot(
            id=new_id(),
            uri=uri,
            version=document.version,
            start=start,
            end=end,
            text=document.slice(start, end),
            created_at=self.engine.now(),
            document=document.slice(before, after),
            document_start=before,
        )
        self.mirror.track(uri, snapshot.id, start, end)
        return snapshot

    async def command_submit(self, session: Session, p: Params) -> Any:
        adapter = p.string("adapter")
        request = wire.request_from_wire(p.method, p.raw.get("request"))
        timeout = p.number("timeout", optional=True)
        max_attempts = p.integer("maxAttempts", optional=True, minimum=1)
        policy = p.choice("onConflict", POLICIES, default="drop")
        cache = p.cache()
        snapshot = self._snapshot(p.section("target", optional=True))
        p.ready()
        try:
            options = CallOptions(
                timeout=timeout,
                max_attempts=DEFAULT_MAX_ATTEMPTS if max_attempts is None else max_attempts,
                priority=PRIORITY_INTERACTIVE,
                cache=cache,
                handler=APPLY_HANDLER if snapshot is not None else None,
                handler_args={"policy": policy} if snapshot is not None else None,
            )
            command_id = await self.engine.submit(
                adapter, request, snapshot=snapshot, options=options
            )
        except BaseException:
            if snapshot is not None:
                self.mirror.untrack(snapshot.uri, snapshot.id)
            raise
        self._own(session, command_id)
        return {"commandId": command_id}

    async def command_cancel(self, session: Session, p: Params) -> Any:
        command = await self.engine.cancel(p.string("commandId"))
        return {"state": command.state}

    async def command_reply(self, session: Session, p: Params) -> Any:
        command_id = p.string("commandId")
        reply = p.section("reply")
        assert reply is not None
        delivery = await self.engine.deliver(command_id, {"text": reply.text("text")})
        return {"accepted": delivery.accepted, "late": delivery.late}

    def command_list(self, session: Session, p: Params) -> Any:
        states = p.strings("states", optional=True)
        for state in states or ():
            if state not in COMMAND_STATES:
                raise RpcError(
                    INVALID_PARAMS,
                    f"command/list: unknown state {state!r} (one of {', '.join(COMMAND_STATES)})",
                )
        commands = self.engine.list(
            states,
            limit=p.integer("limit", optional=True, minimum=1),
            flow_id=p.string("flowId", optional=True),
        )
        return {"commands": [wire.command(c) for c in commands]}

    def command_show(self, session: Session, p: Params) -> Any:
        command = self.engine.get(p.string("commandId"))
        events = self.engine.history(command.id)
        result: dict[str, Any] = {
            "command": wire.command(command),
            "events": [wire.event(e) for e in events],
            "lateReplies": [
                {"text": r.reply.text, "receivedAt": r.received_at, "usedBy": r.used_by}
                for r in self.engine.store.late_replies(command.id)
            ],
        }
        finished = [e for e in events if e.event == "finish" and isinstance(e.detail, dict)]
        merge = finished[-1].detail.get("result") if finished else None
        if isinstance(merge, dict) and "conflicts" in merge:
            result["merge"] = merge
            result["conflicts"] = merge["conflicts"]
            result["unresolved"] = len(self.kept.get(command.id, []))
            result["kept"] = self._kept_now(command.id)
        return result

    def command_watch(self, session: Session, p: Params) -> Any:
        """Receive the notifications of these commands (after a reconnect)."""
        ids = p.strings("commandIds")
        for command_id in ids:
            self.engine.get(command_id)
        for command_id in ids:
            self._own(session, command_id)
        return {"watching": len(ids)}

    def deadletter_list(self, session: Session, p: Params) -> Any:
        letters = self.engine.store.dead_letters(
            reason=p.string("reason", optional=True),
            adapter=p.string("adapter", optional=True),
            limit=p.integer("limit", optional=True, minimum=1),
        )
        return {
            "commands": [
                {**wire.command(c), "unusedLateReplies": late, **self._document_of(c)}
                for c, _, late in letters
            ]
        }

    def _document_of(self, command: Command) -> dict[str, str]:
        """``{"uri": ...}`` of the document a call was about, if any: a list of dead
        letters names the file, whoever made the call."""
        snapshot = self.engine.store.snapshot(command.snapshot_id) if command.snapshot_id else None
        return {"uri": snapshot.uri} if snapshot else {}

    async def deadletter_replay(self, session: Session, p: Params) -> Any:
        ids = p.strings("commandIds", optional=True)
        reason, adapter = p.string("reason", optional=True), p.string("adapter", optional=True)
        if ids is None:
            if reason is None and adapter is None:
                raise RpcError(
                    INVALID_PARAMS,
                    "deadletter/replay: give commandIds, or a reason and/or adapter to filter by",
                )
            ids = [
                c.id for c, _, _ in self.engine.store.dead_letters(reason=reason, adapter=adapter)
            ]
        new_ids = await self.engine.replay(
            ids,
            timeout=p.number("timeout", optional=True),
            use_late_reply=p.flag("useLateReply"),
        )
        for new_id_ in new_ids:
            self._own(session, new_id_)
        return {"replayed": [{"from": a, "to": b} for a, b in zip(ids, new_ids, strict=True)]}

    # --- flows ---------------------------------------------------------------

    async def flow_start(self, session: Session, p: Params) -> Any:
        name = p.string("flow")
        params = p.raw.get("params") or {}
        if not isinstance(params, dict):
            raise RpcError(INVALID_PARAMS, "flow/start: params must be an object")
        policy = p.choice("onConflict", POLICIES, default="drop")
        budget = p.number("budget", optional=True)
        snapshot = self._snapshot(p.section("target", optional=True))
        p.ready()
        if snapshot is not None:
            params = {
                "text": snapshot.text,
                **params,
                "target": {"snapshot": snapshot.id, "policy": policy},
            }
        try:
            flow_id = await self.engine.flow_runner.start(
                name, params, snapshot=snapshot, budget=budget
            )
        except BaseException:
            if snapshot is not None:
                self.mirror.untrack(snapshot.uri, snapshot.id)
            raise
        self.flow_owner[flow_id] = session
        return {"flowId": flow_id}

    def flow_list(self, session: Session, p: Params) -> Any:
        states = p.strings("states", optional=True)
        return {"flows": [wire.flow(f) for f in self.engine.list_flows(states)]}

    def flow_show(self, session: Session, p: Params) -> Any:
        flow = self.engine.get_flow(p.string("flowId"))
        steps = self.engine.store.flow_steps(flow.id)
        return {
            **wire.flow(flow),
            "steps": [
                {
                    "step": s.step,
                    "kind": s.kind,
                    "commandId": s.command_id,
                    "value": s.value,
                    "state": self.engine.get(s.command_id).state if s.command_id else None,
                }
                for s in steps
            ],
            "events": [wire.event(e) for e in self.engine.flow_history(flow.id)],
        }

    def flow_watch(self, session: Session, p: Params) -> Any:
        """Receive these flows' flow/state notifications (after a reconnect)."""
        ids = p.strings("flowIds")
        for flow_id in ids:
            self.engine.get_flow(flow_id)
        for flow_id in ids:
            self.flow_owner[flow_id] = session
        return {"watching": len(ids)}

    async def flow_cancel(self, session: Session, p: Params) -> Any:
        flow = await self.engine.cancel_flow(p.string("flowId"))
        return wire.flow(flow)

    # --- applying replies ----------------------------------------------------

    async def apply_reply(self, command: Command) -> dict[str, Any]:
        """The ``editor.apply`` handler: merge the reply into the region as
        it is now, and have the editor apply the difference."""
        assert command.reply is not None
        snapshot = self.engine.store.snapshot(command.snapshot_id or "")
        if snapshot is None:
            raise LookupError(f"command {command.id} has no stored snapshot to merge against")
        policy = (command.handler_args or {}).get("policy", "drop")
        for tries in range(1, self.apply_tries + 1):
            document, (start, end) = await self._region(snapshot)
            base, current, reply = snapshot.text, document.slice(start, end), command.reply.text
            if policy == "markers":
                # Marker blocks are whole lines of the document, not of the region.
                start, end, pre, post = whole_lines(document.text, start, end)
                base, current, reply = pre + base + post, pre + current + post, pre + reply + post
            merge = apply_policy(three_way(base, current, reply), policy)
            edits = edits_between(current, merge.text, start)
            outcome = {
                "policy": policy,
                "tries": tries,
                "edits": len(edits),
                "conflicts": [attrs.asdict(c) for c in merge.conflicts],
            }
            if not edits:
                break
            version = document.version
            if await self._apply_edit(command.id, snapshot.uri, version, edits):
                await self._wait_newer(snapshot.uri, version)
                break
            await self._wait_newer(snapshot.uri, version)
        else:
            raise EditNotApplied(
                f"the editor refused the merged edit {self.apply_tries} times "
                "(its document kept changing under it); gave up"
            )
        if policy == "ask" and merge.conflicts:
            self._keep(command.id, snapshot.uri, snapshot.id, merge.text, merge.conflicts)
        # Still live: what the person keeps of it is recorded later (finals).
        self.finals.watch(snapshot.id, command.id, snapshot.uri)
        return outcome

    async def _region(self, snapshot: Snapshot) -> tuple[Document, tuple[int, int]]:
        """The snapshot's region in the live document, waiting (a while) for
        an editor to open the document if none has."""
        with trio.move_on_after(self.document_wait):
            while snapshot.uri not in self.mirror.documents:
                await self._opened.wait()
        document = self.mirror.get(snapshot.uri)
        if snapshot.id not in document.regions:
            # This server did not see the call made (it restarted).
            document = await self.mirror.find_again(snapshot)
        return document, document.regions[snapshot.id]

    async def _apply_edit(
        self, command_id: str, uri: str, version: int, edits: list[Change]
    ) -> bool:
        session = self.owner_of.get(command_id)
        if session is None or uri not in session.uris:
            session = next((s for s in self.sessions if uri in s.uris), None)
        if session is None:
            return False
        try:
            answer = await session.connection.request(
                "document/applyEdit",
                {
                    "uri": uri,
                    "version": version,
                    "edits": [{"start": e.start, "end": e.end, "text": e.text} for e in edits],
                    "commandId": command_id,
                },
                self.apply_timeout,
            )
        except RpcError as exc:
            log.warning("document/applyEdit for %s failed: %s", command_id, exc.message)
            return False
        return isinstance(answer, dict) and answer.get("applied") is True

    async def _wait_newer(self, uri: str, version: int, timeout: float = 2.0) -> None:
        """Until the mirror holds a version of ``uri`` after ``version``."""
        with trio.move_on_after(timeout):
            while True:
                document = self.mirror.documents.get(uri)
                if document is None or document.version > version:
                    return
                await document.changed.wait()

    def _keep(
        self, command_id: str, uri: str, region: str, merged: str, conflicts: tuple[Conflict, ...]
    ) -> None:
        """Track each kept conflict's span as a live region of its own."""
        document = self.mirror.documents.get(uri)
        if document is None or region not in document.regions:
            return
        start, end = document.regions[region]
        spans = {f"{command_id}#{i}": (c.start, c.end) for i, c in enumerate(conflicts)}
        rebase(spans, merged, document.slice(start, end))
        kept: list[KeptConflict] = []
        for (key, (s, e)), conflict in zip(spans.items(), conflicts, strict=True):
            document.regions[key] = (start + s, start + e)
            kept.append(KeptConflict(key, uri, conflict, len(kept)))
        self.kept[command_id] = kept

    async def conflict_resolve(self, session: Session, p: Params) -> Any:
        """Resolve kept conflicts against the text as it is now, never as it was.

        Each choice is merged three ways: the conflict's ``ours`` (the person's text the
        conflict showed) as base, the span's text now, and the chosen text.  A span the
        person has edited since is merged with the choice where the edits do not meet;
        where they meet, the person's text stays, the conflict is closed with it, and
        its index is listed in ``changed`` (``applied`` is then false)."""
        command_id = p.string("commandId")
        choice = p.choice("choice", ("ours", "theirs", "text"))
        index = p.integer("index", optional=True)
        self.engine.get(command_id)
        kept = self.kept.get(command_id)
        if not kept:
            raise RpcError(wire.NO_CONFLICT, f"command {command_id} has no conflict to resolve")
        chosen = kept if index is None else [k for k in kept if k.index == index]
        if not chosen:
            raise RpcError(INVALID_PARAMS, f"conflict/resolve: no conflict number {index}")
        replacement = ""
        if choice == "text":
            if len(chosen) != 1:
                raise RpcError(
                    INVALID_PARAMS,
                    "conflict/resolve: choice text needs an index when there are several conflicts",
                )
            replacement = p.text("text")
        applied, changed = True, []
        for item in chosen:
            c = item.conflict
            text = {"ours": c.ours, "theirs": c.theirs}.get(choice, replacement)
            outcome = await self._replace(command_id, item, text)
            if outcome is None:
                applied = False
                continue
            if not outcome:
                changed.append(item.index)
                applied = False
            self.mirror.untrack(item.uri, item.key)
            kept.remove(item)
        if not kept:
            self.kept.pop(command_id, None)
        return {"applied": applied, "changed": changed}

    def _kept_now(self, command_id: str) -> list[dict[str, Any]]:
        """The unresolved conflicts of ``command_id`` with the person's text now."""
        shown = []
        for item in self.kept.get(command_id, []):
            document = self.mirror.documents.get(item.uri)
            region = document.regions.get(item.key) if document else None
            if document is None or region is None:
                continue
            start, end = region
            c = item.conflict
            shown.append(
                {
                    "index": item.index,
                    "start": start,
                    "end": end,
                    "base": c.base,
                    "ours": document.slice(start, end),
                    "theirs": c.theirs,
                }
            )
        return shown

    async def _replace(self, command_id: str, item: KeptConflict, text: str) -> bool | None:
        """Merge ``text`` into the conflict's span as it is now: True once applied (or
        nothing to change), False when the person's edits since collide with it (their
        text stays), None when the editor never took the edit."""
        for _ in range(self.apply_tries):
            document = self.mirror.documents.get(item.uri)
            if document is None or item.key not in document.regions:
                return None
            start, end = document.regions[item.key]
            current = document.slice(start, end)
            merge = three_way(item.conflict.ours, current, text)
            if merge.conflicts:
                return False
            edits = edits_between(current, merge.text, start)
            if not edits:
                return True
            version = document.version
            if await self._apply_edit(command_id, item.uri, version, edits):
                await self._wait_newer(item.uri, version)
                return True
            await self._wait_newer(item.uri, version)
        return None

    # --- people --------------------------------------------------------------

    def _ask_human(self, command_id: str, request: Request) -> None:
        """Queue the question (never waits, so it needs no task of its own)."""
        params: dict[str, Any] = {
            "commandId": command_id,
            "messages": [m.to_json() for m in request.messages],
        }
        if request.system:
            params["system"] = request.system
        owner = self.owner_of.get(command_id)
        audience = [owner] if owner else [s for s in self.sessions if s.initialized]
        for session in audience:
            session.connection.notify("human/ask", params)
