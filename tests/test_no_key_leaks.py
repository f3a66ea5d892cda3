"""An API key goes to its provider in one header and nowhere else.

A distinctive key sits in an environment variable that ``dovecote.toml``
names. Commands succeed, fail with a 401 whose body echoes the key back (what
a misconfigured local server or a proxy does), fail with 500s that echo it
until their retries run out, time out, and are replayed, through the engine
and through the command line (``demo``, ``replay``, ``serve --stdio``, ``show``,
``export``, ``stats``, ``dead``, ``adapters``), with every logger at DEBUG.
Then every byte that dovecote wrote or said is searched for the key: the
database with its ``-wal`` and ``-shm``, every log record, each process's
stdout and stderr, every JSON-RPC frame. The key must be nowhere; and the
fake server must have received it, or the search would prove nothing.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio

import flows
from adapters.config import build_adapters, parse_config
from editor_bridge.framing import FrameReader
from flows.engine import Backoff
from tests.conftest import DOVECOTE, PYTHON, ROOT
from tests.editor import Editor
from tests.fake_providers import Canned, Recorded, json_response, sse_bytes, stream_response
from tests.test_providers_e2e import ANTHROPIC, OLLAMA, OPENAI, Provider, Server, ok

T = TypeVar("T")
KEY = "sk-test-DO-NOT-LEAK-1234567890abcdef"
KEY_ENV = "DOVECOTE_TEST_LEAK_KEY"
# The CLI with every logger at DEBUG on stderr (``serve`` keeps an existing set-up).
DEBUG_CLI = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)\n"
    "from flows.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def received_key(request: Recorded) -> str:
    auth = request.headers.get("authorization", "")
    return auth.removeprefix("Bearer ") or request.headers.get("x-api-key", "")


def error_body(kind: str, message: str) -> dict[str, Any]:
    if kind == "openai":
        return {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    if kind == "anthropic":
        return {"type": "error", "error": {"type": "authentication_error", "message": message}}
    return {"error": message}


class Echoing:
    """The server's answers, by the directive that starts the last user message:
    ``#401`` (and the demo's "I recieve your letter") and ``#500`` echo the key the
    server received in an error body, ``#stream-error`` inside a 200 stream (OpenAI),
    ``#slow`` takes 2 s; anything else succeeds. Once ``healed``, everything succeeds
    (for replays)."""

    def __init__(self, providers: dict[str, Provider]) -> None:
        self.providers = providers  # by path prefix of the request
        self.healed = False

    def __call__(self, request: Recorded) -> Canned:
        provider = next(
            p for prefix, p in self.providers.items() if request.path.startswith(prefix)
        )
        key = received_key(request)
        text = request.body["messages"][-1]["content"]
        if self.healed:
            return ok(provider)
        if "#401" in text or "recieve" in text:
            message = f"Incorrect API key provided: {key}. You can find your API key at ..."
            return json_response(error_body(provider.kind, message), 401)
        if "#500" in text:
            message = f"upstream failed for request with credentials {key!r}"
            return json_response(error_body(provider.kind, message), 500)
        if "#stream-error" in text:
            chunk = {"error": {"message": f"key {key} was revoked", "code": 401}}
            return stream_response(sse_bytes([{"data": chunk}]), "text/event-stream")
        if "#slow" in text:
            return attrs.evolve(ok(provider), delay=2.0)
        return ok(provider)


@pytest.fixture
def echoing() -> Echoing:
    return Echoing({"/v1/chat": OPENAI, "/v1/messages": ANTHROPIC, "/api/chat": OLLAMA})


@pytest.fixture
def server(echoing: Echoing) -> Iterator[Server]:
    with Server(default=echoing) as fake:
        yield fake


def config_text(url: str) -> str:
    env = f'"{KEY_ENV}"'
    return "".join(
        provider.toml(url, name, api_key_env=env, timeout=5)
        for provider, name in ((OPENAI, "local"), (ANTHROPIC, "claude"), (OLLAMA, "llama"))
    )


def assert_nowhere(where: str, data: str | bytes) -> None:
    key = KEY.encode() if isinstance(data, bytes) else KEY
    assert key not in data, f"the API key leaked into {where}"  # type: ignore[operator]


def assert_files_clean(directory: Path) -> list[str]:
    """No file under ``directory`` holds the key; returns the names searched."""
    names = []
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            assert_nowhere(str(path), path.read_bytes())
            names.append(path.name)
    return names


def assert_server_got_the_key(server: Server) -> None:
    assert server.requests, "nothing reached the server"
    assert all(received_key(r) == KEY for r in server.requests), "the key was not sent"


def ask(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 32}


# --- through the engine ---------------------------------------------------------------------


async def test_engine_success_errors_dead_letters_and_replays_keep_the_key_secret(
    server: Server, echoing: Echoing, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    db = tmp_path / "dovecote.db"
    config = parse_config(config_text(server.url), tmp_path / "dovecote.toml")
    adapters = build_adapters(config, {KEY_ENV: KEY})
    cases = ["hello", "#401 hello", "#500 hello", "#slow hello"]
    async with flows.open_engine(
        db, adapters=adapters, backoff=Backoff(base=0.01, cap=0.05)
    ) as engine:
        submitted: list[tuple[str, str, str]] = []
        for name in ("local", "claude", "llama"):
            for text in cases:
                timeout = 0.5 if "#slow" in text else 5.0
                command_id = await engine.submit(name, ask(text), timeout=timeout)
                submitted.append((name, text, command_id))
        stream_id = await engine.submit("local", ask("#stream-error hi"), max_attempts=1)
        finished = {i: await engine.wait(i) for _, _, i in submitted}
        finished[stream_id] = await engine.wait(stream_id)
        for name, text, command_id in submitted:
            command = finished[command_id]
            expected = "dead" if text.startswith("#") else "done"
            assert command.state == expected, (name, text, command)
        errors = [c.error.message for c in finished.values() if c.error is not None]
        assert any("401" in m and "[redacted]" in m for m in errors), errors
        assert any("500" in m and "[redacted]" in m for m in errors), errors
        assert (
            "[redacted] was revoked"
            in (finished[stream_id].error or flows.CommandError("", "")).message
        )
        # While the engine runs the WAL holds the newest pages.
        assert {"dovecote.db", "dovecote.db-wal"} <= set(assert_files_clean(tmp_path))
        echoing.healed = True
        dead = [c.id for c in finished.values() if c.state == "dead"]
        replayed = [await engine.wait(i) for i in await engine.replay(dead, timeout=5)]
        assert all(c.state == "done" for c in replayed), replayed
        everything = engine.list()
        histories = [e for c in everything for e in engine.history(c.id)]
    assert_server_got_the_key(server)
    for command in everything:
        assert_nowhere(f"command {command.id}", json.dumps(command.to_json()) + repr(command))
    assert_nowhere("the journal", json.dumps([e.to_json() for e in histories]))
    assert caplog.records, "nothing was logged at DEBUG: the search proves nothing"
    for record in caplog.records:
        assert_nowhere(f"log record {record.name}", caplog.handler.format(record))
        assert_nowhere(f"log record {record.name} args", repr(record.args))
    assert_files_clean(tmp_path)


# --- through the command line ---------------------------------------------------------------


async def cli(
    *args: str, env: dict[str, str], debug: bool = True, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    command = [PYTHON, "-c", DEBUG_CLI, *args] if debug else [DOVECOTE, *args]
    result = await trio.run_process(
        command, capture_stdout=True, capture_stderr=True, env=env, cwd=ROOT, check=False
    )
    shown = f"dovecote {' '.join(args)}"
    if check:
        assert result.returncode == 0, (shown, result.stdout, result.stderr)
    assert_nowhere(f"stdout of {shown}", result.stdout)
    assert_nowhere(f"stderr of {shown}", result.stderr)
    return result


async def concurrently(*calls: Awaitable[T]) -> list[T]:
    """Await all of ``calls`` at once; their results in order."""
    results: list[Any] = [None] * len(calls)

    async def one(index: int, call: Awaitable[T]) -> None:
        results[index] = await call

    async with trio.open_nursery() as nursery:
        for index, call in enumerate(calls):
            nursery.start_soon(one, index, call)
    return results


class Recording(trio.abc.ReceiveStream):
    """A receive stream that keeps a copy of every byte it passes on."""

    def __init__(self, inner: trio.abc.ReceiveStream) -> None:
        self.inner = inner
        self.seen = bytearray()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        self.seen += data
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


async def serve_stdio(
    common: list[str], env: dict[str, str], stderr_path: Path, echoing: Echoing
) -> bytes:
    """``dovecote serve --stdio`` (DEBUG logging) driven by an editor: a success, a 401
    dead letter, its replay; returns everything the server wrote to stdout."""
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [PYTHON, "-c", DEBUG_CLI, "serve", "--stdio", "--verbose", *common],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=ROOT,
            env=env,
        )
    assert process.stdin is not None and process.stdout is not None
    recording = Recording(process.stdout)
    editor = Editor(recording, process.stdin)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(editor.run)
            hello = await editor.initialize()
            assert "local" in hello["adapters"], hello
            ids = []
            for text in ("hello", "#401 hello", "#500 hello"):
                request = {"messages": [{"role": "user", "content": text}]}
                submitted = await editor.request(
                    "command/submit", {"adapter": "local", "request": request, "maxAttempts": 2}
                )
                ids.append(submitted["commandId"])
            states = [await editor.wait_state(i) for i in ids]
            assert [s["state"] for s in states] == ["done", "dead", "dead"], states
            for command_id in ids:
                shown = await editor.request("command/show", {"commandId": command_id})
                assert shown["command"]["id"] == command_id
            letters = await editor.request("deadletter/list", {})
            assert len(letters["commands"]) == 2
            assert all("[redacted]" in c["error"]["message"] for c in letters["commands"])
            echoing.healed = True
            replayed = await editor.request("deadletter/replay", {"commandIds": ids[1:]})
            for pair in replayed["replayed"]:
                assert (await editor.wait_state(pair["to"]))["state"] == "done"
            await editor.request("shutdown")
            await editor.notify("exit", None)
            with trio.fail_after(10):
                await process.wait()
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
    # Every frame the server sent is well-formed; the key is searched in the raw bytes.
    reader = FrameReader(_Bytes(bytes(recording.seen)))
    while (frame := await reader.read()) is not None:
        assert frame.body is not None, frame.error
    return bytes(recording.seen)


class _Bytes(trio.abc.ReceiveStream):
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data, self.data = self.data, b""
        return data

    async def aclose(self) -> None:
        pass


async def test_cli_demo_replay_serve_and_every_view_keep_the_key_secret(
    server: Server, echoing: Echoing, tmp_path: Path
) -> None:
    db = tmp_path / "state" / "dovecote.db"
    db.parent.mkdir()
    config = tmp_path / "dovecote.toml"
    config.write_text(config_text(server.url))
    env = {**os.environ, KEY_ENV: KEY, "PYTHONUNBUFFERED": "1"}
    env.pop("DOVECOTE_CONFIG", None)
    common = ["--db", str(db), "--config", str(config)]

    # The demo's four calls: three answered, one 401 that echoes the key.
    demo = await cli("demo", "--adapter", "local", *common, env=env)
    assert b"Summary: 4 calls" in demo.stdout, demo.stdout
    assert b"DEBUG" in demo.stderr, "no DEBUG logging: the search would prove nothing"
    assert b"3 done, 1 still dead" in demo.stdout, demo.stdout

    dead = json.loads((await cli("dead", "--json", *common, env=env, debug=False)).stdout)
    assert [d["error"]["status"] for d in dead] == [401]
    assert "[redacted]" in dead[0]["error"]["message"], dead
    await concurrently(
        cli("show", dead[0]["id"], *common, env=env, debug=False),
        cli("show", dead[0]["id"], "--json", *common, env=env, debug=False),
    )

    echoing.healed = True
    replay = await cli("replay", "--all", "--json", *common, env=env)
    assert [r["to"]["state"] for r in json.loads(replay.stdout)] == ["done"]

    echoing.healed = False
    stderr_path = tmp_path / "serve.stderr"
    frames = await serve_stdio(common, env, stderr_path, echoing)
    assert_nowhere("the JSON-RPC frames from serve --stdio", frames)
    assert b"DEBUG" in stderr_path.read_bytes()

    unset = {k: v for k, v in env.items() if k != KEY_ENV}
    views = await concurrently(
        cli("export", *common, env=env, debug=False),
        cli("stats", "--json", *common, env=env, debug=False),
        cli("stats", *common, env=env, debug=False),
        cli("adapters", "--config", str(config), env=env, debug=False),
        cli("adapters", "--config", str(config), env=unset, debug=False),
    )
    export, stats, _, shown, missing = (v.stdout for v in views)
    lines = [json.loads(line) for line in export.splitlines()]
    assert len(lines) == 4 + 1 + 3 + 2, [(c["state"], c["reason"]) for c in lines]
    assert json.loads(stats)["usage"]["adapter"]
    # Keys are shown as set / NOT SET, never their value.
    rows = {line.split()[0]: line.split() for line in shown.decode().splitlines()[3:]}
    assert rows["local"][-2:] == [KEY_ENV, "set"], shown
    assert f"{KEY_ENV}  NOT SET" in missing.decode(), missing

    assert_server_got_the_key(server)
    searched = assert_files_clean(tmp_path)
    assert "dovecote.db" in searched, searched


async def test_a_successful_reply_that_echoes_the_key_is_stored_without_it(
    tmp_path: Path,
) -> None:
    def echo(request: Recorded) -> Canned:
        body = {**OPENAI.chat["response"]["body"], "debug": dict(request.headers)}
        return json_response(body)

    db = tmp_path / "dovecote.db"
    with Server(default=echo) as server:
        config = parse_config(config_text(server.url), tmp_path / "dovecote.toml")
        async with flows.open_engine(db, adapters=build_adapters(config, {KEY_ENV: KEY})) as engine:
            command = await engine.wait(await engine.submit("local", ask("hello")))
    assert command.state == "done"
    assert_server_got_the_key(server)
    assert_nowhere("the stored reply", json.dumps(command.to_json()))
    assert_files_clean(tmp_path)
