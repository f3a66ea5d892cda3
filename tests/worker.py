"""An engine in its own process, for the crash and multi-process tests.

    python -m tests.worker --db PATH [--submit N --text T] [--max-in-flight K]
                           [--wait-sent] [--until-done N]

Submits N commands (if asked), prints ``sent N`` once N of them are in
flight, and with ``--until-done`` runs until N commands in the file are
terminal. The scripted adapter logs each send to ``$DOVECOTE_SCRIPTED_LOG``.
"""

from __future__ import annotations

import argparse
import os
import sys

import trio

import flows
from adapters.scripted import ScriptedAdapter


async def main(args: argparse.Namespace) -> None:
    scripted = ScriptedAdapter(
        max_in_flight=args.max_in_flight, call_log=os.environ.get("DOVECOTE_SCRIPTED_LOG")
    )
    async with flows.open_engine(args.db, adapters=[scripted], poll_interval=0.05) as engine:
        print(f"started {os.getpid()}", flush=True)
        for _ in range(args.submit):
            await engine.submit(
                "scripted",
                {"messages": [{"role": "user", "content": args.text}]},
                max_attempts=3,
                timeout=60,
            )
        if args.wait_sent:
            while len(engine.list(["sent"])) < args.submit:
                await trio.sleep(0.01)
            print(f"sent {args.submit}", flush=True)
        if args.until_done:
            while True:
                finished = engine.list(["done", "dead", "cancelled"])
                if len(finished) >= args.until_done:
                    break
                await trio.sleep(0.02)
            print(f"finished {len(finished)}", flush=True)
        else:
            await trio.sleep_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--submit", type=int, default=0)
    parser.add_argument("--text", default="teh")
    parser.add_argument("--max-in-flight", type=int, default=256)
    parser.add_argument("--until-done", type=int, default=0)
    parser.add_argument("--wait-sent", action="store_true", help="print 'sent N' when all are sent")
    trio.run(main, parser.parse_args())
    sys.exit(0)
