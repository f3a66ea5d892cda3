"""The mirror's text structure against plain ``str``: a ``Rope`` edited by random
changes reads as the ``str`` edited by the same changes, and the mirror built on it
moves its regions as ``move_region`` moves them over plain text."""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import editor_bridge.mirror as mirror_module
import editor_bridge.rope as rope_module
from editor_bridge.mirror import DocumentError, Mirror, edits_between
from editor_bridge.rope import Rope, rope_in_turns
from flows.snapshots import Change, apply_change, move_region

# Multibyte, astral (emoji, so a UTF-16 offset would differ) and combining text.
ALPHABET = st.sampled_from(["a", "b", " ", "\n", "é", "ñ", "\u0301", "🦆", "👍🏽", "中", "\r\n"])
TEXT = st.lists(ALPHABET, max_size=40).map("".join)


@st.composite
def changes_to(draw: st.DrawFn, text: str, count: int) -> list[Change]:
    """``count`` valid changes, each against the text the previous ones made."""
    out = []
    for _ in range(count):
        start = draw(st.integers(0, len(text)))
        end = draw(st.integers(start, min(len(text), start + 12)))
        change = Change(start, end, draw(TEXT))
        text = apply_change(text, change)
        out.append(change)
    return out


@settings(max_examples=300)
@given(st.data(), TEXT, st.integers(1, 6))
def test_a_rope_reads_as_the_str_edited_alike(data: st.DataObject, text: str, chunk: int) -> None:
    rope = Rope(text, chunk=chunk)  # tiny chunks: every split and empty chunk is reached
    model = text
    for change in data.draw(changes_to(text, data.draw(st.integers(0, 30)))):
        rope.replace(change.start, change.end, change.text)
        model = apply_change(model, change)
        assert len(rope) == len(model)
        start = data.draw(st.integers(0, len(model)))
        end = data.draw(st.integers(start, len(model)))
        assert rope.slice(start, end) == model[start:end]
    assert str(rope) == model


@given(TEXT, TEXT, TEXT, st.integers(1, 6))
def test_common_prefix_and_suffix_are_those_of_the_strs(
    shared: str, left: str, right: str, chunk: int
) -> None:
    old, new = shared + left + shared, shared + right + shared
    rope = Rope(old, chunk=chunk)
    prefix = rope.common_prefix(new)
    assert old[:prefix] == new[:prefix]
    assert prefix == len(old) or prefix == len(new) or old[prefix] != new[prefix]
    limit = min(len(old), len(new)) - prefix
    suffix = rope.common_suffix(new, limit)
    assert suffix <= limit
    assert old[len(old) - suffix :] == new[len(new) - suffix :]
    assert suffix == limit or old[len(old) - suffix - 1] != new[len(new) - suffix - 1]


@pytest.mark.parametrize(("start", "end"), [(-1, 0), (2, 1), (0, 6), (6, 6)])
def test_a_range_outside_the_rope_is_refused_and_changes_nothing(start: int, end: int) -> None:
    rope = Rope("héllo", chunk=2)
    with pytest.raises(ValueError, match="outside a text of 5 code points"):
        rope.replace(start, end, "x")
    with pytest.raises(ValueError, match="outside"):
        rope.slice(start, end)
    assert str(rope) == "héllo"


def test_everything_deleted_then_typed_again() -> None:
    rope = Rope("abcdefgh" * 10, chunk=3)
    rope.replace(0, 80, "")
    assert (len(rope), str(rope)) == (0, "")
    rope.replace(0, 0, "🦆")
    rope.replace(1, 1, "x" * 20)
    assert str(rope) == "🦆" + "x" * 20


@settings(max_examples=150, deadline=None)
@given(st.data(), TEXT)
def test_the_mirror_moves_regions_as_move_region_does_over_a_str(
    data: st.DataObject, text: str
) -> None:
    """Batches of changes, some refused whole, against a naive model: the text
    as a ``str`` edited by ``apply_change``, the regions by ``move_region``."""
    mirror = Mirror()
    trio.run(mirror.open, "u", 0, text)
    model, regions, version = text, {}, 0
    for key in range(data.draw(st.integers(0, 3))):
        start = data.draw(st.integers(0, len(model)))
        end = data.draw(st.integers(start, len(model)))
        mirror.track("u", str(key), start, end)
        regions[str(key)] = (start, end)
    for _ in range(data.draw(st.integers(1, 6))):
        batch = data.draw(changes_to(model, data.draw(st.integers(0, 4))))
        bad = data.draw(st.booleans())
        if bad:  # one change out of range: nothing of the batch applies
            batch.append(Change(0, len(model) + 10**6, "x"))
            with pytest.raises(DocumentError, match="nothing was applied"):
                mirror.change("u", version + 1, batch)
        else:
            version += 1
            mirror.change("u", version, batch)
            for change in batch:
                model = apply_change(model, change)
                regions = {k: move_region(s, e, change) for k, (s, e) in regions.items()}
        document = mirror.get("u")
        assert document.text == model
        assert document.version == version
        assert document.regions == regions
        for start, end in regions.values():
            assert document.slice(start, end) == model[start:end]


# Middles of two texts, from alphabets of their own: the common prefix and suffix of
# the texts are then exactly what surrounds the middles.
OLD_MIDDLE = st.lists(st.sampled_from(["X", "🐟"]), max_size=30).map("".join)
NEW_MIDDLE = st.lists(st.sampled_from(["Y", "🐝"]), max_size=30).map("".join)


@settings(max_examples=150, deadline=None)
@given(TEXT, OLD_MIDDLE, NEW_MIDDLE, TEXT, st.data())
def test_reopening_keeps_regions_outside_the_difference_exactly(
    before: str, old_middle: str, new_middle: str, after: str, data: st.DataObject
) -> None:
    """Re-opened with other text, a region in the unchanged head stays, one in
    the unchanged tail shifts by the difference in length, and every region
    is still a range of the new text. (Regions touching the difference are
    left to ``move_region``'s rules.)"""
    old, new = before + old_middle + after, before + new_middle + after
    mirror = Mirror()

    async def reopen() -> None:
        await mirror.open("u", 0, old)
        if before:
            mirror.track("u", "head", 0, data.draw(st.integers(0, len(before) - 1)))
        if after:
            tail = data.draw(st.integers(len(old) - len(after) + 1, len(old)))
            mirror.track("u", "tail", tail, len(old))
        start = data.draw(st.integers(0, len(old)))
        mirror.track("u", "any", start, data.draw(st.integers(start, len(old))))
        await mirror.open("u", 7, new)

    trio.run(reopen)
    document = mirror.get("u")
    assert (document.text, document.version) == (new, 7)
    if before:
        start, end = document.regions["head"]
        assert start == 0 and document.slice(start, end) == new[:end]
    if after:
        start, end = document.regions["tail"]
        assert end == len(new) and document.slice(start, end) == old[len(old) - (end - start) :]
        assert end - start < len(after)
    start, end = document.regions["any"]
    assert 0 <= start <= end <= len(new)


def test_reopening_a_large_document_finds_each_region_through_its_neighbourhood() -> None:
    """A 1.5 MB document re-opened with edits far before, far after, next to
    and inside two regions: each region still covers its words."""
    rng = random.Random(1)
    words = ["naïve", "🦆", "river", "中文", "the", "of", "sea", "—", "ñandú"]
    part = [" ".join(rng.choice(words) for _ in range(80_000)) for _ in range(3)]
    old = part[0] + " one teh cat. " + part[1] + " two teh dog. " + part[2]
    new = old.replace("one teh cat", "one (!) teh big cat").replace("two teh", "two the")
    new = "Preface. " * 500 + new[:1000] + "~" + new[1000:] + " The end."
    mirror = Mirror()

    async def reopen() -> None:
        await mirror.open("u", 0, old)
        for key, words in (("cat", "teh cat"), ("dog", "two teh dog")):
            start = old.index(words)
            mirror.track("u", key, start, start + len(words))
        await mirror.open("u", 1, new)

    trio.run(reopen)
    document = mirror.get("u")
    assert document.text == new
    assert document.slice(*document.regions["cat"]) == "teh big cat"
    assert document.slice(*document.regions["dog"]) == "two the dog"


async def test_a_change_while_a_reopen_diffs_off_the_loop_is_not_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A large region is diffed in a worker thread; a change that another
    connection makes meanwhile makes the re-open start again from the text
    as it now is, so the region is carried through both."""
    # The first diff in the thread waits until the change is made: on a busy
    # machine the thread could otherwise finish before the change.
    changed, diffed = threading.Event(), edits_between

    def held(*args: Any) -> Any:
        changed.wait(10)
        return diffed(*args)

    monkeypatch.setattr(mirror_module, "edits_between", held)
    rng = random.Random(2)
    words = ["cat", "naïve", "🦆", "sea", "of", "ñandú", "river"]
    region = " ".join(rng.choice(words) for _ in range(6_000)) + " teh end"  # > OFF_LOOP
    old = "Head. " + region + " Tail."
    mirror = Mirror()
    await mirror.open("u", 0, old)
    mirror.track("u", "big", 6, 6 + len(region))
    new = "Head. " + region.replace("teh", "the") + " Tail."
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mirror.open, "u", 9, new)
        await trio.testing.wait_all_tasks_blocked()  # the re-open waits for its thread
        mirror.change("u", 1, [Change(0, 0, "Preface. ")])
        changed.set()
    document = mirror.get("u")
    assert (document.text, document.version) == (new, 9)
    start, end = document.regions["big"]
    assert document.slice(start, end) == region.replace("teh", "the")


@pytest.mark.parametrize("turn", [1, 3, 8, 50])
@pytest.mark.parametrize("chunk", [1, 2, 5])
async def test_a_rope_built_in_turns_is_the_rope_of_its_text(
    monkeypatch: pytest.MonkeyPatch, turn: int, chunk: int
) -> None:
    monkeypatch.setattr(rope_module, "TURN", turn)
    text = "naïve 🦆 ñandú, the quick brown fox" * 3
    rope = await rope_in_turns(text, chunk=chunk)
    assert str(rope) == text and len(rope) == len(text)
    assert rope.slice(5, 40) == text[5:40]
    rope.replace(3, 9, "XYZ")
    assert str(rope) == text[:3] + "XYZ" + text[9:]
