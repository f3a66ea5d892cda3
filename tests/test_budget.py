"""Budgets: a call that would pass its flow's or its adapter's daily
ceiling dies before it is sent, with reason ``budget``."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio

import flows
from adapters.base import Price
from adapters.scripted import ScriptedAdapter
from flows.budget import estimate
from tests.conftest import ask
from tests.editor import RemoteError, served
from tests.test_cli import Workspace
from tests.test_providers_e2e import CHAT_COST, OPENAI, Server, ok

# A dollar a token: a scripted call costs its words in and out.
DEAR = Price(input=1e6, output=1e6)


def scripted(budget_per_day: float | None = None) -> ScriptedAdapter:
    adapter = ScriptedAdapter()
    adapter.settings = attrs.evolve(adapter.settings, price=DEAR, budget_per_day=budget_per_day)
    return adapter


@flows.flow("test.three_calls")
async def three_calls(ctx: flows.FlowContext) -> list[str]:
    return [(await ctx.call("scripted", ask(word))).text for word in ("teh", "recieve", "adress")]


async def stalled_flow(engine: flows.Engine, budget: float) -> str:
    """A ``test.three_calls`` flow with ``budget``, once it has stalled."""
    flow_id = await engine.start_flow("test.three_calls", budget=budget)
    while engine.get_flow(flow_id).state != "stalled":
        await trio.sleep(0.01)
    return flow_id


def test_the_estimate_counts_the_prompt_and_max_tokens() -> None:
    request = flows.Request.from_json(ask("x" * 40, max_tokens=100))
    assert estimate(request, Price(input=1.0, output=3.0)) == pytest.approx((10 + 300) / 1e6)
    assert estimate(request, None) == 0.0


async def test_a_flow_stops_before_the_call_that_would_pass_its_budget(db: Path | str) -> None:
    adapter = scripted()
    async with flows.open_engine(db, adapters=[adapter]) as engine:
        # Each call costs 2 (a word in, a word out); 'adress' is estimated at 2.
        flow_id = await stalled_flow(engine, 4.5)
        steps = engine.store.flow_steps(flow_id)
        commands = [engine.get(s.command_id or "") for s in steps]
        assert [c.state for c in commands] == ["done", "done", "dead"]
        assert [c.cost for c in commands[:2]] == [2.0, 2.0]
        dead = commands[2]
        assert dead.reason == "budget" and dead.sent_at is None and dead.cost is None
        history = engine.history(dead.id)
        assert [(e.from_state, e.to_state, e.event) for e in history] == [
            (None, "pending", "submit"),
            ("pending", "dead", "refuse"),
        ]
        assert history[1].detail == {"budget": 4.5, "per": "flow", "spent": 4.0, "estimate": 2.0}
        assert adapter.calls == 2  # the third never reached the model
        assert engine.get_flow(flow_id).budget == 4.5
        # Replayed while the budget is still spent: it dies again, unsent.
        [again] = await engine.replay([dead.id])
        replayed = await engine.wait(again)
        assert (replayed.state, replayed.reason) == ("dead", "budget") and adapter.calls == 2
        # Another flow has a budget of its own, and none means no ceiling.
        assert await engine.wait_flow(await engine.start_flow("test.three_calls")) == [
            "the",
            "receive",
            "address",
        ]


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), True, "5"])
async def test_a_bad_flow_budget_is_refused(db: Path | str, bad: object) -> None:
    async with flows.open_engine(db) as engine:
        with pytest.raises(ValueError, match="budget"):
            await engine.start_flow("test.three_calls", budget=bad)  # type: ignore[arg-type]
        assert engine.list_flows() == []


async def test_an_adapters_daily_budget_keeps_calls_from_the_server(db: Path | str) -> None:
    cost = CHAT_COST["openai"]
    with Server(default=lambda request: ok(OPENAI)) as server:
        request = OPENAI.chat["request"]
        # Room for one estimate (its max_tokens at the output price), not for
        # a second one on top of the first call's cost.
        ceiling = estimate(flows.Request.from_json(request), Price(0.15, 0.60)) + cost / 2
        adapter = OPENAI.adapter(server.url, budget_per_day=ceiling)
        assert adapter.settings.budget_per_day == pytest.approx(ceiling)
        async with flows.open_engine(db, adapters=[adapter]) as engine:
            first = await engine.wait(await engine.submit("p", request))
            second = await engine.wait(await engine.submit("p", request))
            assert first.state == "done" and first.cost == pytest.approx(cost)
            assert (second.state, second.reason) == ("dead", "budget")
            [refusal] = [e for e in engine.history(second.id) if e.event == "refuse"]
            assert refusal.detail["per"] == "day"
            assert refusal.detail["spent"] == pytest.approx(cost)
            # A cache hit costs nothing, so no budget refuses it.
        assert len(server.requests) == 1


async def test_the_day_is_utc_and_a_new_one_has_its_budget_again(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    adapter = scripted(budget_per_day=2.5)  # one call of 2, estimated at 1
    # Ten minutes before midnight UTC.
    async with flows.open_engine(
        db_path, adapters=[adapter], wall_clock=lambda: 86400.0 * 20000 - 600
    ) as engine:
        assert (await engine.wait(await engine.submit("scripted", ask("teh")))).state == "done"
        refused = await engine.wait(await engine.submit("scripted", ask("teh")))
        assert refused.reason == "budget"
        await trio.sleep(601)
        [again] = await engine.replay([refused.id])
        assert (await engine.wait(again)).state == "done"
    assert adapter.calls == 2


def test_stats_show_spend_against_budgets(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    config = tmp_path / "dovecote.toml"
    config.write_text(
        "[adapters.scripted]\n"
        'kind = "scripted"\n'
        "price_per_mtok = { input = 1000000, output = 1000000 }\n"
        "budget_per_day = 2.5\n"
    )

    async def spend() -> str:
        async with flows.open_engine(ws.db, adapters=[scripted(budget_per_day=2.5)]) as engine:
            await engine.call("scripted", ask("teh"))  # costs 2
            refused = await engine.wait(await engine.submit("scripted", ask("teh")))
            assert refused.reason == "budget"
            flow_id = await stalled_flow(engine, 10.0)
            return flow_id

    flow_id = trio.run(spend)
    stats = ws.json("stats", "--config", config)
    assert stats["budgets"]["adapters"] == [
        {"adapter": "scripted", "budget_per_day": 2.5, "spent_today": 2.0}
    ]
    assert stats["budgets"]["flows"] == [
        {"flow": flow_id, "name": "test.three_calls", "budget": 10.0, "spent": 0.0}
    ]
    shown = ws.ok("stats", "--config", config)
    assert "2.0000 / 2.5000" in shown and "0.0000 / 10.0000" in shown


async def test_flow_start_with_a_budget_over_a_real_serve(db: Path | str, tmp_path: Path) -> None:
    config = tmp_path / "dovecote.toml"
    config.write_text(
        '[adapters.scripted]\nkind = "scripted"\n'
        "price_per_mtok = { input = 1000000, output = 1000000 }\n"
    )
    async with served(db, "--config", str(config)) as (editor, _):
        await editor.initialize()
        for bad in ("lots", -1, 0, True, [1]):
            with pytest.raises(RemoteError) as caught:
                await editor.request(
                    "flow/start", {"flow": "corrections", "params": {"text": "x"}, "budget": bad}
                )
            assert caught.value.code == -32602 and "budget" in caught.value.message, bad
        # The corrections flow allows 64 + 2 * len(text) tokens: an estimate of
        # about 70 dollars here, far past a budget of 10.
        started = await editor.request(
            "flow/start", {"flow": "corrections", "params": {"text": "teh"}, "budget": 10}
        )
        flow_id = started["flowId"]
        await editor.wait_flow_state(flow_id, "stalled")
        shown = await editor.request("flow/show", {"flowId": flow_id})
        assert shown["budget"] == 10.0
        [step] = shown["steps"]
        command = await editor.request("command/show", {"commandId": step["commandId"]})
        assert command["command"]["reason"] == "budget"
        assert command["command"]["sentAt"] is None
        assert [e["event"] for e in command["events"]] == ["submit", "refuse"]
        listed = await editor.request("flow/list", {})
    assert len(listed["flows"]) == 1  # the refused starts stored nothing


async def test_a_fork_keeps_the_budget_and_starts_its_own_spend(db: Path | str) -> None:
    adapter = scripted()
    async with flows.open_engine(db, adapters=[adapter]) as engine:
        flow_id = await stalled_flow(engine, 4.5)
        # Steps 1 and 2 reused (their 4 spent stays the old flow's): step 3 fits.
        fork = await engine.fork_flow(flow_id, from_step=3)
        assert await engine.wait_flow(fork) == ["the", "receive", "address"]
        assert engine.get_flow(fork).budget == 4.5
        assert engine.store.flow_spent(fork) == 2.0
    assert adapter.calls == 3
