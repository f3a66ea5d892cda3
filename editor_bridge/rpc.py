"""A JSON-RPC 2.0 connection over one byte stream, on trio.

Requests from the client run each in their own task, so a slow one (a
submit waiting for its commit, a replay of thousands) never blocks the
reading of the next frame. Notifications run inline, in the order they
arrive: ``document/change`` must be applied in exactly the editor's order.
A request may have a part that must also happen in frame order (taking the
snapshot of a region, before the next change moves the text): the next
frame is read only once the handler calls ``ready()``; a handler that has
no such part calls it at once.
Requests for the ``inline`` methods, whose handlers never wait (they only
read and compute: ``command/list``), run inline too: a task of their own
would cost more than their work and buy nothing, since a handler that never
waits holds up everything else while it runs wherever it runs.
Requests from the server to the client (``document/applyEdit``) carry
their own ids (``s1``, ``s2``...) and a timeout of their own.

Everything sent goes through one outbox, written by one writer task: the
messages that are ready by the time it runs go out in one write, not one
write (and one trip through the scheduler) each. Answers are posted without
waiting for the write, so that reading never waits for a client slow to
read; ``send()`` (notifications, requests to the client) waits for it, as
a producer that must not outrun the client should.

Every malformed input gets the JSON-RPC error its kind calls for and the
connection goes on serving; only end-of-stream ends it.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Awaitable, Callable, Container
from typing import Any, Final

import trio

from editor_bridge.framing import DEFAULT_MAX_FRAME, FrameReader, encode

log = logging.getLogger("dovecote.rpc")

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603

YIELD_EVERY: Final = 32
"""Frames read in a row without giving other tasks a turn: a burst of
pipelined frames, all handled inline, would otherwise hold up the engine,
the timers and the writer until the burst ends."""
OUTBOX_LIMIT: Final = 1024
"""Messages queued and not yet written past which the next frame is not
read until they are."""
DRAIN_GRACE: Final = 5.0
"""Seconds to go on writing what is queued once the client has closed its
end: it may still read the answers, but one that does not must not keep
the server alive."""


class RpcError(Exception):
    """An error to send back as a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


Handler = Callable[["Connection", str, Any, bool, Callable[[], None]], Awaitable[Any]]
"""``handler(connection, method, params, is_request, ready)``: the result for
a request (ignored for a notification), or raise ``RpcError``; ``ready()``
lets the next frame be read (see the module docstring)."""


class Connection:
    """One peer. Nothing is written unless ``run()`` is running: it reads,
    and starts the writer."""

    def __init__(
        self,
        receive: trio.abc.ReceiveStream,
        send: trio.abc.SendStream,
        handler: Handler,
        *,
        inline: Container[str] = frozenset(),
        max_frame: int = DEFAULT_MAX_FRAME,
        name: str = "client",
    ) -> None:
        self._reader = FrameReader(receive, max_frame)
        self._send_stream = send
        self._handler = handler
        self._inline = inline
        self._ids = itertools.count(1)
        self._waiting: dict[str, tuple[trio.Event, list[Any]]] = {}
        self.name = name
        self.closed = False
        self._scope: trio.CancelScope | None = None
        # What the writer has yet to take, and the event set once it is
        # written (or can never be): one per batch, shared by its senders.
        self._outbox: list[bytes] = []
        self._outbox_written = trio.Event()
        self._has_output = trio.Event()
        self._writing: trio.Event | None = None  # the batch being written's

    async def run(self) -> None:
        """Serve until the client closes its end."""
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._write_out)
                unyielded = 0
                while True:
                    frame = await self._reader.read()
                    if frame is None:
                        break
                    if frame.body is None:
                        code = INVALID_REQUEST if frame.too_large else PARSE_ERROR
                        self._reply_error(None, RpcError(code, frame.error or "bad frame"))
                    else:
                        await self._receive(frame.body, nursery)
                    if len(self._outbox) >= OUTBOX_LIMIT:
                        # A client that sends without reading gets no more
                        # read from it until it catches up: memory stays bounded.
                        await self._drain()
                    unyielded += 1
                    if unyielded == YIELD_EVERY:
                        unyielded = 0
                        await trio.lowlevel.checkpoint()
                # The answers of the requests already handled are queued: a
                # client that closed our input may still be reading them.
                with trio.move_on_after(DRAIN_GRACE):
                    await self._drain()
                nursery.cancel_scope.cancel()
        finally:
            self.closed = True
            for event, _ in self._waiting.values():
                event.set()
            self._outbox_written.set()

    async def _receive(self, body: bytes, nursery: trio.Nursery) -> None:
        try:
            message = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._reply_error(None, RpcError(PARSE_ERROR, f"not valid UTF-8 JSON: {exc}"))
            return
        if isinstance(message, list):
            self._reply_error(
                None,
                RpcError(INVALID_REQUEST, "batch requests are not supported: send one at a time"),
            )
            return
        if not isinstance(message, dict):
            self._reply_error(None, RpcError(INVALID_REQUEST, "a message must be a JSON object"))
            return
        request_id = message.get("id")
        if "method" not in message and ("result" in message or "error" in message):
            self._answered(message)
            return
        if not _valid_id(request_id):
            self._reply_error(None, RpcError(INVALID_REQUEST, "id must be a string or a number"))
            return
        problem = _check_request(message)
        if problem:
            self._reply_error(request_id, RpcError(INVALID_REQUEST, problem))
            return
        method, params = message["method"], message.get("params")
        if "id" in message:
            if method in self._inline:
                await self._answer(request_id, method, params, _nothing)
            else:
                await nursery.start(self._serve, request_id, method, params)
        else:
            try:
                await self._handler(self, method, params, False, _nothing)
            except RpcError as exc:
                # A notification has no response; say what was refused anyway,
                # so that an editor can resynchronise instead of drifting.
                log.warning("notification %s refused: %s", method, exc.message)
                refused = {"method": method, "code": exc.code, "message": exc.message}
                if isinstance(params, dict) and isinstance(params.get("uri"), str):
                    refused["uri"] = params["uri"]  # which document to re-open
                self._post({"jsonrpc": "2.0", "method": "server/error", "params": refused})
            except Exception:
                log.exception("notification %s failed", method)

    async def _serve(
        self,
        request_id: Any,
        method: str,
        params: Any,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        started = False

        def ready() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        await self._answer(request_id, method, params, ready)

    async def _answer(
        self, request_id: Any, method: str, params: Any, ready: Callable[[], None]
    ) -> None:
        try:
            result = await self._handler(self, method, params, True, ready)
        except RpcError as exc:
            ready()
            self._reply_error(request_id, exc)
        except Exception as exc:
            ready()
            log.exception("request %s failed", method)
            self._reply_error(request_id, RpcError(INTERNAL_ERROR, f"internal error: {exc}"))
        else:
            ready()
            self._post({"jsonrpc": "2.0", "id": request_id, "result": result})

    def _reply_error(self, request_id: Any, error: RpcError) -> None:
        self._post({"jsonrpc": "2.0", "id": request_id, "error": error.to_json()})

    def _answered(self, message: dict[str, Any]) -> None:
        waiting = self._waiting.get(str(message.get("id")))
        if waiting is None:
            log.warning("a response to no request of ours: %r", message.get("id"))
            return
        event, box = waiting
        box.append(message)
        event.set()

    def _post(self, message: dict[str, Any]) -> trio.Event:
        """Queue ``message`` for the writer; the event is set once it is
        written, or once it never will be (the connection closed)."""
        if not self.closed:
            self._outbox.append(encode(message))
            self._has_output.set()
        return self._outbox_written

    async def _write_out(self) -> None:
        """The writer: everything queued since its last write, in one write."""
        while True:
            await self._has_output.wait()
            self._has_output = trio.Event()
            batch, written = self._outbox, self._outbox_written
            self._outbox, self._outbox_written = [], trio.Event()
            self._writing = written
            try:
                await self._send_stream.send_all(b"".join(batch))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The client is gone: nothing queued will ever be written.
                self.closed = True
                self._outbox_written.set()
            finally:
                self._writing = None
                written.set()

    async def _drain(self) -> None:
        """Until everything queued so far is written (batches go in order)."""
        if self._outbox:
            await self._outbox_written.wait()
        elif self._writing is not None:
            await self._writing.wait()

    async def send(self, message: dict[str, Any]) -> None:
        """Send ``message``; return once it is written (or cannot be)."""
        if not self.closed:
            await self._post(message).wait()

    async def close(self) -> None:
        """Stop serving this connection (after ``exit``)."""
        self.closed = True
        if self._scope is not None:
            self._scope.cancel()
        with trio.CancelScope(shield=True):
            await self._send_stream.aclose()

    async def notify(self, method: str, params: Any) -> None:
        await self.send({"jsonrpc": "2.0", "method": method, "params": params})

    async def request(self, method: str, params: Any, timeout: float) -> Any:
        """Ask the client; its result, or ``RpcError`` (its error, a timeout,
        or the connection closing)."""
        request_id = f"s{next(self._ids)}"
        event, box = trio.Event(), list[Any]()
        self._waiting[request_id] = (event, box)
        try:
            await self.send(
                {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
            )
            with trio.move_on_after(timeout):
                await event.wait()
        finally:
            del self._waiting[request_id]
        if not box:
            reason = "the connection closed" if self.closed else f"no answer within {timeout:g} s"
            raise RpcError(INTERNAL_ERROR, f"{method}: {reason}")
        answer = box[0]
        if "error" in answer:
            error = answer["error"] if isinstance(answer["error"], dict) else {}
            raise RpcError(int(error.get("code", INTERNAL_ERROR)), str(error.get("message", "")))
        return answer.get("result")


def _nothing() -> None:
    pass


def _valid_id(value: Any) -> bool:
    return value is None or (isinstance(value, str | int | float) and not isinstance(value, bool))


def _check_request(message: dict[str, Any]) -> str | None:
    if message.get("jsonrpc") != "2.0":
        return 'a JSON-RPC 2.0 message needs "jsonrpc": "2.0"'
    if not isinstance(message.get("method"), str):
        return "method must be a string"
    params = message.get("params")
    if params is not None and not isinstance(params, dict | list):
        return "params must be an object or an array"
    return None
