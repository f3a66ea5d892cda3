"""A user with an OpenAI-compatible server (or Ollama) writes a five-line
``dovecote.toml`` and sees real calls flow through ``dovecote demo --adapter NAME``;
``dovecote stats --json`` then adds up the tokens and the cost the server reported.

The servers are ``tests.fake_providers`` servers on 127.0.0.1 that answer every
request in their provider's streaming format (SSE for OpenAI, NDJSON for
Ollama, since a config streams unless it says otherwise), correcting the
spelling of what they were sent and reporting a usage that depends on the
request, which they note down so the test can add it up independently.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from flows.demo import SCRIPTED_BATCH
from tests.conftest import DOVECOTE, ROOT
from tests.fake_providers import Canned, Recorded, ndjson_bytes, sse_bytes, stream_response
from tests.test_providers_e2e import Server

# What the demo sends to a real model: the last line of its first four scripted calls.
DEMO_TEXTS = [call.text.split("\n")[-1] for call in SCRIPTED_BATCH[:4]]
FIXES = {
    "teh": "the",
    "recieve": "receive",
    "beleive": "believe",
    "tommorow": "tomorrow",
    "libary.": "library.",
}
PRICES = {"local": (0.15, 0.60), "llama": (0.05, 0.25)}


def fix(word: str) -> str:
    fixed = FIXES.get(word.lower(), word)
    return fixed.capitalize() if word[:1].isupper() else fixed


class Model:
    """Answers each request with its text corrected, streamed word by word, and a
    usage of (words sent + 11, words answered + 3); notes what it reported."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.reported: list[tuple[str, int, int]] = []  # (prompt, input, output)
        self._lock = threading.Lock()

    def __call__(self, request: Recorded) -> Canned:
        prompt = request.body["messages"][-1]["content"]
        words = [fix(w) for w in prompt.split(" ")]
        usage = (len(prompt.split()) + 11, len(words) + 3)
        with self._lock:
            self.reported.append((prompt, *usage))
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        if self.kind == "openai":
            events: list[dict[str, Any]] = [
                {"data": {"choices": [{"index": 0, "delta": {"content": p}}]}} for p in pieces
            ]
            events.append(
                {
                    "data": {
                        "choices": [],
                        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]},
                    }
                }
            )
            events.append({"data": "[DONE]"})
            return stream_response(sse_bytes(events), "text/event-stream")
        lines: list[Any] = [{"message": {"role": "assistant", "content": p}} for p in pieces]
        lines.append(
            {
                "message": {"role": "assistant", "content": ""},
                "done": True,
                "prompt_eval_count": usage[0],
                "eval_count": usage[1],
            }
        )
        return stream_response(ndjson_bytes(lines), "application/x-ndjson")


@pytest.fixture
def openai_model() -> Iterator[tuple[Server, Model]]:
    model = Model("openai")
    with Server(default=model) as server:
        yield server, model


@pytest.fixture
def ollama_model() -> Iterator[tuple[Server, Model]]:
    model = Model("ollama")
    with Server(default=model) as server:
        yield server, model


def five_lines(name: str, kind: str, base_url: str, model: str) -> str:
    price_in, price_out = PRICES[name]
    text = (
        f"[adapters.{name}]\n"
        f'kind = "{kind}"\n'
        f'base_url = "{base_url}"\n'
        f'model = "{model}"\n'
        f"price_per_mtok = {{ input = {price_in}, output = {price_out} }}\n"
    )
    assert len(text.splitlines()) == 5
    return text


async def dovecote(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOVECOTE_")}
    return await trio.run_process(
        [DOVECOTE, *args], capture_stdout=True, capture_stderr=True, env=env, cwd=ROOT, check=False
    )


async def run_demo(name: str, config: Path, db: Path) -> str:
    result = await dovecote("demo", "--adapter", name, "--config", str(config), "--db", str(db))
    out = result.stdout.decode()
    assert result.returncode == 0, (out, result.stderr.decode())
    assert f"adapter '{name}'" in out, out
    assert "Summary: 4 calls, 0 replays, 4 done, 0 still dead (none), 4 sends" in out, out
    return out


def assert_served_the_demo(server: Server, model: Model, path: str) -> None:
    assert [r.path for r in server.requests] == [path] * 4
    assert sorted(r.body["messages"][-1]["content"] for r in server.requests) == sorted(DEMO_TEXTS)
    assert all(r.body["stream"] is True for r in server.requests)
    assert sorted(p for p, _, _ in model.reported) == sorted(DEMO_TEXTS)


async def test_demo_against_an_openai_compatible_server_then_stats_add_up(
    openai_model: tuple[Server, Model], ollama_model: tuple[Server, Model], tmp_path: Path
) -> None:
    db = tmp_path / "dovecote.db"
    openai_server, openai = openai_model
    ollama_server, ollama = ollama_model

    local = tmp_path / "dovecote.toml"
    local.write_text(five_lines("local", "openai", openai_server.url + "/v1", "qwen2.5-0.5b"))
    out = await run_demo("local", local, db)
    assert_served_the_demo(openai_server, openai, "/v1/chat/completions")
    assert "The quick brown fox jumps over the lazy dog." in out
    assert all(r.body["model"] == "qwen2.5-0.5b" for r in openai_server.requests)

    llama = tmp_path / "ollama.toml"
    llama.write_text(five_lines("llama", "ollama", ollama_server.url, "llama3.2"))
    out = await run_demo("llama", llama, db)
    assert_served_the_demo(ollama_server, ollama, "/api/chat")
    assert "We will meet tomorrow at the library." in out

    runs: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def look(what: str, *args: str) -> None:
        runs[what] = await dovecote(what, *args, "--db", str(db))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(look, "stats", "--json")
        nursery.start_soon(look, "export")
    stats_run, export_run = runs["stats"], runs["export"]
    assert stats_run.returncode == 0 and export_run.returncode == 0, stats_run.stderr
    usage = json.loads(stats_run.stdout)["usage"]
    exported = [json.loads(line) for line in export_run.stdout.splitlines()]
    assert len(exported) == 8 and all(c["state"] == "done" for c in exported)

    expected = {}
    costs = {}
    for name, model in (("local", openai), ("llama", ollama)):
        price_in, price_out = PRICES[name]
        tokens_in = sum(i for _, i, _ in model.reported)
        tokens_out = sum(o for _, _, o in model.reported)
        costs[name] = (tokens_in * price_in + tokens_out * price_out) / 1e6
        expected[name] = {
            "key": name,
            "calls": 4,
            "done": 4,
            "dead": 0,
            "input_tokens": tokens_in,
            "output_tokens": tokens_out,
            "cost": pytest.approx(costs[name], rel=1e-9),
        }
    assert usage["adapter"] == [expected["llama"], expected["local"]]

    def total(key: Any) -> dict[str, Any]:
        rows = list(expected.values())
        return {
            "key": key,
            "calls": 8,
            "done": 8,
            "dead": 0,
            "input_tokens": sum(r["input_tokens"] for r in rows),
            "output_tokens": sum(r["output_tokens"] for r in rows),
            "cost": pytest.approx(sum(costs.values()), rel=1e-9),
        }

    assert usage["flow"] == [total(None)]
    days = {
        datetime.datetime.fromtimestamp(c["created_at"], datetime.UTC).date().isoformat()
        for c in exported
    }
    if len(days) == 1:
        assert usage["day"] == [total(days.pop())]
    else:  # the run crossed midnight UTC
        assert sorted(r["key"] for r in usage["day"]) == sorted(days)
        assert sum(r["calls"] for r in usage["day"]) == 8

    # Each command carries the usage and the cost the server reported for its prompt.
    reported = {
        (name, p): (i, o)
        for name, model in (("local", openai), ("llama", ollama))
        for p, i, o in model.reported
    }
    for command in exported:
        prompt = command["request"]["messages"][-1]["content"]
        price_in, price_out = PRICES[command["adapter"]]
        tokens_in, tokens_out = reported[command["adapter"], prompt]
        assert command["reply"]["usage"] == {"input_tokens": tokens_in, "output_tokens": tokens_out}
        assert command["cost"] == pytest.approx(
            (tokens_in * price_in + tokens_out * price_out) / 1e6, rel=1e-12
        )
