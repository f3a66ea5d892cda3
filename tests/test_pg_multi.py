"""Several engine processes on one PostgreSQL database (real processes, the
session's real server): the work is shared, each command is sent once by
the engine that holds its lease; and the chaos of DBOS's tests: an engine
killed with SIGKILL, the server itself restarted (``pg_ctl restart -m
immediate``), both under load. After each: no command lost, every command's
state is its last journal event, the engines carry on by themselves. A send
a crash interrupted may be made twice (the contract is at least once): those
are counted and printed, and must be sends the crash interrupted."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from adapters.base import Request
from flows.operations import Insert, Move
from flows.pgstore import PostgresStore
from flows.records import Command, new_id
from flows.states import RETRY, LostRace
from tests.conftest import PYTHON, ROOT

ENGINES = 3


class Worker:
    """``tests/pg_worker.py`` in its own process, with its own send log."""

    def __init__(self, url: str, log: Path, until: int, *extra: str) -> None:
        self.log = log
        self.process = subprocess.Popen(
            [
                *(PYTHON, "-m", "tests.pg_worker", "--db", url, "--log", str(log)),
                *("--until", str(until), *extra),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        first = self.process.stdout.readline().split()
        assert first[:1] == ["started"], first
        self.pid = int(first[1])

    def sends(self) -> list[tuple[str, int]]:
        if not self.log.exists():
            return []
        return [
            (i, int(a))
            for i, a in (line.split() for line in self.log.read_text().split("\n") if line)
        ]

    def finish(self, timeout: float = 120) -> None:
        assert self.process.wait(timeout=timeout) == 0
        assert self.process.stdout is not None
        assert self.process.stdout.read().split() == ["finished"]


@contextmanager
def workers(url: str, tmp_path: Path, until: int, *extra: str) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        for n in range(ENGINES):
            started.append(Worker(url, tmp_path / f"sends-{n}.log", until, *extra))
        yield started
    finally:
        for worker in started:
            if worker.process.poll() is None:
                worker.process.kill()
            worker.process.wait()


def submit(url: str, count: int, text: str) -> list[str]:
    """``count`` commands, committed in batches as a busy producer would."""
    store = PostgresStore(url)
    ids = []
    try:
        request = Request.from_json({"messages": [{"role": "user", "content": text}]})
        for first in range(0, count, 500):
            commands = [
                Command(
                    id=new_id(),
                    adapter="scripted",
                    request=request,
                    state="pending",
                    created_at=time.time(),
                    timeout=60.0,
                    max_attempts=5,
                )
                for _ in range(min(500, count - first))
            ]
            for result in store.commit([Insert(c) for c in commands]):
                assert not isinstance(result, BaseException), result
            ids += [c.id for c in commands]
    finally:
        store.close()
    return ids


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql.encode()).fetchall()


def wait_until_done(url: str, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while query(url, "SELECT count(*) FROM commands WHERE state = 'done'")[0][0] < at_least:
        assert time.monotonic() < deadline, "the engines stopped making progress"
        time.sleep(0.02)


def check_the_table(url: str, ids: list[str]) -> None:
    """Every command is there, done, and its state is its last journal event."""
    states = dict(query(url, "SELECT id, state FROM commands"))
    assert sorted(states) == sorted(ids), "commands lost or made up"
    assert collections.Counter(states.values()) == {"done": len(ids)}
    disagree = query(
        url,
        "SELECT c.id, c.state, e.to_state FROM commands c JOIN LATERAL "
        "(SELECT to_state FROM events WHERE command_id = c.id ORDER BY id DESC LIMIT 1) e "
        "ON true WHERE e.to_state IS DISTINCT FROM c.state",
    )
    assert disagree == []


def dispatchers(url: str) -> dict[str, list[int]]:
    """The pid in each dispatch's owner (``host:pid:token``), by command."""
    out: dict[str, list[int]] = collections.defaultdict(list)
    for command_id, owner in query(
        url, "SELECT command_id, detail::json->>'owner' FROM events WHERE event = 'dispatch'"
    ):
        out[command_id].append(int(owner.split(":")[1]))
    return out


def test_three_engines_share_5000_commands_each_sent_once(pg_url: str, tmp_path: Path) -> None:
    count = 5000
    with workers(pg_url, tmp_path, count) as engines:
        ids = submit(pg_url, count, "#delay 0.002\nteh")
        for worker in engines:
            worker.finish()
    check_the_table(pg_url, ids)
    sends = {w.pid: w.sends() for w in engines}
    per_command = collections.Counter(i for s in sends.values() for i, _ in s)
    assert sorted(per_command) == sorted(ids)
    assert set(per_command.values()) == {1}, "a command was sent twice"
    assert {a for s in sends.values() for _, a in s} == {1}
    # Sent by the engine that claimed it, under its lease: the one dispatch
    # of each command names the process whose adapter sent it.
    claimed = dispatchers(pg_url)
    for pid, made in sends.items():
        assert all(claimed[i] == [pid] for i, _ in made)
    shares = sorted(len(s) for s in sends.values())
    print(f"\nshares of {count} sends among {ENGINES} engines: {shares}")
    assert shares[0] >= count * 0.05, f"the work was not shared: {shares}"


def sending(url: str, pid: int) -> set[str]:
    """The commands in flight in the engine of process ``pid``."""
    rows = query(url, f"SELECT id FROM commands WHERE state = 'sent' AND owner LIKE '%:{pid}:%'")
    return {r[0] for r in rows}


def duplicates(engines: list[Worker]) -> tuple[int, set[str]]:
    sends = collections.Counter(i for w in engines for i, _ in w.sends())
    twice = {i for i, n in sends.items() if n > 1}
    return sum(sends[i] - 1 for i in twice), twice


def test_an_engine_killed_under_load_loses_nothing(pg_url: str, tmp_path: Path) -> None:
    count = 1500
    with workers(pg_url, tmp_path, count, "--lease", "2", "--poll", "0.5") as engines:
        ids = submit(pg_url, count, "#delay 0.02\nteh")
        wait_until_done(pg_url, count // 3)
        victim = engines[0]
        deadline = time.monotonic() + 30
        while not (in_flight := sending(pg_url, victim.pid)):
            assert time.monotonic() < deadline, "the victim never had a send in flight"
        os.kill(victim.pid, signal.SIGKILL)
        victim.process.wait()
        for worker in engines[1:]:
            worker.finish()
    check_the_table(pg_url, ids)
    extra, twice = duplicates(engines)
    print(
        f"\nkill -9 of one engine of {ENGINES} under load, {len(in_flight)} sends in flight "
        f"there: {extra} duplicated send(s)"
    )
    # Only the sends the killed engine had claimed may be made again, each
    # as a new attempt by a survivor.
    assert twice <= in_flight | {i for i, _ in victim.sends()}
    attempts = dict(query(pg_url, "SELECT id, attempt FROM commands"))
    assert all(attempts[i] == 2 for i in twice)


def test_the_server_restarted_under_load_loses_nothing(
    pg_cluster: Any, pg_url: str, tmp_path: Path
) -> None:
    count = 1500
    with workers(pg_url, tmp_path, count, "--lease", "2", "--poll", "0.5") as engines:
        ids = submit(pg_url, count, "#delay 0.02\nteh")
        wait_until_done(pg_url, count // 3)
        pg_cluster.restart("immediate")
        for worker in engines:
            worker.finish()
    check_the_table(pg_url, ids)
    extra, twice = duplicates(engines)
    print(f"\npg_ctl restart -m immediate under load: {extra} duplicated send(s)")
    attempts = dict(query(pg_url, "SELECT id, attempt FROM commands"))
    # A send made again was a new attempt, journaled as a retry.
    assert all(attempts[i] > 1 for i in twice)


def test_two_engines_moving_the_same_rows_in_opposite_orders_do_not_deadlock(
    pg_url: str,
) -> None:
    """Two survivors recovering one dead engine's sends commit the same
    moves in different orders: one wins each row, the other loses the race;
    neither is aborted by a deadlock (which refused whole batches)."""
    request = Request.from_json({"messages": [{"role": "user", "content": "hi"}]})
    sent = [
        Command(
            id=new_id(),
            adapter="scripted",
            request=request,
            state="sent",
            created_at=1.0,
            timeout=30.0,
            max_attempts=5,
            owner="elsewhere:1:dead",
            lease_until=5.0,
        )
        for _ in range(200)
    ]
    setup = PostgresStore(pg_url)
    assert not [r for r in setup.commit([Insert(c) for c in sent]) if isinstance(r, Exception)]
    setup.close()
    results: dict[int, list[Any]] = {}

    def recover(n: int, order: list[Command]) -> None:
        store = PostgresStore(pg_url)
        try:
            results[n] = store.commit(
                [
                    Move(
                        c,
                        c.evolve(state="pending", attempt=2, owner=None, lease_until=None),
                        RETRY,
                        2.0,
                    )
                    for c in order
                ]
            )
        finally:
            store.close()

    threads = [
        threading.Thread(target=recover, args=(0, sent)),
        threading.Thread(target=recover, args=(1, sent[::-1])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for at in range(len(sent)):
        kinds = {type(results[n][at]).__name__ for n in (0, 1)}
        assert kinds == {"Event", LostRace.__name__}, kinds
