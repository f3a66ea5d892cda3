"""One engine process on a PostgreSQL database, for the several-engines
test (tests/test_pg_engines.py): it serves the ``count`` adapter, whose
every send is a line ``<command id> <attempt> <pid>`` in the log file, and
stops once no ``count`` command is left to do.

python tests/pg_engine_worker.py URL LOG [LEASE [SEND_SECONDS]]
"""

from __future__ import annotations

import os
import sys
from typing import Any

import trio

from adapters.base import AdapterSettings, Reply, Request, SendContext
from flows.engine import Engine
from flows.errors import StoreError
from flows.pgstore import PostgresStore
from flows.states import LIVE_STATES


class Counting:
    def __init__(self, log: Any, seconds: float) -> None:
        self.settings = AdapterSettings(name="count", max_in_flight=64)
        self.log = log
        self.seconds = seconds

    async def send(self, request: Request, context: SendContext) -> Reply:
        self.log.write(f"{context.command_id} {context.attempt} {os.getpid()}\n")
        await trio.sleep(self.seconds)
        return Reply("ok")

    async def aclose(self) -> None:
        pass


async def main(url: str, log_path: str, lease: float, seconds: float) -> None:
    store = PostgresStore(url)
    with open(log_path, "a", buffering=1) as log:
        async with trio.open_nursery() as nursery:
            adapters = [Counting(log, seconds)]
            engine = Engine(store, nursery, adapters, poll_interval=0.02, lease=lease)  # type: ignore[arg-type]
            await engine.run()
            print("started", flush=True)
            idle = 0
            while idle < 10:  # 10 looks in a row with nothing left: done
                await trio.sleep(0.1)
                try:
                    live = store.counts(LIVE_STATES)
                except StoreError:  # the server is restarting: look again
                    idle = 0
                    continue
                idle = 0 if any(a == "count" for a, _ in live) else idle + 1
            nursery.cancel_scope.cancel()
    store.close()


if __name__ == "__main__":
    given = sys.argv[3:5]
    lease, seconds = (float(a) for a in [*given, *["30", "0"][len(given) :]])
    trio.run(main, sys.argv[1], sys.argv[2], lease, seconds)
