"""An editable text whose edits cost the size of the edit, not of the text.

The mirror applies every ``document/change`` an editor sends, and an editor sends one
per keystroke. Applied to a Python ``str`` each change builds a new string of the whole
document: 50,000 changes on a 4 MB document is 200 GB of copying, and since changes are
applied inline (in the editor's order) the server answers nobody meanwhile.

``Rope`` keeps the text as a list of chunks of at most ``2 * CHUNK`` code points, with
their lengths in a Fenwick tree (a binary indexed tree of prefix sums), so that finding
the chunk holding an offset and updating a chunk's length are both O(log n). A change
rewrites only the chunks its range touches: O(CHUNK + size of the change + log n). A
chunk emptied by a deletion stays in the list, empty, until the next re-chunking; a chunk
grown past ``2 * CHUNK`` is split, which rebuilds the list and the tree in O(n / CHUNK),
once every ``CHUNK`` or more code points inserted. Reading a slice costs the slice.

Offsets are code points (Python ``str`` indices), like everywhere in ``flows``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Final

import trio

CHUNK: Final = 4096
"""Target chunk size in code points: big enough that the list stays short (a 15 MB
document is under 4,000 chunks), small enough that rewriting one chunk is cheap."""
TURN: Final = 256 * CHUNK
"""Code points ``rope_in_turns`` copies between two checkpoints: about 2 ms."""


class Rope:
    def __init__(self, text: str = "", *, chunk: int = CHUNK) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 code point, got {chunk}")
        self._chunk = chunk
        self._chunks: list[str] = []
        self._tree: list[int] = [0]
        self._length = 0
        self._rechunk([text])

    @classmethod
    def from_chunks(cls, chunks: Sequence[str], *, chunk: int = CHUNK) -> Rope:
        """The rope of ``"".join(chunks)``, taking the pieces as they are where
        they are short enough (no copy)."""
        rope = cls(chunk=chunk)
        rope._rechunk(list(chunks))
        return rope

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return "".join(self._chunks)

    def __repr__(self) -> str:
        return f"Rope({len(self)} code points in {len(self._chunks)} chunks)"

    def slice(self, start: int, end: int) -> str:
        """``str(self)[start:end]`` for ``0 <= start <= end <= len(self)``, at the cost
        of the slice."""
        self._check(start, end)
        return "".join(self._pieces(start, end))

    def replace(self, start: int, end: int, text: str) -> None:
        """Replace ``[start, end)`` with ``text``; ``ValueError`` if the range is not
        inside the text."""
        self._check(start, end)
        first, offset = self._find(start)
        last, last_offset = self._find(end)
        chunks = self._chunks
        if first == len(chunks):  # appending to an empty rope
            self._rechunk([text])
            return
        head = chunks[first][:offset]
        tail = chunks[last][last_offset:] if last < len(chunks) else ""
        middle = head + text + tail
        if len(middle) > 2 * self._chunk:
            self._rechunk([*chunks[:first], middle, *chunks[last + 1 :]])
            return
        self._set(first, middle)
        for index in range(first + 1, last + 1):
            self._set(index, "")

    def common_prefix(self, text: str) -> int:
        """Length of the longest common prefix of this text and ``text``."""
        done = 0
        for chunk in self._chunks:
            if text.startswith(chunk, done):
                done += len(chunk)
                continue
            return done + _head_match(chunk, text, done)
        return done

    def common_suffix(self, text: str, limit: int) -> int:
        """Length of the longest common suffix of this text and ``text``, at most
        ``limit`` (so that it need not overlap a common prefix)."""
        done = 0
        end = len(text)
        for chunk in reversed(self._chunks):
            if done >= limit:
                return limit
            if text.endswith(chunk, 0, end - done):
                done += len(chunk)
                continue
            return min(limit, done + _tail_match(chunk, text, end - done))
        return min(limit, done)

    # --- the chunks and their tree ----------------------------------------------------

    def _check(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= self._length:
            raise ValueError(
                f"range [{start}, {end}) is outside a text of {self._length} code points"
            )

    def _pieces(self, start: int, end: int) -> Iterator[str]:
        index, offset = self._find(start)
        left = end - start
        while left > 0:
            piece = self._chunks[index][offset : offset + left]
            yield piece
            left -= len(piece)
            index, offset = index + 1, 0

    def _find(self, position: int) -> tuple[int, int]:
        """The chunk holding ``position`` and the offset in it: the first non-empty
        chunk whose end is after ``position``; past the end, the last chunk and its
        length (or ``(0, 0)`` when there are no chunks)."""
        if position >= self._length:
            if not self._chunks:
                return 0, 0
            last = len(self._chunks) - 1
            return last, len(self._chunks[last])
        # Descend the Fenwick tree: the largest index whose prefix sum is <= position.
        tree, index, left = self._tree, 0, position
        step = 1 << (len(tree) - 1).bit_length()
        while step:
            probe = index + step
            if probe < len(tree) and tree[probe] <= left:
                index, left = probe, left - tree[probe]
            step >>= 1
        return index, left

    def _set(self, index: int, chunk: str) -> None:
        delta = len(chunk) - len(self._chunks[index])
        self._chunks[index] = chunk
        self._length += delta
        tree, node = self._tree, index + 1
        while node < len(tree):
            tree[node] += delta
            node += node & -node

    def _rechunk(self, texts: list[str]) -> None:
        """Rebuild from ``texts``: empty pieces dropped, long ones cut to ``chunk``."""
        chunks: list[str] = []
        size = self._chunk
        for text in texts:
            if len(text) <= 2 * size:
                if text:
                    chunks.append(text)
                continue
            chunks.extend(text[i : i + size] for i in range(0, len(text), size))
        tree = [0] + [len(c) for c in chunks]
        for node in range(1, len(tree)):
            parent = node + (node & -node)
            if parent < len(tree):
                tree[parent] += tree[node]
        self._chunks, self._tree = chunks, tree
        self._length = sum(len(c) for c in chunks)


def _head_match(chunk: str, text: str, at: int) -> int:
    """How many first code points of ``chunk`` ``text`` has at ``at`` (a binary
    search of C-speed comparisons)."""
    low, high = 0, len(chunk)
    while low < high:
        middle = (low + high + 1) // 2
        if text.startswith(chunk[:middle], at):
            low = middle
        else:
            high = middle - 1
    return low


def _tail_match(chunk: str, text: str, end: int) -> int:
    """How many last code points of ``chunk`` ``text`` has before ``end``."""
    low, high = 0, len(chunk)
    while low < high:
        middle = (low + high + 1) // 2
        if text.endswith(chunk[len(chunk) - middle :], 0, end):
            low = middle
        else:
            high = middle - 1
    return low


async def rope_in_turns(text: str, *, chunk: int = CHUNK) -> Rope:
    """``Rope(text)``, with a checkpoint every ``TURN`` code points: cutting a
    15 MB document into chunks copies 60 MB, some 30 ms held at once."""
    if len(text) <= TURN:
        return Rope(text, chunk=chunk)
    chunks: list[str] = []
    step = TURN - TURN % chunk or chunk  # turns end where chunks do
    for start in range(0, len(text), step):
        end = min(start + step, len(text))
        chunks.extend(text[i : min(i + chunk, end)] for i in range(start, end, chunk))
        await trio.lowlevel.checkpoint()
    return Rope.from_chunks(chunks, chunk=chunk)
