"""The editor clients' invariant at the server's level, with no editor: random edits of
a person around one to three pending regions, and replies merged into the regions as
they are when the replies arrive (document mirror, snapshots, three-way merge and the
conflict policies, as ``editor_bridge.server`` chains them).

At every step the document with the model's edits taken out is exactly the person's
text (nothing they typed lost or doubled), and a call whose region no edit touched
merges cleanly.  The Emacs client's randomized ERT test checks the same in a real
Emacs, undo included."""

from __future__ import annotations

import re

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from editor_bridge.mirror import Mirror, edits_between
from flows.merge import MARKER_LABELS, apply_policy, three_way, whole_lines
from flows.snapshots import Change

URI = "file:///doc"
# Misspellings and fixes of equal length, none of which a few deletions can make out of
# pieces of these words: undoing the fixes gives back the person's text.
FIXES = {"wierd": "weird", "recieve": "receive", "beleive": "believe", "definately": "definitely"}
WORDS = [*FIXES, "garden", "winter", "🦆", "ñandú", "lake", "\n"]
TYPED = ["P", "xyz", " ", "ü", "🌊", "\n"]
YOURS, ORIGINAL, MODEL = MARKER_LABELS
BLOCK = re.compile(
    rf"<<<<<<< {YOURS}\n(.*?)\|\|\|\|\|\|\| {ORIGINAL}\n.*?>>>>>>> {MODEL}\n", re.DOTALL
)
FIXED = re.compile("|".join(FIXES.values()))


def fixed(text: str) -> str:
    """What the model replies: the text with its misspellings fixed."""
    for wrong, right in FIXES.items():
        text = text.replace(wrong, right)
    return text


def normal(text: str) -> tuple[str, list[int]]:
    """The text as the person alone has it (each marker block as its yours side, every
    fix undone) and a map from the text's offsets to that one's."""
    out: list[str] = []
    offsets: list[int] = []
    pos = 0
    for block in BLOCK.finditer(text):
        for ch in text[pos : block.start()]:
            offsets.append(len(out))
            out.append(ch)
        offsets += [len(out)] * (block.end() - block.start())
        out += block.group(1)
        pos = block.end()
    for ch in text[pos:]:
        offsets.append(len(out))
        out.append(ch)
    offsets.append(len(out))
    person = "".join(out)
    for wrong, right in FIXES.items():
        person = person.replace(right, wrong)
    return person, offsets


def free(text: str, start: int, end: int) -> bool:
    """Whether a person's edit of ``[start, end)`` leaves fixed words and marker blocks
    alone (an edit of those the normal form could not undo), and the last line end
    (a marker block at the end of a text without one would add it)."""
    if end >= len(text):
        return False
    zones = [m.span() for m in BLOCK.finditer(text)] + [m.span() for m in FIXED.finditer(text)]
    return all(end < a or start > b for a, b in zones)


@settings(deadline=None)
@given(st.data())
def test_person_text_kept_and_clean_calls_land(data: st.DataObject) -> None:
    words = data.draw(st.lists(st.sampled_from(WORDS), min_size=3, max_size=16), label="words")
    text = " ".join(words) + "\n"
    mirror = Mirror()
    document = trio.run(mirror.open, URI, 0, text)  # a new document: opened at once
    person = normal(text)[0]
    calls: dict[str, tuple[str, str]] = {}  # key -> (base, policy)
    for n in range(data.draw(st.integers(1, 3), label="calls")):
        start = data.draw(st.integers(0, len(text)), label="start")
        end = data.draw(st.integers(start, len(text)), label="end")
        key = f"call{n}"
        mirror.track(URI, key, start, end)
        calls[key] = (text[start:end], data.draw(st.sampled_from(["drop", "ask", "markers"])))
    touched: set[str] = set()
    version = 0

    def change(edits: list[tuple[int, int, str]]) -> None:
        nonlocal version
        version += 1
        mirror.change(URI, version, [Change(*e) for e in edits])

    while calls:
        now = document.text
        if data.draw(st.booleans(), label="type?"):
            start = data.draw(st.integers(0, len(now)), label="at")
            end = data.draw(st.integers(start, min(len(now), start + 4)), label="to")
            typed = data.draw(st.sampled_from(["", *TYPED]), label="typed")
            if not free(now, start, end):
                continue
            touched |= {k for k, (s, e) in document.regions.items() if start <= e and end >= s}
            offsets = normal(now)[1]
            person = person[: offsets[start]] + typed + person[offsets[end] :]
            change([(start, end, typed)])
        else:
            key = data.draw(st.sampled_from(sorted(calls)), label="reply")
            base, policy = calls.pop(key)
            start, end = document.regions[key]
            current, reply = now[start:end], fixed(base)
            if policy == "markers":  # as the server does: whole lines of the document
                start, end, pre, post = whole_lines(now, start, end)
                base, current, reply = pre + base + post, pre + current + post, pre + reply + post
            merge = apply_policy(three_way(base, current, reply), policy)
            if key not in touched:
                assert merge.conflicts == (), (base, current)
            change([(e.start, e.end, e.text) for e in edits_between(current, merge.text, start)])
            mirror.untrack(URI, key)
        assert normal(document.text)[0] == person
        for s, e in document.regions.values():
            assert 0 <= s <= e <= len(document.text)
