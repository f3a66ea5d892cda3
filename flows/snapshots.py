"""Snapshots of a region and the marker arithmetic that keeps a live region in place.

When a call is made on a region, its text is stored as a ``Snapshot``: the ``base`` of
the later three-way merge (``flows.merge``).  While the model works, the editor keeps
sending incremental ``Change``s and the region must follow the text it covered, the way
Emacs markers do, so that "the region's text now" (``ours``) is the person's edit of the
same words and not a window that drifted over its neighbours.

The rules of ``move_region``, and why:

* text inserted before the region shifts it; inserted strictly inside widens it;
* text inserted exactly at the region's start stays *outside* (the start moves right) and
  text inserted exactly at its end stays *outside* (the end stays): typing that abuts
  the region is the person writing around it, not inside what they asked about, and it
  must not become part of ``ours``, where it would be read as an edit of the region and
  likely conflict with the reply;
* an empty region receiving an insertion at its position moves right past the inserted
  text, staying empty.  The two rules above would pull its ends apart (start right, end
  left), which Emacs allows and we never do: ``start <= end`` always.  Moving right is
  the start rule, and it is how the cursor behaves when the person types at it, so a
  reply meant for "here" lands after what the person typed there meanwhile;
* a deletion overlapping the region clips it; a region wholly deleted collapses to an
  empty region at the deletion point;
* a replacement (non-empty range and text) that replaces at least one of the region's
  characters puts its new text *inside* the region: the text is an edit of the region's
  words (a fix of "Teh" at the region's start, a retyped word at its end), and leaving
  it out would make a later merge of the same region see those words deleted, then
  insert them again (``TheThe``).  The region grows over the replaced part outside it
  too (a replacement spanning the region's start or end): the replacement is one piece,
  and ``ours`` must hold all of it or none;
* any other replacement (one that only abuts the region or misses it, and every
  replacement near an empty region, which has no characters to replace) is a deletion
  followed by an insertion at the change's start, so each rule above applies in turn.

Offsets are code points (Python ``str`` indices), like everywhere in ``flows``.
"""

from __future__ import annotations

import json
from typing import Final

import attrs

__all__ = ["CONTEXT", "Change", "Snapshot", "apply_change", "move_region"]

CONTEXT: Final = 1024
"""Code points of text kept either side of a snapshot's region to find it again with
after a restart: enough to be unique in prose and to survive edits near the region."""


def _non_negative(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


@attrs.frozen
class Change:
    """One incremental edit: replace code points ``[start, end)`` of the document with
    ``text``."""

    start: int = attrs.field(validator=_non_negative)
    end: int = attrs.field(validator=_non_negative)
    text: str

    def __attrs_post_init__(self) -> None:
        if self.start > self.end:
            raise ValueError(f"change start {self.start} is after its end {self.end}")


@attrs.frozen
class Snapshot:
    """A region's text at the moment a call was made, and where that region is now.

    ``version`` is the document version the text was taken from; ``start``/``end`` are
    live positions that ``moved`` carries through later changes, while ``text`` stays
    the base of the merge. ``document`` is the document's text around the region at that
    moment, ``document_start`` where it began: a server that restarts has lost its live
    regions, and finds the region again by looking for that context in the text it is
    sent and carrying the region through the difference. Only ``CONTEXT`` code points
    either side are kept, not the whole document (as rows written before schema 4 did,
    with ``document_start`` 0): a call about one word of a 15 MB document must not
    store 15 MB.
    """

    id: str
    uri: str
    version: int = attrs.field(validator=_non_negative)
    start: int = attrs.field(validator=_non_negative)
    end: int = attrs.field(validator=_non_negative)
    text: str
    created_at: float
    document: str | None = None
    document_start: int = attrs.field(default=0, validator=_non_negative)

    def __attrs_post_init__(self) -> None:
        if self.start > self.end:
            raise ValueError(f"snapshot start {self.start} is after its end {self.end}")

    def moved(self, change: Change) -> Snapshot:
        """This snapshot with its region carried through ``change`` (text unchanged)."""
        start, end = move_region(self.start, self.end, change)
        return attrs.evolve(self, start=start, end=end)

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "uri": self.uri,
                "version": self.version,
                "start": self.start,
                "end": self.end,
                "text": self.text,
                "created_at": self.created_at,
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, data: str) -> Snapshot:
        """Inverse of ``to_json``; a wrong shape raises ``ValueError`` naming the field."""
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("a snapshot must be a JSON object")
        fields: dict[str, tuple[type, ...]] = {
            "id": (str,),
            "uri": (str,),
            "version": (int,),
            "start": (int,),
            "end": (int,),
            "text": (str,),
            "created_at": (int, float),
        }
        for name, types in fields.items():
            value = raw.get(name)
            if isinstance(value, bool) or not isinstance(value, types):
                raise ValueError(f"snapshot field {name!r} is missing or not {types[0].__name__}")
        return cls(
            id=raw["id"],
            uri=raw["uri"],
            version=raw["version"],
            start=raw["start"],
            end=raw["end"],
            text=raw["text"],
            created_at=float(raw["created_at"]),
        )


def move_region(start: int, end: int, change: Change) -> tuple[int, int]:
    """Where the region ``[start, end)`` is after ``change`` (rules in the module docstring)."""
    if not 0 <= start <= end:
        raise ValueError(f"region [{start}, {end}) is not a range")
    cut, cut_end = change.start, change.end
    removed = cut_end - cut

    def delete(pos: int) -> int:
        if pos <= cut:
            return pos
        if pos >= cut_end:
            return pos - removed
        return cut

    replaces_inside = max(start, cut) < min(end, cut_end)
    start, end = delete(start), delete(end)
    added = len(change.text)
    if added:
        # Insertion at `cut`: the start moves when the text lands at or before it, the end
        # only when the text lands strictly before it, unless the region is empty (it then
        # moves as a whole, keeping start <= end).  A replacement of the region's own
        # characters left start <= cut <= end: its text goes inside.
        if replaces_inside:
            end += added
        elif cut <= start:
            start += added
            end += added
        elif cut < end:
            end += added
    return start, end


def apply_change(text: str, change: Change) -> str:
    """``text`` with ``change`` applied; ``ValueError`` if its range is not inside ``text``."""
    if change.end > len(text):
        raise ValueError(
            f"change range [{change.start}, {change.end}) is outside a document of "
            f"{len(text)} code points"
        )
    return text[: change.start] + change.text + text[change.end :]
