"""``dovecote eval``: a real CLI subprocess against the scripted adapter and a
local OpenAI-shaped server on 127.0.0.1; killed with SIGKILL half way, it
resumes its flows without calling again what had replied."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from flows.evaluate import DatasetError, load_dataset, percentile
from tests.conftest import DOVECOTE
from tests.fake_providers import Canned, Recorded, json_response
from tests.test_cli import Workspace, clean_env
from tests.test_providers_e2e import Server

PRICE_IN, PRICE_OUT = 0.15, 0.60  # $ per million tokens
TOKENS_IN, TOKENS_OUT = 10, 2
KEY = "sk-eval-test-0123456789"
COST = (TOKENS_IN * PRICE_IN + TOKENS_OUT * PRICE_OUT) / 1e6


def answer(text: str) -> Canned:
    return json_response(
        {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": TOKENS_IN, "completion_tokens": TOKENS_OUT},
        }
    )


def prompt_of(request: Recorded) -> str:
    return str(request.body["messages"][-1]["content"])


def config(ws: Workspace, url: str) -> Path:
    path = ws.root / "dovecote.toml"
    path.write_text(
        f'[adapters.p]\nkind = "openai"\nbase_url = "{url}/v1"\nmodel = "m"\n'
        f'api_key_env = "EVAL_TEST_KEY"\nprice_per_mtok = {{ input = {PRICE_IN}, '
        f"output = {PRICE_OUT} }}\n"
    )
    return path


def dataset(ws: Workspace, *items: dict[str, Any]) -> Path:
    path = ws.root / "set.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


def test_two_adapters_a_table_each_with_the_figures(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    flaky: set[str] = set()

    def provider(request: Recorded) -> Canned:
        text = prompt_of(request)
        if "#fail 400" in text:
            return json_response({"error": {"message": "no"}}, status=400)
        if "#fail-times" in text and text not in flaky:
            flaky.add(text)
            return json_response({"error": {"message": "busy"}}, 503, {"Retry-After": "0"})
        return answer({"#reply\n4": "4", "#reply\nfive": "5"}.get(text, "ok"))

    data = dataset(
        ws,
        {"prompt": "#reply\n4", "expected": "4"},
        {"prompt": "#reply\nfive", "expected": "5"},
        {"prompt": "#delay 0.3\n#fail-times 1\n#reply\nok", "expected": "ok"},
        {"prompt": "#fail 400\nbad", "expected": "x"},
    )
    with Server(default=provider) as server:
        cfg = config(ws, server.url)
        args = ("eval", data, "--adapter", "scripted", "--adapter", "p", "--check", "exact")
        report = ws.json(*args, "--config", cfg, EVAL_TEST_KEY=KEY)
        table = ws.ok(*args, "--config", cfg, EVAL_TEST_KEY=KEY)
    rows = {r["adapter"]: r for r in report["adapters"]}
    scripted, p = rows["scripted"], rows["p"]
    assert {k: scripted[k] for k in ("items", "passed", "retries", "dead")} == {
        "items": 4,
        "passed": 2,  # "4" and "ok"; "five" is not "5"; the dead one has no reply
        "retries": 1,
        "dead": 1,
    }
    assert scripted["pass_rate"] == 0.5 and scripted["cost"] == 0.0
    assert scripted["p95_latency"] >= 0.3 > scripted["p50_latency"]
    assert {k: p[k] for k in ("items", "passed", "retries", "dead")} == {
        "items": 4,
        "passed": 3,
        "retries": 1,
        "dead": 1,
    }
    assert p["pass_rate"] == 0.75 and p["cost"] == pytest.approx(3 * COST)
    assert p["p50_latency"] is not None
    # 4 items + 1 retry = 5 requests, and the second run called nothing.
    assert len(server.requests) == 5
    by_item = {(i["adapter"], i["line"]): i for i in report["items"]}
    assert by_item[("p", 2)]["reply"] == "5" and by_item[("p", 2)]["score"]["passed"]
    assert by_item[("scripted", 4)]["state"] == "dead" and by_item[("scripted", 4)]["score"] is None
    # The table a person reads says the same.
    lines = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert lines["scripted"][1:4] == ["4", "2", "50%"]
    assert lines["p"][1:4] == ["4", "3", "75%"] and lines["p"][-2:] == ["1", "1"]


def test_a_killed_eval_resumes_without_calling_finished_items_again(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    release = threading.Event()

    def provider(request: Recorded) -> Canned:
        text = prompt_of(request)
        if text.startswith("slow") and not release.is_set():
            return Canned(delay=60, **vars(answer(text.upper())))  # in flight at the kill
        return answer(text.upper())

    items = [
        {"prompt": f"{kind} {n}", "expected": f"{kind} {n}".upper()}
        for n, kind in enumerate(["fast", "fast", "fast", "slow", "slow", "slow"])
    ]
    data = dataset(ws, *items)
    with Server(default=provider) as server:
        cfg = config(ws, server.url)
        args = [DOVECOTE, "eval", str(data), "--adapter", "p", "--check", "exact"]
        args += ["--db", str(ws.db), "--config", str(cfg), "--json"]
        env = clean_env(ws.root, EVAL_TEST_KEY=KEY)
        first = subprocess.Popen(args, cwd=ws.root, env=env, stdout=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not (len(server.requests) == 6 and done_count(ws.db) == 3):
                assert time.monotonic() < deadline, "the first run never got half way"
                assert first.poll() is None
                time.sleep(0.05)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        first_prompts = sorted(prompt_of(r) for r in server.requests)
        assert first_prompts == sorted(i["prompt"] for i in items)
        release.set()
        second = subprocess.run(
            args, cwd=ws.root, env=env, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 0, second.stderr
        again = sorted(prompt_of(r) for r in server.requests[6:])
    # Only what was in flight at the kill was sent again; nothing that had replied.
    assert again == ["slow 3", "slow 4", "slow 5"]
    report = json.loads(second.stdout)
    [row] = report["adapters"]
    assert (row["items"], row["passed"], row["dead"]) == (6, 6, 0)
    # The same flows went on: one per item, none started twice.
    with closing(sqlite3.connect(ws.db)) as conn:
        flows = conn.execute("SELECT state, count(*) FROM flows GROUP BY state").fetchall()
    assert flows == [("completed", 6)]


def done_count(db: Path) -> int:
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return int(
                conn.execute("SELECT count(*) FROM commands WHERE state = 'done'").fetchone()[0]
            )
    except sqlite3.OperationalError:
        return 0


def test_a_bad_line_is_refused_with_its_number(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    cases = {
        '{"prompt": "fine"}\n[1, 2]\n': "set.jsonl:2: an item is a JSON object",
        '{"prompt": "a"}\n\n{"prompt": 3}\n': "set.jsonl:3: prompt must be a string",
        '{"prompt": "a", "messages": []}\n': "set.jsonl:1: give either prompt",
        '{"question": "a"}\n': "set.jsonl:1: unknown field(s) question",
        '{"prompt": "a"\n': "set.jsonl:1: not JSON",
        '{"messages": [{"role": "robot", "content": "x"}]}\n': "set.jsonl:1:",
        "\n\n": "no items",
        '{"prompt": "a"}\n{"prompt": "\\ud800"}\n': "set.jsonl:2: the item",
        '{"prompt": "a", "expected": 99999999999999999999}\n': "set.jsonl:1: the item",
    }
    for text, message in cases.items():
        path = ws.root / "set.jsonl"
        path.write_text(text)
        with pytest.raises(
            DatasetError, match="^.*" + message.replace("(", r"\(").replace(")", r"\)")
        ):
            load_dataset(path)
        result = ws.run("eval", path, "--adapter", "scripted", "--check", "exact")
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    unknown = ws.run(
        "eval", dataset(ws, {"prompt": "x"}), "--adapter", "scripted", "--check", "nope"
    )
    assert unknown.returncode == 1 and "no check is registered as 'nope'" in unknown.stderr


def test_an_exported_chat_line_is_an_item_whose_reply_is_expected(tmp_path: Path) -> None:
    path = tmp_path / "set.jsonl"
    path.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ]
            }
        )
        + "\n"
    )
    [item], _ = load_dataset(path)
    assert item.expected == "hello" and item.request.system == "Be brief."
    assert [m.role for m in item.request.messages] == ["user"]


def test_percentile_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert percentile([float(n) for n in range(1, 101)], 0.95) == 95.0


def test_the_example_runs_and_a_second_run_calls_nothing(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    env = clean_env(ws.root, DOVECOTE_DB=str(ws.db))
    env["PATH"] = f"{Path(DOVECOTE).parent}:{env['PATH']}"
    script = Path(__file__).resolve().parent.parent / "examples" / "eval.sh"
    runs = [
        subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=120)
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
        table = run.stdout.splitlines()
        assert table[3].split()[:4] == ["scripted", "5", "4", "80%"]
        assert len([line for line in table if line.startswith('{"messages"')]) == 5
    with closing(sqlite3.connect(ws.db)) as conn:
        assert conn.execute("SELECT count(*) FROM commands").fetchone() == (5,)


def test_items_run_concurrently_a_bounded_number_at_once(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    lock, in_flight, most = threading.Lock(), [0], [0]

    def provider(request: Recorded) -> Canned:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.3)  # the handler thread holds the request open
        with lock:
            in_flight[0] -= 1
        return answer("x")

    data = dataset(ws, *({"prompt": f"item {n}"} for n in range(7)))
    with Server(default=provider) as server:
        cfg = config(ws, server.url)
        report = ws.json(
            "eval",
            data,
            "--adapter",
            "p",
            "--check",
            "nonempty",
            "--concurrency",
            "3",
            "--config",
            cfg,
            EVAL_TEST_KEY=KEY,
        )
    assert report["adapters"][0]["passed"] == 7 and len(server.requests) == 7
    assert most[0] == 3
