"""The server's copy of each open editor document, and the live regions in it.

The editor tells us every change (``document/change``); we apply it here and
move every live region through it the way Emacs moves markers
(``flows.snapshots.move_region``). A region is live from the moment a call
about it is made until its reply has been merged: that is how the merge
knows what "the region's text now" is, however much the person typed.

A batch of changes is checked whole before any of it is applied: a bad one
(unknown document, stale version, range out of bounds) changes nothing.

Changes are applied inline, in the editor's order, so nothing here may cost
the size of the document: the text is a ``Rope`` (a change costs its own
size), a region is read as a slice of it, and re-opening a document with
live regions diffs only what lies between the common prefix and suffix of
the two texts, off the event loop when that is large.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import attrs
import trio

from editor_bridge.rope import Rope
from flows.merge import diff
from flows.snapshots import Change, Snapshot, move_region

OFF_LOOP: Final = 20_000
"""Code points to diff (both sides) past which a re-open diffs in a worker thread:
a diff of that size takes milliseconds, which the event loop should not wait."""
MAX_DIFF: Final = 1 << 21
"""Code points to diff past which a re-open is taken as one replacement of the whole
differing span (regions in it clip or collapse) instead of diffed: the diff's cost
grows with its size, and so large a difference leaves little of any region to find."""
ANCHOR: Final = 64
"""Code points at each end of a snapshot's context looked for when the whole context
is not found as it was (see ``Mirror.find_again``)."""

Regions = dict[str, tuple[int, int]]


class DocumentError(Exception):
    """A change or lookup the mirror refuses; the message says why."""

    def __init__(self, message: str, *, unknown: bool = False) -> None:
        super().__init__(message)
        self.unknown = unknown


@attrs.define
class Document:
    uri: str
    version: int
    rope: Rope
    regions: Regions = attrs.field(factory=dict)
    changed: trio.Event = attrs.field(factory=trio.Event)
    revision: int = 0
    """Bumped with every change of the text: a diff computed while awaiting is
    still right only if this did not move meanwhile."""

    @property
    def text(self) -> str:
        """The whole text: a copy of the document, for tests and rare paths."""
        return str(self.rope)

    def __len__(self) -> int:
        return len(self.rope)

    def slice(self, start: int, end: int) -> str:
        return self.rope.slice(start, end)

    def _moved(self) -> None:
        self.revision += 1
        self.changed.set()
        self.changed = trio.Event()


class Mirror:
    def __init__(self) -> None:
        self.documents: dict[str, Document] = {}

    def get(self, uri: str) -> Document:
        try:
            return self.documents[uri]
        except KeyError:
            raise DocumentError(
                f"document {uri!r} is not open: send document/open first", unknown=True
            ) from None

    async def open(self, uri: str, version: int, text: str) -> Document:
        """Open ``uri``, or re-base it if it is open already: the regions
        move through the difference between our copy and the new text."""
        while True:
            document = self.documents.get(uri)
            if document is None:
                document = self.documents[uri] = Document(uri, version, Rope(text))
                return document
            if not document.regions:
                document.rope = Rope(text)
                break
            revision, rope = document.revision, document.rope
            start = rope.common_prefix(text)
            common = rope.common_suffix(text, min(len(rope), len(text)) - start)
            old_end, new = len(rope) - common, text[start : len(text) - common]
            changes = await _changes_between(rope.slice(start, old_end), new, start)
            if self.documents.get(uri) is document and document.revision == revision:
                move_all(document.regions, changes)
                rope.replace(start, old_end, new)
                break
            # Another connection changed the document while we diffed: again.
        document.version = version
        document._moved()
        return document

    def close(self, uri: str) -> None:
        document = self.documents.pop(uri, None)
        if document is not None:
            document._moved()

    def change(self, uri: str, version: int, changes: Sequence[Change]) -> Document:
        document = self.get(uri)
        if version <= document.version:
            raise DocumentError(
                f"document {uri!r}: version {version} is not after {document.version}; "
                "versions must increase with every change (send document/open to re-sync)"
            )
        length = len(document)
        for index, change in enumerate(changes):
            if change.end > length:
                raise DocumentError(
                    f"document {uri!r}: change {index}: change range [{change.start}, "
                    f"{change.end}) is outside a document of {length} code points; "
                    "nothing was applied"
                )
            length += len(change.text) - (change.end - change.start)
        regions = document.regions
        for change in changes:
            document.rope.replace(change.start, change.end, change.text)
            for key, (start, end) in regions.items():
                regions[key] = move_region(start, end, change)
        document.version = version
        document._moved()
        return document

    def track(self, uri: str, key: str, start: int, end: int) -> None:
        document = self.get(uri)
        if not 0 <= start <= end <= len(document):
            raise DocumentError(
                f"range [{start}, {end}) is outside {uri!r} ({len(document)} code points)"
            )
        document.regions[key] = (start, end)

    def untrack(self, uri: str, key: str) -> None:
        document = self.documents.get(uri)
        if document is not None:
            document.regions.pop(key, None)

    async def find_again(self, snapshot: Snapshot) -> Document:
        """Track ``snapshot``'s region in its document, found again through
        its stored context: the server that saw the call made has restarted,
        and the editor's text may have changed meanwhile."""
        while True:
            document = self.get(snapshot.uri)
            revision, text = document.revision, document.text
            start, end = snapshot.start, snapshot.end
            changes: list[Change] = []
            if snapshot.document is not None:
                window, offset = snapshot.document, snapshot.document_start
                at, to = locate(window, offset, text)
                start, end = start - offset + at, end - offset + at
                changes = await _changes_between(window, text[at:to], at)
            if self.documents.get(snapshot.uri) is document and document.revision == revision:
                break
        regions = {snapshot.id: (start, end)}
        move_all(regions, changes)
        start, end = regions[snapshot.id]
        end = min(end, len(document))
        document.regions[snapshot.id] = (min(start, end), end)
        return document


def locate(window: str, offset: int, text: str) -> tuple[int, int]:
    """The span of ``text`` that is now what ``window`` was when it began at
    ``offset`` of an older ``text``: the window itself where it still is,
    or its occurrence nearest to where it was; failing that (it was edited),
    the span between its first and last ``ANCHOR`` code points found nearest
    to where they were, or where they would be."""
    if text.startswith(window, offset):
        return offset, offset + len(window)
    found = _nearest(text, window, offset)
    if found is not None:
        return found, found + len(window)
    head, tail = window[:ANCHOR], window[-ANCHOR:]
    start = _nearest(text, head, offset)
    expected_tail = (offset if start is None else start) + len(window) - len(tail)
    end = _nearest(text, tail, expected_tail)
    if end is not None:
        end += len(tail)
    if start is None:
        start = min(offset, len(text)) if end is None else max(0, end - len(window))
    if end is None or end < start:
        end = min(len(text), start + len(window))
    return start, end


def _nearest(text: str, pattern: str, around: int) -> int | None:
    """Where ``pattern`` occurs in ``text`` nearest to ``around``, if it does."""
    around = min(max(around, 0), len(text))
    before = text.rfind(pattern, 0, around + len(pattern))
    after = text.find(pattern, around)
    hits = [hit for hit in (before, after) if hit >= 0]
    return min(hits, key=lambda hit: abs(hit - around)) if hits else None


def move_all(regions: Regions, changes: Sequence[Change]) -> None:
    """Move ``regions`` through ``changes``, applied in the order given."""
    for change in changes:
        for key, (start, end) in regions.items():
            regions[key] = move_region(start, end, change)


def rebase(regions: Regions, old: str, new: str) -> None:
    """Move ``regions`` from ``old`` text to ``new``, through the edits that
    turn one into the other."""
    move_all(regions, edits_between(old, new))


async def _changes_between(old: str, new: str, offset: int) -> list[Change]:
    """``edits_between``, bounded: a large diff runs in a worker thread (on
    copies, so the mirror may change meanwhile: the caller checks), and one
    past ``MAX_DIFF`` is not diffed but taken as one replacement."""
    size = len(old) + len(new)
    if old == new:
        return []
    if size > MAX_DIFF:
        return [Change(offset, offset + len(old), new)]
    if size > OFF_LOOP:
        return await trio.to_thread.run_sync(edits_between, old, new, offset)
    return edits_between(old, new, offset)


def edits_between(old: str, new: str, offset: int = 0) -> list[Change]:
    """The changes that turn ``old`` into ``new``, shifted by ``offset``, last
    first: applied in the order given they refer to the original text, so an
    editor may apply them one by one or all against the original alike."""
    return [
        Change(offset + e.start, offset + e.end, e.text)
        for e in sorted(diff(old, new), key=lambda e: e.start, reverse=True)
    ]
