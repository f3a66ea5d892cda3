"""A live region follows its text through the editor's changes like Emacs markers
(flows.snapshots.move_region), checked against sentinels carried inside the text."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from flows.snapshots import Change, Snapshot, apply_change, move_region

try:  # tests/conftest.py may have registered it already (with its own deadline)
    settings.get_profile("thorough")
except InvalidArgument:
    settings.register_profile("thorough", max_examples=2000)

START, END = "\x00", "\x01"  # sentinels; the generated documents never contain them


def carry(marked: str, change: Change) -> str:
    """Apply ``change`` (in document offsets) to a text carrying sentinel characters.

    The deleted characters go, the sentinels among them stay (a deletion clips the
    region).  The inserted text goes after an end sentinel at the change point (text at
    the end stays outside) and before a start sentinel (text at the start stays outside;
    an empty region, START END, therefore moves past it), unless the change deleted a
    character between the sentinels: a replacement of the region's own text puts its new
    text inside (after a start sentinel, before an end sentinel).
    """
    kept: list[str] = []
    offset = 0  # document offset of the next document character
    inside = replaced_inside = False
    for ch in marked:
        if ch in (START, END):
            kept.append(ch)
            inside = ch == START
        else:
            if not change.start <= offset < change.end:
                kept.append(ch)
            else:
                replaced_inside = replaced_inside or inside
            offset += 1
    at = seen = 0
    while seen < change.start:  # just past the document character before the change
        seen += kept[at] not in (START, END)
        at += 1
    while at < len(kept) and kept[at] == (START if replaced_inside else END):
        at += 1
    return "".join(kept[:at]) + change.text + "".join(kept[at:])


def mark(doc: str, start: int, end: int) -> str:
    return doc[:start] + START + doc[start:end] + END + doc[end:]


def read(marked: str) -> tuple[str, int, int]:
    """The document and the region the sentinels delimit."""
    return (
        marked.replace(START, "").replace(END, ""),
        marked.index(START),
        marked.index(END) - 1,
    )


def sentinel_reference(doc: str, start: int, end: int, change: Change) -> tuple[int, int]:
    new_doc, new_start, new_end = read(carry(mark(doc, start, end), change))
    assert new_doc == apply_change(doc, change)
    return new_start, new_end


alphabet = st.sampled_from(["a", "b", " ", "\n", "é", "😀", "\r\n", "中"])
docs = st.lists(alphabet, max_size=20).map("".join)


@st.composite
def region_and_change(draw: st.DrawFn) -> tuple[str, int, int, Change]:
    doc = draw(docs)
    start = draw(st.integers(0, len(doc)))
    end = draw(st.integers(start, len(doc)))
    cut = draw(st.integers(0, len(doc)))
    # Bias towards the interesting points: the region's ends.
    cut = draw(st.sampled_from([cut, start, end]))
    cut_end = draw(st.integers(cut, len(doc)))
    cut_end = draw(st.sampled_from([cut_end, cut, max(cut, start), max(cut, end)]))
    text = draw(st.lists(alphabet, max_size=4).map("".join))
    return doc, start, end, Change(cut, cut_end, text)


@given(region_and_change())
def test_move_region_agrees_with_sentinels(case: tuple[str, int, int, Change]) -> None:
    doc, start, end, change = case
    moved = move_region(start, end, change)
    assert moved == sentinel_reference(doc, start, end, change)
    assert 0 <= moved[0] <= moved[1] <= len(apply_change(doc, change))


# (start, end) of the region "cd" in "ab cd ef" is (3, 5).
CASES = [
    pytest.param(Change(0, 0, "XY"), (5, 7), id="insert-before-shifts"),
    pytest.param(Change(3, 3, "XY"), (5, 7), id="insert-at-start-stays-outside"),
    pytest.param(Change(4, 4, "XY"), (3, 7), id="insert-inside-widens"),
    pytest.param(Change(5, 5, "XY"), (3, 5), id="insert-at-end-stays-outside"),
    pytest.param(Change(7, 7, "XY"), (3, 5), id="insert-after-ignored"),
    pytest.param(Change(0, 2, ""), (1, 3), id="delete-before-shifts-back"),
    pytest.param(Change(2, 4, ""), (2, 3), id="delete-over-start-clips"),
    pytest.param(Change(4, 6, ""), (3, 4), id="delete-over-end-clips"),
    pytest.param(Change(3, 5, ""), (3, 3), id="delete-exactly-region-collapses"),
    pytest.param(Change(1, 7, ""), (1, 1), id="delete-around-collapses-at-point"),
    pytest.param(Change(5, 8, ""), (3, 5), id="delete-after-ignored"),
    # A replacement of the region's own characters puts its text inside, even at the
    # region's ends (a fix of its first word must not fall out of it).
    pytest.param(Change(3, 4, "Q"), (3, 5), id="replace-first-char-new-text-inside"),
    pytest.param(Change(4, 5, "QQ"), (3, 6), id="replace-last-char-new-text-inside"),
    pytest.param(Change(2, 4, "QQQ"), (2, 6), id="replace-over-start-takes-it-whole"),
    pytest.param(Change(4, 7, "QQ"), (3, 6), id="replace-over-end-takes-it-whole"),
    pytest.param(Change(3, 5, "new"), (3, 6), id="replace-whole-region-is-the-new-text"),
    pytest.param(Change(1, 7, "new"), (1, 4), id="replace-around-region-is-the-new-text"),
    # A replacement that only abuts the region replaces none of its text: outside.
    pytest.param(Change(2, 3, "QQ"), (4, 6), id="replace-abutting-start-stays-outside"),
    pytest.param(Change(5, 6, "QQ"), (3, 5), id="replace-abutting-end-stays-outside"),
]


@pytest.mark.parametrize(("change", "expected"), CASES)
def test_move_region_cases(change: Change, expected: tuple[int, int]) -> None:
    assert move_region(3, 5, change) == expected
    assert move_region(3, 5, change) == sentinel_reference("ab cd ef", 3, 5, change)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(Change(4, 4, "XY"), (6, 6), id="insert-at-empty-region-moves-it-past"),
        pytest.param(Change(3, 3, "XY"), (6, 6), id="insert-before-empty"),
        pytest.param(Change(5, 5, "XY"), (4, 4), id="insert-after-empty"),
        pytest.param(Change(3, 5, ""), (3, 3), id="delete-around-empty"),
        # No character of an empty region is replaced: the text goes past it.
        pytest.param(Change(3, 5, "XYZ"), (6, 6), id="replace-around-empty-moves-it-past"),
    ],
)
def test_empty_region(change: Change, expected: tuple[int, int]) -> None:
    assert move_region(4, 4, change) == expected
    assert move_region(4, 4, change) == sentinel_reference("ab cd ef", 4, 4, change)


def test_move_region_rejects_inverted_regions() -> None:
    with pytest.raises(ValueError, match="not a range"):
        move_region(5, 3, Change(0, 0, "x"))


class Region(RuleBasedStateMachine):
    """A document with a live region through a run of random edits; sentinels travel
    inside the text the whole way and must always agree with move_region."""

    @initialize(doc=docs, data=st.data())
    def start(self, doc: str, data: st.DataObject) -> None:
        self.doc = doc
        self.start_, self.end_ = sorted(
            data.draw(st.tuples(st.integers(0, len(doc)), st.integers(0, len(doc))))
        )
        self.marked = mark(doc, self.start_, self.end_)

    def _apply(self, change: Change) -> None:
        self.start_, self.end_ = move_region(self.start_, self.end_, change)
        self.doc = apply_change(self.doc, change)
        self.marked = carry(self.marked, change)

    @invariant()
    def region_is_where_the_sentinels_are(self) -> None:
        assert read(self.marked) == (self.doc, self.start_, self.end_)
        assert 0 <= self.start_ <= self.end_ <= len(self.doc)

    @rule(data=st.data(), text=st.lists(alphabet, min_size=1, max_size=4).map("".join))
    def insert(self, data: st.DataObject, text: str) -> None:
        point = data.draw(st.sampled_from([self.start_, self.end_, len(self.doc), 0]))
        point = data.draw(st.sampled_from([point, data.draw(st.integers(0, len(self.doc)))]))
        self._apply(Change(point, point, text))

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        a = data.draw(st.integers(0, len(self.doc)))
        b = data.draw(st.integers(a, len(self.doc)))
        self._apply(Change(a, b, ""))

    @rule(data=st.data(), text=st.lists(alphabet, max_size=4).map("".join))
    def replace(self, data: st.DataObject, text: str) -> None:
        a = data.draw(st.integers(0, len(self.doc)))
        b = data.draw(st.integers(a, len(self.doc)))
        self._apply(Change(a, b, text))


TestRegion = Region.TestCase
TestRegion.settings = settings(max_examples=100, stateful_step_count=20)


def test_a_region_follows_its_text_through_a_session() -> None:
    doc, start, end = "hello world", 6, 11  # "world"
    for change, region in [
        (Change(6, 6, "big "), "world"),  # typed at the start: outside
        (Change(15, 15, "!"), "world"),  # typed at the end: outside
        (Change(12, 12, "o"), "woorld"),  # inside: widens
        (Change(0, 6, ""), "woorld"),  # "hello " deleted before
        (Change(0, 5, "x"), "xoorld"),  # replacement over the start: one piece, inside
    ]:
        start, end = move_region(start, end, change)
        doc = apply_change(doc, change)
        assert doc[start:end] == region


# --- Change, apply_change, Snapshot ---------------------------------------------------


def test_apply_change() -> None:
    assert apply_change("héllo 😀", Change(6, 7, "🙂!")) == "héllo 🙂!"
    assert apply_change("", Change(0, 0, "x")) == "x"


@pytest.mark.parametrize("change", [Change(0, 6, ""), Change(6, 6, "x")])
def test_apply_change_out_of_bounds(change: Change) -> None:
    with pytest.raises(ValueError, match="outside a document of 5 code points"):
        apply_change("hello", change)


@pytest.mark.parametrize(("start", "end"), [(-1, 0), (0, -1), (3, 2)])
def test_change_validates_its_range(start: int, end: int) -> None:
    with pytest.raises(ValueError):
        Change(start, end, "")


SNAP = Snapshot(
    id="s1",
    uri="file:///tmp/a.txt",
    version=7,
    start=3,
    end=9,
    text="naïve 😀\r\n",
    created_at=1714740000.5,
)


def test_snapshot_json_round_trip() -> None:
    assert Snapshot.from_json(SNAP.to_json()) == SNAP
    assert json.loads(SNAP.to_json())["text"] == "naïve 😀\r\n"


@pytest.mark.parametrize(
    "patch",
    [{"start": "3"}, {"version": True}, {"text": None}, {"created_at": "now"}, {"id": 1}],
)
def test_snapshot_from_json_rejects_wrong_shapes(patch: dict[str, object]) -> None:
    raw = json.loads(SNAP.to_json()) | patch
    with pytest.raises(ValueError, match=next(iter(patch))):
        Snapshot.from_json(json.dumps(raw))


def test_snapshot_from_json_rejects_non_objects() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        Snapshot.from_json("[1, 2]")


@pytest.mark.parametrize(("start", "end", "version"), [(5, 4, 0), (-1, 4, 0), (0, 4, -1)])
def test_snapshot_validates(start: int, end: int, version: int) -> None:
    with pytest.raises(ValueError):
        Snapshot("s", "u", version, start, end, "", 0.0)


def test_snapshot_moves_but_keeps_its_base_text() -> None:
    moved = SNAP.moved(Change(0, 0, "ab"))
    assert (moved.start, moved.end, moved.text, moved.version) == (5, 11, SNAP.text, 7)
