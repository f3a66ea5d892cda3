"""Samplers: ``ctx.sample`` asks for candidates, judges them by a named check,
journals every score and the choice, and a resumed flow pays for none again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import flows
from flows.checks import check
from flows.location import open_store
from tests.conftest import DOVECOTE
from tests.test_crash import read_line
from tests.test_flows import worker


def say(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


@check("test.length")
def length(text: str, expected: Any | None) -> float:
    return min(1.0, len(text) / 10)


async def test_best_submits_all_at_once_and_journals_every_score(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    texts = ["short", "a longer one", "also long!", "x"]

    @flows.flow("test.best")
    async def best(ctx: flows.FlowContext) -> dict[str, Any]:
        asked = [say(f"#delay 10\n#reply\n{t}") for t in texts]
        sample = await ctx.sample("scripted", asked, n=4, check="test.length", pick="best")
        return {"chosen": sample.chosen, "text": sample.text, "score": sample.score.score}

    async with flows.open_engine(db_path) as engine:
        start = trio.current_time()
        flow_id = await engine.start_flow("test.best")
        result = await engine.wait_flow(flow_id)
        took = trio.current_time() - start
        commands = sorted(engine.list(flow_id=flow_id), key=lambda c: c.id)
        steps = engine.store.flow_steps(flow_id)
        details = [engine.history(c.id)[0].detail for c in commands]
    # Two score 1.0: the earliest wins. All four were out together: 10 s, not 40.
    assert result == {"chosen": 1, "text": "a longer one", "score": 1.0}
    assert took < 15
    assert len({c.sent_at for c in commands}) == 1
    assert [d["sample"]["candidate"] for d in details] == [0, 1, 2, 3]
    assert [s.kind for s in steps] == ["call"] * 4 + ["sample"]
    recorded = steps[-1].value
    assert recorded["chosen"] == 1 and recorded["pick"] == "best"
    assert [c["score"] for c in recorded["candidates"]] == [0.5, 1.0, 1.0, 0.1]
    assert [c["command_id"] for c in recorded["candidates"]] == [c.id for c in commands]

    # A fork that reuses half the candidates asks only for the other half.
    async with flows.open_engine(db_path) as engine:
        fork = await engine.fork_flow(flow_id, 3)
        assert await engine.wait_flow(fork) == result
        assert len(engine.list(flow_id=fork)) == 2
        assert [s.kind for s in engine.store.flow_steps(fork)] == ["call"] * 4 + ["sample"]

    shown = subprocess.run(
        [DOVECOTE, "--db", str(db_path), "flow", "show", flow_id, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    [sample_step] = [s for s in json.loads(shown.stdout)["steps"] if s["kind"] == "sample"]
    assert sample_step["value"] == recorded


async def test_first_stops_at_the_first_that_passes(db: Path | str) -> None:
    @flows.flow("test.first")
    async def first(ctx: flows.FlowContext) -> int:
        asked = [say(f"#reply\n{t}") for t in ["", " ", "yes", "never asked"]]
        sample = await ctx.sample("scripted", asked, n=4, check="nonempty", pick="first")
        return sample.chosen

    @flows.flow("test.none")
    async def none(ctx: flows.FlowContext) -> int:
        await ctx.sample("scripted", say("#reply\n"), n=2, check="nonempty", pick="first")
        return -1

    async with flows.open_engine(db) as engine:
        flow_id = await engine.start_flow("test.first")
        assert await engine.wait_flow(flow_id) == 2
        assert len(engine.list(flow_id=flow_id)) == 3
        # Run again on the whole journal: the recorded choice, nothing asked.
        again = await engine.fork_flow(flow_id, 5)
        assert await engine.wait_flow(again) == 2
        assert len(engine.list()) == 3
        # Reuse the two that failed: only the third is asked again.
        partly = await engine.fork_flow(flow_id, 3)
        assert await engine.wait_flow(partly) == 2
        assert len(engine.list(flow_id=partly)) == 1
        failed = await engine.start_flow("test.none")
        with pytest.raises(flows.FlowFailed, match="NoCandidatePassed"):
            await engine.wait_flow(failed)
        assert len(engine.list(flow_id=failed)) == 2


async def test_a_dead_candidate_scores_as_failed_and_the_flow_goes_on(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    @flows.flow("test.dead")
    async def dead(ctx: flows.FlowContext) -> str:
        asked = [say("#fail 400"), say("#reply\nfine")]
        sample = await ctx.sample("scripted", asked, n=2, check="nonempty", max_attempts=1)
        return f"{sample.chosen} {sample.scores[0].detail}"

    async with flows.open_engine(db_path) as engine:
        assert await engine.wait_flow(await engine.start_flow("test.dead")) == "1 dead (error)"


async def test_a_check_may_be_a_model_call(db: Path | str) -> None:
    @check("test.judge", needs_engine=True)
    async def judge(engine: flows.Engine, text: str, expected: Any | None) -> bool:
        verdict = await engine.call("scripted", say(f"#reply\n{'yes' if 'b' in text else 'no'}"))
        return verdict.text == "yes"

    @flows.flow("test.judged")
    async def judged(ctx: flows.FlowContext) -> str:
        asked = [say("#reply\na"), say("#reply\nb")]
        return (await ctx.sample("scripted", asked, n=2, check="test.judge")).text

    async with flows.open_engine(db) as engine:
        assert await engine.wait_flow(await engine.start_flow("test.judged")) == "b"
        assert len(engine.list()) == 4  # two candidates, two judgements, all commands


async def test_bad_arguments_fail_before_anything_is_sent(db: Path | str) -> None:
    cases = [
        ({"n": 0, "check": "nonempty"}, "n must be"),
        ({"n": 2, "check": "nonempty", "pick": "worst"}, "pick must be"),
        ({"n": 2, "check": "no-such-check"}, "no check is registered"),
    ]

    @flows.flow("test.bad-sample")
    async def bad(ctx: flows.FlowContext, case: int) -> None:
        await ctx.sample("scripted", say("x"), **cases[case][0])  # type: ignore[arg-type]

    async with flows.open_engine(db) as engine:
        for index, (_, words) in enumerate(cases):
            with pytest.raises(flows.FlowFailed, match=words):
                await engine.wait_flow(await engine.start_flow("test.bad-sample", case=index))
        assert engine.list() == []


def test_kill_9_after_a_sample_resumes_without_calling_again(
    db: Path | str, tmp_path: Path
) -> None:
    log = tmp_path / "calls.log"
    first = worker(db, log, "start-sample")
    read_line(first, "after sample")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert len(log.read_text().splitlines()) == 3  # the three candidates

    second = worker(db, log, "resume")
    result = json.loads(read_line(second, "result ")[len("result ") :])
    second.wait(timeout=30)
    assert result == {"chosen": 1, "text": "a goose", "typed": 1}
    sends = Counter(line.split()[0] for line in log.read_text().splitlines())
    assert len(sends) == 5 and set(sends.values()) == {1}  # 3 candidates, a call, a re-ask


def test_kill_9_while_candidates_are_out_resumes_them_without_new_ones(
    db: Path | str, tmp_path: Path
) -> None:
    log = tmp_path / "calls.log"
    first = worker(db, log, "start-slow-sample")
    read_line(first, "started")
    deadline = time.monotonic() + 30
    while not log.exists() or len(log.read_text().splitlines()) < 3:
        assert time.monotonic() < deadline, "the candidates were never sent"
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()

    second = worker(db, log, "resume")
    result = json.loads(read_line(second, "result ")[len("result ") :])
    second.wait(timeout=30)
    assert result == {"chosen": 1, "text": "a goose", "typed": 1}
    sends = Counter(line.split()[0] for line in log.read_text().splitlines())
    # The same three candidates (sent again: they were out when it died), then two more.
    assert len(sends) == 5
    store = open_store(db)
    try:
        [flow] = store.flows()
        kinds = [s.kind for s in store.flow_steps(flow.id)]
    finally:
        store.close()
    assert kinds == ["call", "call", "call", "sample", "sleep", "call", "call"]
