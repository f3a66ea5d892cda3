"""A model that drops or adds a line around the words it fixes must not
shift the alignment of those words (found by the Emacs client's tests: the
merge read "The definitely definately odd plan")."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flows.merge import apply_policy, three_way

CASES = [
    # (base, ours, theirs, merged with policy drop, conflicts (ours, theirs))
    (
        "#delay 0.5\nTeh definately wierd plan.",
        "#delay 0.5\nTeh definately odd plan.",
        "The definitely weird plan.",
        "The definitely odd plan.",
        [("odd", "weird")],
    ),
    (
        "#delay 1\nTeh definately wierd plan to recieve it.",
        "#delay 1\nTeh definately odd plan to get it.",
        "The definitely weird plan to receive it.",
        "The definitely odd plan to get it.",
        [("odd", "weird"), ("get", "receive")],
    ),
    (
        "Teh cat sat on teh mat.",
        "Teh cat sat on teh rug.",
        "Here is the corrected text:\nThe cat sat on the mat.",
        "Here is the corrected text:\nThe cat sat on the rug.",
        [],
    ),
]


@pytest.mark.parametrize(("base", "ours", "theirs", "merged", "conflicts"), CASES)
def test_a_dropped_or_added_line_does_not_shift_the_words(
    base: str, ours: str, theirs: str, merged: str, conflicts: list[tuple[str, str]]
) -> None:
    merge = apply_policy(three_way(base, ours, theirs), "drop")
    assert merge.text == merged
    assert [(c.ours, c.theirs) for c in merge.conflicts] == conflicts


WORDS = st.sampled_from(["plan", "garden", "letter", "winter", "friend", "weird", "word"])


@given(
    st.lists(WORDS, min_size=3, max_size=12, unique=True),
    st.data(),
)
def test_fixes_after_a_dropped_first_line_land_on_their_words(
    words: list[str], data: st.DataObject
) -> None:
    """theirs drops a directive line and fixes every misspelt word; ours
    rewrites one other word: everything lands, nothing is duplicated."""
    typos = {w: w[:-2] + w[-1] + w[-2] for w in words}  # swap the last two letters
    base = "#delay 1\n" + " ".join(typos[w] for w in words) + "."
    theirs = " ".join(words) + "."
    # Not the first word: the dropped line and the first word's fix are one
    # edit of theirs, so a change of ours there conflicts with both (and
    # "drop" then keeps the line, conservatively).
    mine = data.draw(st.integers(1, len(words) - 1))
    ours_words = [typos[w] for w in words]
    ours_words[mine] = "CHANGED"
    ours = "#delay 1\n" + " ".join(ours_words) + "."
    merge = apply_policy(three_way(base, ours, theirs), "drop")
    expected = list(words)
    expected[mine] = "CHANGED"
    assert merge.text == " ".join(expected) + "."
    assert [(c.ours, c.theirs) for c in merge.conflicts] == [("CHANGED", words[mine])]
