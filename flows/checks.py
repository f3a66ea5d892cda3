"""Checks, registered by name: how a sampler or an evaluation judges a reply.

A check is stored and passed around by NAME, like a reply handler (see
``flows/handlers.py``): a sampler's journal, a resumed flow and ``dovecote
eval`` all name the check, and any process that imports the module defining
it can run it again.

A check is called as ``fn(text, expected)``: ``text`` is the model's reply,
``expected`` a dataset item's expected value (``None`` when there is none).
Registered with ``needs_engine=True`` it is called as ``fn(engine, text,
expected)`` instead, so it can itself make a model call (an LLM judge) --
through the engine, so that call is a command with its journal like any
other. It may be a plain or an ``async`` function.

It returns a :class:`Score`, a ``bool`` (passed, score 1.0 or 0.0) or a
number in [0, 1] (the score; it passes when it is at least
:data:`PASS_AT`). Anything else is a bug in the check and raises
``TypeError``: a silently-failing judge would make a sampler pick at random.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

if TYPE_CHECKING:
    from flows.engine import Engine

PASS_AT = 0.5
"""A number returned by a check passes when it is at least this."""

C = TypeVar("C", bound=Callable[..., Any])


@attrs.frozen
class Score:
    """One check's judgement of one text."""

    passed: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    score: float = attrs.field(converter=float)
    detail: str = attrs.field(default="", validator=attrs.validators.instance_of(str))

    @score.validator
    def _finite(self, _attribute: attrs.Attribute[float], value: float) -> None:
        if not math.isfinite(value):
            raise ValueError(f"a score must be a finite number, not {value!r}")

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "score": self.score, "detail": self.detail}


@attrs.frozen
class _Registered:
    fn: Callable[..., Awaitable[Any] | Any]
    needs_engine: bool


class UnknownCheck(LookupError):
    """No check is registered under this name."""

    def __init__(self, name: str) -> None:
        known = ", ".join(sorted(REGISTRY)) or "none"
        super().__init__(f"no check is registered as {name!r} (known: {known})")
        self.name = name


REGISTRY: dict[str, _Registered] = {}


def check(name: str, *, needs_engine: bool = False) -> Callable[[C], C]:
    """Register the decorated function as the check called ``name``."""

    def register(fn: C) -> C:
        existing = REGISTRY.get(name)
        if existing is not None and existing.fn is not fn:
            raise ValueError(f"a different check is already registered as {name!r}")
        REGISTRY[name] = _Registered(fn, needs_engine)
        return fn

    return register


def needs_engine(name: str) -> bool:
    """Whether the check ``name`` must be given an engine (it calls a model)."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise UnknownCheck(name)
    return entry.needs_engine


def to_score(value: Any) -> Score:
    """Normalize what a check returned (Score, bool or number) to a Score."""
    if isinstance(value, Score):
        return value
    if isinstance(value, bool):
        return Score(value, 1.0 if value else 0.0)
    if isinstance(value, int | float):
        return Score(float(value) >= PASS_AT, float(value))
    raise TypeError(f"a check must return a Score, a bool or a number, not {type(value).__name__}")


async def run_check(
    name: str, text: str, expected: Any | None = None, *, engine: Engine | None = None
) -> Score:
    """Run the check ``name`` on ``text``; a check that needs an engine needs ``engine``."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise UnknownCheck(name)
    if entry.needs_engine:
        if engine is None:
            raise TypeError(f"check {name!r} makes a model call: pass engine=")
        result = entry.fn(engine, text, expected)
    else:
        result = entry.fn(text, expected)
    if inspect.isawaitable(result):
        result = await result
    return to_score(result)


# -- built-ins ---------------------------------------------------------------


@check("nonempty")
def _nonempty(text: str, expected: Any | None) -> Score:
    """Passes when the reply has any non-blank text."""
    return Score(bool(text.strip()), 1.0 if text.strip() else 0.0)


@check("exact")
def _exact(text: str, expected: Any | None) -> Score:
    """Passes when the stripped reply equals the expected value (as text)."""
    want = "" if expected is None else str(expected)
    ok = text.strip() == want.strip()
    return Score(ok, 1.0 if ok else 0.0, "" if ok else f"expected {want!r}")


@check("contains")
def _contains(text: str, expected: Any | None) -> Score:
    """Passes when the expected value (as text) occurs in the reply."""
    if expected is None:
        raise ValueError("check 'contains' needs an expected value")
    ok = str(expected) in text
    return Score(ok, 1.0 if ok else 0.0, "" if ok else f"{str(expected)!r} not in the reply")


@check("json")
def _parses_as_json(text: str, expected: Any | None) -> Score:
    """Passes when the reply parses as JSON (and equals ``expected`` when given)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        return Score(False, 0.0, f"not JSON: {exc}")
    if expected is not None and value != expected:
        return Score(False, 0.0, "JSON differs from the expected value")
    return Score(True, 1.0)
