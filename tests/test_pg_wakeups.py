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


# The engine's side of these wake-ups (flows.wakeups.Wakeups: the dispatcher,
# waiters, the bridge and a send stopped, across real processes) is tested in
# tests/test_pg_engine_wakeups.py.


def test_a_store_that_cannot_tell_has_no_feed(tmp_path: Any) -> None:
    from flows.store import Store
    from flows.wakeups import feed_of

    store = Store(tmp_path / "x.db")
    try:
        assert feed_of(store) is None
    finally:
        store.close()
