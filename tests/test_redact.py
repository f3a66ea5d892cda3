"""The Redactor finds the key however a text spells it, and a stream shows no
part of it whatever the pieces it arrives in (property tests)."""

from __future__ import annotations

import logging
import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters._http import ProgressThrottle
from adapters._redact import REDACTED, Redactor, clean_json, redact_http_logs, repair
from tests.test_key_echoes import KEY, assert_no_key

REDACTOR = Redactor(KEY)


def spell(char: str, how: int) -> str:
    forms = [char, f"\\u{ord(char):04x}", f"\\u{ord(char):04X}", f"\\x{ord(char):02x}"]
    forms.append(urllib.parse.quote(char, safe=""))
    forms.append({"/": "\\/"}.get(char, char))
    return forms[how % len(forms)]


around = st.text(st.characters(codec="utf-8"), max_size=30)


@given(around, st.lists(st.integers(0, 5), min_size=len(KEY), max_size=len(KEY)), around)
def test_every_spelling_of_the_key_is_redacted(
    before: str, spellings: list[int], after: str
) -> None:
    spelled = "".join(spell(c, how) for c, how in zip(KEY, spellings, strict=True))
    shown = REDACTOR.text(before + spelled + after)
    assert_no_key("the redacted text", shown)
    assert REDACTED in shown


@given(st.text(st.characters(codec="utf-8", exclude_characters="\\%")))
def test_a_text_without_the_key_is_left_alone(text: str) -> None:
    assert REDACTOR.text(text) == text
    assert Redactor(None).text(text) == text


@given(around, around, st.lists(st.integers(1, len(KEY) + 40), max_size=8))
def test_a_stream_never_shows_a_part_of_the_key(before: str, after: str, cuts: list[int]) -> None:
    text = before + KEY + after + KEY
    pieces, at = [], 0
    for cut in sorted(set(cuts)):
        pieces.append(text[at:cut])
        at = cut
    pieces.append(text[at:])
    reports: list[str] = []
    throttle = ProgressThrottle(reports.append, REDACTOR, interval=0)
    so_far = ""
    for piece in pieces:
        so_far += piece
        throttle.update(so_far)
    throttle.finish(so_far)
    for report in reports:
        assert_no_key("a progress report", report)
    assert reports[-1] == REDACTOR.text(text)


@given(st.text(st.characters(codec="utf-8")), st.lists(st.integers(0, 0x7FF), max_size=4))
def test_repair_leaves_valid_unicode_and_counts(text: str, lone: list[int]) -> None:
    broken = text + "".join(chr(0xD800 + n) for n in lone)
    repaired, count = repair(broken)
    repaired.encode("utf-8")
    assert count == len(lone)
    assert repaired == text + "\ufffd" * len(lone)


def test_clean_json_reaches_keys_and_deep_values() -> None:
    deep: object = f"a {KEY} \ud800"
    for _ in range(5000):  # deeper than Python's recursion limit
        deep = [deep]
    value = {f"{KEY}": {"x": deep}, "n": 1}
    cleaned = clean_json(value, lambda t: repair(REDACTOR.text(t)))
    assert cleaned.repaired == 1
    assert list(cleaned.value) == [REDACTED, "n"]
    leaf = cleaned.value[REDACTED]["x"]
    while isinstance(leaf, list):
        (leaf,) = leaf
    assert leaf == f"a {REDACTED} \ufffd"


def test_a_key_inside_another_key_does_not_unmask_the_longer_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two adapters, one key inside the other, registered shortest first:
    httpcore's log still shows neither (the short one, removed first, used to
    leave the rest of the long one)."""
    short, long = "sk-inner-1234567890", "sk-outer-sk-inner-1234567890-tail-abcdefgh"
    redact_http_logs(Redactor(short))
    redact_http_logs(Redactor(long))
    with caplog.at_level(logging.DEBUG, logger="httpcore.http11"):
        logging.getLogger("httpcore.http11").debug("response headers: location=/x?key=%s", long)
    logged = caplog.text
    assert "response headers" in logged
    assert all(long[i : i + 12] not in logged for i in range(len(long) - 11)), logged
