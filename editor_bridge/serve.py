"""Transports for the server: stdio, a Unix socket, loopback TCP.

stdio needs no token: whoever can write to the server's stdin started it.
Sockets can be reached by other local users and programs, so they need the
token that ``initialize`` must carry: generated at each start and written to
a file only the owner can read (mode 0600) next to the database. A Unix
socket is itself created mode 0600; TCP listens on loopback only unless
``--allow-remote`` says otherwise.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import secrets
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from adapters.base import Adapter
from adapters.human import HumanAdapter
from editor_bridge.framing import DEFAULT_MAX_FRAME
from editor_bridge.server import Server
from flows.engine import open_engine

log = logging.getLogger("dovecote.serve")


class ListenError(Exception):
    pass


def token_path(db: Path) -> Path:
    return db.with_name(db.name + ".token")


def write_token(path: Path) -> str:
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return token


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


async def unix_listener(path: str) -> trio.SocketListener:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    Path(path).unlink(missing_ok=True)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return trio.SocketListener(sock)


async def serve(
    db: Path,
    *,
    stdio: bool,
    listen: Sequence[str] = (),
    allow_remote: bool = False,
    adapters: Sequence[Adapter] = (),
    max_frame: int = DEFAULT_MAX_FRAME,
    ready: trio.Event | None = None,
) -> None:
    specs = [parse_listen(s, allow_remote) for s in listen]
    async with open_engine(db, adapters=[*adapters, HumanAdapter()]) as engine:
        server = Server(engine, max_frame=max_frame)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            if specs:
                server.token = write_token(token_path(db))
                listeners: list[trio.SocketListener] = []
                for kind, where, port in specs:
                    try:
                        if kind == "unix":
                            listeners.append(await unix_listener(where))
                        else:
                            listeners.extend(await trio.open_tcp_listeners(port, host=where))
                    except OSError as exc:
                        if exc.errno == errno.EADDRINUSE:
                            raise ListenError(f"{kind}:{where}:{port} is already in use") from None
                        raise
                for listener in listeners:
                    log.info("listening on %s", listener.socket.getsockname())
                    print(
                        f"dovecote: listening on {listener.socket.getsockname()}", file=sys.stderr
                    )

                async def one(stream: trio.SocketStream) -> None:
                    await server.serve(stream, stream, needs_token=True)

                for listener in listeners:
                    nursery.start_soon(trio.serve_listeners, one, [listener])
            if ready is not None:
                ready.set()
            if stdio:
                stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
                stdout = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))
                await server.serve(stdin, stdout, needs_token=False)
                nursery.cancel_scope.cancel()
