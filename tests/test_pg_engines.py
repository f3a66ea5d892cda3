"""Several engine processes on one PostgreSQL database share its pending
table: 3 engines, 5,000 commands; each is sent exactly once and all end
done. Real processes, a real server.

Not asserted yet: that the work is *shared*. With today's claims (the
dispatcher reads the head of the queue, then claims those rows by
compare-and-set) every engine reads the same oldest rows, and the one that
commits first wins them all: seen here, one engine sends all 5,000 and the
others lose every race. A claim that picks its rows inside the store
(``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT n)``)
is the fix; it needs the dispatcher to ask the store for it."""

from __future__ import annotations

import collections
import subprocess
from pathlib import Path

from adapters.base import Request
from flows.operations import Insert
from flows.pgstore import PostgresStore
from flows.records import Command, new_id
from tests.conftest import PYTHON, ROOT

ENGINES = 3
COMMANDS = 5_000


def test_three_engines_share_five_thousand_commands_each_sent_once(
    pg_url: str, tmp_path: Path
) -> None:
    store = PostgresStore(pg_url)
    logs = [tmp_path / f"engine-{i}.log" for i in range(ENGINES)]
    engines = [
        subprocess.Popen(
            [PYTHON, str(ROOT / "tests" / "pg_engine_worker.py"), pg_url, str(log)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for log in logs
    ]
    try:
        for engine in engines:
            assert engine.stdout is not None and engine.stdout.readline().strip() == "started"
        request = Request.from_json({"messages": [{"role": "user", "content": "count me"}]})
        ids = []
        for _ in range(COMMANDS // 500):  # submitted while the engines run
            batch = [
                Command(
                    id=new_id(),
                    adapter="count",
                    request=request,
                    state="pending",
                    created_at=1_700_000_000.0,
                    timeout=60.0,
                )
                for _ in range(500)
            ]
            ids += [c.id for c in batch]
            assert all(
                not isinstance(r, BaseException) for r in store.commit([Insert(c) for c in batch])
            )
        for engine in engines:
            assert engine.wait(timeout=240) == 0
        sends = [line.split() for log in logs for line in log.read_text().splitlines()]
        per_command = collections.Counter(command_id for command_id, _, _ in sends)
        duplicated = {i: n for i, n in per_command.items() if n > 1}
        assert duplicated == {}, f"{len(duplicated)} commands sent more than once"
        assert set(per_command) == set(ids)
        assert store.counts() == {("count", "done"): COMMANDS}
        for command_id in ids[:50]:  # the journal of each: one claim, by its sender
            events = [e.event for e in store.history(command_id)]
            assert events == ["submit", "dispatch", "reply", "finish"]
    finally:
        for engine in engines:
            if engine.poll() is None:
                engine.kill()
        store.close()
