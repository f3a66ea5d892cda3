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
live regions diffs only each region's neighbourhood (off the event loop
when that is large), the way a restarted server finds a snapshot's region
again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import attrs
import trio

from editor_bridge.rope import Rope, rope_in_turns
from flows.merge import diff
from flows.snapshots import CONTEXT, Change, Snapshot, move_region

OFF_LOOP: Final = 20_000
"""Code points to diff (both sides) past which a region's neighbourhood is diffed in a
worker thread: a diff of that size takes milliseconds, which the loop should not wait."""
MAX_DIFF: Final = 1 << 20
"""Code points to diff past which a neighbourhood is taken as one replacement (its
region clips or collapses) instead of diffed: in a thread too, a diff holds the GIL,
for long stretches on texts of megabytes (measured: 150 ms to 2.7 s on 15 MB)."""
ANCHOR: Final = 64
"""Code points at each end of a region's context looked for when the whole context is
not found as it was (see ``locate``)."""
NEAR: Final = 1 << 16
"""Code points either side of where a context was that are searched before the whole
text: most edits move a region little, and a search of 15 MB takes milliseconds."""

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
        """Open ``uri``, or re-base it if it is open already: each region
        moves through the difference between our copy and the new text.

        Only what lies between the texts' common prefix and suffix differs;
        a region clear of that span stays, or shifts by the difference in
        length, and one that meets or touches it is found again through its
        context (``relocate``): the cost is the regions' neighbourhoods, never
        a diff of the documents."""
        built: Rope | None = None  # the new text as a rope, when it is needed whole
        while True:
            document = self.documents.get(uri)
            if document is None or not document.regions:
                if built is None:
                    built = await rope_in_turns(text)
                    continue  # the document may have moved while it was built
                if document is None:
                    document = self.documents[uri] = Document(uri, version, built)
                    return document
                document.rope = built
                break
            revision, rope, regions = document.revision, document.rope, dict(document.regions)
            start = rope.common_prefix(text)
            common = rope.common_suffix(text, min(len(rope), len(text)) - start)
            old_end, new_end = len(rope) - common, len(text) - common
            for key, (at, to) in regions.items():
                if to < start:  # wholly before what differs: where it was
                    continue
                if at > old_end:  # wholly after: shifted by the difference in length
                    regions[key] = (at + new_end - old_end, to + new_end - old_end)
                else:
                    before, after = max(0, at - CONTEXT), min(len(rope), to + CONTEXT)
                    regions[key] = await relocate(at, to, rope.slice(before, after), before, text)
            if new_end - start > OFF_LOOP and built is None:
                built = await rope_in_turns(text)  # cheaper than splicing that much in
            if (
                self.documents.get(uri) is document
                and document.revision == revision
                and document.regions.keys() <= regions.keys()
            ):
                for key in document.regions:
                    document.regions[key] = regions[key]
                if new_end - start > OFF_LOOP:
                    assert built is not None
                    document.rope = built
                else:
                    rope.replace(start, old_end, text[start:new_end])
                break
            # Another connection changed the document, or tracked a region in
            # it, while we worked: again, with what it is now.
        document.version = version
        document._moved()
        return document

    def close(self, uri: str) -> None:
        document = self.documents.pop(uri, None)
        if document is not None:
            document._moved()

    def change(
        self, uri: str, version: int, changes: Sequence[Change], touched: set[str] | None = None
    ) -> Document:
        """Apply ``changes``; the keys of the regions they met are added to ``touched``."""
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
                if touched is not None and change.start <= end and start <= change.end:
                    touched.add(key)
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
            region = snapshot.start, min(snapshot.end, len(text))
            if snapshot.document is not None:
                region = await relocate(
                    snapshot.start, snapshot.end, snapshot.document, snapshot.document_start, text
                )
            if self.documents.get(snapshot.uri) is document and document.revision == revision:
                document.regions[snapshot.id] = (min(region[0], region[1]), region[1])
                return document


async def relocate(start: int, end: int, window: str, offset: int, text: str) -> tuple[int, int]:
    """Where the region ``[start, end)`` of an older text is in ``text``, given
    ``window``, the older text from ``offset`` on, around the region: the span
    ``window`` became is found (``locate``) and the region carried through the
    difference between the two."""
    at, to = locate(window, offset, text)
    regions = {"region": (start - offset + at, end - offset + at)}
    move_all(regions, await _changes_between(window, text[at:to], at))
    start, end = regions["region"]
    end = min(end, len(text))
    return min(start, end), end


def locate(window: str, offset: int, text: str) -> tuple[int, int]:
    """The span of ``text`` that is now what ``window`` was when it began at
    ``offset`` of an older ``text``: the window itself where it still is,
    or its occurrence nearest to where it was; failing that (it was edited),
    the span between its first and last ``ANCHOR`` code points found nearest
    to where they were, or where they would be. Prose does not repeat 64 code
    points; text that does, closer than the distance the window moved, may
    be found at a copy of itself."""
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
    """Where ``pattern`` occurs in ``text`` nearest to ``around``, if it does:
    looked for within ``NEAR`` code points first, then in the whole text."""
    around = min(max(around, 0), len(text))
    for reach in (NEAR, len(text)):
        low, high = max(0, around - reach), around + reach + len(pattern)
        before = text.rfind(pattern, low, around + len(pattern))
        after = text.find(pattern, around, high)
        hits = [hit for hit in (before, after) if hit >= 0]
        if hits:
            return min(hits, key=lambda hit: abs(hit - around))
    return None


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
