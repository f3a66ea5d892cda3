"""``python -m bench`` (or ``make bench``): every benchmark, side by side with
its peers, in one run; the output also goes to bench/RESULTS.md with the
machine, Python and SQLite versions and the date.

Each benchmark is a module here with its own method written in its
docstring; this runner only runs them in turn and keeps what they print. Each
module's ``main(args)`` returns its headline figures (``bench._common.headline``
rows); at the end they are printed as one summary table, which also heads
bench/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import platform
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

BENCHMARKS: list[tuple[str, str, list[str]]] = [
    ("Command lifecycle throughput (submit -> done, journaled)", "bench.lifecycle", []),
    ("Claim latency, 4 producers / 4 consumers", "bench.claims", []),
    ("Engine overhead vs raw httpx, 1,000 in flight", "bench.overhead", []),
    ("Three-way merge, 1 MB, 200 edits per side, vs git merge-file", "bench.merge", []),
    ("JSON-RPC round trip over stdio vs a bare framing loop", "bench.rpc", []),
    (
        "Large documents: command/list latency while another client edits or re-opens one",
        "bench.documents",
        [],
    ),
    ("Dead-letter lateness and peak memory, 100,000 pending deadlines", "bench.deadletter", []),
    ("Crash: kill -9 after 500 claims under load, then restart", "bench.crash", []),
    (
        "PostgreSQL: lifecycle vs procrastinate and pgqueuer, scaling, wake-up latency",
        "bench.pg",
        [],
    ),
]


def machine() -> str:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}\n"
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {cpu}\n"
        f"- Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}\n"
        f"- load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
    )


def main() -> None:
    import importlib

    from bench._common import headlines_markdown, print_headlines

    header = f"# Benchmark results\n\n{machine()}"
    print(header)
    sections = []
    headlines: list[dict[str, Any]] = []
    for title, module, args in BENCHMARKS:
        print(f"## {title}\n", flush=True)
        buffer = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(buffer):
            headlines += importlib.import_module(module).main(args) or []
        output = buffer.getvalue().rstrip()
        print(output + f"\n\n({time.perf_counter() - started:.0f} s)\n", flush=True)
        sections.append(f"## {title}\n\n```\n{output}\n```\n")
    print("## Summary\n")
    print_headlines(headlines)
    summary = f"## Summary\n\n{headlines_markdown(headlines)}"
    Path(__file__).with_name("RESULTS.md").write_text("\n".join([header, summary, *sections]))
    print(f"written to {Path(__file__).with_name('RESULTS.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
