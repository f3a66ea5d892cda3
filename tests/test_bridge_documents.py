"""Large documents through a real ``dovecote serve --stdio``: a correction in
the middle of megabytes merges into the right place however the person
types around it, a snapshot stores the text around its region and not the
whole document, and that context is enough to find the region again after
the server is killed and the text changed while it was down."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
from pathlib import Path

import trio

from flows.snapshots import CONTEXT
from tests.editor import Editor, served

URI = "file:///tmp/book.txt"
REGION = "I recieve teh letter and beleive every word of it."
FIXED = "I receive the letter and believe every word of it."
WORDS = ["over", "under", "🦆", "naïve", "中文", "the", "river", "—", "ñandú", "\n"]


def filler(size: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(size // 5))[:size]


def correction(text: str, directives: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": directives + text}]}


async def submit(editor: Editor, start: int, directives: str) -> str:
    result = await editor.request(
        "command/submit",
        {
            "adapter": "scripted",
            "request": correction(REGION, directives),
            "target": {"uri": URI, "start": start, "end": start + len(REGION)},
        },
    )
    return str(result["commandId"])


def stored_context(db: Path, command_id: str) -> tuple[str, int]:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute(
            "SELECT s.document, s.document_start FROM snapshots AS s "
            "JOIN commands AS c ON c.snapshot_id = s.id WHERE c.id = ?",
            (command_id,),
        ).fetchone()
    finally:
        conn.close()
    return str(row[0]), int(row[1])


async def test_a_correction_in_a_large_document_merges_right_around_typing(
    db_path: Path,
) -> None:
    before, after = filler(1_500_000, 1), filler(1_500_000, 2)
    async with served(db_path) as (editor, _):
        await editor.initialize()
        await editor.open(URI, before + " " + REGION + " " + after)
        start = len(before) + 1
        command_id = await submit(editor, start, "#delay 2\n")
        # While the model works: a paste far before, keystrokes near and far,
        # an edit inside the region and one right after it.
        rng = random.Random(3)
        await editor.type(URI, 0, 0, "Preface. " * 1000)
        for _ in range(50):
            text = editor.text(URI)
            region = text.index(REGION[:20])
            at = rng.choice([rng.randrange(region - 2000), rng.randrange(region + 2000, len(text))])
            await editor.type(URI, at, at, rng.choice(["x", "🌊", " "]))
        inside = editor.text(URI).index("every word")
        await editor.type(URI, inside, inside + len("every word"), "each and every word")
        end = editor.text(URI).index("of it.") + len("of it.")
        await editor.type(URI, end, end, " P.S.")
        expected = editor.text(URI).replace(
            "I recieve teh letter and beleive each and every word of it. P.S.",
            "I receive the letter and believe each and every word of it. P.S.",
        )
        state = await editor.wait_state(command_id)
        assert state["state"] == "done", state
        assert editor.text(URI) == expected
        shown = await editor.request("command/show", {"commandId": command_id})
    assert shown["conflicts"] == []
    # The edit sent to the editor is the three words fixed, not a copy of the document.
    assert sum(len(e["text"]) + e["end"] - e["start"] for e in editor.applied[-1]["edits"]) < 40


async def test_a_snapshot_keeps_the_text_around_its_region_not_the_document(
    db_path: Path,
) -> None:
    text = filler(500_000, 4) + " " + REGION + " " + filler(500_000, 5)
    start = text.index(REGION)
    async with served(db_path) as (editor, _):
        await editor.initialize()
        await editor.open(URI, text)
        far = await submit(editor, start, "#hang\n")
        near = await submit(editor, 3, "#hang\n")  # the context is cut at the document's start
    document, document_start = stored_context(db_path, far)
    assert document_start == start - CONTEXT
    assert document == text[start - CONTEXT : start + len(REGION) + CONTEXT]
    document, document_start = stored_context(db_path, near)
    assert (document, document_start) == (text[: 3 + len(REGION) + CONTEXT], 0)


async def test_the_region_is_found_again_after_a_kill_and_edits_while_down(
    db_path: Path,
) -> None:
    """Killed while the call is out; meanwhile the person pastes more than the
    stored context before the region and edits inside that context: the new
    server still merges the reply into the region, and only there."""
    before, after = filler(300_000, 6), filler(300_000, 7)
    text = before + " " + REGION + " " + after
    async with served(db_path) as (editor, process):
        await editor.initialize()
        await editor.open(URI, text)
        command_id = await submit(editor, len(before) + 1, "#delay 2\n")
        with trio.fail_after(20):
            while (await editor.request("command/show", {"commandId": command_id}))["command"][
                "state"
            ] != "sent":
                await trio.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    # Typed while no server runs.
    region = text.index(REGION)
    text = text[: region - 100] + "[a note]" + text[region - 100 :]
    text = "Preface. " * (CONTEXT // 4) + text
    text = text.replace(REGION, REGION.replace("every", "each"))
    async with served(db_path) as (editor, _):
        await editor.initialize()
        await editor.open(URI, text)
        with trio.fail_after(30):
            while (await editor.request("command/show", {"commandId": command_id}))["command"][
                "state"
            ] != "done":
                await trio.sleep(0.1)
        assert editor.text(URI) == text.replace(
            REGION.replace("every", "each"), FIXED.replace("every", "each")
        )
