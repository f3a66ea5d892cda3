"""The scripted adapter, directive by directive, as DESIGN.md's table says.

It is the model every offline test, the demo and the editor clients rely on,
so its behaviour is a contract: exact delays (on trio's MockClock), hangs,
HTTP-like failures, failures by attempt, verbatim replies, and the
spelling corrections with every other character kept."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from adapters.base import PermanentError, Reply, Request, RetryableError, SendContext, Usage
from adapters.scripted import MISSPELLINGS, ScriptedAdapter, correct


def request(text: str, **extra: Any) -> Request:
    return Request.from_json({"messages": [{"role": "user", "content": text}], **extra})


def context(attempt: int = 1, command_id: str = "c1", **extra: Any) -> SendContext:
    return SendContext(command_id=command_id, attempt=attempt, deadline=2e9, **extra)


async def reply_text(text: str, attempt: int = 1) -> str:
    return (await ScriptedAdapter().send(request(text), context(attempt))).text


# --- #delay --------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0.25, 1.0, 2.5, 90.0])
async def test_delay_replies_after_exactly_s_seconds(
    autojump_clock: trio.testing.MockClock, seconds: float
) -> None:
    start = trio.current_time()
    text = await reply_text(f"#delay {seconds:g}\nteh end")
    assert trio.current_time() - start == pytest.approx(seconds, abs=1e-9)
    assert text == "the end"


async def test_delay_zero_replies_at_once(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    assert await reply_text("#delay 0\nok") == "ok"
    assert trio.current_time() == start


# --- #hang ---------------------------------------------------------------------


@pytest.mark.parametrize("text", ["#hang", "#hang\nteh", "#delay 1\n#hang\nx", "#hang\n#reply\nx"])
async def test_hang_never_replies(autojump_clock: trio.testing.MockClock, text: str) -> None:
    start = trio.current_time()
    with trio.move_on_after(24 * 3600) as scope:
        await reply_text(text)
    assert scope.cancelled_caught
    assert trio.current_time() - start == pytest.approx(24 * 3600)


# --- #fail and #fail-times -------------------------------------------------------


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 599])
async def test_fail_with_a_retryable_status(status: int) -> None:
    with pytest.raises(RetryableError) as caught:
        await reply_text(f"#fail {status}\nteh")
    assert caught.value.status == status
    assert str(status) in str(caught.value)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422, 451])
async def test_fail_with_a_permanent_status(status: int) -> None:
    with pytest.raises(PermanentError) as caught:
        await reply_text(f"#fail {status}\nteh")
    assert caught.value.status == status
    assert not isinstance(caught.value, RetryableError)


async def test_fail_fails_on_every_attempt() -> None:
    for attempt in (1, 2, 10):
        with pytest.raises(RetryableError):
            await reply_text("#fail 503\nx", attempt=attempt)


@pytest.mark.parametrize("times", [1, 2, 5])
async def test_fail_times_fails_the_first_n_attempts_with_503(times: int) -> None:
    adapter = ScriptedAdapter()
    for attempt in range(1, times + 1):
        with pytest.raises(RetryableError) as caught:
            await adapter.send(request(f"#fail-times {times}\nteh"), context(attempt))
        assert caught.value.status == 503
    reply = await adapter.send(request(f"#fail-times {times}\nteh"), context(times + 1))
    assert reply.text == "the"
    # Counted by the command's attempt, not by calls: a fresh process agrees.
    again = await ScriptedAdapter().send(request(f"#fail-times {times}\nteh"), context(times + 1))
    assert again == reply


async def test_fail_times_zero_answers_at_once() -> None:
    assert await reply_text("#fail-times 0\nteh") == "the"


# --- #reply --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#reply\nteh recieve", "teh recieve"),  # verbatim: not corrected
        ("#reply\n#fail 500\n#hang\n# Heading", "#fail 500\n#hang\n# Heading"),
        ("#reply\n\n  teh \r\n", "\n  teh \r\n"),
        ("#reply\r\nteh\r\n", "teh\r\n"),
        ("#reply", ""),
        ("#reply\n", ""),
        ("#reply  \t\nx", "x"),
    ],
)
async def test_reply_is_the_rest_verbatim(text: str, expected: str) -> None:
    assert await reply_text(text) == expected


# --- #replies --------------------------------------------------------------------


def conversation(first: str, turns: int) -> Request:
    messages = [{"role": "user", "content": first}]
    for turn in range(turns):
        messages += [
            {"role": "assistant", "content": f"answer {turn}"},
            {"role": "user", "content": f"#reply\nnot this: {turn}"},
        ]
    return Request.from_json({"messages": messages})


@pytest.mark.parametrize(
    ("turns", "expected"), [(0, "one"), (1, "two teh"), (2, "three"), (5, "three")]
)
async def test_replies_in_the_first_message_answer_each_turn_in_order(
    turns: int, expected: str
) -> None:
    script = "#replies\none\ntwo teh\nthree"
    reply = await ScriptedAdapter().send(conversation(script, turns), context())
    assert reply.text == expected


async def test_replies_combine_with_other_directives_and_only_lead_as_a_directive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    assert await reply_text("#delay 2\n#replies\nfirst\nsecond") == "first"
    assert trio.current_time() - start == pytest.approx(2)
    assert await reply_text("#replies") == ""
    delayed = await ScriptedAdapter().send(conversation("#delay 1\n#replies\na\nb", 1), context())
    assert delayed.text == "b"
    # Not a directive at the first message's head: the last user message
    # steers, as always.
    for text in ("#repliesX\na", "#delay x\n#replies\na", "hi\n#replies\na"):
        reply = await ScriptedAdapter().send(conversation(text, 1), context())
        assert reply.text == "not this: 0"


# --- directives together, and what is not a directive ------------------------------


async def test_directives_combine(autojump_clock: trio.testing.MockClock) -> None:
    text = "#delay 1.5\n#fail-times 1\nteh"
    start = trio.current_time()
    with pytest.raises(RetryableError):
        await reply_text(text, attempt=1)
    assert trio.current_time() - start == pytest.approx(1.5)  # it fails after the delay
    start = trio.current_time()
    assert await reply_text(text, attempt=2) == "the"
    assert trio.current_time() - start == pytest.approx(1.5)

    start = trio.current_time()
    assert await reply_text("#fail-times 1\n#delay 2\n#reply\n#hang teh", attempt=2) == "#hang teh"
    assert trio.current_time() - start == pytest.approx(2)


async def test_fail_outranks_fail_times() -> None:
    with pytest.raises(PermanentError) as caught:
        await reply_text("#fail-times 1\n#fail 404\nx", attempt=5)
    assert caught.value.status == 404


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#delay 0\nLine one\nLine two", "Line one\nLine two"),
        ("#delay 0\r\n#fail-times 0\r\nteh\r\n", "the\r\n"),
        ("#delay 0   \nx", "x"),
        ("#delay\t0\nx", "x"),
        ("#fail-times 0", ""),
    ],
)
async def test_directive_lines_are_not_part_of_the_text(text: str, expected: str) -> None:
    assert await reply_text(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("# Heading\nteh", "# Heading\nthe"),
        ("#hashtag teh", "#hashtag the"),
        ("#hangover\nteh", "#hangover\nthe"),
        ("#failure is teh option", "#failure is the option"),
        ("#replying to teh", "#replying to the"),
        ("#delay5 teh", "#delay5 the"),
        ("#DELAY 5\nteh", "#DELAY 5\nthe"),
        (" #hang\nteh", " #hang\nthe"),
        ("\n#hang", "\n#hang"),
        # Directives only at the head: after text, a directive line is text.
        ("teh\n#hang", "the\n#hang"),
        ("# Heading\n#fail 500\nteh", "# Heading\n#fail 500\nthe"),
        ("#delay 0\n# Heading\n#hang", "# Heading\n#hang"),
    ],
)
async def test_lines_that_only_look_like_directives_are_text(
    autojump_clock: trio.testing.MockClock, text: str, expected: str
) -> None:
    start = trio.current_time()
    with trio.fail_after(1):
        assert await reply_text(text) == expected
    assert trio.current_time() == start


@pytest.mark.parametrize(
    "directive",
    [
        "#delay",
        "#delay ",
        "#delay abc",
        "#delay -1",
        "#delay nan",
        "#delay inf",
        "#delay 1e999",
        "#fail",
        "#fail abc",
        "#fail 4.5",
        "#fail -500",
        "#fail-times",
        "#fail-times x",
        "#fail-times -2",
        "#fail-times 1.5",
    ],
)
async def test_bad_directive_arguments_are_a_400(directive: str) -> None:
    with pytest.raises(PermanentError) as caught:
        await reply_text(directive + "\nteh")
    assert caught.value.status == 400
    assert directive.split()[0] in str(caught.value)


@pytest.mark.parametrize("directive", ["#delay 1 2", "#fail 503 now", "#reply foo"])
async def test_a_directive_with_extra_arguments_is_a_400(
    autojump_clock: trio.testing.MockClock, directive: str
) -> None:
    with pytest.raises(PermanentError) as caught:
        await reply_text(directive + "\nteh")
    assert caught.value.status == 400


# --- corrections -----------------------------------------------------------------


@pytest.mark.parametrize(("wrong", "right"), sorted(MISSPELLINGS.items()))
def test_every_built_in_misspelling_is_corrected(wrong: str, right: str) -> None:
    assert correct(wrong) == right
    assert correct(wrong.capitalize()) == right.capitalize()
    assert correct(f"({wrong}, {wrong}.)") == f"({right}, {right}.)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("teh", "the"),
        ("Teh", "The"),
        ("tEH", "the"),
        # Only the first letter's case is kept: an all-caps word is not kept
        # all-caps (DESIGN.md: "keeping the case of the first letter").
        ("TEH", "The"),
        ("RECIEVE", "Receive"),
        ("tehran teh", "tehran the"),
        ("xteh tehx teh_ teh1 _teh", "xteh tehx teh_ teh1 _teh"),
        ("éteh tehé", "éteh tehé"),
        ("teh's teh-teh (teh) teh.", "the's the-the (the) the."),
        ("Seperate teh two.", "Separate the two."),
    ],
)
def test_corrections_whole_words_any_case(text: str, expected: str) -> None:
    assert correct(text) == expected


async def test_every_other_character_is_kept() -> None:
    text = "Teh\r\n\tcat  did not recieve 🙂 it\u00a0teh\u200bend  \r\n\r\n  trailing   "
    expected = "The\r\n\tcat  did not receive 🙂 it\u00a0the\u200bend  \r\n\r\n  trailing   "
    assert await reply_text(text) == expected
    assert await reply_text("#delay 0\r\n" + text) == expected


# Letters that re.IGNORECASE matches to an ASCII letter but that str.lower()
# does not map to it: correct() leaves such words alone (tested below), so the
# properties are checked on text without them.
CRASHERS = "\u017f\u0131\u0130"  # ſ ı İ
TEXT = st.text(st.characters(exclude_characters=CRASHERS))
WORDS = st.sampled_from([*MISSPELLINGS, *(w.upper() for w in MISSPELLINGS), "the", "Teh", "x"])
SEPARATORS = st.text(alphabet=" \t\r\n.,;:!?'\"()-—🙂\u00a0", min_size=1, max_size=3)


@given(st.lists(st.tuples(WORDS, SEPARATORS), max_size=8), TEXT)
def test_corrections_change_only_misspelled_words(
    pieces: list[tuple[str, str]], noise: str
) -> None:
    text = "".join(w + s for w, s in pieces) + noise
    fixed = correct(text)
    # Every non-word character stays, in order; nothing is fixed twice.
    assert re.sub(r"\w", "", fixed) == re.sub(r"\w", "", text)
    assert correct(fixed) == fixed
    for word in re.findall(r"\w+", fixed):
        assert word.lower() not in MISSPELLINGS


@given(TEXT)
def test_text_without_misspellings_comes_back_unchanged(text: str) -> None:
    if not any(w.lower() in MISSPELLINGS for w in re.findall(r"\w+", text)):
        assert correct(text) == text


@pytest.mark.parametrize("word", ["\u017feperate", "w\u0131ch", "W\u0130CH", "bele\u0131f"])
async def test_unusual_letters_never_crash_the_corrections(word: str) -> None:
    text = await reply_text(f"I say {word}.")
    assert text.startswith("I say ") and text.endswith(".")


# --- which message is read, usage, progress, the call log ---------------------------


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        (
            [
                {"role": "user", "content": "#fail 400\nold"},
                {"role": "assistant", "content": "#hang"},
                {"role": "user", "content": "recieve"},
            ],
            "receive",
        ),
        (
            [{"role": "user", "content": "teh"}, {"role": "assistant", "content": "#fail 500"}],
            "the",
        ),
        ([{"role": "assistant", "content": "teh"}], ""),
    ],
)
async def test_only_the_last_user_message_is_read(
    messages: list[dict[str, str]], expected: str
) -> None:
    reply = await ScriptedAdapter().send(
        Request.from_json({"messages": messages, "system": "#hang"}), context()
    )
    assert reply.text == expected


async def test_usage_counts_words() -> None:
    req = Request.from_json(
        {
            "system": "Fix the spelling.",  # 3 words
            "messages": [
                {"role": "user", "content": "first question"},  # 2
                {"role": "assistant", "content": "an answer"},  # 2
                {"role": "user", "content": "#delay 0\nteh  cat\tsat"},  # 5, directive included
            ],
        }
    )
    reply = await ScriptedAdapter().send(req, context())
    assert reply == Reply("the  cat\tsat", Usage(input_tokens=12, output_tokens=3), raw=None)


async def test_progress_reports_the_whole_text() -> None:
    seen: list[str] = []
    reply = await ScriptedAdapter().send(
        request("#delay 0\nteh end"), context(report_progress=seen.append)
    )
    assert seen == [reply.text] == ["the end"]


async def test_call_log_gets_one_line_per_send(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    log = tmp_path / "calls.log"
    adapter = ScriptedAdapter(call_log=log)
    await adapter.send(request("teh"), context(1, "a"))
    with pytest.raises(RetryableError):
        await adapter.send(request("#fail-times 1\nx"), context(1, "b"))
    await adapter.send(request("#fail-times 1\nx"), context(2, "b"))
    with pytest.raises(PermanentError):
        await adapter.send(request("#delay oops"), context(1, "c"))
    with trio.move_on_after(5):
        await adapter.send(request("#hang"), context(3, "d"))
    assert log.read_text() == "a 1\nb 1\nb 2\nc 1\nd 3\n"
    assert adapter.calls == 5
    # Appended to, never truncated: a second adapter (another process) adds to it.
    await ScriptedAdapter(call_log=log).send(request("x"), context(1, "e"))
    assert log.read_text().splitlines()[-1] == "e 1"


async def test_call_log_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "env.log"
    monkeypatch.setenv("DOVECOTE_SCRIPTED_LOG", str(log))
    await ScriptedAdapter.from_env().send(request("x"), context(4, "z"))
    assert log.read_text() == "z 4\n"
    monkeypatch.delenv("DOVECOTE_SCRIPTED_LOG")
    adapter = ScriptedAdapter.from_env()
    await adapter.send(request("x"), context())
    assert adapter.call_log is None and adapter.calls == 1


def test_settings() -> None:
    adapter = ScriptedAdapter()
    assert adapter.settings.name == "scripted"
    assert adapter.settings.max_in_flight == 256
    assert adapter.calls == 0 and adapter.call_log is None


async def test_replies_are_deterministic() -> None:
    text = "#delay 0\nTeh freind wich I beleive.\n"
    replies = [await ScriptedAdapter().send(request(text), context(n)) for n in (1, 1, 2)]
    assert replies[0] == replies[1] == replies[2]
    assert replies[0].text == "The friend which I believe.\n"
