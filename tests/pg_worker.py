"""One engine process on a shared database, for the tests of several engines
and of crashes (tests/test_pg_multi.py) and the scaling benchmark.

    python -m tests.pg_worker --db URL --log PATH --until N
                              [--max-in-flight K] [--lease S] [--poll S]

Prints ``started PID`` once its engine runs, sends what it claims through the
scripted adapter, which appends ``<command id> <attempt>`` to ``PATH`` for
each send (so sends can be counted per command across processes), and exits
once ``N`` commands in the database are terminal, printing ``finished``. A
store that is away meanwhile (the server restarting) is waited for.
"""

from __future__ import annotations

import argparse
import os

import trio

import flows
from adapters.scripted import ScriptedAdapter
from flows.errors import StoreError
from flows.states import TERMINAL_STATES


async def main(args: argparse.Namespace) -> None:
    scripted = ScriptedAdapter(max_in_flight=args.max_in_flight, call_log=args.log)
    async with flows.open_engine(
        args.db, adapters=[scripted], lease=args.lease, poll_interval=args.poll
    ) as engine:
        print(f"started {os.getpid()}", flush=True)
        while True:
            await trio.sleep(0.05)
            try:
                ended = sum(engine.store.counts(TERMINAL_STATES).values())
            except StoreError:
                continue  # the server is away: the engine waits for it too
            if ended >= args.until:
                break
    print("finished", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--until", type=int, required=True)
    parser.add_argument("--max-in-flight", type=int, default=128)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--poll", type=float, default=1.0)
    trio.run(main, parser.parse_args())
