"""Executions as data sets: ``dovecote export --format chat | preference``, its
filters, and the editor bridge's ``final_text`` event the preferences come from.

Exports run the real CLI on a real database made read-only; corrections go
through a real ``dovecote serve`` subprocess (or, where time is the subject,
an in-process bridge on trio's MockClock)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import flows
from adapters.config import build_adapter, parse_config
from editor_bridge.server import Server
from flows.datasets import since
from flows.engine import Engine
from flows.runtime import FlowContext
from tests.conftest import ask
from tests.editor import Editor, bridged, served
from tests.fake_providers import FakeProvider, canned, load_fixture
from tests.test_cli import Workspace

URI = "file:///tmp/notes.txt"


@flows.flow("dataset-test")
async def _one_call(ctx: FlowContext, text: str) -> str:
    return (await ctx.call("scripted", ask(text))).text


def assert_chat_line(line: dict[str, Any]) -> None:
    """The OpenAI chat fine-tuning shape, exactly."""
    assert set(line) == {"messages"}
    messages = line["messages"]
    assert isinstance(messages, list) and len(messages) >= 2
    for m in messages:
        assert set(m) == {"role", "content"} and isinstance(m["content"], str)
    roles = [m["role"] for m in messages]
    assert roles[-1] == "assistant"
    assert "system" not in roles[1:]
    assert all(r in ("system", "user", "assistant") for r in roles)


def assert_preference_line(line: dict[str, Any]) -> None:
    assert set(line) == {"prompt", "chosen", "rejected"}
    assert isinstance(line["chosen"], str) and isinstance(line["rejected"], str)
    assert line["chosen"] != line["rejected"]
    assert [set(m) for m in line["prompt"]] == [{"role", "content"}] * len(line["prompt"])


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Workspace]:
    """A workspace whose directory ``freeze`` makes read-only; writable again after."""
    ws = Workspace(tmp_path)
    yield ws
    ws.root.chmod(0o755)


def freeze(ws: Workspace) -> None:
    for path in [ws.db, *ws.root.glob("work.db-*")]:
        path.chmod(0o400)
    ws.root.chmod(0o555)


def test_chat_export_one_line_per_done_call_from_scripted_and_a_provider(
    read_only: Workspace,
) -> None:
    ws = read_only
    chat = load_fixture("openai_chat.json")
    with FakeProvider() as server:
        server.queue(canned(chat["response"]))
        config = parse_config(
            f'[adapters.p]\nkind = "openai"\nbase_url = "{server.url}/v1"\n'
            'model = "gpt-4o-mini"\napi_key_env = "NO_SUCH_KEY_VAR"\n',
            Path("dovecote.toml"),
        )
        provider = build_adapter(
            config.providers[0], {"NO_SUCH_KEY_VAR": "sk-datasets-test-0123456789"}
        )
        assert provider is not None

        async def body() -> None:
            async with flows.open_engine(ws.db, adapters=[provider]) as engine:
                await engine.call("scripted", ask("#reply\nfour", system="Answer in words."))
                await engine.call("scripted", ask("teh cat"))
                dead = await engine.submit("scripted", ask("#fail 400\nno"))
                await engine.wait(dead)
                await engine.call("p", ask("Say hello"))

        trio.run(body)
    freeze(ws)
    exported = lines(ws.ok("export", "--format", "chat"))
    for line in exported:
        assert_chat_line(line)
    assert exported[:2] == [
        {
            "messages": [
                {"role": "system", "content": "Answer in words."},
                {"role": "user", "content": "#reply\nfour"},
                {"role": "assistant", "content": "four"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "teh cat"},
                {"role": "assistant", "content": "the cat"},
            ]
        },
    ]
    assert len(exported) == 3  # the dead letter is no training example
    assert exported[2]["messages"][0] == {"role": "user", "content": "Say hello"}
    assert (
        exported[2]["messages"][-1]["content"]
        == chat["response"]["body"]["choices"][0]["message"]["content"]
    )
    # The default format is unchanged: every command with its journal.
    records = lines(ws.ok("export"))
    assert len(records) == 4 and all("events" in r and "request" in r for r in records)


def test_export_filters_since_adapter_flow_state(read_only: Workspace) -> None:
    ws = read_only
    day = 86400.0
    old = time.time() - 10 * day

    async def body() -> None:
        async with flows.open_engine(ws.db, wall_clock=lambda: old) as engine:
            await engine.call("scripted", ask("#reply\nancient"))
        async with flows.open_engine(ws.db) as engine:
            await engine.call("scripted", ask("#reply\nrecent"))
            flow_id = await engine.start_flow("dataset-test", text="#reply\nin a flow")
            await engine.wait_flow(flow_id)

    trio.run(body)
    freeze(ws)

    def replies(*args: str) -> list[str]:
        return [
            line["messages"][-1]["content"]
            for line in lines(ws.ok("export", "--format", "chat", *args))
        ]

    assert replies() == ["ancient", "recent", "in a flow"]
    assert replies("--flow", "dataset-test") == ["in a flow"]
    flow_id = ws.json("flow", "list")[0]["id"]
    assert replies("--flow", flow_id) == ["in a flow"]
    assert replies("--flow", "no-such-flow") == []
    assert replies("--since", "7d") == ["recent", "in a flow"]
    assert replies("--since", "11d") == ["ancient", "recent", "in a flow"]
    iso = time.strftime("%Y-%m-%d", time.localtime(old - day))
    assert replies("--since", iso) == ["ancient", "recent", "in a flow"]
    assert replies("--since", str(old + 1)) == ["recent", "in a flow"]
    assert replies("--since", "7d", "--flow", "dataset-test", "--adapter", "scripted") == [
        "in a flow"
    ]
    assert replies("--adapter", "nobody") == []
    assert replies("--state", "dead") == []
    bad = ws.run("export", "--format", "chat", "--since", "last tuesday")
    assert bad.returncode == 1 and "--since 'last tuesday'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_since_reads_ages_dates_and_epochs() -> None:
    now = 1_800_000_000.0
    assert since("90s", now) == now - 90
    assert since("15m", now) == now - 900
    assert since("12H", now) == now - 12 * 3600
    assert since("2w", now) == now - 14 * 86400
    assert since("1700000000", now) == 1_700_000_000.0
    assert since("2026-12-01T00:00:00Z", now) == 1_796_083_200.0
    for bad in ("", "7 days ago", "-3d", "2026-13-01", "nan", "inf", "\ud800"):
        with pytest.raises(ValueError, match="--since"):
            since(bad, now)


# --- the final text of a correction, over a real dovecote serve ----------------


async def corrected(editor: Editor, region: str, before: str = "Notes:\n") -> str:
    """Open a document, correct ``region`` in it, wait until done; the call's id."""
    await editor.open(URI, before + region + "\nEnd.")
    start = len(before)
    result = await editor.request(
        "command/submit",
        {
            "adapter": "scripted",
            "request": {
                "system": "Correct the spelling.",
                "messages": [{"role": "user", "content": region}],
            },
            "target": {"uri": URI, "start": start, "end": start + len(region)},
        },
    )
    command_id: str = result["commandId"]
    assert (await editor.wait_state(command_id))["state"] == "done"
    return command_id


async def final_texts(editor: Editor, command_id: str, count: int = 1) -> list[Any]:
    """The final_text events of a command, waiting (a while) for ``count`` of them."""
    with trio.fail_after(20):
        while True:
            shown = await editor.request("command/show", {"commandId": command_id})
            found = [e for e in shown["events"] if e["event"] == "final_text"]
            if len(found) >= count:
                return found
            await trio.sleep(0.02)


async def test_save_records_what_the_person_kept_and_preference_exports_it(
    tmp_path: Path,
) -> None:
    ws = Workspace(tmp_path)
    async with served(ws.db) as (editor, _):
        await editor.initialize()
        edited = await corrected(editor, "I recieve teh letter")
        text = editor.text(URI)
        assert "I receive the letter" in text
        # The person rewrites part of the corrected region, then saves.
        at = text.index("the letter")
        await editor.type(URI, at, at + len("the letter"), "your kind letter")
        await editor.notify("document/save", {"uri": URI, "version": editor.documents[URI][0]})
        [event] = await final_texts(editor, edited)
        assert event["detail"] == {"text": "I receive your kind letter"}
        assert event["from"] == event["to"] == "done"
        # A second correction the person keeps as it came: nothing to prefer.
        kept = await corrected(editor, "teh end", before=editor.text(URI) + "\n")
        await editor.notify("document/save", {"uri": URI})
        [same] = await final_texts(editor, kept)
        assert same["detail"] == {"text": "the end"}
        # Recorded once per command: saving again adds nothing.
        await editor.notify("document/save", {"uri": URI})
        await editor.request("command/list", {})
        assert len(await final_texts(editor, edited)) == 1
    exported = lines(ws.ok("export", "--format", "preference"))
    for line in exported:
        assert_preference_line(line)
    assert exported == [
        {
            "prompt": [
                {"role": "system", "content": "Correct the spelling."},
                {"role": "user", "content": "I recieve teh letter"},
            ],
            "chosen": "I receive your kind letter",
            "rejected": "I receive the letter",
        }
    ]


async def test_close_records_the_final_text(db_path: Path) -> None:
    async with served(db_path) as (editor, _):
        await editor.initialize()
        command_id = await corrected(editor, "beleive it")
        await editor.type(URI, 0, 0, "Draft. ")  # outside the region: it only moves
        await editor.notify("document/close", {"uri": URI})
        [event] = await final_texts(editor, command_id)
    assert event["detail"] == {"text": "believe it"}


async def test_a_vanished_editor_closes_its_documents_and_records(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    async with served(ws.db) as (editor, process):
        await editor.initialize()
        command_id = await corrected(editor, "teh plan")
        at = editor.text(URI).index("the plan")
        await editor.type(URI, at + 4, at + 8, "idea")
        # The editor goes without a word: its end of the pipe closes.
        assert process.stdin is not None
        await process.stdin.aclose()
        with trio.fail_after(20):
            assert await process.wait() == 0
    [line] = lines(ws.ok("export", "--format", "preference"))
    assert line["chosen"] == "the idea" and line["rejected"] == "the plan"
    assert command_id


async def test_idle_region_records_after_the_configured_delay(db_path: Path) -> None:
    async with served(db_path, "--final-idle", "0.3") as (editor, _):
        await editor.initialize()
        command_id = await corrected(editor, "teh sky")
        [event] = await final_texts(editor, command_id)
    assert event["detail"] == {"text": "the sky"}


async def test_idle_time_restarts_with_each_edit_of_the_region(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with flows.open_engine(db_path) as engine:
        server = Server(engine, final_idle=60.0)
        async with bridged(server) as editor:
            await idle_story(engine, server, editor)


async def idle_story(engine: Engine, server: Server, editor: Editor) -> None:
    command_id = await corrected(editor, "teh sea")

    def events() -> list[Any]:
        return [e.detail for e in engine.history(command_id) if e.event == "final_text"]

    await trio.sleep(59)
    assert events() == []
    at = editor.text(URI).index("the sea")
    await editor.type(URI, at + 4, at + 7, "ocean")
    await trio.sleep(59)
    assert events() == []  # 118 s after the reply, 59 s after the edit
    await editor.type(URI, 0, 0, "Title\n")  # elsewhere: no restart
    await trio.sleep(2)
    assert events() == [{"text": "the ocean"}]
    await trio.sleep(600)
    assert len(events()) == 1
    # Let go once recorded: the mirror tracks the region no more.
    assert server.mirror.documents[URI].regions == {}
