"""The checks registry: what a sampler and ``dovecote eval`` judge replies with."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from flows.checks import Score, UnknownCheck, check, run_check, to_score


def run(coro: Any) -> Any:
    async def main() -> Any:
        return await coro

    return trio.run(main)


def test_builtins_judge_as_documented() -> None:
    assert run(run_check("nonempty", "  x ")).passed
    assert not run(run_check("nonempty", " \n ")).passed
    assert run(run_check("exact", " 42\n", "42")).passed
    assert not run(run_check("exact", "41", "42")).passed
    assert run(run_check("contains", "the answer is 42", "42")).passed
    assert not run(run_check("contains", "no", "42")).passed
    assert run(run_check("json", '{"a": [1]}')).passed
    assert run(run_check("json", '{"a": [1]}', {"a": [1]})).passed
    assert not run(run_check("json", '{"a": [2]}', {"a": [1]})).passed
    bad = run(run_check("json", "{nope"))
    assert not bad.passed and "not JSON" in bad.detail


def test_unknown_name_is_a_clear_error() -> None:
    with pytest.raises(UnknownCheck, match="no-such-check"):
        run(run_check("no-such-check", "x"))


def test_bools_and_numbers_normalize_and_junk_is_refused() -> None:
    assert to_score(True) == Score(True, 1.0)
    assert to_score(0.5) == Score(True, 0.5)
    assert to_score(0.49) == Score(False, 0.49)
    with pytest.raises(TypeError):
        to_score("yes")
    with pytest.raises(ValueError):
        to_score(float("nan"))


def test_async_check_and_engine_check() -> None:
    @check("test-async-len")
    async def length(text: str, expected: Any | None) -> float:
        await trio.sleep(0)
        return min(1.0, len(text) / 10)

    assert run(run_check("test-async-len", "12345")) == Score(True, 0.5)

    seen: list[Any] = []

    @check("test-judge", needs_engine=True)
    def judge(engine: Any, text: str, expected: Any | None) -> bool:
        seen.append(engine)
        return text == expected

    with pytest.raises(TypeError, match="engine"):
        run(run_check("test-judge", "a", "a"))
    sentinel = object()
    assert run(run_check("test-judge", "a", "a", engine=sentinel))  # type: ignore[arg-type]
    assert seen == [sentinel]


def test_two_functions_cannot_share_a_name() -> None:
    with pytest.raises(ValueError, match="already registered"):
        check("exact")(lambda text, expected: True)
