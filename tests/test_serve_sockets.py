"""Socket clients against a real ``dovecote serve --listen``: one client's
fault (a reset, answers left unread, never reading at all) ends that client
alone; the socket and token files belong to the one server that made them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from editor_bridge.framing import FrameReader, encode
from tests.conftest import DOVECOTE, ROOT, ask
from tests.editor import Editor
from tests.test_bridge_faults import read_error, start_listener, still_serving


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def token_of(db: Path) -> str:
    return db.with_name(db.name + ".token").read_text().strip()


@asynccontextmanager
async def connected(
    connect: Callable[[], Any], token: str, *, initialize: bool = True
) -> AsyncIterator[Editor]:
    stream = await connect()
    editor = Editor(stream, stream)
    async with trio.open_nursery() as nursery:
        await nursery.start(editor.run)
        if initialize:
            await editor.initialize(token)
        yield editor
        nursery.cancel_scope.cancel()
    await stream.aclose()


def request(request_id: int, method: str, params: Any) -> bytes:
    return encode({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})


def flood(token: str, n: int, text: str = "#delay 0\nx") -> bytes:
    """initialize, then ``n`` submits, as one client that will not read."""
    frames = [request(0, "initialize", {"clientInfo": {"name": "flood"}, "token": token})]
    frames += [
        request(i, "command/submit", {"adapter": "scripted", "request": ask(text)})
        for i in range(1, n + 1)
    ]
    return b"".join(frames)


def flooding(path: str, token: str, n: int, *, reads: bool) -> socket.socket:
    """A Unix socket client sending ``flood`` in a thread; reading (and
    forgetting) all it is sent, or never reading at all."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    threading.Thread(target=sock.sendall, args=(flood(token, n),), daemon=True).start()
    if reads:
        threading.Thread(target=drain, args=(sock,), daemon=True).start()
    return sock


def drain(sock: socket.socket) -> None:
    """Read and forget everything (a client that reads, in a thread)."""
    with contextlib.suppress(OSError):
        while sock.recv(1 << 16):
            pass


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


async def test_a_reset_or_a_client_gone_with_answers_unread_ends_only_that_client(
    tmp_path: Path,
) -> None:
    db, port = tmp_path / "dovecote.db", free_port()
    path = str(tmp_path / "s")
    process = await start_listener(db, f"tcp:127.0.0.1:{port}", f"unix:{path}")
    try:
        token = token_of(db)
        for _ in range(3):  # connect, and reset before sending a byte (SO_LINGER 0)
            raw = socket.create_connection(("127.0.0.1", port))
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
        for family, where in ((socket.AF_INET, ("127.0.0.1", port)), (socket.AF_UNIX, path)):
            # Ask, let the answers arrive, close without reading them (a reset).
            raw = socket.socket(family, socket.SOCK_STREAM)
            raw.connect(where)
            raw.sendall(
                request(0, "initialize", {"token": token})
                + b"".join(request(i, "command/list", {}) for i in range(1, 201))
            )
            await trio.sleep(0.3)
            raw.close()
        await trio.sleep(0.3)
        assert process.poll() is None, "the server exited"
        # Before its token, a client gets no large frame parsed; after, it does.
        padded = {"jsonrpc": "2.0", "method": "command/list", "params": {"pad": "x" * 100_000}}
        async with connected(
            lambda: trio.open_tcp_stream("127.0.0.1", port), token, initialize=False
        ) as editor:
            await editor.write({**padded, "id": 1})
            refused = await read_error(editor, -32600)  # id null: the frame was not read
            assert "65536" in refused["error"]["message"]
            await editor.initialize(token)
            assert "result" in await editor.request_message(padded)
    finally:
        stop(process)


async def test_a_client_that_never_reads_does_not_stop_the_others(tmp_path: Path) -> None:
    """4,000 commands' notices (16,000) queued for one client that never
    reads: once, they stopped every other client's notifications, then the
    engine dropped the bridge's one subscription and every human command died."""
    db, path = tmp_path / "dovecote.db", str(tmp_path / "s")
    process = await start_listener(db, f"unix:{path}")
    try:
        token = token_of(db)
        silent = flooding(path, token, 4000, reads=False)
        async with connected(lambda: trio.open_unix_socket(path), token) as editor:
            await all_done(db, 4000)
            submitted = await editor.request(
                "command/submit", {"adapter": "scripted", "request": ask("#delay 0\nteh")}
            )
            assert (await editor.wait_state(submitted["commandId"], timeout=15))["state"] == "done"
            editor.answer_human = lambda params: "a person's answer"
            human = await editor.request(
                "command/submit", {"adapter": "human", "request": ask("your view?")}
            )
            finished = await editor.wait_state(human["commandId"], timeout=15)
            assert finished["state"] == "done", finished
        silent.close()
        assert process.poll() is None
    finally:
        stop(process)


async def all_done(db: Path, count: int) -> None:
    with trio.fail_after(60):
        while True:
            with sqlite3.connect(db) as conn:
                done = conn.execute("SELECT count(*) FROM commands WHERE state = 'done'")
                if done.fetchone()[0] >= count:
                    return
            await trio.sleep(0.2)


async def test_a_client_past_its_byte_bound_is_told_and_disconnected(tmp_path: Path) -> None:
    db, path = tmp_path / "dovecote.db", str(tmp_path / "s")
    process = subprocess.Popen(
        [DOVECOTE, "serve", "--db", str(db), "--listen", f"unix:{path}", "--max-outbox", "65536"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    lines: list[bytes] = []
    reading = threading.Thread(target=lambda: lines.extend(process.stderr or ()), daemon=True)
    reading.start()
    try:
        with trio.fail_after(20):
            while not any(b"listening" in line for line in lines):
                await trio.sleep(0.05)
        token = token_of(db)
        async with connected(lambda: trio.open_unix_socket(path), token) as other:
            silent = await trio.open_unix_socket(path)

            async def send_unread() -> None:
                with contextlib.suppress(trio.BrokenResourceError):  # it is cut off
                    await silent.send_all(flood(token, 2000))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_unread)
                with trio.fail_after(30):
                    while not any(b"fell" in line for line in lines):
                        await trio.sleep(0.05)
                # It reads now, late: what was written, then why, then the end.
                messages = []
                reader = FrameReader(silent)
                with trio.fail_after(20):
                    while (frame := await reader.read()) is not None:
                        assert frame.body is not None
                        messages.append(frame.body)
                nursery.cancel_scope.cancel()
            told = messages[-1]
            assert b'"server/error"' in told and b"-32009" in told and b"fell behind" in told
            # The others are untouched, and every command it got in goes on.
            submitted = await other.request(
                "command/submit", {"adapter": "scripted", "request": ask("#delay 0\nteh")}
            )
            assert (await other.wait_state(submitted["commandId"]))["state"] == "done"
            with trio.fail_after(30):
                while True:
                    listed = (await other.request("command/list", {}))["commands"]
                    if all(c["state"] == "done" for c in listed):
                        break
                    await trio.sleep(0.1)
            assert len(listed) > 1
        assert process.poll() is None
    finally:
        stop(process)


async def test_unread_large_answers_stay_bounded_in_memory(tmp_path: Path) -> None:
    """300 unread command/list answers on a 2,000-command file: once some
    200 MB queued; now the reading stops at a quarter of the byte bound (16 MiB)."""
    db, path = tmp_path / "dovecote.db", str(tmp_path / "s")
    process = await start_listener(db, f"unix:{path}")
    try:
        token = token_of(db)
        loader = flooding(path, token, 2000, reads=True)
        await all_done(db, 2000)
        before = rss(process.pid)
        greedy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        greedy.connect(path)
        greedy.sendall(
            request(0, "initialize", {"token": token})
            + b"".join(request(i, "command/list", {}) for i in range(1, 301))
        )
        # Until it grows past the bound, or stops working (it has stopped
        # reading): however fast or slow this machine builds answers.
        peak, busy = before, cpu_seconds(process.pid)
        with trio.fail_after(120):
            while peak - before < 80 * 2**20:
                await trio.sleep(0.5)
                peak = max(peak, rss(process.pid))
                busy, was = cpu_seconds(process.pid), busy
                if busy - was < 0.05:
                    break
        # (16 MiB queued, the kernel's buffer, and what building answers costs:
        # some 40 MB in all.)
        assert peak - before < 80 * 2**20, f"{(peak - before) / 2**20:.0f} MB more"
        async with connected(lambda: trio.open_unix_socket(path), token) as editor:
            await still_serving(editor)
        greedy.close()
        loader.close()
    finally:
        stop(process)


def serve_and_fail(db: Path, *listen: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DOVECOTE, "serve", "--db", str(db), *(a for spec in listen for a in ("--listen", spec))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_unix_socket_and_token_files_belong_to_the_server_that_made_them(
    tmp_path: Path,
) -> None:
    db, port = tmp_path / "dovecote.db", free_port()
    path, token_file = tmp_path / "s", tmp_path / "dovecote.db.token"
    # A regular file where the socket would go is not the server's to delete.
    path.write_text("precious")
    refused = serve_and_fail(db, f"unix:{path}")
    assert refused.returncode == 2 and "not a socket" in refused.stderr, refused.stderr
    assert path.read_text() == "precious"
    path.unlink()
    # A stale socket (its server killed with -9) is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    first = await start_listener(db, f"unix:{path}", f"tcp:127.0.0.1:{port}")
    try:
        token = token_of(db)
        # A live server's socket is refused, to a server of any database.
        refused = serve_and_fail(tmp_path / "other.db", f"unix:{path}")
        assert refused.returncode == 2 and "held by a live server" in refused.stderr
        # A second listening server on the same database does not take the token.
        refused = serve_and_fail(db, f"unix:{tmp_path / 't'}")
        assert refused.returncode == 2 and "another dovecote server" in refused.stderr
        assert not (tmp_path / "t").exists()
        assert token_file.read_text().strip() == token
        for connect in (
            lambda: trio.open_tcp_stream("127.0.0.1", port),
            lambda: trio.open_unix_socket(str(path)),
        ):
            async with connected(connect, token) as editor:
                await still_serving(editor)
        # On exit the server removes what it made, and only that.
        os.kill(first.pid, signal.SIGTERM)
        assert first.wait(timeout=20) == 0
        assert not path.exists() and not token_file.exists()
        second = await start_listener(db, f"unix:{path}")
        path.unlink()
        path.write_text("someone else's")
        os.kill(second.pid, signal.SIGTERM)
        assert second.wait(timeout=20) == 0
        assert path.read_text() == "someone else's"
    finally:
        stop(first)
