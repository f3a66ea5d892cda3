"""Samplers: several candidate replies, one chosen by a check.

``ctx.sample(adapter, request, n=..., check=NAME, pick=...)`` in a scripted
flow (flows/runtime.py) asks for candidates, each a command and a step of
its own, and judges each with the check registered as ``NAME``
(flows/checks.py):

* ``pick="best"`` submits all ``n`` in one transaction, so they are out at
  once, and chooses the highest score (ties go to the earliest);
* ``pick="first"`` asks one at a time and stops at the first that passes,
  ``n`` being its budget of attempts; if none passes, ``NoCandidatePassed``.

A candidate whose command died scores as failed (it does not stall the
flow). The choice and every candidate's score are recorded as the flow's
``sample`` step, which ``dovecote flow show`` lists; a resumed flow returns
that record and neither calls the model nor judges again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from adapters.base import Reply, Request
from flows.checks import Score, run_check

if TYPE_CHECKING:
    from flows.engine import Engine
    from flows.records import Command
    from flows.storage import StoreProtocol

PICKS = ("best", "first")


@attrs.frozen
class Sample:
    """What a sampler chose: the reply of candidate ``chosen``, its score,
    and every candidate's score and command, in the order they were asked."""

    reply: Reply
    chosen: int
    scores: tuple[Score, ...]
    command_ids: tuple[str, ...]

    @property
    def text(self) -> str:
        return self.reply.text

    @property
    def score(self) -> Score:
        return self.scores[self.chosen]


class NoCandidatePassed(Exception):
    """No candidate of a sample could be chosen; ``scores`` say why."""

    def __init__(self, pick: str, scores: Sequence[Score]) -> None:
        why = "; ".join(f"{i}: {s.score:g} {s.detail}".rstrip() for i, s in enumerate(scores))
        super().__init__(f"pick={pick}: no candidate of {len(scores)} could be chosen ({why})")
        self.scores = tuple(scores)


def check_pick(pick: str) -> None:
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {', '.join(PICKS)}, not {pick!r}")


def candidate_requests(
    request: Request | Mapping[str, Any] | Sequence[Request | Mapping[str, Any]], n: int
) -> list[Request]:
    """``n`` requests: the one given ``n`` times, or the ``n`` given."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 100:
        raise ValueError(f"n must be an integer from 1 to 100, not {n!r}")
    one = isinstance(request, Request | Mapping)
    requests: list[Request | Mapping[str, Any]] = [request] * n if one else list(request)  # type: ignore[list-item, arg-type]
    if len(requests) != n:
        raise ValueError(f"n is {n} but {len(requests)} requests were given")
    return [r if isinstance(r, Request) else Request.from_json(r) for r in requests]


async def judge_all(
    check: str, candidates: Sequence[Command], expected: Any, engine: Engine | None
) -> list[Score]:
    """Every candidate's score, judged at once (a judge may be a model call);
    one without a reply fails without being judged."""
    scores = [Score(False, 0.0, f"{c.state} ({c.reason})") for c in candidates]

    async def one(index: int, command: Command) -> None:
        if command.reply is not None and command.state == "done":
            scores[index] = await run_check(check, command.reply.text, expected, engine=engine)

    async with trio.open_nursery() as nursery:
        for index, command in enumerate(candidates):
            nursery.start_soon(one, index, command)
    return scores


def choose(pick: str, candidates: Sequence[Command], scores: Sequence[Score]) -> int | None:
    """The index chosen, or None: ``best`` the highest score among those
    with a reply (the earliest on a tie), ``first`` the first that passed."""
    if pick == "first":
        return next((i for i, s in enumerate(scores) if s.passed), None)
    answered = [i for i, c in enumerate(candidates) if c.reply is not None and c.state == "done"]
    if not answered:
        return None
    return max(answered, key=lambda i: (scores[i].score, -i))


def record(
    pick: str,
    check: str,
    candidates: Sequence[Command],
    scores: Sequence[Score],
    chosen: int | None,
) -> dict[str, Any]:
    """The ``sample`` step's journaled value."""
    return {
        "pick": pick,
        "check": check,
        "chosen": chosen,
        "candidates": [
            {"command_id": c.id, **s.to_json()} for c, s in zip(candidates, scores, strict=True)
        ],
    }


def from_record(store: StoreProtocol, value: Mapping[str, Any]) -> Sample:
    """The ``Sample`` a recorded ``sample`` step stands for, or
    ``NoCandidatePassed`` again when none was chosen."""
    scores = tuple(Score(c["passed"], c["score"], c.get("detail", "")) for c in value["candidates"])
    chosen = value["chosen"]
    if chosen is None:
        raise NoCandidatePassed(value["pick"], scores)
    ids = tuple(c["command_id"] for c in value["candidates"])
    reply = store.get(ids[chosen]).reply
    assert reply is not None, "a chosen candidate always has a reply"
    return Sample(reply, chosen, scores, ids)
