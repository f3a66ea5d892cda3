"""What the store must survive: values SQLite cannot hold, operations that
must commit together, a full disk. Real SQLite files; the server cases run a
real ``dovecote serve`` subprocess.

The committer is the one task every write goes through: if it dies, every
caller waits for ever and the server answers nothing again. So no value, no
lost race and no refusal of the disk may end it; an operation that fails is
rolled back alone (a ``Group`` as a whole) and its caller hears why."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import flows
from adapters.base import Request
from flows.errors import StoreError
from flows.records import Command, Flow, new_id
from flows.snapshots import Snapshot
from flows.states import CANCEL, CANCELLED, IllegalTransition
from flows.store import Group, Insert, InsertFlow, Move, MoveFlow, Store
from tests.conftest import ask, mounted_tmpfs
from tests.editor import Editor, served

AT = 1_700_000_000.0


def command(**fields: Any) -> Command:
    """A pending command built as the store receives it: past every check the
    engine makes, as a caller of ``Store.commit`` could send it."""
    return Command(
        id=new_id(),
        adapter="scripted",
        request=Request.from_json(ask("hello")),
        state="pending",
        created_at=AT,
        timeout=30.0,
        **fields,
    )


def snapshot(**fields: Any) -> Snapshot:
    values: dict[str, Any] = {
        "id": new_id(),
        "uri": "file:///a.txt",
        "version": 1,
        "start": 0,
        "end": 5,
        "text": "hello",
        "created_at": AT,
        "document": "hello world",
    }
    return Snapshot(**{**values, **fields})


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


# --- the store ---------------------------------------------------------------


def test_an_operation_sqlite_refuses_fails_alone_and_leaves_nothing(db_path: Path) -> None:
    store = Store(db_path)
    good = command()
    refused = [
        Insert(command(handler_args={"note": "lone \ud800"})),
        Insert(command(priority=2**70)),
        # The snapshot goes in first: the command that fails after it must
        # take it back with it.
        Insert(command(), snapshot=snapshot(text="\udfff")),
        Insert(command(), snapshot=snapshot(version=2**70)),
        Insert(command(), detail={"why": "\ud800"}),
    ]
    results = store.commit([refused[0], refused[1], Insert(good), *refused[2:]])
    good_event = results.pop(2)
    for result in results:
        assert isinstance(result, StoreError), result
        assert "Insert refused" in str(result)
    assert good_event.command_id == good.id
    assert [c.id for c in store.list()] == [good.id]
    assert rows(db_path, "SELECT count(*) FROM snapshots") == [(0,)]
    # The journal holds exactly the committed transition, under the seq its
    # caller was told.
    assert rows(db_path, "SELECT id, command_id FROM events") == [(good_event.seq, good.id)]
    # And the store goes on committing.
    later = command()
    assert store.commit_one(Insert(later)).seq == good_event.seq + 1
    store.close()


def test_a_group_commits_whole_or_not_at_all(db_path: Path) -> None:
    store = Store(db_path)
    first, second, alone = command(), command(), command()
    never_stored = command()
    claim = Move(never_stored, never_stored.evolve(state="sent", owner="me"), "dispatch", AT)
    results = store.commit(
        [
            Group((Insert(first), Insert(second), claim)),  # the claim loses: none of it
            Insert(alone),
            Group((Insert(second),)),
        ]
    )
    assert isinstance(results[0], IllegalTransition)
    assert results[1].command_id == alone.id
    assert [event.command_id for event in results[2]] == [second.id]
    assert {c.id for c in store.list()} == {alone.id, second.id}
    assert rows(db_path, "SELECT id FROM events ORDER BY id") == [
        (results[1].seq,),
        (results[2][0].seq,),
    ]
    store.close()


def test_a_step_for_a_cancelled_flow_is_not_stored(db_path: Path) -> None:
    """The runtime stores a step's command together with its flow's move to
    ``waiting``: a flow cancelled meanwhile refuses the move, and the
    command goes with it."""
    store = Store(db_path)
    running = Flow(id=new_id(), name="f", state="running", created_at=AT, updated_at=AT)
    store.commit_one(InsertFlow(running))
    cancelled = attrs.evolve(running, state=CANCELLED, updated_at=AT + 1)
    store.commit_one(MoveFlow(running, cancelled, CANCEL))
    step = command(flow_id=running.id, step=1)
    waiting = attrs.evolve(running, state="waiting", step=1)
    [result] = store.commit([Group((MoveFlow(running, waiting, "wait"), Insert(step)))])
    assert isinstance(result, IllegalTransition)
    assert store.list() == []
    assert store.flow_steps(running.id) == []
    store.close()


# --- the engine --------------------------------------------------------------


async def test_the_api_refuses_what_sqlite_cannot_hold_before_queueing_it(
    db_path: Path,
) -> None:
    async with flows.open_engine(db_path) as engine:
        with pytest.raises(ValueError, match=r"request\.messages\[0\]\.content .*surrogate"):
            await engine.submit("scripted", ask("hi \ud800"))
        with pytest.raises(ValueError, match="priority"):
            await engine.submit("scripted", ask("hi"), priority=2**70)
        with pytest.raises(ValueError, match="handler_args"):
            await engine.submit("scripted", ask("hi"), handler_args=["\udc00"])
        with pytest.raises(ValueError, match=r"snapshot\.version"):
            await engine.submit("scripted", ask("hi"), snapshot=snapshot(version=2**70))
        with pytest.raises(ValueError, match=r"snapshot\.document"):
            await engine.submit("scripted", ask("hi"), snapshot=snapshot(document="\ud800"))
        waiting = await engine.submit("scripted", ask("#hang\nhi"), timeout=60)
        with pytest.raises(ValueError, match=r"reply\.text"):
            await engine.deliver(waiting, {"text": "caf\udce9"})
        assert [c.id for c in engine.list()] == [waiting]
        assert (await engine.call("scripted", ask("teh end"))).text == "the end"
        await engine.cancel(waiting)


async def test_two_replays_racing_for_one_late_reply_leave_one_new_command(
    db_path: Path,
) -> None:
    async with flows.open_engine(db_path) as engine:
        dead_id = await engine.submit("scripted", ask("#hang\nx"), timeout=0.05)
        await engine.wait(dead_id)
        await engine.deliver(dead_id, {"text": "the late answer"})
        outcomes: list[Any] = []

        async def replay() -> None:
            try:
                outcomes.append(await engine.replay([dead_id], use_late_reply=True))
            except IllegalTransition as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(replay)
            nursery.start_soon(replay)
        [won] = [o for o in outcomes if isinstance(o, list)]
        [lost] = [o for o in outcomes if isinstance(o, IllegalTransition)]
        assert "already used" in str(lost)
        done = await engine.wait(won[0])
        replays = [c for c in engine.list() if c.replay_of == dead_id]
        late = engine.store.late_replies(dead_id)
    assert [c.id for c in replays] == won
    assert done.state == "done" and done.owner is None
    assert [(r.used_by) for r in late] == won


async def test_a_flow_step_is_taken_over_by_one_replay_only(db_path: Path) -> None:
    async with flows.open_engine(db_path) as engine:
        flow_id = await engine.start_flow("test.faults.one_step")
        while engine.get_flow(flow_id).state != "stalled":
            await trio.sleep(0.01)
        [dead] = [c for c, _, _ in engine.store.dead_letters()]
        [first] = await engine.replay([dead.id], timeout=5)
        with pytest.raises(IllegalTransition, match="another replay took step 1"):
            await engine.replay([dead.id], timeout=5)
        assert [c.id for c in engine.list() if c.replay_of == dead.id] == [first]
        assert await engine.wait_flow(flow_id) == "the answer"


@flows.flow("test.faults.one_step")
async def _one_step(ctx: flows.FlowContext) -> str:
    reply = await ctx.call("scripted", ask("#delay 0.3\n#reply\nthe answer"), timeout=0.1)
    return reply.text


# --- a real server -----------------------------------------------------------


async def write_ascii(editor: Editor, message: dict[str, Any]) -> None:
    """``message`` written with JSON's ``\\u`` escapes, so that it can carry
    what no UTF-8 encoder would write: a lone surrogate."""
    body = json.dumps({"jsonrpc": "2.0", **message}).encode()
    await editor.write_raw(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


async def ask_ascii(editor: Editor, method: str, params: Any) -> dict[str, Any]:
    """A request sent by ``write_ascii``; its answer, error or result."""
    editor.next_id += 1
    request_id = editor.next_id
    event, box = trio.Event(), list[dict[str, Any]]()
    editor.waiting[request_id] = (event, box)
    await write_ascii(editor, {"id": request_id, "method": method, "params": params})
    with trio.fail_after(20):
        await event.wait()
    assert box, "the server closed the connection"
    return box[0]


async def test_values_sqlite_cannot_hold_never_stop_the_server(db_path: Path) -> None:
    async with served(db_path) as (editor, process):
        await editor.initialize()
        sent = await editor.request(
            "command/submit", {"adapter": "scripted", "request": ask("#hang\nwait"), "timeout": 60}
        )
        await editor.notify(
            "document/open", {"uri": "file:///big", "version": 2**70, "text": "abc"}
        )
        await write_ascii(
            editor,
            {
                "method": "document/open",
                "params": {"uri": "file:///bad", "version": 1, "text": "a\ud800"},
            },
        )
        for method, params in [
            ("command/submit", {"adapter": "scripted", "request": ask("hi \ud800")}),
            ("command/reply", {"commandId": sent["commandId"], "reply": {"text": "\ud800"}}),
            (
                "command/submit",
                {
                    "adapter": "scripted",
                    "request": ask("x"),
                    "target": {"uri": "file:///big", "start": 0, "end": 1},
                },
            ),
            (
                "command/submit",
                {
                    "adapter": "scripted",
                    "request": ask("x"),
                    "target": {"uri": "file:///bad", "start": 0, "end": 2},
                },
            ),
        ]:
            answer = await ask_ascii(editor, method, params)
            assert "error" in answer, answer
            listed = await editor.request("command/list", {})
            assert [c["id"] for c in listed["commands"]] == [sent["commandId"]]
        done = await editor.request("command/submit", {"adapter": "scripted", "request": ask("ok")})
        assert (await editor.wait_state(done["commandId"]))["state"] == "done"
        assert process.stdin is not None
        await process.stdin.aclose()  # end of input: the server ends
        with trio.fail_after(20):
            assert await process.wait() == 0


# --- a full disk ---------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "small") as mount:
        yield mount


def fill(path: Path) -> None:
    """Write ``path`` until the file system has no byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 65536)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0")
    finally:
        os.close(fd)


async def test_a_full_disk_refuses_new_work_and_the_server_lives_on(small_disk: Path) -> None:
    db = small_disk / "dovecote" / "dovecote.db"
    async with served(db) as (editor, process):
        await editor.initialize()
        first = await editor.request(
            "command/submit", {"adapter": "scripted", "request": ask("teh first")}
        )
        await editor.wait_state(first["commandId"])
        # A reply that arrives once the disk is full: its commit is refused
        # in a background task, not in a request.
        delayed = await editor.request(
            "command/submit", {"adapter": "scripted", "request": ask("#delay 1\nlater")}
        )
        fill(small_disk / "filler")
        for _ in range(3):
            answer = await ask_ascii(
                editor, "command/submit", {"adapter": "scripted", "request": ask("x" * 20_000)}
            )
            assert answer["error"]["code"] == -32006, answer
            assert "full" in answer["error"]["message"]
        await trio.sleep(2)  # the delayed reply came, and could not be stored
        assert process.returncode is None
        listed = await editor.request("command/list", {})
        assert {c["id"] for c in listed["commands"]} == {first["commandId"], delayed["commandId"]}

        (small_disk / "filler").unlink()
        again = await editor.request(
            "command/submit", {"adapter": "scripted", "request": ask("teh again")}
        )
        assert (await editor.wait_state(again["commandId"]))["state"] == "done"
        shown = (await editor.request("command/show", {"commandId": first["commandId"]}))["command"]
        assert shown["state"] == "done" and shown["reply"]["text"] == "the first"


async def test_what_a_full_disk_refused_is_done_once_it_frees(
    small_disk: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A reply whose commit the disk refused leaves its command ``sent``,
    owned by this engine and held by no task: once its lease runs out the
    engine takes it back (and sends it again). A timeout the disk refused
    rings again until it is stored."""
    async with flows.open_engine(small_disk / "dovecote.db") as engine:
        answered = await engine.submit(
            "scripted", ask("#delay 5\nteh reply"), timeout=60, max_attempts=2
        )
        hung = await engine.submit("scripted", ask("#hang\nx"), timeout=10)
        await trio.sleep(1)
        fill(small_disk / "filler")
        await trio.sleep(12)  # the reply came at 5 s, the timeout at 11 s: both refused
        assert engine.get(answered).state == "sent" and engine.get(hung).state == "sent"
        (small_disk / "filler").unlink()
        timed_out = await engine.wait(hung)
        done = await engine.wait(answered)
    assert timed_out.state == "dead" and timed_out.reason == "timeout"
    assert done.state == "done" and done.attempt == 2 and done.owner is None
    assert done.reply is not None and done.reply.text == "the reply"


@flows.flow("test.faults.patient")
async def _patient(ctx: flows.FlowContext) -> str:
    await ctx.sleep(5)
    return (await ctx.call("scripted", ask("teh end"))).text


async def test_a_flow_whose_step_a_full_disk_refused_runs_again_once_it_frees(
    small_disk: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The script stops when its step cannot be stored, and cannot record
    that it failed either: its flow is left running, owned by this engine,
    run by no task. Its lease is no longer renewed, and once it runs out the
    engine takes the flow up again: the script runs on from its journal."""
    async with flows.open_engine(small_disk / "dovecote.db") as engine:
        flow_id = await engine.start_flow("test.faults.patient")
        await trio.sleep(1)  # the sleep's wake-up time is journaled
        fill(small_disk / "filler")
        await trio.sleep(6)  # the step's command was refused, and so was the failure
        assert engine.get_flow(flow_id).state == "running"
        (small_disk / "filler").unlink()
        with trio.fail_after(300):
            assert await engine.wait_flow(flow_id) == "the end"
