"""Helpers shared by the benchmarks.

Timing, the fixed payload, SQLite pragma read-back and the printed table. Every row a
benchmark returns is a plain ``dict`` so that the ``python -m bench`` runner can
collect rows from every module and print or store them together.

Headline figures: each module's ``main(argv)`` returns a list of ``headline(...)``
dicts, one per target or comparison it reports; ``python -m bench`` prints them all in
one summary table (``print_headlines``) and puts it at the top of bench/RESULTS.md
(``headlines_markdown``).
"""

from __future__ import annotations

import math
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

import flows
from adapters.base import AdapterSettings, Answer, Reply, Request, SendContext

# A ~100-byte user message (exactly 100 ASCII characters); every system gets this text.
MESSAGE = (
    "Please fix the spelling in this sentence: teh quick brown fox jumps over the lazy dog. " * 2
)[:100]
# The request every command carries, in dovecote's provider-neutral JSON form.
REQUEST: dict[str, Any] = {"messages": [{"role": "user", "content": MESSAGE}]}
# The instant model's answer, also ~100 bytes.
REPLY_TEXT = MESSAGE.replace("teh", "the")


class InstantAdapter:
    """An in-process model that answers every request at once, with the same reply."""

    def __init__(self, name: str = "instant", max_in_flight: int = 1024) -> None:
        self.settings = AdapterSettings(name=name, max_in_flight=max_in_flight)
        self._reply = Reply(REPLY_TEXT)

    async def send(self, request: Request, context: SendContext) -> Reply:
        return self._reply

    async def send_many(self, sends: Sequence[tuple[Request, SendContext]], answer: Answer) -> None:
        for index in range(len(sends)):
            answer(index, self._reply)

    async def aclose(self) -> None:
        return None


class Parked:
    """A stand-in adapter with ``max_in_flight`` 0: the engine claims nothing for it, so
    what is submitted for ``name`` stays ``pending`` (see ``prefill``)."""

    def __init__(self, name: str) -> None:
        self.settings = AdapterSettings(name=name, max_in_flight=0)

    async def send(self, request: Request, context: SendContext) -> Reply:
        raise AssertionError("a parked adapter is never sent to")

    async def aclose(self) -> None:
        return None


def prefill(
    path: Path,
    adapter: str,
    jobs: Sequence[dict[str, Any]],
    *,
    submitters: int = 20,
    batch: int = 100,
    **options: Any,
) -> float:
    """Put ``jobs`` in a new dovecote file at ``path``, every command ``pending``: each job
    is the keyword arguments of ``engine.submit`` for adapter ``adapter``. Runs of
    consecutive jobs with the same options (all but ``request``) go in one
    ``engine.submit_many`` call (at most ``batch`` requests), from ``submitters``
    concurrent tasks, while the adapter is parked so that nothing is sent. The engine is
    closed afterwards, which checkpoints the WAL into the file. ``options`` go to
    ``flows.open_engine`` (e.g. ``handlers``, which ``submit`` checks). Returns submits/s."""
    groups: list[tuple[dict[str, Any], list[Any]]] = []
    for job in jobs:
        same = {key: value for key, value in job.items() if key != "request"}
        if groups and groups[-1][0] == same and len(groups[-1][1]) < batch:
            groups[-1][1].append(job["request"])
        else:
            groups.append((same, [job["request"]]))

    async def fill() -> float:
        async with flows.open_engine(path, adapters=[Parked(adapter)], **options) as engine:

            async def submit(share: Sequence[tuple[dict[str, Any], list[Any]]]) -> None:
                for same, requests in share:
                    await engine.submit_many(adapter, requests, **same)

            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for first in range(submitters):
                    nursery.start_soon(submit, groups[first::submitters])
            elapsed = time.perf_counter() - started
            pending = engine.store.counts()
        if pending != {(adapter, "pending"): len(jobs)}:
            raise RuntimeError(f"prefill: expected {len(jobs)} pending, found {pending}")
        return len(jobs) / elapsed

    rate: float = trio.run(fill)
    return rate


SYNCHRONOUS_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}

Row = dict[str, Any]


@contextmanager
def fresh_dir(prefix: str) -> Iterator[Path]:
    """A new, empty temporary directory, removed afterwards: one per measured run."""
    with tempfile.TemporaryDirectory(prefix=f"dovecote-bench-{prefix}-") as name:
        yield Path(name)


def pragmas(conn: sqlite3.Connection) -> tuple[str, str]:
    """(journal_mode, synchronous) as the connection reports them, e.g. ("wal", "NORMAL")."""
    journal = str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    level = int(conn.execute("PRAGMA synchronous").fetchone()[0])
    return journal, SYNCHRONOUS_NAMES.get(level, str(level))


def rate_row(
    bench: str,
    system: str,
    variant: str,
    n: int,
    seconds: Sequence[float],
    *,
    journal: str,
    synchronous: str,
    txns: str,
    notes: str = "",
) -> Row:
    """A throughput row: ``n`` items per run, one elapsed time per run."""
    rates = [n / s for s in seconds]
    return {
        "bench": bench,
        "system": system,
        "variant": variant,
        "n": n,
        "runs": len(seconds),
        "unit": "commands/s",
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "journal_mode": journal,
        "synchronous": synchronous,
        "txns": txns,
        "notes": notes,
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by the nearest-rank method."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def print_table(
    rows: Sequence[Row], columns: Sequence[tuple[str, str, Callable[[Any], str]]]
) -> None:
    """Print ``rows`` as an aligned text table; ``columns`` are (key, heading, format)."""
    cells = [[heading for _, heading, _ in columns]]
    cells += [[fmt(row.get(key)) for key, _, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for index, line in enumerate(cells):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )
        if index == 0:
            print("  ".join("-" * width for width in widths))


def print_spread(
    rows: Sequence[Row],
    leading: Sequence[tuple[str, str, Callable[[Any], str]]],
    show: Callable[[Row, str], str],
) -> None:
    """Print ``rows`` as the ``leading`` columns, then each row's median, min and max
    over its runs, as ``show(row, key)`` writes them."""
    spread = ("median", "min", "max")
    shown = [{**row, **{f"{key}_shown": show(row, key) for key in spread}} for row in rows]
    print_table(shown, (*leading, *((f"{key}_shown", key, fmt_str) for key in spread)))


def fmt_int(value: Any) -> str:
    return f"{value:,.0f}" if isinstance(value, int | float) and math.isfinite(value) else "-"


def fmt_ms(value: Any) -> str:
    return f"{value * 1000:.2f}" if isinstance(value, int | float) and math.isfinite(value) else "-"


def fmt_str(value: Any) -> str:
    return "" if value is None else str(value)


# --- headline figures: one row per benchmark target, for the summary table ------------


def headline(
    benchmark: str,
    dovecote: str,
    *,
    baseline: str = "-",
    ratio: str = "-",
    target: str = "-",
    met: bool | None = None,
) -> Row:
    """One row of the summary table. ``dovecote`` and ``baseline`` are formatted figures
    (``baseline`` names the best peer or the floor it is, e.g. "persist-queue 8,460/s");
    ``met`` is None when the row has no target."""
    return {
        "benchmark": benchmark,
        "dovecote": dovecote,
        "baseline": baseline,
        "ratio": ratio,
        "target": target,
        "met": met,
    }


def verdict(met: bool | None) -> str:
    return "-" if met is None else ("met" if met else "MISSED")


HEADLINE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("benchmark", "benchmark"),
    ("dovecote", "dovecote"),
    ("baseline", "best peer / baseline"),
    ("ratio", "ratio"),
    ("target", "target"),
    ("met", "met?"),
)


def _headline_cells(rows: Sequence[Row]) -> list[list[str]]:
    return [
        [
            verdict(row["met"]) if key == "met" else fmt_str(row.get(key))
            for key, _ in HEADLINE_COLUMNS
        ]
        for row in rows
    ]


def print_headlines(rows: Sequence[Row]) -> None:
    """The summary table, as aligned text."""
    print_table(
        [
            dict(zip((k for k, _ in HEADLINE_COLUMNS), cells, strict=True))
            for cells in _headline_cells(rows)
        ],
        [(key, heading, fmt_str) for key, heading in HEADLINE_COLUMNS],
    )


def headlines_markdown(rows: Sequence[Row]) -> str:
    """The summary table, as a Markdown table."""
    lines = ["| " + " | ".join(heading for _, heading in HEADLINE_COLUMNS) + " |"]
    lines.append("|" + "---|" * len(HEADLINE_COLUMNS))
    for cells in _headline_cells(rows):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
