"""Benchmark of ``flows.merge.three_way`` on a ~1 MB prose document, against git.

Run from the repository root: ``.venv/bin/python -m bench.merge``.

The document is real prose (the licence texts the OS ships and stdlib docstrings),
repeated until it passes 1 MB.  Each copy is shuffled and varied (numbered paragraphs,
some words suffixed with the copy number) so that tokens are diverse and, as in a real
long document, most stretches of text occur once.  Each side makes 200 word edits at
scattered, non-adjacent words; the merge must be clean and contain both sets.

Targets: median merge under 50 ms, peak memory under 10x the base's size.
"""

from __future__ import annotations

import inspect
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from bench._common import Row, headline
from flows.merge import three_way

TARGET_BYTES = 1_000_000
EDITS_PER_SIDE = 200
RUNS = 7
STDLIB_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "csv",
    "dataclasses",
    "decimal",
    "difflib",
    "email",
    "functools",
    "heapq",
    "json",
    "logging",
    "pickle",
    "re",
    "subprocess",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "zipfile",
)
WORD = re.compile(r"[A-Za-z]{3,}")


def paragraphs() -> list[str]:
    texts = [p.read_text(errors="replace") for p in Path("/usr/share/common-licenses").iterdir()]
    for name in STDLIB_MODULES:
        module = __import__(name)
        texts.append(inspect.getdoc(module) or "")
        for _, member in inspect.getmembers(module):
            doc = inspect.getdoc(member) if callable(member) else None
            if doc and len(doc) > 200:
                texts.append(doc)
    paras: list[str] = []
    for text in texts:
        paras.extend(p for p in re.split(r"\n\s*\n", text) if len(p) > 80)
    return paras


def vary(para: str, copy: int, rng: random.Random) -> str:
    """The paragraph with about one word in twelve suffixed with the copy number."""

    def one(m: re.Match[str]) -> str:
        return f"{m.group()}{copy}" if rng.random() < 0.08 else m.group()

    return WORD.sub(one, para)


def document(rng: random.Random) -> str:
    paras = paragraphs()
    out: list[str] = []
    size = 0
    copy = 0
    while size < TARGET_BYTES:
        copy += 1
        order = paras[:]
        rng.shuffle(order)
        for i, para in enumerate(order):
            piece = f"{copy}.{i}. {vary(para, copy, rng)}\n\n"
            out.append(piece)
            size += len(piece)
            if size >= TARGET_BYTES:
                break
    return "".join(out)


def edited(base: str, rng: random.Random) -> tuple[str, str, str]:
    """Ours and theirs with 200 word edits each at scattered, non-adjacent words, and the
    text with both."""
    words = list(WORD.finditer(base))
    picked = sorted(rng.sample(range(0, len(words), 2), 2 * EDITS_PER_SIDE))
    sides = [0] * EDITS_PER_SIDE + [1] * EDITS_PER_SIDE
    rng.shuffle(sides)
    texts: list[list[str]] = [[], [], []]
    pos = 0
    for index, side in zip(picked, sides, strict=True):
        m = words[index]
        new = m.group().upper() if side == 0 else f"{m.group()[::-1]}x"
        gap = base[pos : m.start()]
        for t in texts:
            t.append(gap)
        texts[side].append(new)
        texts[1 - side].append(m.group())
        texts[2].append(new)
        pos = m.end()
    for t in texts:
        t.append(base[pos:])
    ours, theirs, both = ("".join(t) for t in texts)
    return ours, theirs, both


def time_git(base: str, ours: str, theirs: str) -> list[float]:
    git = shutil.which("git")
    if git is None:
        sys.exit("git is not installed: the benchmark compares against git merge-file")
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp, name) for name in ("ours", "base", "theirs")]
        for path, text in zip(paths, (ours, base, theirs), strict=True):
            path.write_text(text, encoding="utf-8")
        for _ in range(RUNS):
            t0 = time.perf_counter()
            subprocess.run([git, "merge-file", "-p", *map(str, paths)], capture_output=True)
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> list[Row]:
    rng = random.Random(20240503)
    base = document(rng)
    ours, theirs, both = edited(base, rng)
    size = len(base.encode("utf-8"))
    print(f"document: {size:,} bytes, {len(base):,} code points, {EDITS_PER_SIDE} edits per side")

    merge = three_way(base, ours, theirs)  # warm-up: compiles the token pattern once
    if not (merge.clean and merge.text == both):
        sys.exit(f"merge is wrong: clean={merge.clean}, conflicts={len(merge.conflicts)}")

    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        three_way(base, ours, theirs)
        times.append(time.perf_counter() - t0)
    git_times = time_git(base, ours, theirs)

    tracemalloc.start()
    three_way(base, ours, theirs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    med = statistics.median(times)
    git_med = statistics.median(git_times)
    ms = [t * 1000 for t in times]
    print(
        f"three_way: median {med * 1000:.1f} ms over {RUNS} runs "
        f"(min {min(ms):.1f}, max {max(ms):.1f}, stdev {statistics.stdev(ms):.1f} ms)"
    )
    print(
        f"git merge-file -p: median {git_med * 1000:.1f} ms "
        f"(min {min(git_times) * 1000:.1f}, max {max(git_times) * 1000:.1f} ms)"
    )
    print(f"ratio three_way / git: {med / git_med:.2f}x")
    print(f"peak memory of the merge: {peak:,} bytes = {peak / size:.2f}x the base's size")
    print(
        f"targets: median < 50 ms {'met' if med < 0.05 else 'MISSED'}, "
        f"peak < 10x {'met' if peak < 10 * size else 'MISSED'}"
    )
    return [
        headline(
            f"three-way merge, {size / 1e6:.0f} MB, {EDITS_PER_SIDE} edits per side (median)",
            f"{med * 1000:.1f} ms",
            baseline=f"git merge-file {git_med * 1000:.1f} ms",
            ratio=f"{med / git_med:.2f}x",
            target="< 50 ms",
            met=med < 0.05,
        ),
        headline(
            "three-way merge peak memory",
            f"{peak / size:.2f}x the base",
            target="< 10x",
            met=peak < 10 * size,
        ),
    ]


if __name__ == "__main__":
    main()
