"""Wake-ups across processes on PostgreSQL (LISTEN/NOTIFY): a command
submitted by one process, and its end, wake a store listening in another,
with nothing for what was rolled back. Real server, real second process."""

from __future__ import annotations

import subprocess
import textwrap
from typing import Any

from flows.operations import Group, Insert, Move
from flows.pgstore import PostgresStore
from flows.records import Command, new_id
from flows.states import CANCEL, CANCELLED
from flows.wakeups import Changes
from tests.conftest import PYTHON, ROOT

# The other process: submits one command, then cancels it, each committed
# when told to on stdin, printing the command's id.
OTHER = textwrap.dedent(
    """
    import sys
    from adapters.base import Request
    from flows.operations import Group, Insert, Move
    from flows.pgstore import PostgresStore
    from flows.records import Command, new_id
    from flows.states import CANCEL, CANCELLED

    store = PostgresStore(sys.argv[1])
    command = Command(
        id=new_id(), adapter="far-away", state="pending", created_at=1.0, timeout=30.0,
        request=Request.from_json({"messages": [{"role": "user", "content": "hi"}]}),
    )
    sys.stdin.readline()
    store.commit_one(Insert(command))
    print(command.id, flush=True)
    sys.stdin.readline()
    store.commit_one(Move(command, command.evolve(state=CANCELLED, finished_at=2.0), CANCEL, 2.0))
    print("cancelled", flush=True)
    sys.stdin.readline()
    """
)


def test_a_submit_and_an_end_in_another_process_wake_this_one(pg_url: str) -> None:
    here = PostgresStore(pg_url)
    other = subprocess.Popen(
        [PYTHON, "-c", OTHER, pg_url],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert other.stdin is not None and other.stdout is not None
    try:
        here.listen()
        assert here.wait_for_change(0.05) == Changes()  # nothing yet: the wait times out
        other.stdin.write("go\n")
        other.stdin.flush()
        command_id = other.stdout.readline().strip()
        changes = here.wait_for_change(10)
        assert changes.ready == {"far-away"} and changes.finished == ()
        other.stdin.write("go\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "cancelled"
        changes = here.wait_for_change(10)
        assert changes.finished == ((command_id, CANCELLED),) and not changes.ready
        assert here.get(command_id).state == CANCELLED  # woken after it is visible
    finally:
        other.stdin.close()
        other.wait(timeout=10)
        here.close()


def test_what_is_rolled_back_wakes_nobody(pg_url: str) -> None:
    from adapters.base import Request

    here, there = PostgresStore(pg_url), PostgresStore(pg_url)
    try:
        here.listen()
        command = Command(
            id=new_id(),
            adapter="a",
            state="pending",
            created_at=1.0,
            timeout=30.0,
            request=Request.from_json({"messages": [{"role": "user", "content": "hi"}]}),
        )
        there.commit_one(Insert(command))
        assert here.wait_for_change(10).ready == {"a"}
        # A second insert of the same id fails; a group whose new command
        # commits with a cancel that loses its race is undone whole: none of
        # them is announced.
        stale = command.evolve(attempt=7)
        lost = Move(stale, stale.evolve(state=CANCELLED, finished_at=2.0), CANCEL, 2.0)
        results = there.commit(
            [Insert(command), Group((Insert(command.evolve(id=new_id(), adapter="b")), lost))]
        )
        assert all(isinstance(r, Exception) for r in results)
        assert there.counts() == {("a", "pending"): 1}
        assert here.wait_for_change(0.2) == Changes()
    finally:
        here.close()
        there.close()


async def test_relay_wakes_the_dispatcher_and_a_waiter_for_work_done_elsewhere(
    pg_url: str,
) -> None:
    """flows.wakeups.relay, as an engine runs it: another connection's submit
    wakes the dispatcher, its cancel wakes a task waiting here (which would
    otherwise sleep its whole minute), and closing the store after the relay
    is cancelled leaves nothing hanging."""
    import trio

    from adapters.base import Request
    from flows.notices import Notices
    from flows.wakeups import relay

    here, there = PostgresStore(pg_url), PostgresStore(pg_url)
    notices = Notices()
    woken = trio.Event()
    command = Command(
        id=new_id(),
        adapter="far",
        state="pending",
        created_at=1.0,
        timeout=30.0,
        request=Request.from_json({"messages": [{"role": "user", "content": "hi"}]}),
    )
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(relay, here, woken.set, notices)
                await trio.to_thread.run_sync(there.commit_one, Insert(command))
                await woken.wait()

                async def cancel_elsewhere() -> None:
                    await trio.sleep(0.1)
                    cancelled = command.evolve(state=CANCELLED, finished_at=2.0)
                    await trio.to_thread.run_sync(
                        there.commit_one, Move(command, cancelled, CANCEL, 2.0)
                    )

                nursery.start_soon(cancel_elsewhere)
                assert await notices.wait_terminal(command.id, 60) is None  # woken, not told
                assert here.get(command.id).state == CANCELLED
                nursery.cancel_scope.cancel()
    finally:
        here.close()
        there.close()


async def test_relay_needs_no_task_for_a_store_that_cannot_tell(tmp_path: Any) -> None:
    import trio

    from flows.notices import Notices
    from flows.store import Store
    from flows.wakeups import relay

    store = Store(tmp_path / "x.db")
    with trio.fail_after(5):
        await relay(store, lambda: None, Notices())  # returns at once
    store.close()
