"""The processes of the PostgreSQL benchmarks (bench/pg.py), one role each:

    python -m bench.pg_roles lifecycle SYSTEM URL N    dovecote | procrastinate | pgqueuer
    python -m bench.pg_roles engine URL N [--poll S] [--no-wakeups]
    python -m bench.pg_roles submit URL COUNT GAP

Each prints one JSON line of what it measured. The peers are asyncio
libraries, so each runs in a process of its own under asyncio, as its users
would run it; dovecote runs under trio. Every system gets the same ~100-byte
message and answers it at once, so what is measured is the queue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import timedelta
from typing import Any

import trio

import flows
from adapters.base import Request
from bench._common import MESSAGE, REQUEST, InstantAdapter
from flows.operations import Insert, Move
from flows.pgstore import PostgresStore
from flows.records import Command, new_id
from flows.states import DISPATCH, TERMINAL_STATES, LostRace

BATCH = 1000  # jobs per enqueue call, for every system


# --- lifecycle: enqueue N in batches, then all of them done -----------------


async def dovecote_lifecycle(url: str, n: int) -> float:
    async with flows.open_engine(url, adapters=[InstantAdapter()]) as engine:
        with engine.subscribe(buffer=4 * n + 64) as notices:
            started = time.perf_counter()
            for first in range(0, n, BATCH):
                await engine.submit_many("instant", [REQUEST] * min(BATCH, n - first))
            finished = 0
            async for notice in notices:
                if isinstance(notice, flows.StateChange) and notice.command.is_terminal:
                    finished += 1
                    if finished == n:
                        break
            elapsed = time.perf_counter() - started
        counts = engine.store.counts()
    if counts != {("instant", "done"): n}:
        raise RuntimeError(f"dovecote: wrong end state {counts}")
    return elapsed


async def procrastinate_lifecycle(url: str, n: int) -> float:
    from procrastinate import App, PsycopgConnector

    app = App(connector=PsycopgConnector(conninfo=url))
    done = 0

    @app.task(name="job")
    async def job(message: str) -> None:
        nonlocal done
        done += 1

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        started = time.perf_counter()
        for first in range(0, n, BATCH):
            await job.batch_defer_async(*[{"message": MESSAGE}] * min(BATCH, n - first))
        await app.run_worker_async(concurrency=100, wait=False, install_signal_handlers=False)
        elapsed = time.perf_counter() - started
    if done != n:
        raise RuntimeError(f"procrastinate: {done} of {n} jobs ran")
    return elapsed


async def pgqueuer_lifecycle(url: str, n: int) -> float:
    import psycopg
    from pgqueuer.adapters.persistence.queries import Queries
    from pgqueuer.core.qm import QueueManager
    from pgqueuer.domain.types import QueueExecutionMode

    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    enqueuer = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await Queries.from_psycopg_connection(conn).install()
    manager = QueueManager(Queries.from_psycopg_connection(conn))
    done = 0

    @manager.entrypoint("job")
    async def job(_: Any) -> None:
        nonlocal done
        done += 1

    queries = Queries.from_psycopg_connection(enqueuer)
    payload = MESSAGE.encode()
    started = time.perf_counter()
    for first in range(0, n, BATCH):
        size = min(BATCH, n - first)
        await queries.enqueue(["job"] * size, [payload] * size, [0] * size)
    await manager.run(
        mode=QueueExecutionMode.drain,
        batch_size=100,
        dequeue_timeout=timedelta(seconds=0.2),
        log_aggregation_interval=timedelta(0),
    )
    elapsed = time.perf_counter() - started
    await conn.close()
    await enqueuer.close()
    if done != n:
        raise RuntimeError(f"pgqueuer: {done} of {n} jobs ran")
    return elapsed


# --- engine: one of several engine processes draining one database ----------


async def engine_role(url: str, n: int, poll: float) -> dict[str, Any]:
    """Run an engine until ``n`` commands in the database are terminal;
    report its sends and how many of its claims other engines won."""
    adapter = InstantAdapter()
    sent = 0
    original = adapter.send

    async def counting(request: Any, context: Any) -> Any:
        nonlocal sent
        sent += 1
        return await original(request, context)

    adapter.send = counting  # type: ignore[method-assign]
    async with flows.open_engine(url, adapters=[adapter], poll_interval=poll) as engine:
        print(json.dumps({"started": os.getpid()}), flush=True)
        while sum(engine.store.counts(TERMINAL_STATES).values()) < n:
            await trio.sleep(0.005)
        ended = time.time()
    return {"sent": sent, "claims": CLAIMS[0], "lost": CLAIMS[1], "ended": ended}


CLAIMS = [0, 0]  # claims tried, claims lost to another engine (this process)


def count_claims() -> None:
    """Count this process's claims and the races they lost, at the store."""
    commit = PostgresStore.commit

    def counted(self: PostgresStore, operations: Any) -> list[Any]:
        results = commit(self, operations)
        for op, result in zip(operations, results, strict=True):
            if isinstance(op, Move) and op.event == DISPATCH:
                CLAIMS[0] += 1
                CLAIMS[1] += isinstance(result, LostRace)
        return results

    PostgresStore.commit = counted  # type: ignore[method-assign]


# --- submit: one command at a time, for the wake-up latency -----------------


def pending(count: int) -> list[Command]:
    """``count`` new pending commands for the instant adapter."""
    body = Request.from_json(REQUEST)
    now = time.time()
    return [
        Command(
            id=new_id(),
            adapter="instant",
            request=body,
            state="pending",
            created_at=now,
            timeout=60.0,
        )
        for _ in range(count)
    ]


def submit_role(url: str, count: int, gap: float) -> list[str]:
    store = PostgresStore(url)
    ids = []
    try:
        for _ in range(count):
            # Made as it is submitted: its created_at is the submit's time.
            [command] = pending(1)
            store.commit_one(Insert(command))
            ids.append(command.id)
            time.sleep(gap)
    finally:
        store.close()
    return ids


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("lifecycle")
    p.add_argument("system", choices=["dovecote", "procrastinate", "pgqueuer"])
    p.add_argument("url")
    p.add_argument("n", type=int)
    p = sub.add_parser("engine")
    p.add_argument("url")
    p.add_argument("n", type=int)
    p.add_argument("--poll", type=float, default=1.0)
    p.add_argument("--no-wakeups", action="store_true")
    p = sub.add_parser("submit")
    p.add_argument("url")
    p.add_argument("count", type=int)
    p.add_argument("gap", type=float)
    args = parser.parse_args(argv)
    out: Any
    if args.role == "lifecycle":
        if args.system == "dovecote":
            out = {"seconds": trio.run(dovecote_lifecycle, args.url, args.n)}
        else:
            run = {"procrastinate": procrastinate_lifecycle, "pgqueuer": pgqueuer_lifecycle}
            out = {"seconds": asyncio.run(run[args.system](args.url, args.n))}
    elif args.role == "engine":
        count_claims()
        if args.no_wakeups:
            import flows.engine

            flows.engine.feed_of = lambda store: None  # type: ignore[assignment]  # the baseline
        out = trio.run(engine_role, args.url, args.n, args.poll)
    else:
        out = {"ids": submit_role(args.url, args.count, args.gap)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
