"""The server's copy of each open editor document, and the live regions in it.

The editor tells us every change (``document/change``); we apply it here and
move every live region through it the way Emacs moves markers
(``flows.snapshots.move_region``). A region is live from the moment a call
about it is made until its reply has been merged: that is how the merge
knows what "the region's text now" is, however much the person typed.

A batch of changes is checked whole before any of it is applied: a bad one
(unknown document, stale version, range out of bounds) changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio

from flows.merge import diff
from flows.snapshots import Change, apply_change, move_region


class DocumentError(Exception):
    """A change or lookup the mirror refuses; the message says why."""

    def __init__(self, message: str, *, unknown: bool = False) -> None:
        super().__init__(message)
        self.unknown = unknown


@attrs.define
class Document:
    uri: str
    version: int
    text: str
    regions: dict[str, tuple[int, int]] = attrs.field(factory=dict)
    changed: trio.Event = attrs.field(factory=trio.Event)

    def _moved(self) -> None:
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

    def open(self, uri: str, version: int, text: str) -> Document:
        """Open ``uri``, or re-base it if it is open already: the regions
        move through the difference between our copy and the new text."""
        document = self.documents.get(uri)
        if document is None:
            document = self.documents[uri] = Document(uri, version, text)
            return document
        rebase(document.regions, document.text, text)
        document.text, document.version = text, version
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
        text = document.text
        for index, change in enumerate(changes):
            try:
                text = apply_change(text, change)
            except ValueError as exc:
                raise DocumentError(
                    f"document {uri!r}: change {index}: {exc}; nothing was applied"
                ) from None
        for change in changes:
            for key, (start, end) in document.regions.items():
                document.regions[key] = move_region(start, end, change)
        document.text, document.version = text, version
        document._moved()
        return document

    def track(self, uri: str, key: str, start: int, end: int) -> None:
        document = self.get(uri)
        if not 0 <= start <= end <= len(document.text):
            raise DocumentError(
                f"range [{start}, {end}) is outside {uri!r} ({len(document.text)} code points)"
            )
        document.regions[key] = (start, end)

    def untrack(self, uri: str, key: str) -> None:
        document = self.documents.get(uri)
        if document is not None:
            document.regions.pop(key, None)


def rebase(regions: dict[str, tuple[int, int]], old: str, new: str) -> None:
    """Move ``regions`` from ``old`` text to ``new``, through the edits that
    turn one into the other (applied last-first, so each edit's offsets,
    which refer to ``old``, are still right when it is applied)."""
    if old == new:
        return
    for edit in sorted(diff(old, new), key=lambda e: e.start, reverse=True):
        change = Change(edit.start, edit.end, edit.text)
        for key, (start, end) in regions.items():
            regions[key] = move_region(start, end, change)


def edits_between(old: str, new: str, offset: int = 0) -> list[Change]:
    """The changes that turn ``old`` into ``new``, shifted by ``offset``, last
    first: applied in the order given they refer to the original text, so an
    editor may apply them one by one or all against the original alike."""
    return [
        Change(offset + e.start, offset + e.end, e.text)
        for e in sorted(diff(old, new), key=lambda e: e.start, reverse=True)
    ]
