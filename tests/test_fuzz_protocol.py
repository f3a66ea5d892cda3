"""A protocol fuzzer against ONE real ``dovecote serve`` kept for the run.

Frames are built from the grammar (every method, params of every wrong
type, extreme numbers, deep nesting, lone surrogates, bad headers) and sent
over stdio; the same frames, their raw bytes mutated, go over fresh Unix
socket connections. After every example the server must: answer a probe on
the connection the example used (stdio), deliver a ``command/state`` to a
second connection that submits a ``#delay 0`` command, keep its database
sound (``PRAGMA integrity_check``), and keep each command's state equal to
the ``to`` state of its last journal event.

In ``make test`` each test runs a bounded number of examples, replaying the
committed corpus (``tests/fuzz-corpus``, read-only there). ``make fuzz
FUZZ_SECONDS=600`` (``HYPOTHESIS_PROFILE=fuzz``) runs batch after batch until
the time is up, and saves to that corpus what fails, so that every later run
tries it first.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase, ReadOnlyDatabase

from tests.conftest import DOVECOTE, ROOT

FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "0"))
CORPUS = Path(__file__).with_name("fuzz-corpus")
EXAMPLES = 150 if FUZZ_SECONDS == 0 else settings.default.max_examples
"""Per batch: what ``make test`` runs once; ``make fuzz`` (the ``fuzz``
settings profile) runs batches again and again."""

# --- a client that reads in a thread ----------------------------------------


class Peer:
    """One connection: writes frames, and a thread reads what comes back."""

    def __init__(self, write: Callable[[bytes], Any], read: Callable[[], bytes]) -> None:
        self.write = write
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.ids = itertools.count()
        threading.Thread(target=self._read, args=(read,), daemon=True).start()

    def _read(self, read: Callable[[], bytes]) -> None:
        buffer = b""
        try:
            while chunk := read():
                buffer += chunk
                while (end := buffer.find(b"\r\n\r\n")) >= 0:
                    length = int(buffer[:end].split(b":")[1])
                    if len(buffer) < end + 4 + length:
                        break
                    body = buffer[end + 4 : end + 4 + length]
                    buffer = buffer[end + 4 + length :]
                    # Strict JSON: a bare NaN from the server is a failure.
                    self.messages.put(json.loads(body, parse_constant=_not_json))
        except OSError:
            pass
        self.messages.put(None)

    def send(self, message: dict[str, Any]) -> None:
        body = json.dumps(message).encode()
        self.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def call(self, method: str, params: Any, timeout: float = 20) -> dict[str, Any]:
        """The answer to one request (notifications and answers to other
        requests meanwhile are passed over, server requests left unanswered)."""
        request_id = f"probe-{next(self.ids)}"
        self.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        return self.until(lambda m: m.get("id") == request_id and "method" not in m, timeout)

    def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            message = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            assert message is not None, "the server closed the connection"
            if predicate(message):
                return message


def _not_json(name: str) -> Any:
    raise AssertionError(f"the server sent {name}, which is not JSON")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    where = tmp_path_factory.mktemp("fuzz")
    db, path = where / "fuzz.db", str(where / "fuzz.sock")
    process = subprocess.Popen(
        [DOVECOTE, "serve", "--stdio", "--listen", f"unix:{path}", "--db", str(db)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdin is not None and process.stdout is not None
    stdin, stdout = process.stdin, process.stdout

    def write(data: bytes) -> None:
        stdin.write(data)
        stdin.flush()

    stdio = Peer(write, lambda: stdout.read1(65536))
    assert "result" in stdio.call("initialize", {"clientInfo": {"name": "fuzz"}}, 30)
    token = db.with_name(db.name + ".token").read_text().strip()
    observer = connect(path)
    assert "result" in observer.call("initialize", {"token": token})
    yield {
        "process": process,
        "db": db,
        "path": path,
        "token": token,
        "stdio": stdio,
        "observer": observer,
    }
    process.kill()
    process.wait()


def connect(path: str) -> Peer:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return Peer(sock.sendall, lambda: sock.recv(65536))


def sound(server: dict[str, Any]) -> None:
    """What must hold after every example."""
    assert server["process"].poll() is None, "the server exited"
    observer: Peer = server["observer"]
    answer = observer.call(
        "command/submit",
        {
            "adapter": "scripted",
            "request": {"messages": [{"role": "user", "content": "#delay 0\nok"}]},
        },
    )
    assert "result" in answer, answer
    command_id = answer["result"]["commandId"]
    observer.until(
        lambda m: (
            m.get("method") == "command/state"
            and m["params"]["commandId"] == command_id
            and m["params"]["state"] == "done"
        ),
        20,
    )
    with sqlite3.connect(f"file:{server['db']}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        drifted = conn.execute(
            """SELECT c.id, c.state, (SELECT e.to_state FROM events e
                   WHERE e.command_id = c.id ORDER BY e.id DESC LIMIT 1) AS last
               FROM commands c WHERE last IS NULL OR last != c.state"""
        ).fetchall()
    assert drifted == [], drifted


# --- the grammar --------------------------------------------------------------

HUGE, DEEP = "@@huge@@", "@@deep@@"
"""Stand-ins spliced into the JSON text once it is written: a 5,000-digit
integer (``json.dumps`` cannot write one) and 100,000 levels of nesting."""

METHODS = [
    "initialize", "shutdown", "document/open", "document/change", "document/close",
    "command/submit", "command/cancel", "command/reply", "command/list", "command/show",
    "command/watch", "deadletter/list", "deadletter/replay", "conflict/resolve",
    "flow/start", "flow/list", "flow/show", "flow/cancel", "flow/watch",
]  # fmt: skip
STATES = ["pending", "sent", "replied", "done", "dead", "cancelled", "sleeping"]

integers = st.one_of(
    st.integers(-5, 20),
    st.sampled_from([2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 2**70, 10**30]),
    st.just(HUGE),
)
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e999, -0.0, 1e-320])
texts = st.text(
    st.characters(categories=["Cs", "Lu", "Ll", "Nd", "Zs", "Cc", "So", "Mn"]), max_size=12
) | st.sampled_from(["", "#delay 0\nx", "\u2028", "\x00", "Content-Length: 3"])
scalars = st.none() | st.booleans() | integers | floats | texts | st.just(DEEP)
wild = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
big_text = st.integers(1, 3).map(lambda n: "x" * (n * 600_000))  # decoded off the loop


def either(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(plausible, plausible, wild)


uri = either(st.sampled_from(["file:///fuzz/a", "file:///fuzz/b"]))
ask = st.builds(
    lambda t: {"messages": [{"role": "user", "content": "#delay 0\n" + t}]}, texts
) | st.fixed_dictionaries({"messages": wild})
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "uri": uri,
    "version": either(st.integers(0, 6)),
    "text": either(texts | big_text),
    "start": either(st.integers(0, 8)),
    "end": either(st.integers(0, 8)),
    "changes": either(
        st.lists(
            st.fixed_dictionaries(
                {
                    "start": either(st.integers(0, 8)),
                    "end": either(st.integers(0, 8)),
                    "text": either(texts),
                }
            ),
            max_size=3,
        )
    ),
    "adapter": either(st.sampled_from(["scripted", "nope"])),
    "request": either(ask),
    "target": either(
        st.fixed_dictionaries({"uri": uri, "start": st.integers(0, 4), "end": st.integers(0, 8)})
    ),
    "timeout": either(st.sampled_from([0.5, 5.0])),
    "maxAttempts": either(st.integers(1, 3)),
    "onConflict": either(st.sampled_from(["drop", "ask", "markers", "theirs"])),
    "commandId": either(texts),
    "commandIds": either(st.lists(texts, max_size=2)),
    "reply": either(st.fixed_dictionaries({"text": either(texts)})),
    "states": either(st.lists(st.sampled_from(STATES), max_size=2)),
    "limit": either(st.integers(1, 5)),
    "flowId": either(texts),
    "flowIds": either(st.lists(texts, max_size=2)),
    "flow": either(st.sampled_from(["nope", "fix"])),
    "params": wild,
    "choice": either(st.sampled_from(["ours", "theirs", "text"])),
    "index": either(st.integers(0, 2)),
    "reason": either(texts),
    "useLateReply": either(st.booleans()),
    "clientInfo": either(st.fixed_dictionaries({"name": texts})),
    "token": wild,
}
params = st.one_of(
    st.dictionaries(st.sampled_from(sorted(FIELDS)), st.none(), max_size=6).flatmap(
        lambda keys: st.fixed_dictionaries({k: FIELDS[k] for k in keys})
    ),
    wild,
    st.none(),
)


@st.composite
def message(draw: st.DrawFn, methods: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        out["jsonrpc"] = "2.0"
    else:
        out["jsonrpc"] = draw(wild)
    out["method"] = draw(st.sampled_from(methods) | st.sampled_from(["nope/nope", ""]) | wild)
    if out["method"] == "exit" and "exit" not in methods:
        out["method"] = "nope/exit"
    shown = draw(params)
    if shown is not None or draw(st.booleans()):
        out["params"] = shown
    kind = draw(st.integers(0, 3))
    if kind:  # a request (1, 2: a good id; 3: any id), else a notification
        out["id"] = draw(st.integers(0, 10**6) | texts) if kind < 3 else draw(wild)
    if not draw(st.integers(0, 15)):
        out["result"] = draw(wild)  # looks like an answer, too
    return out


def written(value: Any) -> bytes:
    """JSON text as a client might write it: lone surrogates as escapes,
    NaN as NaN, the stand-ins spliced in."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=True)
    text = text.replace(json.dumps(HUGE), "9" * 5000)
    text = text.replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000)
    return text.encode()


def framed(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


BAD_HEADERS = [
    b"Content-Length: +2", b"Content-Length: 1_0", b"Content-Length:  12 x",
    b"Content-Length: -1", b"Content-Length: zero", b"Content-Length: " + b"9" * 30,
    b"X-Nothing: here", b"no colon at all", b"Content-Length: 1\r\nContent-Length: 2",
    b"Content-Type: application/json",
]  # fmt: skip


@st.composite
def frames(draw: st.DrawFn, methods: list[str]) -> bytes:
    """A few frames, each well delimited: a message, a body that is not JSON
    (UTF-16, stray bytes, deep brackets), or a bad header with no body."""
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.integers(0, 9))
        if kind <= 5:
            out += framed(written(draw(message(methods))))
        elif kind == 6:
            out += framed(draw(st.binary(max_size=40)))
        elif kind == 7:
            shown = json.dumps(draw(message(methods)), ensure_ascii=False, allow_nan=True)
            out += framed(
                shown.encode(draw(st.sampled_from(["utf-16", "utf-32", "latin-1"])), "replace")
            )
        elif kind == 8:
            out += draw(st.sampled_from(BAD_HEADERS)) + b"\r\n\r\n"
        else:
            depth = draw(st.sampled_from([63, 64, 65, 1000, 100_000]))
            out += framed(b"[" * depth + b"]" * depth)
    return out


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bool, bytes]:
    """Frames whose bytes are then flipped, cut, repeated and spliced; and
    whether the connection is first initialized with the token."""
    data = bytearray(draw(frames([*METHODS, "exit"])))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        how = draw(st.integers(0, 4))
        if how == 0 and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == 1:
            del data[at : at + draw(st.integers(1, 16))]
        elif how == 2:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif how == 3:
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
        else:
            data[at:at] = draw(st.sampled_from([b"\r\n\r\n", b"Content-Length: ", b"\\ud800"]))
    return draw(st.booleans()), bytes(data)


# --- the tests ----------------------------------------------------------------


def fuzz(test: Callable[[Any], None], strategy: st.SearchStrategy[Any]) -> None:
    """Run ``test`` on examples of ``strategy``: one batch in ``make test``,
    batch after batch until FUZZ_SECONDS are up in ``make fuzz``."""
    corpus = DirectoryBasedExampleDatabase(CORPUS)
    run = settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=corpus if FUZZ_SECONDS else ReadOnlyDatabase(corpus),
        suppress_health_check=list(HealthCheck),
    )(given(strategy)(test))
    stop = time.monotonic() + FUZZ_SECONDS
    while True:
        run()
        if time.monotonic() >= stop:
            return


def test_fuzz_over_stdio(server: dict[str, Any]) -> None:
    """Grammar frames, each well delimited, on the one stdio connection
    (``exit`` left out: it would end the server, as it should)."""
    stdio: Peer = server["stdio"]

    def example(data: bytes) -> None:
        stdio.write(data)
        assert "result" in stdio.call("command/list", {"limit": 1}), "no answer to the probe"
        sound(server)

    fuzz(example, frames(METHODS))


def test_fuzz_raw_bytes_over_a_unix_socket(server: dict[str, Any]) -> None:
    """Mutated bytes, each example on a connection of its own (some of them
    initialized with the token first), which the example may well end."""

    def example(case: tuple[bool, bytes]) -> None:
        authorized, data = case
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(server["path"])
        try:
            if authorized:
                body = json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": 0,
                        "method": "initialize",
                        "params": {"token": server["token"]},
                    }
                ).encode()
                sock.sendall(framed(body))
            sock.sendall(data)
        except OSError:
            pass  # the server may close it early: that is allowed
        finally:
            sock.close()
        sound(server)

    fuzz(example, mutated())
