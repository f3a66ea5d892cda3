"""CallOptions: every way of submitting shares one record, checked once.

What a hostile or unlucky caller puts in an option is refused where the
record is made, by name, and nothing is stored."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

import flows
from flows.options import MAX_ATTEMPTS, MAX_TIMEOUT, CallOptions
from tests.conftest import ask

REFUSED: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"timeout": True}, TypeError, "timeout"),
    ({"timeout": "30"}, TypeError, "timeout"),
    ({"timeout": 0}, ValueError, "timeout"),
    ({"timeout": -1}, ValueError, "timeout"),
    ({"timeout": math.nan}, ValueError, "timeout"),
    ({"timeout": math.inf}, ValueError, "timeout"),
    ({"timeout": MAX_TIMEOUT * 2}, ValueError, "timeout"),
    ({"max_attempts": 0}, ValueError, "max_attempts"),
    ({"max_attempts": MAX_ATTEMPTS + 1}, ValueError, "max_attempts"),
    ({"max_attempts": True}, TypeError, "max_attempts"),
    ({"max_attempts": 1.5}, TypeError, "max_attempts"),
    ({"priority": 2**70}, ValueError, "priority"),
    ({"priority": False}, TypeError, "priority"),
    ({"handler": 7}, TypeError, "handler"),
    ({"handler_args": {"x": object()}}, ValueError, "handler_args"),
    ({"handler_args": {"x": "\ud800"}}, ValueError, "handler_args"),
    ({"handler_args": {"deep": 2**64}}, ValueError, "handler_args"),
    ({"expires_at": math.nan}, ValueError, "expires_at"),
    ({"expires_at": True}, ValueError, "expires_at"),
    ({"cache": "sometimes"}, ValueError, "cache"),
]


@pytest.mark.parametrize(("options", "error", "named"), REFUSED)
def test_a_bad_option_is_refused_by_name(
    options: dict[str, Any], error: type[Exception], named: str
) -> None:
    with pytest.raises(error, match=named):
        CallOptions(**options)


def test_an_unknown_option_is_refused() -> None:
    with pytest.raises(TypeError, match="retries"):
        CallOptions(retries=3)  # type: ignore[call-arg]


async def test_submit_takes_the_record_or_keywords_but_not_both(db_path: Path) -> None:
    urgent = CallOptions(timeout=7, priority=10, max_attempts=2)
    async with flows.open_engine(db_path) as engine:
        command = engine.get(await engine.submit("scripted", ask("#hang\nhi"), options=urgent))
        assert (command.timeout, command.priority, command.max_attempts) == (7.0, 10, 2)
        [many] = await engine.submit_many("scripted", [ask("#hang\nho")], options=urgent)
        assert engine.get(many).priority == 10
        before = len(engine.list())
        with pytest.raises(TypeError, match="not both"):
            await engine.submit("scripted", ask("x"), options=urgent, timeout=3)
        with pytest.raises(ValueError, match="timeout"):
            await engine.submit("scripted", ask("x"), timeout=math.nan)
        assert len(engine.list()) == before  # nothing stored by a refused submit
