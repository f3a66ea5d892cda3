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
write (and one trip through the scheduler) each. Nothing that posts waits
for the write: not the answers, so that reading never waits for a client
slow to read, and not the notifications, so that the server's one loop
forwarding the engine's notices to every client never waits for any one of
them. Instead the outbox is bounded in bytes (``max_outbox``): past a
quarter of it the next frame is not read until the client catches up (so its
own answers cannot pile up), and a client whose unwritten messages still
pass the whole bound (notifications go on arriving while it does not read)
has fallen behind: it is sent a ``server/error`` saying so and disconnected.
Its commands go on (they are durable); it can reconnect and
``command/watch`` them.

Every malformed input gets the JSON-RPC error its kind calls for and the
connection goes on serving (see ``editor_bridge.decode`` for what a body may
hold); bytes that are not LSP framing at all end the connection, with a
``server/error`` first, as do end-of-stream and a peer that vanishes.
Bodies of more than ``LARGE_BODY`` bytes are decoded in turns
(``editor_bridge.large``), so that one client's huge frame does not hold up
the others' answers, nor a deadline.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable, Container
from typing import Any, Final

import trio

from editor_bridge.decode import SURROGATE, Decoded, Refused, check, decode
from editor_bridge.framing import DEFAULT_MAX_FRAME, FrameReader, encode
from editor_bridge.large import decode_large

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
DEFAULT_MAX_OUTBOX: Final = 64 * 1024 * 1024
"""Bytes of answers and notifications queued for one client and not yet
written past which it has fallen behind (a quarter of it stops the reading)."""
LARGE_BODY: Final = 1024 * 1024
"""Bodies larger than this are decoded in turns with the rest of the server:
``json.loads`` of a 16 MB ``document/open`` holds the interpreter for about
90 ms (in a worker thread too), longer than another client's answer may
wait."""
DRAIN_GRACE: Final = 5.0
"""Seconds to go on writing what is queued once the client has closed its
end: it may still read the answers, but one that does not must not keep
the server alive."""
FELL_BEHIND: Final = -32009
"""The ``server/error`` code of a client disconnected for falling behind."""


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
        max_outbox: int = DEFAULT_MAX_OUTBOX,
        name: str = "client",
    ) -> None:
        self._reader = FrameReader(receive, max_frame)
        self._send_stream = send
        self._handler = handler
        self._inline = inline
        self._max_outbox = max_outbox
        self._ids = itertools.count(1)
        self._waiting: dict[str, tuple[trio.Event, list[Any]]] = {}
        self.name = name
        self.closed = False
        self.fell_behind = False
        self._scope: trio.CancelScope | None = None
        self._reading = trio.CancelScope()
        # What the writer has yet to take (and its size), and the event set
        # once it is written (or can never be): one per batch, shared by its
        # senders; the batch being written, its event and size.
        self._outbox: list[bytes] = []
        self._outbox_bytes = 0
        self._outbox_written = trio.Event()
        self._has_output = trio.Event()
        self._writing: trio.Event | None = None
        self._writing_bytes = 0

    @property
    def max_frame(self) -> int:
        """The largest frame read from now on."""
        return self._reader.max_frame

    @max_frame.setter
    def max_frame(self, size: int) -> None:
        self._reader.max_frame = size

    async def run(self) -> None:
        """Serve until the client closes its end, vanishes, sends what is not
        LSP framing, or falls behind."""
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._write_out)
                with self._reading:
                    await self._read_all(nursery)
                # The answers of the requests already handled are queued: a
                # client that closed our input may still be reading them (or,
                # having fallen behind, reading why it is disconnected).
                with trio.move_on_after(DRAIN_GRACE):
                    await self._drain()
                nursery.cancel_scope.cancel()
        finally:
            self.closed = True
            for event, _ in self._waiting.values():
                event.set()
            self._outbox_written.set()

    async def _read_all(self, nursery: trio.Nursery) -> None:
        unyielded = 0
        while True:
            frame = await self._reader.read()
            if frame is None:
                return
            if frame.fatal:
                log.warning("%s: %s; closing the connection", self.name, frame.error)
                self._tell(PARSE_ERROR, f"{frame.error}; closing the connection")
                return
            if frame.body is None:
                code = INVALID_REQUEST if frame.too_large else PARSE_ERROR
                self._reply_error(None, RpcError(code, frame.error or "bad frame"))
            else:
                await self._receive(frame.body, nursery)
            if self._outbox_bytes + self._writing_bytes >= self._max_outbox // 4:
                # A client that sends without reading gets no more read
                # from it until it catches up: its answers stay bounded.
                await self._drain()
            unyielded += 1
            if unyielded == YIELD_EVERY:
                unyielded = 0
                await trio.lowlevel.checkpoint()

    async def _receive(self, body: bytes, nursery: trio.Nursery) -> None:
        if len(body) > LARGE_BODY:
            decoded = await decode_large(body)
            await trio.lowlevel.checkpoint()  # joining its pieces held the loop
        else:
            decoded = decode(body)
        message = decoded.value
        if decoded.error is not None:
            self._reply_error(None, RpcError(PARSE_ERROR, decoded.error))
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
        refused = decoded.refused
        if "method" not in message and ("result" in message or "error" in message):
            self._answered(message, decoded)
            return
        if refused is not None and refused.top != "id":
            refused = _id_refused(message) or refused  # an id it cannot echo comes first
        if refused is not None and refused.top == "id":
            self._reply_error(None, RpcError(INVALID_REQUEST, f"id: {refused.why}"))
            return
        request_id = message.get("id")
        if not _valid_id(request_id):
            self._reply_error(None, RpcError(INVALID_REQUEST, "id must be a string or a number"))
            return
        problem = _check_request(message)
        if problem is None and refused is not None:
            problem = f"{refused.where()}: {refused.why}"
            if refused.top == "params":
                # The message is a request; what it asks with is not valid.
                why = f"{message['method']}: {refused.where(1)}: {refused.why}"
                self._refuse(message, request_id, RpcError(INVALID_PARAMS, why))
                return
        if problem:
            self._refuse(message, request_id, RpcError(INVALID_REQUEST, problem))
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
                self._refuse(message, None, exc)
            except Exception:
                log.exception("notification %s failed", method)

    def _refuse(self, message: dict[str, Any], request_id: Any, error: RpcError) -> None:
        """A request's error answer; a notification has none, so say what was
        refused anyway, so that an editor can resynchronise instead of drifting."""
        if "id" in message:
            self._reply_error(request_id, error)
            return
        method = message.get("method")
        log.warning("notification %r refused: %s", method, error.message)
        refused: dict[str, Any] = {"code": error.code, "message": error.message}
        if isinstance(method, str) and not SURROGATE.search(method):
            refused["method"] = method
        params = message.get("params")
        uri = params.get("uri") if isinstance(params, dict) else None
        if isinstance(uri, str) and not SURROGATE.search(uri):
            refused["uri"] = uri  # which document to re-open
        self.notify("server/error", refused)

    def _tell(self, code: int, message: str) -> None:
        self.notify("server/error", {"code": code, "message": message})

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

    def _answered(self, message: dict[str, Any], decoded: Decoded) -> None:
        waiting = self._waiting.get(str(message.get("id")))
        if waiting is None:
            log.warning("a response to no request of ours: %r", message.get("id"))
            return
        event, box = waiting
        if decoded.refused is not None:
            why = f"the answer's {decoded.refused.where()}: {decoded.refused.why}"
            message = {"error": {"code": INVALID_PARAMS, "message": why}}
        box.append(message)
        event.set()

    def _post(self, message: dict[str, Any]) -> trio.Event:
        """Queue ``message`` for the writer; the event is set once it is
        written, or once it never will be (the connection closed). Never
        waits: a client that lets too much pile up has fallen behind."""
        if self.closed:
            return self._outbox_written
        frame = _encode(message)
        self._outbox.append(frame)
        self._outbox_bytes += len(frame)
        self._has_output.set()
        # One message alone never counts: an answer may be large, and the
        # writer takes it at its next turn.
        if self._outbox_bytes > self._max_outbox and len(self._outbox) > 1:
            self._fall_behind()
        return self._outbox_written

    def _fall_behind(self) -> None:
        """Drop what is queued, say why, and stop serving this client."""
        dropped = len(self._outbox)
        log.warning(
            "%s fell %d bytes (%d messages) behind; disconnecting it",
            self.name,
            self._outbox_bytes,
            dropped,
        )
        self._outbox, self._outbox_bytes = [], 0
        self._tell(
            FELL_BEHIND,
            f"this connection fell behind: {dropped} messages, more than "
            f"{self._max_outbox} bytes, were waiting to be read; disconnecting. Commands go on: "
            "reconnect and command/watch them",
        )
        self.closed = True
        self.fell_behind = True
        self._reading.cancel()

    async def _write_out(self) -> None:
        """The writer: everything queued since its last write, in one write."""
        while True:
            await self._has_output.wait()
            self._has_output = trio.Event()
            batch, written = self._outbox, self._outbox_written
            self._writing_bytes = self._outbox_bytes
            self._outbox, self._outbox_bytes, self._outbox_written = [], 0, trio.Event()
            self._writing = written
            try:
                await self._send_stream.send_all(b"".join(batch))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The client is gone: nothing queued will ever be written.
                self.closed = True
                self._outbox_written.set()
                self._reading.cancel()
            finally:
                self._writing, self._writing_bytes = None, 0
                written.set()

    async def _drain(self) -> None:
        """Until everything queued so far is written (batches go in order)."""
        if self._outbox:
            await self._outbox_written.wait()
        elif self._writing is not None:
            await self._writing.wait()

    async def close(self) -> None:
        """Stop serving this connection (after ``exit``)."""
        self.closed = True
        if self._scope is not None:
            self._scope.cancel()
        with trio.CancelScope(shield=True):
            await self._send_stream.aclose()

    def notify(self, method: str, params: Any) -> None:
        """Queue a notification; never waits (see the module docstring)."""
        self._post({"jsonrpc": "2.0", "method": method, "params": params})

    async def request(self, method: str, params: Any, timeout: float) -> Any:
        """Ask the client; its result, or ``RpcError`` (its error, a timeout,
        or the connection closing)."""
        request_id = f"s{next(self._ids)}"
        event, box = trio.Event(), list[Any]()
        self._waiting[request_id] = (event, box)
        try:
            if not self.closed:
                self._post({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
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
            code = error.get("code")
            raise RpcError(
                code if type(code) is int else INTERNAL_ERROR, str(error.get("message", ""))
            )
        return answer.get("result")


def _encode(message: dict[str, Any]) -> bytes:
    """``encode``, made safe for what came from inside: a lone surrogate (a
    provider's reply may hold one) is sent as U+FFFD rather than failing the
    write, and a value that is not JSON (NaN) fails its own message alone."""
    try:
        return encode(message)
    except UnicodeEncodeError:
        return encode(_replace_surrogates(message))
    except (ValueError, TypeError, RecursionError) as exc:
        log.error("could not encode a %s: %s", message.get("method", "response"), exc)
        error = {"code": INTERNAL_ERROR, "message": f"internal error: unencodable answer: {exc}"}
        if "id" in message and "method" not in message:
            return encode({"jsonrpc": "2.0", "id": message["id"], "error": error})
        return encode({"jsonrpc": "2.0", "method": "server/error", "params": error})


def _replace_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_replace_surrogates(k): _replace_surrogates(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_replace_surrogates(v) for v in value]
    return value


def _id_refused(message: dict[str, Any]) -> Refused | None:
    try:
        check({"id": message.get("id")})
    except Refused as refused:
        return refused
    return None


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
