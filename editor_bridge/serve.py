"""Transports for the server: stdio, a Unix socket, loopback TCP.

stdio needs no token: whoever can write to the server's stdin started it.
Sockets can be reached by other local users and programs, so they need the
token that ``initialize`` must carry: generated at each start and written to
a file only the owner can read (mode 0600) next to the database,
``DB.token``. A Unix socket is itself created mode 0600; TCP listens on
loopback only unless ``--allow-remote`` says otherwise.

One token file, one listening server: the server that writes ``DB.token``
holds a lock on it for as long as it runs (``flock``, released by the kernel
however the process ends), and removes it on a clean exit. A second server
started with ``--listen`` on the same database finds the lock held and
refuses to start, saying so, instead of overwriting the token the first
server's clients use (stdio servers need no token and are not affected). So
a client always finds the token of the one server listening in ``DB.token``.

``--listen unix:PATH`` never removes a file it did not create: an existing
socket that a live server answers on is refused, a stale one (nobody
listens: a server killed with -9) is replaced, anything else (a regular
file, a directory) is refused. On exit the server removes the socket only if
the path still is the one it created.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import ipaddress
import logging
import os
import secrets
import signal
import socket
import stat
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import trio

from adapters.base import Adapter
from adapters.human import HumanAdapter
from editor_bridge.finals import IDLE
from editor_bridge.framing import DEFAULT_MAX_FRAME
from editor_bridge.rpc import DEFAULT_MAX_OUTBOX
from editor_bridge.server import Server
from flows.engine import open_engine, user_data_dir
from flows.location import is_postgres_url, shown

log = logging.getLogger("dovecote.serve")


class ListenError(Exception):
    pass


def token_path(db: str | os.PathLike[str]) -> Path:
    """Where a listening server keeps its token: beside a database file;
    for a ``postgresql://`` database, in the user data directory, under a
    name drawn from the URL without its password (one server per database
    on this host, as for a file)."""
    if is_postgres_url(db):
        digest = hashlib.sha256(shown(db).encode()).hexdigest()[:16]
        return user_data_dir() / f"postgresql-{digest}.token"
    db = Path(db)
    return db.with_name(db.name + ".token")


@contextmanager
def held_token(path: Path) -> Iterator[str]:
    """A fresh token in ``path``, locked for as long as the server runs, and
    removed after; ``ListenError`` if another live server holds the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:  # a symlink, a directory, no permission
            raise ListenError(f"cannot write the token file {path}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ListenError(
                f"another dovecote server is listening for this database (it holds {path}); "
                "stop it, or use --stdio (no token) or another database"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as we opened it: again
    try:
        token = secrets.token_urlsafe(32)
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        os.write(fd, (token + "\n").encode())
        yield token
    finally:
        path.unlink(missing_ok=True)  # still ours: we hold the lock
        os.close(fd)


def parse_listen(spec: str, allow_remote: bool) -> tuple[str, str, int]:
    """``unix:PATH`` or ``tcp:HOST:PORT`` -> (kind, host or path, port)."""
    kind, _, rest = spec.partition(":")
    if kind == "unix" and rest:
        return "unix", rest, 0
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise ListenError(f"--listen {spec}: expected tcp:HOST:PORT, e.g. tcp:127.0.0.1:7717")
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback and not allow_remote:
            raise ListenError(
                f"--listen {spec}: {host} is not a loopback address; "
                "add --allow-remote to listen beyond this machine"
            )
        return "tcp", host, int(port)
    raise ListenError(f"--listen {spec}: expected unix:PATH or tcp:HOST:PORT")


async def _clear_stale_socket(path: str) -> None:
    """Remove ``path`` if it is a socket nobody listens on; refuse anything
    else that is there."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ListenError(f"unix:{path} exists and is not a socket: not replacing it")
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: its server is gone
        return
    except OSError as exc:
        raise ListenError(f"unix:{path}: cannot tell whether a server holds it: {exc}") from None
    finally:
        probe.close()
    raise ListenError(f"unix:{path} is held by a live server")


@contextmanager
def _removed_after(path: str) -> Iterator[None]:
    """On exit, remove the socket at ``path`` only if it is still the one
    created here (not one another server put there since)."""
    created = os.lstat(path)
    try:
        yield
    finally:
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if (now.st_dev, now.st_ino) == (created.st_dev, created.st_ino):
                os.unlink(path)


async def unix_listener(path: str, cleanup: ExitStack) -> trio.SocketListener:
    await _clear_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    cleanup.enter_context(_removed_after(path))
    os.chmod(path, 0o600)
    sock.listen(128)
    return trio.SocketListener(sock)


async def _until_signalled(
    cancel_scope: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """SIGTERM and SIGINT end the server as end of input does: cleanly, so
    that the socket and token files it made are removed."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for _ in signals:
            cancel_scope.cancel()
            return


async def serve(
    db: str | os.PathLike[str],
    *,
    stdio: bool,
    listen: Sequence[str] = (),
    allow_remote: bool = False,
    adapters: Sequence[Adapter] = (),
    max_frame: int = DEFAULT_MAX_FRAME,
    max_outbox: int = DEFAULT_MAX_OUTBOX,
    ready: trio.Event | None = None,
    final_idle: float = IDLE,
) -> None:
    specs = [parse_listen(s, allow_remote) for s in listen]
    with ExitStack() as cleanup:
        # Before the engine starts: a second server, a held path stop here.
        token = cleanup.enter_context(held_token(token_path(db))) if specs else None
        listeners = [one for spec in specs for one in await _listen(spec, cleanup)]
        async with open_engine(db, adapters=[*adapters, HumanAdapter()]) as engine:
            server = Server(
                engine,
                token=token,
                max_frame=max_frame,
                max_outbox=max_outbox,
                final_idle=final_idle,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(server.run)
                await nursery.start(_until_signalled, nursery.cancel_scope)

                async def one(stream: trio.SocketStream) -> None:
                    await server.serve(stream, stream, needs_token=True)

                for listener in listeners:
                    nursery.start_soon(trio.serve_listeners, one, [listener])
                    # Said once all is set up, SIGTERM's handling included.
                    log.info("listening on %s", listener.socket.getsockname())
                    print(
                        f"dovecote: listening on {listener.socket.getsockname()}", file=sys.stderr
                    )
                if ready is not None:
                    ready.set()
                if stdio:
                    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
                    stdout = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))
                    await server.serve(stdin, stdout, needs_token=False)
                    nursery.cancel_scope.cancel()


async def _listen(spec: tuple[str, str, int], cleanup: ExitStack) -> list[trio.SocketListener]:
    kind, where, port = spec
    try:
        if kind == "unix":
            listeners = [await unix_listener(where, cleanup)]
        else:
            listeners = await trio.open_tcp_listeners(port, host=where)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(f"{kind}:{where}:{port} is already in use") from None
        raise
    for listener in listeners:
        cleanup.callback(listener.socket.close)
    return listeners
