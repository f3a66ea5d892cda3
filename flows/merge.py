"""Three-way merge of a region: the snapshot, the person's edits, and the model's reply.

A model's reply to "fix this region" arrives seconds after the request; by then the person
has typed inside and around the region.  ``three_way(base, ours, theirs)`` merges the
two edit sets against the stored snapshot: ``base`` is the snapshot's text, ``ours`` the
region's text now (the person's edits), ``theirs`` the model's reply.

Why tokens, and which tokens
    Line-based merges (``git merge-file``) conflict whenever both sides touch the same line,
    and prose is often one 2,000-character paragraph per line, so a person fixing one word
    and a model fixing another would always conflict.  Characters are too fine: two edits
    inside the same word would be spliced into a word nobody wrote.  The unit is therefore
    the *token*, and a text is the concatenation of its tokens, which are:

    * a maximal run of whitespace (``"\\r\\n"`` is never split, so line ends survive intact);
    * a maximal run of word characters (``\\w``) with any combining marks, ZWJ/ZWNJ and emoji
      skin-tone modifiers attached, so ``"e\\u0301"`` is one unit with its accent;
    * one character of a script written without spaces (CJK ideographs, kana, Thai, Lao,
      Khmer, Myanmar) plus its marks: a whole Chinese sentence would otherwise be one
      "word", and any two edits in it would conflict;
    * one other character (punctuation, symbol, emoji) plus its marks and ZWJ-joined
      partners, so an emoji ZWJ sequence stays whole.

    No token mixes whitespace with non-whitespace, so every whitespace/non-whitespace
    transition is a token boundary whatever surrounds it.  The anchoring pass below relies
    on that to cut texts into pieces whose tokens are the tokens of the whole.

How tokens are diffed
    Each distinct token of a piece is given one character (``chr(0)``, ``chr(1)``, ...) and
    diff-match-patch's ``diff_main`` diffs the encoded strings: the classic line-to-char
    trick, with tokens.  A Python ``str`` holds any code point, surrogates included, so a
    piece can hold 1,114,112 distinct tokens, not the 65,536 a UTF-16 string would allow
    (a 1 MB document can have more).  A piece with more falls back to lines as units,
    and one with more distinct lines than that to a single replacement: each fallback
    is coarser but still an exact diff.

    Tokenizing and diffing a whole 1 MB document in Python is far too slow (1.8 s for 200
    scattered edits, against about 25 ms with what follows), so a first pass works on
    characters with C-speed string operations: it strips the common prefix and suffix and
    splits the rest at *anchors*, runs of text that occur exactly once in both texts (the
    idea of patience diff, and of dmp's own "half match", made safe for repeated text by
    the uniqueness test).  Cuts are placed on whitespace transitions, so only the small
    pieces around actual edits are tokenized.  Text with no whitespace gives this pass
    nowhere to cut; it is tokenized and diffed whole: correct, slower, bounded by the
    timeout below.  dmp's half-match speedup is disabled: in repetitive text it can align
    a copy shifted by one repetition, a correct but needlessly large diff that would
    surface as spurious conflicts.

When edits overlap (the conflict rule)
    Each side's diff is a list of ``Edit(start, end, text)`` in base offsets.  An edit with
    ``start == end`` is an insertion at a point; otherwise it replaces ``base[start:end]``.
    An edit of ours and an edit of theirs *overlap*, and land in one conflict unless they
    produce the same text, when

    * both replace ranges that share at least one base character, or
    * an insertion falls strictly inside the other side's replaced range, or
    * both insert at the same point (different texts conflict; identical ones are taken
      once).

    Edits that merely *touch* (one ends where the other starts, or an insertion sits at
    the boundary of the other's range) do not overlap and are both applied; an insertion
    at a boundary stays outside the replaced range, before it at its start and after it
    at its end.  Why: with whitespace runs as tokens, touching edits are edits with no
    unchanged token between them, such as a word and the comma after it, or text the
    person typed right after the words the model rewrote.  Both sides' text survives,
    their order is fixed by the base, and the ambiguity that makes ``diff3`` cautious
    (which of two same-point insertions goes first) cannot arise.  Where a diff could
    place a pure deletion in two equivalent spots, one of them may put an insertion of the
    other side strictly inside it: that case conflicts, so ambiguity errs on the side of a
    conflict, never a silent merge.

What happens on ``Diff_Timeout``
    Each side's diff gets ``timeout`` seconds (``DIFF_TIMEOUT`` by default), set as dmp's
    ``Diff_Timeout`` and passed as one deadline to every ``diff_main`` call of that side,
    so a merge takes at most about twice the timeout plus linear work.  When a deadline
    passes, dmp stops refining and reports each remaining unsolved piece as "delete all of
    it, insert all of the other": still an exact diff (applying it yields the other text),
    only coarser.  The merge built on it is therefore still correct: every edit of each
    side is either applied or reported inside a conflict.  It may report conflicts that a
    finer diff would have merged cleanly.

Offsets are Python ``str`` indices, that is Unicode code points, never UTF-16 units or
bytes; any text, including astral characters, combining marks and CRLF, round-trips
exactly.
"""

from __future__ import annotations

import functools
import re
import time
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate, chain
from typing import Final, Literal

import attrs
from diff_match_patch import diff_match_patch

__all__ = [
    "DIFF_TIMEOUT",
    "Conflict",
    "Edit",
    "Merge",
    "Policy",
    "apply_edits",
    "apply_policy",
    "diff",
    "resolve",
    "three_way",
    "tokenize",
]

DIFF_TIMEOUT = 0.5
"""Seconds each side's diff may spend refining before it settles for a coarser diff."""

Policy = Literal["drop", "ask", "markers", "theirs"]
_POLICIES: tuple[str, ...] = ("drop", "ask", "markers", "theirs")

# Distinct tokens one piece may hold: every code point a Python str can carry.
_ALPHABET = 0x110000
# Pieces at most this long (both sides together) go straight to dmp: anchoring them would
# cost more string scans than it saves.
_LEAF = 512
# Length of the text probed for an anchor; longer probes are tried when shorter ones are
# not unique, as in repetitive text.
_ANCHOR = 48
# How far the common-prefix/suffix trim may back up looking for a whitespace transition.
# Text without whitespace for this long (CJK, base64) is then left to the token diff.
_BACKOFF = 256


@attrs.frozen
class Edit:
    """Replace ``base[start:end]`` with ``text``; ``start == end`` is a pure insertion."""

    start: int
    end: int
    text: str

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"edit range [{self.start}, {self.end}) is not a range")


@attrs.frozen
class Conflict:
    """Overlapping, different edits of one base span, never merged and never dropped.

    ``start``/``end`` is the code-point range this conflict occupies in the text it was
    reported with (ours after ``three_way``, theirs or a marker block after
    ``apply_policy``), so a later ``resolve`` can replace exactly that range.
    """

    start: int
    end: int
    base: str
    ours: str
    theirs: str

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"conflict range [{self.start}, {self.end}) is not a range")

    def shifted(self, delta: int) -> Conflict:
        """This conflict after text of length ``delta`` was inserted before it."""
        return attrs.evolve(self, start=self.start + delta, end=self.end + delta)


@attrs.frozen
class Merge:
    """The merged text (ours kept inside each conflict span) and the conflicts, in order."""

    text: str
    conflicts: tuple[Conflict, ...]

    @property
    def clean(self) -> bool:
        return not self.conflicts


# --- tokens ---------------------------------------------------------------------------

# Scripts written without spaces between words: each character is a token of its own.
_CONTINUA = (
    "\\u0e00-\\u0eff"  # Thai, Lao
    "\\u1000-\\u109f"  # Myanmar
    "\\u1780-\\u17ff"  # Khmer
    "\\u3040-\\u30ff"  # Hiragana, Katakana
    "\\u3400-\\u4dbf"  # CJK extension A
    "\\u4e00-\\u9fff"  # CJK unified ideographs
    "\\uf900-\\ufaff"  # CJK compatibility ideographs
    "\\uff66-\\uff9f"  # halfwidth Katakana
    "\\U00020000-\\U0003ffff"  # CJK extensions B and later
)
# Characters that extend the preceding one rather than start a token, besides marks.
_EXTENDERS = "\\u200c\\u200d\\U0001f3fb-\\U0001f3ff"


def _escape(cp: int) -> str:
    return f"\\U{cp:08x}"


def _class_ranges(cps: Iterable[int]) -> str:
    """Character-class body for a sorted set of code points, as ranges."""
    parts: list[str] = []
    first = last = -2
    for cp in cps:
        if cp != last + 1:
            if first >= 0:
                parts.append(f"{_escape(first)}-{_escape(last)}")
            first = cp
        last = cp
    if first >= 0:
        parts.append(f"{_escape(first)}-{_escape(last)}")
    return "".join(parts)


@functools.cache
def _token_pattern() -> re.Pattern[str]:
    # Marks (categories Mn, Mc, Me) live only in planes 0, 1 and 14; scanning just those
    # keeps the one-off cost near 40 ms instead of a scan of all 1.1M code points.
    marks = _class_ranges(
        cp
        for cp in chain(range(0x20000), range(0xE0000, 0xE1000))
        if unicodedata.category(chr(cp)).startswith("M")
    )
    ext = f"{marks}{_EXTENDERS}"
    return re.compile(
        rf"\s+"
        rf"|[{_CONTINUA}][{ext}]*"
        # A word run, unrolled so the large mark class is only tried where a word char
        # is not found (a fifth faster than an alternation per character on prose).
        rf"|(?:[^\W{_CONTINUA}]|[{ext}])[^\W{_CONTINUA}]*(?:[{ext}]+[^\W{_CONTINUA}]*)*"
        rf"|[^\w\s](?:\u200d[^\w\s]|[{ext}])*"
    )


_LINES = re.compile(r"[^\n]*\n|[^\n]+")


def tokenize(text: str) -> list[str]:
    """Split ``text`` into merge units; ``"".join(tokenize(t)) == t`` always."""
    return _token_pattern().findall(text)


# --- diff -----------------------------------------------------------------------------


class _Dmp(diff_match_patch):  # type: ignore[misc]
    """diff-match-patch without the half-match speedup (see the module docstring)."""

    def diff_halfMatch(self, text1: str, text2: str) -> None:
        return None


def _common_prefix(a: str, ai: int, b: str, bi: int, n: int) -> int:
    """Length of the common prefix of ``a[ai:ai+n]`` and ``b[bi:bi+n]``.

    Galloping block comparisons keep the cost proportional to the answer rather than
    to ``n`` (dmp's binary search copies ``n`` characters per probe).
    """
    done = 0
    step = 64
    while done < n:
        size = min(step, n - done)
        if a.startswith(b[bi + done : bi + done + size], ai + done):
            done += size
            step = min(step * 2, 1 << 16)
        elif size > 64:
            step = 64  # the mismatch is in this block: approach it again from small steps
        else:
            while a[ai + done] == b[bi + done]:
                done += 1
            return done
    return n


def _common_suffix(a: str, ae: int, b: str, be: int, n: int) -> int:
    """Length of the common suffix of ``a[ae-n:ae]`` and ``b[be-n:be]``."""
    done = 0
    step = 64
    while done < n:
        size = min(step, n - done)
        if a.endswith(b[be - done - size : be - done], 0, ae - done):
            done += size
            step = min(step * 2, 1 << 16)
        elif size > 64:
            step = 64
        else:
            while a[ae - done - 1] == b[be - done - 1]:
                done += 1
            return done
    return n


def _transition(s: str, i: int) -> bool:
    """Whether ``s[i-1]`` and ``s[i]`` differ in being whitespace (a token boundary)."""
    return s[i - 1].isspace() != s[i].isspace()


def _boundary(s: str, i: int) -> bool:
    return i == 0 or i == len(s) or _transition(s, i)


class _Differ:
    """One side's diff against the base: anchoring pass, then token diffs of the pieces."""

    def __init__(self, a: str, b: str, timeout: float) -> None:
        self.a = a
        self.b = b
        self.dmp = _Dmp()
        self.dmp.Diff_Timeout = timeout
        self.deadline = time.time() + timeout
        self.edits: list[Edit] = []

    def run(self) -> list[Edit]:
        self._align(0, len(self.a), 0, len(self.b))
        return self.edits

    def _align(self, alo: int, ahi: int, blo: int, bhi: int) -> None:
        a, b = self.a, self.b
        # Every range handed here starts and ends on a token boundary of both texts; the
        # trims below keep it that way by backing up to a whitespace transition.
        n = min(ahi - alo, bhi - blo)
        p = _common_prefix(a, alo, b, blo, n) if n else 0
        if p and not (_boundary(a, alo + p) and _boundary(b, blo + p)):
            i = alo + p - 1
            stop = max(alo, alo + p - _BACKOFF)
            while i > stop and not _transition(a, i):
                i -= 1
            p = i - alo if i > stop else 0
        alo += p
        blo += p
        n = min(ahi - alo, bhi - blo)
        s = _common_suffix(a, ahi, b, bhi, n) if n else 0
        if s and not (_boundary(a, ahi - s) and _boundary(b, bhi - s)):
            i = ahi - s + 1
            stop = min(ahi, ahi - s + _BACKOFF)
            while i < stop and not _transition(a, i):
                i += 1
            s = ahi - i if i < stop else 0
        ahi -= s
        bhi -= s
        if alo == ahi or blo == bhi:
            if alo != ahi or blo != bhi:
                self.edits.append(Edit(alo, ahi, b[blo:bhi]))
            return
        if (ahi - alo) + (bhi - blo) > _LEAF:
            anchor = self._anchor(alo, ahi, blo, bhi)
            if anchor is not None:
                ai, aj, bi = anchor
                self._align(alo, ai, blo, bi)
                self._align(aj, ahi, bi + (aj - ai), bhi)
                return
        self._leaf(alo, ahi, blo, bhi)

    def _anchor(self, alo: int, ahi: int, blo: int, bhi: int) -> tuple[int, int, int] | None:
        """A run ``a[ai:aj] == b[bi:bi+aj-ai]`` occurring once in both ranges, or None.

        The run starts and ends on whitespace transitions, checked with one character of
        context on each side, so the cut is a token boundary in both texts.
        """
        a, b = self.a, self.b
        size = ahi - alo
        probe = _ANCHOR
        while probe <= size // 2:
            for frac in (0.5, 0.25, 0.75):
                m = alo + int((size - probe) * frac)
                first = next((i for i in range(m + 1, m + probe) if _transition(a, i)), 0)
                last = next((i for i in range(m + probe - 1, m, -1) if _transition(a, i)), 0)
                if not first or first >= last:
                    continue
                needle = a[first - 1 : last + 1]
                if a.find(needle, alo, ahi) != first - 1 or a.find(needle, first, ahi) != -1:
                    continue
                j = b.find(needle, blo, bhi)
                if j == -1 or b.find(needle, j + 1, bhi) != -1:
                    continue
                return first, last, j + 1
            probe *= 4
        return None

    def _leaf(self, alo: int, ahi: int, blo: int, bhi: int) -> None:
        a_seg = self.a[alo:ahi]
        b_seg = self.b[blo:bhi]
        for split in (tokenize, _LINES.findall):
            ta: list[str] = split(a_seg)
            tb: list[str] = split(b_seg)
            table: dict[str, int] = {}
            ids_a = [table.setdefault(t, len(table)) for t in ta]
            ids_b = [table.setdefault(t, len(table)) for t in tb]
            if len(table) <= _ALPHABET:
                break
        else:
            # More distinct lines than code points: one replacement is still exact.
            self.edits.append(Edit(alo, ahi, b_seg))
            return
        diffs = self.dmp.diff_main(
            "".join(map(chr, ids_a)), "".join(map(chr, ids_b)), False, self.deadline
        )
        oa = list(accumulate(map(len, ta), initial=0))
        ob = list(accumulate(map(len, tb), initial=0))
        blocks = _changed_blocks(diffs, ta)
        if time.time() < self.deadline:  # past the deadline, coarse it stays
            blocks = _refine(blocks, ta, tb)
        for ia0, ia1, ib0, ib1 in blocks:
            self._emit(alo, oa, ia0, ia1, b_seg, ob, ib0, ib1)

    def _emit(
        self,
        alo: int,
        oa: Sequence[int],
        ia0: int,
        ia1: int,
        b_seg: str,
        ob: Sequence[int],
        ib0: int,
        ib1: int,
    ) -> None:
        self.edits.append(Edit(alo + oa[ia0], alo + oa[ia1], b_seg[ob[ib0] : ob[ib1]]))


Block = tuple[int, int, int, int]
"""A changed run of tokens: ``a[ia0:ia1]`` became ``b[ib0:ib1]``."""

_REFINE_LIMIT = 40_000
"""Largest block (tokens of one side times the other's) aligned word by word."""


def _changed_blocks(diffs: Sequence[tuple[int, str]], ta: Sequence[str]) -> list[Block]:
    """The changed runs of a token diff, with runs that only whitespace
    separates joined into one: such a separator is a weak match (any space
    equals any other), and the next step aligns the words around it better."""
    blocks: list[Block] = []
    ia = ib = 0
    run: tuple[int, int] | None = None
    for op, chars in [*diffs, (0, "")]:
        k = len(chars)
        if op == 0:
            if run is not None:
                block = (run[0], ia, run[1], ib)
                if blocks and _only_space(ta, blocks[-1][1], run[0]):
                    block = (blocks[-1][0], ia, blocks[-1][2], ib)
                    blocks.pop()
                blocks.append(block)
                run = None
            ia += k
            ib += k
            continue
        if run is None:
            run = (ia, ib)
        if op < 0:
            ia += k
        else:
            ib += k
    return blocks


def _only_space(tokens: Sequence[str], start: int, end: int) -> bool:
    return start < end and all(t.isspace() for t in tokens[start:end])


def _refine(blocks: Iterable[Block], ta: Sequence[str], tb: Sequence[str]) -> list[Block]:
    """Split each block where its tokens align: identical tokens stay, and a
    word pairs with a similar word (a misspelling and its fix), so that
    "#delay 1\nTeh wierd" -> "The weird" is three edits (the line deleted,
    Teh->The, wierd->weird), not one, and not words shifted against each
    other. An LCS over the block where a pair scores 3 for an identical
    word, 2 for a similar one and 1 for identical whitespace."""
    out: list[Block] = []
    for ia0, ia1, ib0, ib1 in blocks:
        n, m = ia1 - ia0, ib1 - ib0
        if n == 0 or m == 0 or n * m > _REFINE_LIMIT:
            out.append((ia0, ia1, ib0, ib1))
            continue
        a, b = ta[ia0:ia1], tb[ib0:ib1]
        score = [[0] * (m + 1) for _ in range(n + 1)]
        for i in range(n - 1, -1, -1):
            for j in range(m - 1, -1, -1):
                best = max(score[i + 1][j], score[i][j + 1])
                pair = _pair_score(a[i], b[j])
                if pair:
                    best = max(best, pair + score[i + 1][j + 1])
                score[i][j] = best
        i = j = 0
        start: tuple[int, int] | None = None
        while i < n or j < m:
            pair = _pair_score(a[i], b[j]) if i < n and j < m else 0
            if pair and score[i][j] == pair + score[i + 1][j + 1]:
                if a[i] == b[j]:
                    if start is not None:
                        out.append((ia0 + start[0], ia0 + i, ib0 + start[1], ib0 + j))
                        start = None
                else:
                    if start is not None:
                        out.append((ia0 + start[0], ia0 + i, ib0 + start[1], ib0 + j))
                    out.append((ia0 + i, ia0 + i + 1, ib0 + j, ib0 + j + 1))
                    start = None
                i += 1
                j += 1
                continue
            if start is None:
                start = (i, j)
            if i < n and (j == m or score[i][j] == score[i + 1][j]):
                i += 1
            else:
                j += 1
        if start is not None:
            out.append((ia0 + start[0], ia0 + n, ib0 + start[1], ib0 + m))
    # One side's edits never touch (the merge relies on it): join those that do.
    joined: list[Block] = []
    for block in out:
        if joined and joined[-1][1] == block[0] and joined[-1][3] == block[2]:
            previous = joined.pop()
            block = (previous[0], block[1], previous[2], block[3])
        joined.append(block)
    return joined


@functools.lru_cache(maxsize=4096)
def _pair_score(x: str, y: str) -> int:
    if x == y:
        return 1 if x.isspace() else 3
    if x.isspace() or y.isspace() or min(len(x), len(y)) < 3:
        return 0
    return 2 if _similar(x.lower(), y.lower()) else 0


def _similar(x: str, y: str) -> bool:
    """Close enough to be the same word misspelt: an edit distance of at most
    a third of the longer word."""
    if abs(len(x) - len(y)) * 3 > max(len(x), len(y)):
        return False
    previous = list(range(len(y) + 1))
    for i, cx in enumerate(x, 1):
        current = [i]
        for j, cy in enumerate(y, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (cx != cy)))
        previous = current
    return previous[-1] * 3 <= max(len(x), len(y))


def _check_timeout(timeout: float) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout!r}")


def diff(base: str, other: str, *, timeout: float = DIFF_TIMEOUT) -> tuple[Edit, ...]:
    """Token-level edits turning ``base`` into ``other``, sorted, in base offsets.

    Edits never overlap or touch one another: an unchanged token separates any two.
    ``apply_edits(base, diff(base, other)) == other`` always, timeout or not.
    """
    _check_timeout(timeout)
    if base == other:
        return ()
    return tuple(_Differ(base, other, timeout).run())


def apply_edits(base: str, edits: Iterable[Edit], start: int = 0, end: int | None = None) -> str:
    """``base[start:end]`` with ``edits`` (sorted, inside that span, disjoint) applied."""
    stop = len(base) if end is None else end
    pieces: list[str] = []
    pos = start
    for e in edits:
        if e.start < pos or e.end > stop:
            raise ValueError(f"edit [{e.start}, {e.end}) out of order or outside the span")
        pieces.append(base[pos : e.start])
        pieces.append(e.text)
        pos = e.end
    pieces.append(base[pos:stop])
    return "".join(pieces)


# --- merge ----------------------------------------------------------------------------


def _extent(e: Edit) -> tuple[int, int]:
    """Closed interval on a doubled axis: overlapping edits are exactly those whose
    intervals intersect (insertion at p -> point 2p; range [s, e) -> [2s+1, 2e-1])."""
    if e.start == e.end:
        return 2 * e.start, 2 * e.start
    return 2 * e.start + 1, 2 * e.end - 1


def three_way(base: str, ours: str, theirs: str, *, timeout: float = DIFF_TIMEOUT) -> Merge:
    """Merge the person's edits (``ours``) and the model's (``theirs``) of ``base``.

    Non-overlapping edits are both kept, an edit made on both sides is taken once, and
    overlapping different edits become a ``Conflict`` whose span keeps ours.  See the
    module docstring for the token and overlap rules and for what ``timeout`` does.
    """
    _check_timeout(timeout)
    if ours == theirs or theirs == base:
        return Merge(ours, ())
    if ours == base:
        return Merge(theirs, ())
    tagged = sorted(
        chain(
            ((*_extent(e), 0, e) for e in diff(base, ours, timeout=timeout)),
            ((*_extent(e), 1, e) for e in diff(base, theirs, timeout=timeout)),
        ),
        key=lambda item: (item[0], item[1]),
    )
    pieces: list[str] = []
    conflicts: list[Conflict] = []
    out_len = 0
    pos = 0

    def flush(group: list[tuple[int, Edit]]) -> None:
        nonlocal out_len, pos
        start = min(e.start for _, e in group)
        end = max(e.end for _, e in group)
        mine = apply_edits(base, (e for side, e in group if side == 0), start, end)
        other = apply_edits(base, (e for side, e in group if side == 1), start, end)
        sides = {side for side, _ in group}
        kept = mine if 0 in sides else other
        gap = base[pos:start]
        pieces.append(gap)
        pieces.append(kept)
        out_len += len(gap)
        if len(sides) == 2 and mine != other:
            conflicts.append(Conflict(out_len, out_len + len(kept), base[start:end], mine, other))
        out_len += len(kept)
        pos = end

    group: list[tuple[int, Edit]] = []
    reach = -1
    for lo, hi, side, e in tagged:
        if group and lo > reach:
            flush(group)
            group = []
        reach = max(reach, hi) if group else hi
        group.append((side, e))
    if group:
        flush(group)
    pieces.append(base[pos:])
    return Merge("".join(pieces), tuple(conflicts))


# --- policies -------------------------------------------------------------------------


def _newline(text: str) -> str:
    """The text's own line end, so marker lines do not mix LF into a CRLF file."""
    i = text.find("\n")
    return "\r\n" if i > 0 and text[i - 1] == "\r" else "\n"


MARKER_LABELS: Final = ("yours", "original", "model")
"""The labels of a marker block's three sides, the same as the editors' conflict views."""


def _line_block(text: str, group: list[Conflict]) -> tuple[int, int]:
    """The whole lines of ``text`` around ``group``'s conflicts: where a marker block
    replacing them starts and ends, so that every marker starts a line and keeping one
    side leaves whole sentences, not a line broken around the clash."""
    first, last = group[0], group[-1]
    start = text.rfind("\n", 0, first.start) + 1
    sides_end_lines = all(s == "" or s.endswith("\n") for s in (last.base, last.theirs))
    if last.end > last.start and text[last.end - 1] == "\n":
        return start, last.end
    if last.end == last.start == start and sides_end_lines:
        return start, last.end
    newline = text.find("\n", last.end)
    return start, len(text) if newline < 0 else newline + 1


def _marker_block(
    text: str, start: int, end: int, group: list[Conflict], nl: str
) -> tuple[Conflict, str]:
    """git's diff3 conflict style over the whole lines ``[start, end)`` of ``text``.

    Each side is those lines with every conflict of ``group`` written as that side; a
    side that does not end in a line end gets one, inside the block, so the closing
    marker starts a line (resolving the block removes it with the markers).  The
    returned conflict's sides are those lines and its range, from ``start``, the block.
    """

    def side(pick: Callable[[Conflict], str]) -> str:
        pieces, pos = [], start
        for c in group:
            pieces += [text[pos : c.start], pick(c)]
            pos = c.end
        pieces.append(text[pos:end])
        return "".join(pieces)

    def section(s: str) -> str:
        return s if s == "" or s.endswith("\n") else s + nl

    ours, base, theirs = side(lambda c: c.ours), side(lambda c: c.base), side(lambda c: c.theirs)
    yours, original, model = MARKER_LABELS
    block = "".join(
        (
            f"<<<<<<< {yours}{nl}",
            section(ours),
            f"||||||| {original}{nl}",
            section(base),
            f"======={nl}",
            section(theirs),
            f">>>>>>> {model}{nl}",
        )
    )
    return Conflict(start, start + len(block), base, ours, theirs), block


_MARKER_LINE = re.compile(r"^(?:<{7}|={7}|>{7}|\|{7})(?: |\r?$)", re.MULTILINE)


def _markers(merge: Merge) -> Merge:
    """The merge with each clash's whole lines as one marker block; clashes sharing a
    line share its block (one conflict), so no line is split between two blocks.

    Lines that hold a marker block already (an earlier call's, still to resolve) are
    left as they are, the clash recorded as under ``drop``: a block nested in another
    is one neither smerge nor a person can resolve."""
    text, nl = merge.text, _newline(merge.text)
    groups: list[tuple[int, int, list[Conflict]]] = []
    for c in merge.conflicts:
        start, end = _line_block(text, [c])
        if groups and start < groups[-1][1]:
            group = [*groups[-1][2], c]
            groups[-1] = (groups[-1][0], _line_block(text, group)[1], group)
        else:
            groups.append((start, end, [c]))
    pieces: list[str] = []
    conflicts: list[Conflict] = []
    out_len = pos = 0
    for start, end, group in groups:
        if _MARKER_LINE.search(text, start, end):
            # Not consumed yet: output offsets are input ones moved by what came before.
            conflicts += [c.shifted(out_len - pos) for c in group]
            continue
        gap = text[pos:start]
        conflict, block = _marker_block(text, start, end, group, nl)
        out_len += len(gap)
        pieces += [gap, block]
        conflicts.append(attrs.evolve(conflict, start=out_len, end=out_len + len(block)))
        out_len += len(block)
        pos = end
    pieces.append(text[pos:])
    return Merge("".join(pieces), tuple(conflicts))


def _rewrite(merge: Merge, replace: Callable[[Conflict], str]) -> Merge:
    text = merge.text
    pieces: list[str] = []
    conflicts: list[Conflict] = []
    out_len = 0
    pos = 0
    for c in merge.conflicts:
        gap = text[pos : c.start]
        new = replace(c)
        pieces += [gap, new]
        out_len += len(gap)
        conflicts.append(attrs.evolve(c, start=out_len, end=out_len + len(new)))
        out_len += len(new)
        pos = c.end
    pieces.append(text[pos:])
    return Merge("".join(pieces), tuple(conflicts))


def _check_fresh(merge: Merge) -> None:
    pos = 0
    for c in merge.conflicts:
        if c.start < pos or merge.text[c.start : c.end] != c.ours:
            raise ValueError(
                "apply_policy expects a merge fresh from three_way (ours in each conflict span)"
            )
        pos = c.end


def whole_lines(text: str, start: int, end: int) -> tuple[int, int, str, str]:
    """The whole lines of ``text`` around ``[start, end)``: their range, and the text
    before and after the range in them.  A caller writing ``markers`` into a region of
    a document merges over these lines, so that each block is whole lines of the
    document, not of the region."""
    line_start = text.rfind("\n", 0, start) + 1
    at_line_end = end == len(text) or (end > line_start and text[end - 1] == "\n")
    line_end = end if at_line_end else (text.find("\n", end) + 1 or len(text))
    return line_start, line_end, text[line_start:start], text[end:line_end]


def apply_policy(merge: Merge, policy: Policy) -> Merge:
    """The text a call's conflict policy yields; conflicts stay recorded in every policy.

    ``drop`` and ``ask`` keep ours in each conflict span (callers differ in what they do
    next: ``ask`` hands the conflicts to the person), ``theirs`` takes the model's text,
    ``markers`` writes a diff3-style block over the whole lines around each clash, with
    the labels ``MARKER_LABELS``.  Conflict ranges are recomputed for the new text,
    covering the whole marker block (and its sides the whole lines) under ``markers``.
    """
    if policy not in _POLICIES:
        raise ValueError(f"unknown conflict policy {policy!r}; expected one of {_POLICIES}")
    _check_fresh(merge)
    if policy == "theirs":
        return _rewrite(merge, lambda c: c.theirs)
    if policy == "markers":
        return _markers(merge)
    return merge


def resolve(
    text: str,
    conflict: Conflict,
    choice: Literal["ours", "theirs", "text"],
    replacement: str | None = None,
) -> str:
    """Replace one conflict's range of ``text`` with ours, theirs or ``replacement``.

    Works on any text the conflict was reported with, markers included.  Conflicts after
    this one move by ``len(new) - (conflict.end - conflict.start)``; use
    ``Conflict.shifted`` to follow them.
    """
    if conflict.end > len(text):
        raise ValueError(
            f"conflict range [{conflict.start}, {conflict.end}) is outside a text of "
            f"length {len(text)}"
        )
    if choice == "text":
        if replacement is None:
            raise ValueError('choice "text" needs a replacement')
        new = replacement
    elif replacement is not None:
        raise ValueError(f'a replacement is only used with choice "text", not {choice!r}')
    elif choice == "ours":
        new = conflict.ours
    elif choice == "theirs":
        new = conflict.theirs
    else:
        raise ValueError(f"unknown choice {choice!r}; expected ours, theirs or text")
    return text[: conflict.start] + new + text[conflict.end :]
