"""flows.merge.three_way against ``git merge-file -p`` on real prose.

The prose is what the machine ships: the OS's licence texts and stdlib module docstrings.
Where git merges cleanly (edits on different lines) both must produce the same text.
Where prose is a paragraph per line and both sides edit different words of one line,
git conflicts and three_way must merge cleanly: that is the point of merging tokens.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.merge import three_way

CASES = 40
LICENCES = Path("/usr/share/common-licenses")
MODULES = (
    "argparse",
    "difflib",
    "heapq",
    "json",
    "pickle",
    "subprocess",
    "textwrap",
    "decimal",
    "logging",
    "tarfile",
    "zipfile",
    "bisect",
)
WORD = re.compile(r"[a-z]{3,}")


@pytest.fixture(scope="module")
def git() -> str:
    path = shutil.which("git")
    if path is None:
        pytest.fail("git is not installed: this test compares three_way with git merge-file")
    return path


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    """Paragraphs of real prose, as wrapped in their sources."""
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(LICENCES.iterdir())]
    texts += [inspect.getdoc(importlib.import_module(name)) or "" for name in MODULES]
    paras = [
        p.strip("\n")
        for text in texts
        for p in re.split(r"\n[ \t]*\n", text)
        if len(WORD.findall(p)) >= 20
    ]
    assert len(paras) > 200, "too little prose found on this machine"
    return paras


def git_merge(git: str, tmp: Path, base: str, ours: str, theirs: str) -> tuple[bool, str]:
    files = []
    for name, text in (("ours", ours), ("base", base), ("theirs", theirs)):
        path = tmp / name
        path.write_bytes(text.encode("utf-8"))
        files.append(str(path))
    done = subprocess.run([git, "merge-file", "-p", *files], capture_output=True, check=False)
    # The exit status is the number of conflicts (at most 127); anything else is an error.
    assert 0 <= done.returncode <= 127, done.stderr.decode()
    return done.returncode == 0, done.stdout.decode("utf-8")


def replace_word(text: str, match: re.Match[str], new: str) -> str:
    return text[: match.start()] + new + text[match.end() :]


def edit_pairs(
    rng: random.Random, paragraphs: list[str], one_line: bool
) -> Iterator[tuple[str, str, str, str]]:
    """base, ours, theirs, expected: each side changes one word of the base, at places
    git can tell apart (different lines, one unchanged line between) or not (one line)."""
    while True:
        chosen = rng.sample(paragraphs, 6)
        if one_line:
            chosen = [" ".join(p.split()) for p in chosen]
        base = "\n\n".join(chosen) + "\n"
        words = list(WORD.finditer(base))
        first = rng.randrange(len(words))
        line_of = base.count("\n", 0, words[first].start())
        if one_line:
            others = [
                k
                for k, w in enumerate(words)
                if abs(k - first) >= 2 and base.count("\n", 0, w.start()) == line_of
            ]
        else:
            others = [
                k for k, w in enumerate(words) if abs(base.count("\n", 0, w.start()) - line_of) >= 2
            ]
        if not others:
            continue
        second = rng.choice(others)
        a, b = words[first], words[second]
        ours = replace_word(base, a, a.group().upper())
        theirs = replace_word(base, b, b.group()[::-1] + "x")
        x, y = sorted((a, b), key=lambda m: m.start())
        new = {a.start(): a.group().upper(), b.start(): b.group()[::-1] + "x"}
        expected = replace_word(replace_word(base, y, new[y.start()]), x, new[x.start()])
        yield base, ours, theirs, expected


def test_line_disjoint_edits_agree_with_git(
    git: str, paragraphs: list[str], tmp_path: Path
) -> None:
    ours_clean = git_clean = 0
    cases = edit_pairs(random.Random(1), paragraphs, one_line=False)
    for _ in range(CASES):
        base, ours, theirs, expected = next(cases)
        merge = three_way(base, ours, theirs)
        clean, text = git_merge(git, tmp_path, base, ours, theirs)
        assert clean, "git conflicted on edits two lines apart"
        assert text == expected
        assert merge.text == text
        ours_clean += merge.clean
        git_clean += clean
    print(f"line-disjoint: dovecote {ours_clean}/{CASES} clean, git {git_clean}/{CASES} clean")
    assert ours_clean == CASES


def test_same_line_word_edits_merge_where_git_conflicts(
    git: str, paragraphs: list[str], tmp_path: Path
) -> None:
    ours_clean = git_clean = 0
    cases = edit_pairs(random.Random(2), paragraphs, one_line=True)
    for _ in range(CASES):
        base, ours, theirs, expected = next(cases)
        merge = three_way(base, ours, theirs)
        clean, _ = git_merge(git, tmp_path, base, ours, theirs)
        assert merge.text == expected
        ours_clean += merge.clean
        git_clean += clean
    print(f"same-line: dovecote {ours_clean}/{CASES} clean, git {git_clean}/{CASES} clean")
    assert ours_clean == CASES
    assert git_clean <= CASES // 10, "git was expected to conflict on same-line edits"
