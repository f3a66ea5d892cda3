"""The JSON-RPC bridge end to end: a real ``dovecote serve --stdio``
subprocess and an editor that types while corrections are pending, on
each store (the ``db`` fixture)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from editor_bridge.framing import encode
from tests.editor import Editor, RemoteError, served

URI = "file:///tmp/letter.txt"


def correction(text: str, directives: str = "#delay 0.5\n") -> dict[str, object]:
    """What dovecote-correct-region sends, with scripted directives prepended."""
    return {
        "system": "Correct the spelling. Change nothing else.",
        "messages": [{"role": "user", "content": directives + text}],
    }


async def test_initialize_lists_adapters(db: Path | str) -> None:
    async with served(db) as (editor, _):
        result = await editor.initialize()
    assert result["serverInfo"]["name"] == "dovecote"
    assert {"scripted", "human"} <= set(result["adapters"])


async def test_typing_before_inside_and_after_a_pending_correction(db: Path | str) -> None:
    intro = "Dear 🦆 friend,\n"
    region = "I recieve teh letter and beleive every word of it."
    outro = "\nYours, Ann"
    async with served(db) as (editor, _):
        await editor.initialize()
        await editor.open(URI, intro + region + outro)
        start = len(intro)
        result = await editor.request(
            "command/submit",
            {
                "adapter": "scripted",
                "request": correction(region),
                "target": {"uri": URI, "start": start, "end": start + len(region)},
                "onConflict": "drop",
            },
        )
        command_id = result["commandId"]
        # While the model thinks: type after, inside and before the region.
        text = editor.text(URI)
        await editor.type(URI, len(text), len(text), " (sent from my 📱)")
        inside = editor.text(URI).index("every word")
        await editor.type(URI, inside, inside + len("every word"), "each and every word")
        await editor.type(URI, 0, 0, "Re: your note\n")
        state = await editor.wait_state(command_id)
        assert state["state"] == "done", state
        final = editor.text(URI)
        shown = await editor.request("command/show", {"commandId": command_id})
    assert final == (
        "Re: your note\nDear 🦆 friend,\n"
        "I receive the letter and believe each and every word of it."
        "\nYours, Ann (sent from my 📱)"
    )
    assert shown["conflicts"] == []
    assert shown["merge"]["policy"] == "drop" and shown["merge"]["tries"] == 1
    assert [e["to"] for e in shown["events"]] == ["pending", "sent", "replied", "done"]


async def retyped_correction(
    editor: Editor, region: str, word: str, typed: str, policy: str
) -> str:
    """Open ``region`` as the whole document and correct it with ``policy``, typing
    ``typed`` over ``word`` meanwhile; the call's id once it is over."""
    await editor.initialize()
    await editor.open(URI, region)
    result = await editor.request(
        "command/submit",
        {
            "adapter": "scripted",
            "request": correction(region),
            "target": {"uri": URI, "start": 0, "end": len(region)},
            "onConflict": policy,
        },
    )
    at = editor.text(URI).index(word)
    await editor.type(URI, at, at + len(word), typed)
    await editor.wait_state(result["commandId"])
    return str(result["commandId"])


async def test_collision_with_drop_keeps_the_persons_text(db: Path | str) -> None:
    async with served(db) as (editor, _):
        command_id = await retyped_correction(
            editor, "We will meet tommorow at noon.", "tommorow", "on Friday", "drop"
        )
        shown = await editor.request("command/show", {"commandId": command_id})
        final = editor.text(URI)
    assert final == "We will meet on Friday at noon."
    [conflict] = shown["conflicts"]
    assert (conflict["base"], conflict["ours"], conflict["theirs"]) == (
        "tommorow",
        "on Friday",
        "tomorrow",
    )


async def test_stale_apply_edit_is_refused_and_merged_again(db: Path | str) -> None:
    region = "Teh cat sat on teh mat."
    async with served(db) as (editor, _):
        await editor.initialize()
        await editor.open(URI, region)
        typed = False

        def type_just_before(params: dict[str, object]) -> None:
            nonlocal typed
            if not typed:
                typed = True
                end = len(editor.text(URI))
                editor.type_now(URI, end, end, " It purred.")

        editor.before_apply = type_just_before
        result = await editor.request(
            "command/submit",
            {
                "adapter": "scripted",
                "request": correction(region, ""),
                "target": {"uri": URI, "start": 0, "end": len(region)},
            },
        )
        await editor.wait_state(result["commandId"])
        shown = await editor.request("command/show", {"commandId": result["commandId"]})
        final = editor.text(URI)
    assert final == "The cat sat on the mat. It purred."
    assert len(editor.refused) == 1 and len(editor.applied) == 1
    assert shown["merge"]["tries"] == 2


async def test_conflict_ask_waits_for_resolve(db: Path | str) -> None:
    async with served(db) as (editor, _):
        command_id = await retyped_correction(
            editor, "Teh definately wierd plan.", "wierd", "odd", "ask"
        )
        assert editor.text(URI) == "The definitely odd plan."
        shown = await editor.request("command/show", {"commandId": command_id})
        assert shown["unresolved"] == 1
        await editor.type(URI, 0, 0, ">> ")  # the conflict's span moves with the text
        answer = await editor.request(
            "conflict/resolve", {"commandId": command_id, "choice": "theirs"}
        )
        assert answer == {"applied": True, "changed": []}
        assert editor.text(URI) == ">> The definitely weird plan."
        with pytest.raises(RemoteError) as caught:
            await editor.request("conflict/resolve", {"commandId": command_id, "choice": "ours"})
        assert caught.value.code == -32008


@pytest.mark.parametrize(
    ("retype", "expected"),
    [
        # One replacement of the word: the span holds "chilly".
        (lambda at: [(at, at + 3, "chilly")], "The garden is chilly in winter."),
        # Deleted, then typed letter by letter: the span is empty, "chilly" beside it.
        (
            lambda at: [(at, at + 3, "")] + [(at + i, at + i, ch) for i, ch in enumerate("chilly")],
            "The garden is chilly in winter.",
        ),
    ],
    ids=["replaced", "deleted-then-typed"],
)
async def test_resolving_after_the_word_was_edited_again_keeps_the_new_word(
    db: Path | str, retype: Callable[[int], list[tuple[int, int, str]]], expected: str
) -> None:
    """Issue 14, finding 1: the person's second edit of the clashing word is kept, the
    model's side is not written next to it (was: "chillyweird"), and the clash is said."""
    async with served(db) as (editor, _):
        command_id = await retyped_correction(
            editor, "Teh garden is wierd in winter.", "wierd", "odd", "ask"
        )
        assert editor.text(URI) == "The garden is odd in winter."
        for start, end, text in retype(editor.text(URI).index("odd")):
            await editor.type(URI, start, end, text)
        answer = await editor.request(
            "conflict/resolve", {"commandId": command_id, "choice": "theirs"}
        )
        assert answer == {"applied": False, "changed": [0]}
        assert editor.text(URI) == expected
        shown = await editor.request("command/show", {"commandId": command_id})
        assert shown["unresolved"] == 0


async def test_resolving_merges_with_edits_beside_the_clash(db: Path | str) -> None:
    async with served(db) as (editor, _):
        command_id = await retyped_correction(
            editor, "Teh garden is wierd in winter.", "wierd", "odd", "ask"
        )
        shown = await editor.request("command/show", {"commandId": command_id})
        assert [(k["ours"], k["theirs"]) for k in shown["kept"]] == [("odd", "weird")]
        at = editor.text(URI).index("odd")
        await editor.type(URI, at + 1, at + 1, "d")  # "oddd": typed inside the span
        shown = await editor.request("command/show", {"commandId": command_id})
        assert shown["kept"][0]["ours"] == "oddd"
        answer = await editor.request(
            "conflict/resolve", {"commandId": command_id, "choice": "ours"}
        )
        assert answer == {"applied": True, "changed": []}
        assert editor.text(URI) == "The garden is oddd in winter."


async def test_markers_are_whole_lines_of_the_document(db: Path | str) -> None:
    """Issue 14, finding 4: the block holds the whole line around the clash, even where
    the region starts and ends mid-line, with the conflict buffer's labels."""
    text = "Notes\nSo: teh garden is wierd in winter. (draft)\nEnd\n"
    region = "teh garden is wierd in winter."
    async with served(db) as (editor, _):
        await editor.initialize()
        await editor.open(URI, text)
        start = text.index(region)
        result = await editor.request(
            "command/submit",
            {
                "adapter": "scripted",
                "request": correction(region),
                "target": {"uri": URI, "start": start, "end": start + len(region)},
                "onConflict": "markers",
            },
        )
        at = text.index("wierd")
        await editor.type(URI, at, at + len("wierd"), "odd")
        await editor.wait_state(result["commandId"])
        assert editor.text(URI) == (
            "Notes\n<<<<<<< yours\nSo: the garden is odd in winter. (draft)\n"
            "||||||| original\nSo: the garden is wierd in winter. (draft)\n=======\n"
            "So: the garden is weird in winter. (draft)\n>>>>>>> model\nEnd\n"
        )


async def test_timeout_dead_letter_and_replay_over_rpc(db: Path | str) -> None:
    region = "Teh end."
    async with served(db) as (editor, _):
        await editor.initialize()
        await editor.open(URI, region)
        result = await editor.request(
            "command/submit",
            {
                "adapter": "scripted",
                "request": correction(region, "#delay 1\n"),
                "target": {"uri": URI, "start": 0, "end": len(region)},
                "timeout": 0.2,
            },
        )
        dead = await editor.wait_state(result["commandId"])
        assert (dead["state"], dead["reason"]) == ("dead", "timeout")
        letters = await editor.request("deadletter/list", {"reason": "timeout"})
        assert [c["id"] for c in letters["commands"]] == [result["commandId"]]
        assert letters["commands"][0]["uri"] == URI  # the list names the file
        await editor.type(URI, 0, 0, "P.S. ")
        replayed = await editor.request(
            "deadletter/replay", {"commandIds": [result["commandId"]], "timeout": 5}
        )
        [pair] = replayed["replayed"]
        assert pair["from"] == result["commandId"]
        done = await editor.wait_state(pair["to"])
        assert done["state"] == "done" and done["replayOf"] == result["commandId"]
        assert editor.text(URI) == "P.S. The end."
        assert (await editor.request("deadletter/list", {}))["commands"] == []


async def test_human_answers_like_a_model(db: Path | str) -> None:
    async with served(db) as (editor, _):
        await editor.initialize()
        editor.answer_human = lambda params: (
            "yes, ship it" if "ship" in params["messages"][0]["content"] else None
        )
        result = await editor.request(
            "command/submit",
            {
                "adapter": "human",
                "request": {"messages": [{"role": "user", "content": "May we ship?"}]},
            },
        )
        asked = await editor.wait_for(lambda m: m["method"] == "human/ask")
        assert asked["params"]["commandId"] == result["commandId"]
        state = await editor.wait_state(result["commandId"])
        shown = await editor.request("command/show", {"commandId": result["commandId"]})
        # A human times out and dead-letters like a model.
        slow = await editor.request(
            "command/submit",
            {
                "adapter": "human",
                "request": {"messages": [{"role": "user", "content": "Lunch?"}]},
                "timeout": 0.2,
            },
        )
        dead = await editor.wait_state(slow["commandId"])
        late = await editor.request(
            "command/reply", {"commandId": slow["commandId"], "reply": {"text": "sure"}}
        )
    assert state["state"] == "done"
    assert shown["command"]["reply"]["text"] == "yes, ship it"
    assert (dead["state"], dead["reason"]) == ("dead", "timeout")
    assert late == {"accepted": False, "late": True}


async def test_notifications_go_to_the_owner_only(db: Path | str) -> None:
    async with served(db) as (editor, _):
        await editor.initialize()
        result = await editor.request(
            "command/submit",
            {"adapter": "scripted", "request": {"messages": [{"role": "user", "content": "teh"}]}},
        )
        states = []
        while True:
            message = await editor.wait_for(
                lambda m: (
                    m["method"] == "command/state"
                    and m["params"]["commandId"] == result["commandId"]
                    and m["params"]["state"] not in states
                )
            )
            states.append(message["params"]["state"])
            if message["params"]["state"] == "done":
                break
    assert states == ["pending", "sent", "replied", "done"]


@pytest.mark.parametrize("text", ["#hang\nx"])
async def test_cancel_over_rpc(db: Path | str, text: str) -> None:
    async with served(db) as (editor, _):
        await editor.initialize()
        result = await editor.request(
            "command/submit",
            {"adapter": "scripted", "request": {"messages": [{"role": "user", "content": text}]}},
        )
        await editor.wait_state(result["commandId"], ("sent",))
        assert await editor.request("command/cancel", {"commandId": result["commandId"]}) == {
            "state": "cancelled"
        }
        with pytest.raises(RemoteError) as caught:
            await editor.request("command/cancel", {"commandId": result["commandId"]})
        assert caught.value.code == -32001
        with trio.fail_after(5):
            await editor.wait_state(result["commandId"], ("cancelled",))


async def test_a_change_sent_right_after_a_submit_does_not_move_its_snapshot(
    db: Path | str,
) -> None:
    """The editor does not wait for command/submit's answer before sending
    its next change: the snapshot must be taken in frame order."""
    region = "I recieve teh letter."
    async with served(db) as (editor, _):
        await editor.initialize()
        for attempt in range(10):
            uri = f"file:///race-{attempt}.txt"
            await editor.open(uri, "Dear Ann,\n" + region)
            start = len("Dear Ann,\n")
            editor.next_id += 1
            request_id = editor.next_id
            answered, box = trio.Event(), list[dict[str, object]]()
            editor.waiting[request_id] = (answered, box)
            submit = {
                "jsonrpc": "2.0",
                "id": request_id,
                "method": "command/submit",
                "params": {
                    "adapter": "scripted",
                    "request": correction(region),
                    "target": {"uri": uri, "start": start, "end": start + len(region)},
                },
            }
            change = {
                "jsonrpc": "2.0",
                "method": "document/change",
                "params": {
                    "uri": uri,
                    "version": 2,
                    "changes": [{"start": 0, "end": 0, "text": "Re: your note\n"}],
                },
            }
            # Both frames in one write, as an editor's buffered output arrives.
            editor.documents[uri] = [2, "Re: your note\n" + editor.text(uri)]
            await editor.write_raw(encode(submit) + encode(change))
            await answered.wait()
            command_id = box[0]["result"]["commandId"]  # type: ignore[index]
            await editor.wait_state(str(command_id))
            assert editor.text(uri) == "Re: your note\nDear Ann,\nI receive the letter."


async def test_a_target_at_an_old_version_is_refused(db: Path | str) -> None:
    async with served(db) as (editor, _):
        await editor.initialize()
        await editor.open(URI, "Teh end.")
        await editor.type(URI, 0, 0, "x")
        with pytest.raises(RemoteError) as caught:
            await editor.request(
                "command/submit",
                {
                    "adapter": "scripted",
                    "request": correction("Teh end."),
                    "target": {"uri": URI, "start": 1, "end": 9, "version": 1},
                },
            )
        assert caught.value.code == -32005 and "version 1" in caught.value.message


async def test_flow_over_rpc_with_a_target_and_watch_after_reconnect(db: Path | str) -> None:
    region = "Teh quick fox."
    async with served(db) as (editor, _):
        await editor.initialize()
        await editor.open(URI, region)
        started = await editor.request(
            "flow/start",
            {
                "flow": "corrections",
                "params": {"adapter": "scripted"},
                "target": {"uri": URI, "start": 0, "end": len(region)},
            },
        )
        flow_id = started["flowId"]
        await editor.wait_flow_state(flow_id, "completed")
        shown = await editor.request("flow/show", {"flowId": flow_id})
        assert editor.text(URI) == "The quick fox."
        assert shown["state"] == "completed" and shown["result"] == {"text": "The quick fox."}
        assert [s["kind"] for s in shown["steps"]] == ["call"]
        listed = await editor.request("flow/list", {"states": ["completed"]})
        assert [f["id"] for f in listed["flows"]] == [flow_id]
    async with served(db) as (editor, _):
        await editor.initialize()
        assert await editor.request("flow/watch", {"flowIds": [flow_id]}) == {"watching": 1}
        with pytest.raises(RemoteError) as caught:
            await editor.request("flow/watch", {"flowIds": ["nope"]})
        assert caught.value.code == -32007
