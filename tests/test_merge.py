"""The three-way merge of a region (flows.merge): what a person relies on when a model's
reply lands on a region they kept editing."""

from __future__ import annotations

import itertools
import unicodedata
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import flows.merge as fm
from flows.merge import (
    Conflict,
    Edit,
    Merge,
    apply_edits,
    apply_policy,
    diff,
    resolve,
    three_way,
    tokenize,
)

try:  # tests/conftest.py may have registered it already (with its own deadline)
    settings.get_profile("thorough")
except InvalidArgument:
    settings.register_profile("thorough", max_examples=2000)


# --- strategies -----------------------------------------------------------------------

VOCAB = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "naïve", "中文"]
SEPARATORS = [" ", " ", " ", ", ", ".\n", "\r\n", "  ", "; "]
# Everything an editor can send: astral characters, emoji sequences, combining marks, CJK,
# CRLF, tabs, punctuation.
UNICODE_PIECES = [
    "a",
    "b",
    "word",
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\r",
    ",",
    ".",
    "é",
    "e\u0301",
    "\u0301",
    "ß",
    "😀",
    "👍🏽",
    "👨\u200d👩\u200d👧",
    "中",
    "文",
    "字",
    "𝔘",
    "\U0002a6a5",
    "ไทย",
    "\u200d",
    "\ufeff",
]


@st.composite
def base_words(draw: st.DrawFn, unique: bool) -> tuple[list[str], list[str]]:
    """Words and the separator after each one (the last separator may be empty)."""
    n = draw(st.integers(3, 24))
    words = [draw(st.sampled_from(VOCAB)) for _ in range(n)]
    if unique:
        words = [f"{w}{i}" for i, w in enumerate(words)]
    seps = [draw(st.sampled_from(SEPARATORS)) for _ in range(n - 1)]
    seps.append(draw(st.sampled_from(["", "\n", "."])))
    return words, seps


def render(words: list[str], seps: list[str], ops: dict[int, tuple[str, str]]) -> str:
    """The text with word-level ops: replace, insert a word before, delete word+separator."""
    out = []
    for i, (w, s) in enumerate(zip(words, seps, strict=True)):
        kind, fresh = ops.get(i, ("keep", ""))
        if kind == "keep":
            out.append(w + s)
        elif kind == "replace":
            out.append(fresh + s)
        elif kind == "insert":
            out.append(f"{fresh} {w}{s}")
        else:
            out.append("")
    return "".join(out)


KINDS = st.sampled_from(["replace", "replace", "insert", "delete"])


@st.composite
def disjoint_edits(draw: st.DrawFn, unique: bool = True) -> tuple[str, str, str, str]:
    """base, ours, theirs and the text with both: each side edits its own words, with at
    least one untouched word between an edit of ours and an edit of theirs."""
    words, seps = draw(base_words(unique))
    owner = [draw(st.sampled_from([None, None, 0, 1])) for _ in words]
    for i in range(1, len(owner)):
        if owner[i] is not None and owner[i - 1] is not None and owner[i] != owner[i - 1]:
            owner[i] = None
    ops: list[dict[int, tuple[str, str]]] = [{}, {}]
    for i, side in enumerate(owner):
        if side is not None:
            # Fresh, upper-case words occur nowhere in the base: the intended diff is the
            # only minimal one.
            ops[side][i] = (draw(KINDS), f"{'OURS' if side == 0 else 'THEIRS'}{i}")
    both = {**ops[0], **ops[1]}
    return (
        render(words, seps, {}),
        render(words, seps, ops[0]),
        render(words, seps, ops[1]),
        render(words, seps, both),
    )


@st.composite
def overlapping_edits(draw: st.DrawFn) -> tuple[str, str, str, list[str], list[str]]:
    """base, ours, theirs where both sides replace overlapping word ranges with different
    fresh words; also the fresh words of each side."""
    words, seps = draw(base_words(unique=False))
    n = len(words)
    i = draw(st.integers(0, n - 1))
    j = draw(st.integers(i, n - 1))
    k = draw(st.integers(0, j))
    m = draw(st.integers(max(k, i), n - 1))
    fresh: list[list[str]] = [[], []]

    def side(lo: int, hi: int, name: str, bucket: list[str]) -> str:
        ops: dict[int, tuple[str, str]] = {}
        for p in range(lo, hi + 1):
            word = f"{name}{p}"
            ops[p] = ("replace", word)
            bucket.append(word)
        return render(words, seps, ops)

    ours = side(i, j, "OURS", fresh[0])
    theirs = side(k, m, "THEIRS", fresh[1])
    return render(words, seps, {}), ours, theirs, fresh[0], fresh[1]


unicode_text = st.lists(st.sampled_from(UNICODE_PIECES), max_size=30).map("".join)
short_text = st.lists(st.sampled_from(UNICODE_PIECES), max_size=3).map("".join)


@st.composite
def related(draw: st.DrawFn, base: str) -> str:
    """``base`` after a few random replacements, so the texts share most of their text."""
    text = base
    for _ in range(draw(st.integers(0, 3))):
        a = draw(st.integers(0, len(text)))
        b = draw(st.integers(a, min(len(text), a + 6)))
        text = text[:a] + draw(short_text) + text[b:]
    return text


@st.composite
def unicode_triples(draw: st.DrawFn) -> tuple[str, str, str]:
    base = draw(unicode_text)
    return base, draw(related(base)), draw(related(base))


def check_conflicts(merge: Merge, base: str) -> None:
    """What every merge promises about its conflict records."""
    pos = 0
    for c in merge.conflicts:
        assert pos <= c.start <= c.end <= len(merge.text)
        assert merge.text[c.start : c.end] == c.ours
        assert c.ours != c.theirs
        assert c.base in base
        pos = c.end


# --- properties -----------------------------------------------------------------------


@given(unicode_triples())
def test_identities(triple: tuple[str, str, str]) -> None:
    base, ours, theirs = triple
    assert three_way(base, base, theirs) == Merge(theirs, ())
    assert three_way(base, ours, base) == Merge(ours, ())
    assert three_way(base, ours, ours) == Merge(ours, ())


@given(disjoint_edits())
def test_non_overlapping_word_edits_merge_cleanly_with_both(
    case: tuple[str, str, str, str],
) -> None:
    base, ours, theirs, both = case
    assert three_way(base, ours, theirs) == Merge(both, ())


@given(disjoint_edits(unique=False))
def test_repeated_words_never_merge_to_a_wrong_text(case: tuple[str, str, str, str]) -> None:
    # With repeated words a deletion has several equivalent places; some make it touch the
    # other side's edit.  Such ambiguity may surface as a conflict, but a clean merge must
    # still be exactly the text with both edits.
    base, ours, theirs, both = case
    merge = three_way(base, ours, theirs)
    check_conflicts(merge, base)
    if merge.clean:
        assert merge.text == both


@given(overlapping_edits())
def test_overlapping_different_edits_conflict_and_lose_nothing(
    case: tuple[str, str, str, list[str], list[str]],
) -> None:
    base, ours, theirs, ours_words, theirs_words = case
    merge = three_way(base, ours, theirs)
    assert not merge.clean
    check_conflicts(merge, base)
    for word in ours_words:
        assert word in merge.text
    for word in theirs_words:
        assert word in merge.text or any(word in c.theirs for c in merge.conflicts)
        assert word in apply_policy(merge, "theirs").text


@given(unicode_triples())
def test_unicode_round_trips_and_the_merge_is_symmetric(triple: tuple[str, str, str]) -> None:
    base, ours, theirs = triple
    for other in (ours, theirs):
        assert apply_edits(base, diff(base, other)) == other
    merge = three_way(base, ours, theirs)
    check_conflicts(merge, base)
    swapped = three_way(base, theirs, ours)
    # Taking theirs in every conflict is exactly the merge seen from the other side: the
    # clean parts agree and each conflict holds the same three texts.
    assert apply_policy(merge, "theirs").text == swapped.text
    assert [(c.base, c.ours, c.theirs) for c in merge.conflicts] == [
        (c.base, c.theirs, c.ours) for c in swapped.conflicts
    ]


@given(st.text())
def test_tokens_cover_the_text_and_never_mix_whitespace(text: str) -> None:
    tokens = tokenize(text)
    assert "".join(tokens) == text
    assert all(len({ch.isspace() for ch in t}) == 1 for t in tokens)


def boundaries(text: str) -> set[int]:
    return set(itertools.accumulate(map(len, tokenize(text)), initial=0))


def check_diff(base: str, other: str) -> None:
    """A diff is exact, and its edits are whole tokens, separated by unchanged ones."""
    edits = diff(base, other)
    assert apply_edits(base, edits) == other
    # An unchanged token between any two edits of one side: the merge relies on it.
    for e, f in itertools.pairwise(edits):
        assert e.end < f.start
    # Whole tokens on both sides, or two edits inside one word could merge into a word
    # nobody wrote.
    in_base, in_other = boundaries(base), boundaries(other)
    shift = 0
    for e in edits:
        assert {e.start, e.end} <= in_base
        assert {e.start + shift, e.start + shift + len(e.text)} <= in_other
        shift += len(e.text) - (e.end - e.start)


@given(unicode_triples())
def test_diffs_are_exact_and_made_of_whole_tokens(triple: tuple[str, str, str]) -> None:
    base, other, _ = triple
    check_diff(base, other)


def test_tokens_keep_marks_emoji_and_line_ends_whole() -> None:
    assert tokenize("cafe\u0301 👨\u200d👩\u200d👧 👍🏽!\r\n中文, naïve") == [
        "cafe\u0301",
        " ",
        "👨\u200d👩\u200d👧",
        " ",
        "👍🏽",
        "!",
        "\r\n",
        "中",
        "文",
        ",",
        " ",
        "naïve",
    ]


def test_every_combining_mark_attaches_to_the_word_before_it() -> None:
    marks = [chr(cp) for cp in range(0x110000) if unicodedata.category(chr(cp)).startswith("M")]
    text = "".join(f"x{m} " for m in marks)
    assert tokenize(text)[::2] == [f"x{m}" for m in marks]


# --- hand-written cases ---------------------------------------------------------------

CLEAN = [
    pytest.param("a b c", "a B c", "a b C", "a B C", id="different-words"),
    pytest.param(
        "one three five",
        "one two three five",
        "one two three five!",
        "one two three five!",
        id="same-insertion-taken-once",
    ),
    pytest.param("a b c d", "a B c D", "a B C d", "a B C D", id="same-edit-once-plus-others"),
    pytest.param("a b c d", "a d", "a d", "a d", id="same-deletion-once"),
    pytest.param(
        "quick, brown", "fast, brown", "quick; brown", "fast; brown", id="touching-word-punct"
    ),
    pytest.param(
        "a quick fox",
        "a very quick fox",
        "a slow fox",
        "a very slow fox",
        id="insert-at-start-of-replaced",
    ),
    pytest.param(
        "a quick fox", "a quick! fox", "a slow fox", "a slow! fox", id="insert-at-end-of-replaced"
    ),
    pytest.param("a b c", "a X b c", "a B c", "a X B c", id="insert-before-replaced-word"),
    pytest.param(
        "keep this word", "keep word", "keep this WORD", "keep WORD", id="delete-touching-edit"
    ),
    pytest.param(
        "one two three", "one TWO three", "one two three four", "one TWO three four", id="append"
    ),
    pytest.param("", "", "reply", "reply", id="empty-base-reply-only"),
    pytest.param("abc", "abc", "completely new", "completely new", id="whole-replacement-theirs"),
    pytest.param("abc def", "", "abc def", "", id="empty-ours-theirs-unchanged"),
    pytest.param("abc def", "abc def", "", "", id="empty-reply-ours-unchanged"),
    pytest.param(
        "line one\r\nline two\r\n",
        "line 1\r\nline two\r\n",
        "line one\r\nline 2\r\n",
        "line 1\r\nline 2\r\n",
        id="crlf-lines",
    ),
    pytest.param(
        "one two\r\nthree",
        "one 2\r\nthree",
        "one two\nthree",
        "one 2\nthree",
        id="crlf-to-lf-and-word",
    ),
    pytest.param("x 😀 y 中文", "x 😀 Y 中文", "x 🙂 y 中文", "x 🙂 Y 中文", id="emoji-and-words"),
    pytest.param("中文字", "中A字", "中文字B", "中A字B", id="cjk-characters"),
    pytest.param(
        "See the cat sat on the mat.",
        "See the cat sat on the rug.",
        "See, the cat sat on the mat.",
        "See, the cat sat on the rug.",
        id="same-sentence",
    ),
]


@pytest.mark.parametrize(("base", "ours", "theirs", "expected"), CLEAN)
def test_clean_cases(base: str, ours: str, theirs: str, expected: str) -> None:
    assert three_way(base, ours, theirs) == Merge(expected, ())


CONFLICTS = [
    pytest.param(
        "one three",
        "one two three",
        "one 2 three",
        "one two three",
        [(4, 8, "", "two ", "2 ")],
        id="different-insertions-same-point",
    ),
    pytest.param("", "x", "y", "x", [(0, 1, "", "x", "y")], id="empty-base-both-insert"),
    pytest.param(
        "keep drop these words end",
        "keep end",
        "keep drop those words end",
        "keep end",
        [(5, 5, "drop these words ", "", "drop those words ")],
        id="delete-vs-edit-inside",
    ),
    pytest.param(
        "a b c d",
        "a d",
        "a b X c d",
        "a d",
        [(2, 2, "b c ", "", "b X c ")],
        id="insert-inside-deletion",
    ),
    pytest.param("a b c", "a c", "a b X c", "a X c", [], id="insert-after-deleted-word-is-clean"),
    pytest.param("a b c", "a X c", "a c", "a X c", [(2, 4, "b ", "X ", "")], id="edit-vs-delete"),
    pytest.param(
        "abc def", "abc DEF", "", "abc DEF", [(0, 7, "abc def", "abc DEF", "")], id="empty-reply"
    ),
    pytest.param("abc def", "", "abc DEF", "", [(0, 0, "abc def", "", "abc DEF")], id="empty-ours"),
    pytest.param(
        "abc def",
        "abc DEF",
        "completely_new",
        "abc DEF",
        [(0, 7, "abc def", "abc DEF", "completely_new")],
        id="whole-replacement-vs-edit",
    ),
    # Tokens, not characters: the reply's space still matches the base's space.
    pytest.param(
        "abc def",
        "abc DEF",
        "brand new",
        "brand DEF",
        [(6, 9, "def", "DEF", "new")],
        id="rewrite-sharing-a-space",
    ),
    pytest.param(
        "a\r\nb",
        "a\nb",
        "a \r\nb",
        "a\nb",
        [(1, 2, "\r\n", "\n", " \r\n")],
        id="crlf-whitespace-run",
    ),
    pytest.param(
        "naïve", "naive", "naïvety", "naive", [(0, 5, "naïve", "naive", "naïvety")], id="same-word"
    ),
]


@pytest.mark.parametrize(("base", "ours", "theirs", "text", "conflicts"), CONFLICTS)
def test_conflict_cases(
    base: str, ours: str, theirs: str, text: str, conflicts: list[tuple[int, int, str, str, str]]
) -> None:
    merge = three_way(base, ours, theirs)
    assert merge.text == text
    assert merge.conflicts == tuple(Conflict(*c) for c in conflicts)


# --- timeout and robustness -----------------------------------------------------------

# Six evenly spread edits in one piece: no anchor or shortcut applies, so dmp must bisect.
TIMEOUT_BASE = " ".join(f"w{i}" for i in range(60))


def _edit_words(text: str, changes: dict[int, str]) -> str:
    words = text.split(" ")
    return " ".join(changes.get(i, w) for i, w in enumerate(words))


def test_timeout_makes_the_diff_coarser_but_the_merge_still_correct() -> None:
    ours = _edit_words(TIMEOUT_BASE, {i: f"O{i}" for i in (5, 15, 25, 35, 45, 55)})
    theirs = _edit_words(TIMEOUT_BASE, {30: "T30"})
    both = _edit_words(TIMEOUT_BASE, {**{i: f"O{i}" for i in (5, 15, 25, 35, 45, 55)}, 30: "T30"})
    assert three_way(TIMEOUT_BASE, ours, theirs) == Merge(both, ())

    coarse_diff = diff(TIMEOUT_BASE, ours, timeout=1e-9)
    assert len(coarse_diff) < len(diff(TIMEOUT_BASE, ours))  # the deadline was hit
    assert apply_edits(TIMEOUT_BASE, coarse_diff) == ours  # and the diff is still exact

    coarse = three_way(TIMEOUT_BASE, ours, theirs, timeout=1e-9)
    assert not coarse.clean  # more conflicts than needed ...
    check_conflicts(coarse, TIMEOUT_BASE)
    # ... but nothing lost: settling each conflict with an unhurried merge of its own three
    # texts gives exactly the unhurried merge of the whole.
    text = coarse.text
    for c in reversed(coarse.conflicts):
        inner = three_way(c.base, c.ours, c.theirs)
        assert inner.clean
        text = resolve(text, c, "text", inner.text)
    assert text == both


@given(disjoint_edits())
def test_a_merge_that_ran_out_of_time_loses_nothing(case: tuple[str, str, str, str]) -> None:
    base, ours, theirs, both = case
    merge = three_way(base, ours, theirs, timeout=1e-9)
    check_conflicts(merge, base)
    text = merge.text
    for c in reversed(merge.conflicts):
        inner = three_way(c.base, c.ours, c.theirs)
        assert inner.clean
        text = resolve(text, c, "text", inner.text)
    assert text == both


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_timeout_must_be_positive(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        three_way("a", "b", "c", timeout=timeout)


def test_more_distinct_tokens_than_the_bmp_holds() -> None:
    # No whitespace, so the whole text is one piece with 70,001 distinct tokens: their
    # characters run past U+FFFF, through the surrogate range, into the astral planes.
    n = 70_000
    base = ",".join(f"t{i}" for i in range(n))
    ours = base.replace(",t100,", ",T100,")
    theirs = base.replace(",t69000,", ",T69000,")
    both = ours.replace(",t69000,", ",T69000,")
    assert len(set(tokenize(base))) > 0x10000
    assert three_way(base, ours, theirs) == Merge(both, ())


ALPHA = "alpha beta\ngamma delta\nepsilon zeta\n"
ALPHA_OURS = ALPHA.replace("beta", "BETA").replace("zeta", "ZETA")
ALPHA_THEIRS = ALPHA.replace("epsilon", "EPSILON")


@pytest.mark.parametrize(
    ("alphabet", "ours_diff", "conflict"),
    [
        pytest.param(100, [Edit(6, 10, "BETA"), Edit(31, 35, "ZETA")], None, id="tokens-fit"),
        # Ours' piece "beta ... zeta" has 9 distinct tokens but 5 distinct lines.
        pytest.param(
            8,
            [Edit(6, 11, "BETA\n"), Edit(23, 35, "epsilon ZETA")],
            Conflict(23, 35, "epsilon zeta", "epsilon ZETA", "EPSILON zeta"),
            id="lines",
        ),
        pytest.param(
            4,
            [Edit(6, 35, "BETA\ngamma delta\nepsilon ZETA")],
            Conflict(
                6,
                35,
                "beta\ngamma delta\nepsilon zeta",
                "BETA\ngamma delta\nepsilon ZETA",
                "beta\ngamma delta\nEPSILON zeta",
            ),
            id="one-replacement",
        ),
    ],
)
def test_too_many_distinct_tokens_fall_back_to_lines_then_one_replacement(
    alphabet: int, ours_diff: list[Edit], conflict: Conflict | None
) -> None:
    with mock.patch.object(fm, "_ALPHABET", alphabet):
        assert list(diff(ALPHA, ALPHA_OURS)) == ours_diff
        merge = three_way(ALPHA, ALPHA_OURS, ALPHA_THEIRS)
    # Coarser units, still exact: what was a clean merge becomes a conflict, never a loss.
    if conflict is None:
        assert merge == Merge("alpha BETA\ngamma delta\nEPSILON ZETA\n", ())
    else:
        assert merge == Merge(ALPHA_OURS, (conflict,))


@settings(max_examples=50)
@given(unicode_triples(), disjoint_edits())
def test_anchoring_pass_forced_everywhere(
    triple: tuple[str, str, str], case: tuple[str, str, str, str]
) -> None:
    # The anchoring pass normally only runs on long texts; force it onto short ones.
    with mock.patch.multiple(fm, _LEAF=0, _ANCHOR=4):
        base, other, _ = triple
        check_diff(base, other)
        base, ours, theirs, both = case
        check_diff(base, ours)
        assert three_way(base, ours, theirs) == Merge(both, ())


WORDS = st.sampled_from(["ab", "cd", "ef", "é"])


@given(st.lists(WORDS, min_size=3, max_size=12), st.data())
def test_anchors_are_unique_runs_cut_at_whitespace(words: list[str], data: st.DataObject) -> None:
    a = " ".join(words)
    i = data.draw(st.integers(0, len(words) - 1))
    words[i] = data.draw(st.sampled_from(["zz", "ab", "cd"]))
    b = " ".join(words)
    with mock.patch.object(fm, "_ANCHOR", 4):
        anchor = fm._Differ(a, b, 1.0)._anchor(0, len(a), 0, len(b))
    if anchor is not None:
        ai, aj, bi = anchor
        needle = a[ai - 1 : aj + 1]  # with the context character on each side
        for text in (a, b):  # exactly once, overlapping occurrences included
            assert sum(text.startswith(needle, k) for k in range(len(text))) == 1
        assert b.index(needle) == bi - 1
        assert a[ai - 1].isspace() != a[ai].isspace()
        assert a[aj - 1].isspace() != a[aj].isspace()


def test_long_document_edits_far_apart() -> None:
    base = "\n\n".join(
        f"Paragraph {i} says something about item {i * 7} and item {i * 13}." for i in range(3000)
    )
    ours = base.replace("about item 700 ", "about thing 700 ").replace(
        "Paragraph 2900 ", "Para 2900 "
    )
    theirs = base.replace("item 13.", "item thirteen.").replace("item 1001 ", "item 1,001 ")
    both = ours.replace("item 13.", "item thirteen.").replace("item 1001 ", "item 1,001 ")
    assert ours != base and theirs != base
    assert three_way(base, ours, theirs) == Merge(both, ())


# --- policies -------------------------------------------------------------------------

SENTENCE = "The quick brown fox jumps over the lazy dog."
FOX = three_way(
    SENTENCE,
    SENTENCE.replace("quick", "fast").replace("lazy", "idle"),
    SENTENCE.replace("quick", "slow").replace("lazy", "sleepy"),
)


def test_drop_and_ask_keep_ours_and_the_conflicts() -> None:
    assert FOX.text == "The fast brown fox jumps over the idle dog."
    assert len(FOX.conflicts) == 2
    assert apply_policy(FOX, "drop") == FOX
    assert apply_policy(FOX, "ask") == FOX


def test_theirs_takes_the_reply_and_moves_the_ranges() -> None:
    merged = apply_policy(FOX, "theirs")
    assert merged.text == "The slow brown fox jumps over the sleepy dog."
    assert [merged.text[c.start : c.end] for c in merged.conflicts] == ["slow", "sleepy"]
    assert [(c.base, c.ours, c.theirs) for c in merged.conflicts] == [
        ("quick", "fast", "slow"),
        ("lazy", "idle", "sleepy"),
    ]


def test_markers_write_the_whole_line_around_each_clash_once() -> None:
    """Two clashes in one sentence: one block of whole lines, with the labels of the
    editors' conflict views, that smerge can act on and that resolves back to a line."""
    marked = apply_policy(FOX, "markers")
    assert marked.text == (
        "<<<<<<< yours\n"
        "The fast brown fox jumps over the idle dog.\n"
        "||||||| original\n"
        "The quick brown fox jumps over the lazy dog.\n"
        "=======\n"
        "The slow brown fox jumps over the sleepy dog.\n"
        ">>>>>>> model\n"
    )
    (block,) = marked.conflicts
    assert (block.start, block.end) == (0, len(marked.text))
    assert resolve(marked.text, block, "theirs") == "The slow brown fox jumps over the sleepy dog."
    assert resolve(marked.text, block, "ours") == FOX.text


def test_markers_keep_the_lines_around_the_block() -> None:
    base = "first line\nThe quick fox.\nmiddle\nA lazy dog.\nlast\n"
    merge = three_way(
        base, base.replace("quick", "fast").replace("lazy", "idle"), base.replace("quick", "slow")
    )
    marked = apply_policy(merge, "markers")
    assert marked.text == (
        "first line\n<<<<<<< yours\nThe fast fox.\n||||||| original\nThe quick fox.\n"
        "=======\nThe slow fox.\n>>>>>>> model\nmiddle\nA idle dog.\nlast\n"
    )
    assert resolve(marked.text, marked.conflicts[0], "theirs") == base.replace(
        "quick", "slow"
    ).replace("lazy", "idle")


def test_markers_never_nest_in_a_block_still_to_resolve() -> None:
    """A second call's clash on lines holding the first call's block: the lines stay
    as they are (the clash recorded, as under drop), not a block inside a block."""
    block = (
        "<<<<<<< yours\nThe odd garden.\n||||||| original\nThe wierd garden.\n"
        "=======\nThe weird garden.\n>>>>>>> model\n"
    )
    base = "Teh start.\nThe wierd garden.\nThe teh end.\n"
    ours = "Teh start.\n" + block + "The last end.\n"
    theirs = "The start.\nThe weird garden.\nThe the end.\n"
    merge = three_way(base, ours, theirs)
    assert merge.conflicts
    marked = apply_policy(merge, "markers")
    assert len(marked.conflicts) == len(merge.conflicts)  # every clash still recorded
    depth = 0
    for line in marked.text.splitlines():
        depth += line.startswith("<<<<<<<") - line.startswith(">>>>>>>")
        assert depth in (0, 1), marked.text  # never a block inside a block
    for c in marked.conflicts:
        block = marked.text[c.start : c.end]
        assert block == c.ours or block.startswith("<<<<<<< yours")


def test_markers_for_whole_lines_add_no_newlines() -> None:
    merge = three_way("keep\nold\nkeep\n", "keep\nkeep\n", "keep\ntheir\nkeep\n")
    assert merge.conflicts == (Conflict(5, 5, "old\n", "", "their\n"),)
    assert apply_policy(merge, "markers").text == (
        "keep\n<<<<<<< yours\n||||||| original\nold\n=======\ntheir\n>>>>>>> model\nkeep\n"
    )


def test_markers_follow_crlf_and_handle_empty_sides() -> None:
    base = "one two three\r\nfour\r\n"
    merge = three_way(base, "one three\r\nfour\r\n", "one TWO three\r\nfour\r\n")
    assert merge.conflicts == (Conflict(4, 4, "two ", "", "TWO "),)
    marked = apply_policy(merge, "markers")
    assert marked.text == (
        "<<<<<<< yours\r\none three\r\n||||||| original\r\none two three\r\n=======\r\n"
        "one TWO three\r\n>>>>>>> model\r\nfour\r\n"
    )
    assert resolve(marked.text, marked.conflicts[0], "theirs") == "one TWO three\r\nfour\r\n"


def test_markers_at_the_very_start_and_end() -> None:
    merge = three_way("old", "ours", "theirs")
    assert apply_policy(merge, "markers").text == (
        "<<<<<<< yours\nours\n||||||| original\nold\n=======\ntheirs\n>>>>>>> model\n"
    )


def test_resolve_with_a_person_s_text() -> None:
    (c,) = three_way("a b c", "a X c", "a Y c").conflicts
    assert resolve("a X c", c, "text", "both X and Y") == "a both X and Y c"
    assert resolve("a X c", c, "theirs") == "a Y c"


@pytest.mark.parametrize(
    ("choice", "replacement", "message"),
    [("text", None, "needs a replacement"), ("ours", "x", "only used"), ("mine", None, "unknown")],
)
def test_resolve_rejects_unclear_requests(
    choice: str, replacement: str | None, message: str
) -> None:
    (c,) = FOX.conflicts[:1]
    with pytest.raises(ValueError, match=message):
        resolve(FOX.text, c, choice, replacement)  # type: ignore[arg-type]


def test_resolve_rejects_a_range_outside_the_text() -> None:
    with pytest.raises(ValueError, match="outside"):
        resolve("short", Conflict(3, 9, "", "", ""), "ours")


def test_apply_policy_rejects_unknown_policies_and_stale_merges() -> None:
    with pytest.raises(ValueError, match="unknown conflict policy"):
        apply_policy(FOX, "merge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fresh"):
        apply_policy(apply_policy(FOX, "markers"), "theirs")


def test_records_validate_their_ranges() -> None:
    with pytest.raises(ValueError):
        Conflict(5, 4, "", "", "")
    with pytest.raises(ValueError):
        Edit(-1, 0, "")
    assert Conflict(1, 2, "b", "o", "t").shifted(3) == Conflict(4, 5, "b", "o", "t")


@given(st.one_of(unicode_triples(), overlapping_edits().map(lambda case: case[:3])))
def test_marker_blocks_always_resolve_back(triple: tuple[str, str, str]) -> None:
    base, ours, theirs = triple
    merge = three_way(base, ours, theirs)
    marked = apply_policy(merge, "markers")
    for c in marked.conflicts:
        block = marked.text[c.start : c.end]
        assert block.startswith("<<<<<<< yours") and block.rstrip("\r\n").endswith(">>>>>>> model")
        # Whole lines: the block starts a line and the text after it starts one too.
        assert c.start == 0 or marked.text[c.start - 1] == "\n"
        assert block.endswith("\n")
    text = marked.text
    for c in reversed(marked.conflicts):
        text = resolve(text, c, "ours")
    assert text == merge.text
    text = marked.text
    for c in reversed(marked.conflicts):
        text = resolve(text, c, "theirs")
    assert text == apply_policy(merge, "theirs").text


@given(st.text(alphabet="ab", max_size=8), st.integers(0, 3000), st.text(alphabet="ab", max_size=8))
def test_galloping_common_prefix_and_suffix(head: str, size: int, tail: str) -> None:
    # Long equal runs with the mismatch anywhere: the galloping blocks must land on it.
    body = ("abcde" * (size // 5 + 1))[:size]
    a, b = body + head, body + tail
    n = min(len(a), len(b))
    assert fm._common_prefix(a, 0, b, 0, n) == next((i for i in range(n) if a[i] != b[i]), n)
    a, b = head + body, tail + body
    assert fm._common_suffix(a, len(a), b, len(b), n) == next(
        (i for i in range(n) if a[-1 - i] != b[-1 - i]), n
    )
