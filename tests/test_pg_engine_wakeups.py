"""An engine on PostgreSQL hears what other processes commit at once
(LISTEN/NOTIFY, flows.wakeups): its dispatcher wakes for their submits, its
waiters and the editor bridge learn of the commands they end, and it keeps
listening when the connection is cut. Every engine here polls once a minute,
so only a wake-up can explain what a test sees within its few seconds."""

from __future__ import annotations

import subprocess
import textwrap
from collections.abc import Iterator

import psycopg
import pytest
import trio

import flows
from adapters.scripted import ScriptedAdapter
from tests.conftest import PYTHON, ROOT, ask
from tests.editor import served

SLOW_POLL = 60.0

# Another process, its own store: on each line of stdin, one action.
OTHER = textwrap.dedent(
    """
    import sys
    import trio
    from adapters.base import Request
    from flows.operations import Insert, Move
    from flows.pgstore import PostgresStore
    from flows.records import Command, new_id
    from flows.states import CANCEL, CANCELLED

    store = PostgresStore(sys.argv[1])
    for line in sys.stdin:
        action, _, arg = line.strip().partition(" ")
        if action == "submit":
            command = Command(
                id=new_id(), adapter=arg, state="pending", created_at=1.0, timeout=30.0,
                request=Request.from_json(
                    {"messages": [{"role": "user", "content": "teh"}]}
                ),
            )
            store.commit_one(Insert(command))
            print(command.id, flush=True)
        elif action == "cancel":
            command = store.get(arg)
            store.commit_one(
                Move(command, command.evolve(state=CANCELLED, finished_at=2.0), CANCEL, 2.0)
            )
            print("ok", flush=True)
    """
)


class Other:
    """The other process, told what to do line by line."""

    def __init__(self, url: str) -> None:
        self.process = subprocess.Popen(
            [PYTHON, "-c", OTHER, url],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    async def do(self, line: str) -> str:
        def ask_it() -> str:
            assert self.process.stdin is not None and self.process.stdout is not None
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
            return self.process.stdout.readline().strip()

        return await trio.to_thread.run_sync(ask_it)

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=10)


@pytest.fixture
def other(pg_url: str) -> Iterator[Other]:
    """Another process on the test's database, closed after the test."""
    started = Other(pg_url)
    try:
        yield started
    finally:
        started.close()


def dovecote_backends(url: str, *, listening: bool = False) -> list[int]:
    """The server pids of dovecote's connections to the test's database
    (only those waiting in LISTEN, with ``listening``)."""
    sql = (
        "SELECT pid FROM pg_stat_activity "
        "WHERE application_name = 'dovecote' AND datname = current_database()"
    )
    if listening:
        sql += " AND query LIKE 'LISTEN%%'"
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(sql).fetchall()
    return [int(r[0]) for r in rows]


def listeners(url: str) -> list[int]:
    return dovecote_backends(url, listening=True)


async def test_another_process_submit_wakes_the_dispatcher(pg_url: str, other: Other) -> None:
    async with flows.open_engine(pg_url, poll_interval=SLOW_POLL) as engine:
        command_id = await other.do("submit scripted")
        with trio.fail_after(10):
            done = await engine.wait(command_id)
        assert done.state == "done" and done.reply is not None
        assert done.reply.text == "the"


async def test_wait_learns_of_an_end_committed_by_another_process(
    pg_url: str, other: Other
) -> None:
    async with flows.open_engine(pg_url, poll_interval=SLOW_POLL) as engine:
        # An adapter this engine lacks: it stays pending here.
        command_id = await other.do("submit far-away")
        async with trio.open_nursery() as nursery:
            ended: list[str] = []

            async def wait() -> None:
                ended.append((await engine.wait(command_id)).state)

            nursery.start_soon(wait)
            await trio.sleep(0.2)  # the waiter waits
            assert await other.do(f"cancel {command_id}") == "ok"
            with trio.fail_after(10):
                while not ended:
                    await trio.sleep(0.01)
        assert ended == ["cancelled"]


async def test_a_send_in_flight_here_is_stopped_when_another_process_ends_it(
    pg_url: str, other: Other
) -> None:
    """One send at a time: the next command can only go once the hung send
    of the one cancelled elsewhere has been stopped (its deadline is 30 s,
    and the lease, whose renewal would notice too, is renewed each 100 s)."""
    one_at_a_time = ScriptedAdapter(max_in_flight=1)
    async with flows.open_engine(
        pg_url, adapters=[one_at_a_time], poll_interval=SLOW_POLL, lease=300
    ) as engine:
        hung = await engine.submit("scripted", ask("#hang\nx"), timeout=30)
        with trio.fail_after(10):
            while engine.get(hung).state != "sent":
                await trio.sleep(0.01)
        assert await other.do(f"cancel {hung}") == "ok"
        with trio.fail_after(10):
            after = await engine.wait(await engine.submit("scripted", ask("teh")))
        assert after.state == "done"
        assert engine.get(hung).state == "cancelled"


async def test_the_bridge_tells_the_editor_of_an_end_committed_elsewhere(
    pg_url: str, other: Other
) -> None:
    async with served(pg_url) as (editor, _):  # type: ignore[arg-type]
        await editor.initialize()
        result = await editor.request(
            "command/submit", {"adapter": "scripted", "request": ask("#hang\nx")}
        )
        command_id = result["commandId"]
        await editor.wait_state(command_id, {"sent"})
        assert await other.do(f"cancel {command_id}") == "ok"
        with trio.fail_after(10):
            state = await editor.wait_state(command_id, {"cancelled"})
        assert state["state"] == "cancelled"


async def test_listening_goes_on_after_the_connection_is_cut(pg_url: str, other: Other) -> None:
    async with flows.open_engine(pg_url, poll_interval=SLOW_POLL) as engine:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            [pid] = listeners(pg_url)
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with trio.fail_after(10):
            while listeners(pg_url) == [pid]:
                await trio.sleep(0.02)
        with trio.fail_after(10):
            while len(listeners(pg_url)) != 1:  # listening again
                await trio.sleep(0.02)
        command_id = await other.do("submit scripted")
        with trio.fail_after(10):
            assert (await engine.wait(command_id)).state == "done"


async def test_closing_leaves_no_connection_and_no_thread(pg_url: str) -> None:
    async with flows.open_engine(pg_url, poll_interval=SLOW_POLL) as engine:
        await engine.call("scripted", ask("teh"))
        assert len(dovecote_backends(pg_url)) == 3  # reads, writes, listens
    # A server process ends a moment after its client closes the connection.
    with trio.fail_after(10):
        while dovecote_backends(pg_url):
            await trio.sleep(0.02)
