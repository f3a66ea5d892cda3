"""Helpers shared by the queue benchmarks (``bench.lifecycle``, ``bench.claims``).

Timing, the fixed payload, SQLite pragma read-back and the printed table. Every row a
benchmark returns is a plain ``dict`` so that a later ``python -m bench`` runner can
collect rows from every module and print or store them together.
"""

from __future__ import annotations

import math
import sqlite3
import statistics
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adapters.base import AdapterSettings, Reply, Request, SendContext

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

    async def aclose(self) -> None:
        return None


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


def fmt_int(value: Any) -> str:
    return f"{value:,.0f}" if isinstance(value, int | float) and math.isfinite(value) else "-"


def fmt_ms(value: Any) -> str:
    return f"{value * 1000:.2f}" if isinstance(value, int | float) and math.isfinite(value) else "-"


def fmt_str(value: Any) -> str:
    return "" if value is None else str(value)
