"""The response cache: an identical call reuses an earlier reply, as a new
command with its own journal, at no cost, and never for another model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import flows
from adapters.base import Price
from adapters.scripted import ScriptedAdapter
from tests.conftest import ask
from tests.editor import RemoteError, served
from tests.test_cli import Workspace
from tests.test_providers_e2e import OPENAI, Server, ok


def scripted(**settings: Any) -> ScriptedAdapter:
    adapter = ScriptedAdapter()
    adapter.settings = attrs.evolve(
        adapter.settings, price=Price(input=1.0, output=2.0), **settings
    )
    return adapter


def transitions(engine: flows.Engine, command_id: str) -> list[tuple[str | None, str, str]]:
    return [(e.from_state, e.to_state, e.event) for e in engine.history(command_id)]


async def test_a_hit_is_a_new_journaled_command_that_calls_no_model_and_costs_nothing(
    db: Path | str,
) -> None:
    adapter = scripted()
    async with flows.open_engine(db, adapters=[adapter]) as engine:
        first = await engine.wait(await engine.submit("scripted", ask("teh cat"), cache=True))
        second = await engine.wait(await engine.submit("scripted", ask("teh cat"), cache=True))
        history = engine.history(second.id)
        assert adapter.calls == 1
        assert first.cost is not None and first.cost > 0
        assert second.id != first.id and second.state == "done"
        assert second.reply == first.reply and second.reply is not None
        assert second.reply.text == "the cat"
        assert second.cost == 0.0
        assert [(e.from_state, e.to_state, e.event) for e in history] == [
            (None, "pending", "submit"),
            ("pending", "replied", "resolve"),
            ("replied", "done", "finish"),
        ]
        assert history[1].detail == {"cached_from": first.id}
        # Not asked for: an ordinary call, which reaches the model.
        third = await engine.wait(await engine.submit("scripted", ask("teh cat")))
        assert adapter.calls == 2 and third.cost == first.cost
        # Another request is another key.
        await engine.call("scripted", ask("teh dog"), cache=True)
        await engine.call("scripted", ask("teh cat", system="be brief"), cache=True)
        await engine.call("scripted", ask("teh cat", max_tokens=5), cache=True)
        assert adapter.calls == 5


async def test_a_hit_runs_its_own_handler(db: Path | str) -> None:
    seen: list[str] = []

    def note(engine: flows.Engine, command: flows.Command) -> str:
        seen.append(command.id)
        return "noted"

    async with flows.open_engine(db, handlers={"test.note": note}) as engine:
        a = await engine.submit("scripted", ask("x"), cache=True, handler="test.note")
        await engine.wait(a)
        b = await engine.submit("scripted", ask("x"), cache=True, handler="test.note")
        done = await engine.wait(b)
        assert done.state == "done"
        assert engine.history(b)[-1].detail == {"result": "noted"}
    assert seen == [a, b]


async def test_hits_survive_a_restart_of_the_engine(db: Path | str) -> None:
    first = scripted()
    async with flows.open_engine(db, adapters=[first]) as engine:
        source = await engine.submit("scripted", ask("recieve"), cache=True)
        await engine.wait(source)
    again = scripted()
    async with flows.open_engine(db, adapters=[again]) as engine:
        hit = await engine.wait(await engine.submit("scripted", ask("recieve"), cache=True))
        assert engine.history(hit.id)[1].detail == {"cached_from": source}
    assert (first.calls, again.calls) == (1, 0)
    assert hit.reply is not None and hit.reply.text == "receive" and hit.cost == 0.0


async def test_an_adapter_that_caches_serves_hits_without_cache_true(db: Path | str) -> None:
    adapter = scripted(cache=True)
    async with flows.open_engine(db, adapters=[adapter]) as engine:
        await engine.call("scripted", ask("same"))
        await engine.call("scripted", ask("same"))
        assert adapter.calls == 1
        await engine.call("scripted", ask("same"), cache=False)  # the call says no
        assert adapter.calls == 2


async def test_an_entry_older_than_the_ttl_is_a_miss(
    db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    adapter = scripted(cache_ttl=60.0)
    async with flows.open_engine(db_path, adapters=[adapter]) as engine:
        await engine.call("scripted", ask("ttl"), cache=True)
        await trio.sleep(59)
        await engine.call("scripted", ask("ttl"), cache=True)
        assert adapter.calls == 1
        await trio.sleep(2)  # 61 s after the reply
        fresh = await engine.wait(await engine.submit("scripted", ask("ttl"), cache=True))
        assert adapter.calls == 2 and fresh.cost
        # The fresh reply is the one served from now on.
        hit = await engine.wait(await engine.submit("scripted", ask("ttl"), cache=True))
        assert engine.history(hit.id)[1].detail == {"cached_from": fresh.id}
        assert adapter.calls == 2


async def test_sampling_is_not_cached_unless_the_call_says_always(db: Path | str) -> None:
    adapter = scripted(cache=True)
    async with flows.open_engine(db, adapters=[adapter]) as engine:
        for _ in range(2):
            await engine.call("scripted", ask("hot", temperature=0.7), cache=True)
        assert adapter.calls == 2
        for _ in range(2):
            await engine.call("scripted", ask("hot", temperature=0.7), cache="always")
        assert adapter.calls == 3
        for _ in range(2):  # temperature 0 is not sampling
            await engine.call("scripted", ask("cold", temperature=0), cache=True)
        assert adapter.calls == 4


async def test_a_dead_call_is_never_served(db: Path | str) -> None:
    adapter = scripted()
    async with flows.open_engine(db, adapters=[adapter]) as engine:
        dead = await engine.wait(await engine.submit("scripted", ask("#fail 400\nx"), cache=True))
        assert dead.state == "dead"
        again = await engine.wait(await engine.submit("scripted", ask("#fail 400\nx"), cache=True))
        assert again.state == "dead" and adapter.calls == 2


@pytest.mark.parametrize("bad", ["yes", 1, 0, "", "ALWAYS", [], 1.0])
async def test_a_bad_cache_value_is_refused_and_stores_nothing(db: Path | str, bad: object) -> None:
    async with flows.open_engine(db) as engine:
        with pytest.raises(ValueError, match="cache must be"):
            await engine.submit("scripted", ask("x"), cache=bad)  # type: ignore[arg-type]
        assert engine.list() == []


async def test_a_flow_step_may_be_served_from_the_cache(db: Path | str) -> None:
    @flows.flow("test.cached")
    async def cached(ctx: flows.FlowContext) -> str:
        return (await ctx.call("scripted", ask("teh flow"), cache=True)).text

    adapter = scripted()
    async with flows.open_engine(db, adapters=[adapter]) as engine:
        one = await engine.wait_flow(await engine.start_flow("test.cached"))
        second = await engine.start_flow("test.cached")
        two = await engine.wait_flow(second)
        [step] = engine.store.flow_steps(second)
        assert step.command_id is not None
        assert engine.history(step.command_id)[1].event == "resolve"
        assert engine.get(step.command_id).cost == 0.0
    assert one == two == "the flow" and adapter.calls == 1


# --- against a real HTTP server -------------------------------------------------------------


async def test_a_hit_never_reaches_the_provider_and_costs_nothing(db: Path | str) -> None:
    with Server(default=lambda request: ok(OPENAI)) as server:
        adapter = OPENAI.adapter(server.url)
        request = {**OPENAI.chat["request"], "temperature": 0}
        async with flows.open_engine(db, adapters=[adapter]) as engine:
            first = await engine.wait(await engine.submit("p", request, cache=True))
            second = await engine.wait(await engine.submit("p", request, cache=True))
        assert len(server.requests) == 1
        assert first.cost and second.cost == 0.0 and second.reply == first.reply
        # Restarted on the same file, with a new adapter object: still a hit.
        async with flows.open_engine(db, adapters=[OPENAI.adapter(server.url)]) as engine:
            third = await engine.wait(await engine.submit("p", request, cache=True))
            assert engine.history(third.id)[1].detail == {"cached_from": first.id}
        assert len(server.requests) == 1


async def test_a_reply_of_one_model_or_server_is_not_served_for_another(db: Path | str) -> None:
    with (
        Server(default=lambda request: ok(OPENAI)) as one,
        Server(default=lambda request: ok(OPENAI)) as two,
    ):
        base = OPENAI.adapter(one.url)
        other_model = attrs.evolve(
            base, model="gpt-4o", settings=attrs.evolve(base.settings, name="m")
        )
        other_server = OPENAI.adapter(two.url)
        other_server = attrs.evolve(
            other_server, settings=attrs.evolve(other_server.settings, name="s")
        )
        same_place = attrs.evolve(base, settings=attrs.evolve(base.settings, name="alias"))
        request = {**OPENAI.chat["request"], "temperature": 0}
        async with flows.open_engine(
            db, adapters=[base, other_model, other_server, same_place]
        ) as engine:
            await engine.call("p", request, cache=True)
            await engine.call("m", request, cache=True)
            await engine.call("s", request, cache=True)
            assert (len(one.requests), len(two.requests)) == (2, 1)
            assert one.requests[1].body["model"] == "gpt-4o"
            # Another name for the same model at the same address shares entries.
            await engine.call("alias", request, cache=True)
            assert (len(one.requests), len(two.requests)) == (2, 1)


# --- dovecote cache stats | clear, and command/submit over a real server --------------------


def test_cache_stats_and_clear(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    for _ in range(3):  # one after another: calls in flight at once all miss
        ws.calls(("teh", {"cache": True}))
    ws.calls(("other", {"cache": True}), ("uncached", {}))
    [row] = ws.json("cache", "stats")["adapters"]
    assert (row["adapter"], row["entries"], row["served"], row["hits"]) == ("scripted", 2, 2, 2)
    assert row["bytes"] > 0 and row["oldest"] > 0
    shown = ws.ok("cache", "stats")
    assert "scripted" in shown and "hits" in shown
    assert ws.json("cache", "clear", "--adapter", "elsewhere") == {"cleared": 0}
    assert ws.json("cache", "clear", "--older-than", "1d") == {"cleared": 0}
    assert ws.ok("cache", "clear") == "cleared 2 cache entries\n"
    assert ws.json("cache", "stats") == {"adapters": []}
    # Cleared: the next call is a miss, and the commands are all still there.
    ws.calls(("teh", {"cache": True}))
    assert len(ws.export()) == 6
    [row] = ws.json("cache", "stats")["adapters"]
    assert (row["entries"], row["hits"]) == (1, 0)
    refused = ws.run("cache", "clear", "--older-than", "soon")
    assert refused.returncode == 2 and "duration" in refused.stderr


async def test_command_submit_with_cache_over_a_real_serve(db: Path | str) -> None:
    request = {"messages": [{"role": "user", "content": "teh bridge"}]}
    async with served(db) as (editor, _):
        await editor.initialize()
        ids = []
        for _ in range(2):
            result = await editor.request(
                "command/submit", {"adapter": "scripted", "request": request, "cache": True}
            )
            ids.append(result["commandId"])
            assert (await editor.wait_state(ids[-1]))["state"] == "done"
        shown = await editor.request("command/show", {"commandId": ids[1]})
        assert [e["event"] for e in shown["events"]] == ["submit", "resolve", "finish"]
        # The journal's details are the core's own JSON, as for replay_of.
        assert shown["events"][1]["detail"] == {"cached_from": ids[0]}
        assert shown["command"]["cost"] == 0.0
        for bad in ("yes", 1, [], {"on": True}):
            with pytest.raises(RemoteError) as caught:
                await editor.request(
                    "command/submit", {"adapter": "scripted", "request": request, "cache": bad}
                )
            assert caught.value.code == -32602, bad
            assert "cache must be" in str(caught.value)
        listed = await editor.request("command/list", {})
    assert len(listed["commands"]) == 2  # nothing stored for the refused ones


async def test_an_adapter_configured_to_cache_over_a_real_serve(
    db: Path | str, tmp_path: Path
) -> None:
    config = tmp_path / "dovecote.toml"
    config.write_text('[adapters.scripted]\nkind = "scripted"\ncache = true\ncache_ttl = 3600\n')
    request = {"messages": [{"role": "user", "content": "teh config"}]}
    async with served(db, "--config", str(config)) as (editor, _):
        await editor.initialize()
        ids = []
        for cache in (None, None, False):
            params: dict[str, Any] = {"adapter": "scripted", "request": request}
            if cache is not None:
                params["cache"] = cache
            ids.append((await editor.request("command/submit", params))["commandId"])
            assert (await editor.wait_state(ids[-1]))["state"] == "done"
        events = [
            [e["event"] for e in (await editor.request("command/show", {"commandId": i}))["events"]]
            for i in ids
        ]
    assert events == [
        ["submit", "dispatch", "reply", "finish"],
        ["submit", "resolve", "finish"],
        ["submit", "dispatch", "reply", "finish"],  # the call said no
    ]


async def test_a_hit_for_an_editor_region_is_merged_like_a_reply(db: Path | str) -> None:
    uri = "file:///tmp/cached.txt"
    region = "I recieve teh letter."
    request = {"messages": [{"role": "user", "content": region}]}
    async with served(db) as (editor, _):
        await editor.initialize()
        for name in ("a", "b"):
            await editor.open(uri + name, region)
            result = await editor.request(
                "command/submit",
                {
                    "adapter": "scripted",
                    "request": request,
                    "cache": True,
                    "target": {"uri": uri + name, "start": 0, "end": len(region)},
                },
            )
            assert (await editor.wait_state(result["commandId"]))["state"] == "done"
            assert editor.text(uri + name) == "I receive the letter."
        shown = await editor.request("command/show", {"commandId": result["commandId"]})
    assert [e["event"] for e in shown["events"]] == ["submit", "resolve", "finish"]
