"""Typed calls: ``result=SomeAttrsClass`` on ``engine.call`` and ``ctx.call``.

Against the scripted adapter (its ``#replies`` directive scripts a whole
re-ask conversation) and against the fake provider servers on 127.0.0.1,
where what is asserted is what each provider received on the wire.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import attrs
import pytest
import trio

import flows
from flows.typed import ResultInvalid, parse_result, schema_for
from tests.fake_providers import json_response
from tests.test_providers_e2e import ANTHROPIC, OLLAMA, OPENAI, Provider, Server


@attrs.frozen
class Address:
    city: str
    zip: Optional[str] = None  # noqa: UP045 -- the old spelling must work too


@attrs.frozen
class Person:
    name: str
    age: int = attrs.field(validator=attrs.validators.ge(0))
    address: Address
    tags: list[str] = attrs.field(factory=list)
    height: float | None = None


@attrs.frozen
class Loose:
    data: dict[str, int]


@attrs.frozen
class Either:
    value: int | str


@attrs.define
class Node:
    child: Node | None = None


PERSON = {"name": "Ada", "age": 36, "address": {"city": "London"}}


def say(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def test_schema_follows_the_fields_and_their_types() -> None:
    schema = schema_for(Person)
    assert schema["required"] == ["name", "age", "address"]
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert props["age"] == {"type": "integer"}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["height"] == {"anyOf": [{"type": "number"}, {"type": "null"}]}
    assert props["address"]["properties"]["zip"]["anyOf"][1] == {"type": "null"}
    assert props["address"]["required"] == ["city"]


def test_types_without_a_schema_are_refused_clearly() -> None:
    with pytest.raises(TypeError, match=r"Loose\.data"):
        schema_for(Loose)
    with pytest.raises(TypeError, match="Optional"):
        schema_for(Either)
    with pytest.raises(TypeError, match="contains itself"):
        schema_for(Node)
    with pytest.raises(TypeError, match="attrs class"):
        schema_for(dict)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{nope", "not JSON"),
        ("[]", "must be an object"),
        ('{"name": "Ada", "age": "36", "address": {"city": "L"}}', "Person.age must be integer"),
        ('{"name": "Ada", "age": true, "address": {"city": "L"}}', "Person.age must be integer"),
        ('{"name": "Ada", "age": -1, "address": {"city": "L"}}', "age"),
        ('{"name": "Ada", "age": 1, "address": {}}', "Person.address is missing"),
        ('{"name": "Ada", "age": 1, "address": {"city": "L"}, "x": 1}', "unexpected keys"),
        ('{"name": "Ada", "age": 1, "address": {"city": "L"}, "tags": [1]}', r"tags\[0\]"),
        ('{"name": "\\ud800", "age": 1, "address": {"city": "L"}, "tags": []}', None),
    ],
)
def test_a_reply_that_does_not_fit_says_why(text: str, words: str | None) -> None:
    if words is None:  # a lone surrogate is a str to JSON: the store refuses it later
        assert parse_result(Person, text).name == "\ud800"
        return
    with pytest.raises(ValueError, match=words):
        parse_result(Person, text)


def test_a_reply_nested_too_deep_is_a_validation_error_not_a_crash() -> None:
    with pytest.raises(ValueError, match="too deep"):
        parse_result(Person, "[" * 200_000 + "]" * 200_000)


async def test_a_class_without_a_schema_fails_before_anything_is_sent(db: Path | str) -> None:
    async with flows.open_engine(db) as engine:
        with pytest.raises(TypeError, match=r"Loose\.data"):
            await engine.call("scripted", say("x"), result=Loose)
        assert engine.list() == []


def test_ints_are_floats_and_deep_nesting_is_built() -> None:
    person = parse_result(Person, json.dumps({**PERSON, "height": 2, "tags": ["a"]}))
    assert person.height == 2.0 and isinstance(person.height, float)
    assert person.address == Address("London")


async def test_a_bad_reply_is_re_asked_as_its_own_journaled_command(db: Path | str) -> None:
    bad = json.dumps({**PERSON, "age": "thirty-six"})
    async with flows.open_engine(db) as engine:
        person = await engine.call(
            "scripted", say(f"#replies\n{bad}\n{json.dumps(PERSON)}"), result=Person
        )
        first, reask = sorted(engine.list(), key=lambda c: c.id)
        history = engine.history(reask.id)
    assert person == Person("Ada", 36, Address("London"))
    assert first.request.response_format["json_schema"]["schema"] == schema_for(Person)
    assert [m.role for m in reask.request.messages] == ["user", "assistant", "user"]
    assert reask.request.messages[1].content == bad
    assert "Person.age must be integer" in reask.request.messages[2].content
    assert history[0].event == "submit"
    assert history[0].detail["reask_of"] == first.id and history[0].detail["reask"] == 1


async def test_re_asks_stop_at_the_bound_with_the_last_error(db: Path | str) -> None:
    async with flows.open_engine(db) as engine:
        with pytest.raises(ResultInvalid, match="after 3 call") as caught:
            await engine.call("scripted", say("#replies\nnot json"), result=Person)
        with pytest.raises(ResultInvalid, match="after 1 call"):
            await engine.call("scripted", say("#reply\n[]"), result=Person, max_reasks=0)
        with pytest.raises(ValueError, match="max_reasks"):
            await engine.call("scripted", say("x"), result=Person, max_reasks=-1)
        assert len(engine.list()) == 4
    assert "not JSON" in caught.value.error and len(caught.value.command_ids) == 3


async def test_a_flow_re_asks_as_steps_and_a_rerun_pays_for_none(db: Path | str) -> None:
    bad = json.dumps({**PERSON, "age": -3})

    @flows.flow("test.typed")
    async def typed(ctx: flows.FlowContext) -> dict[str, Any]:
        person = await ctx.call(
            "scripted", say(f"#replies\n{bad}\n{json.dumps(PERSON)}"), result=Person
        )
        return attrs.asdict(person)

    async with flows.open_engine(db) as engine:
        flow_id = await engine.start_flow("test.typed")
        assert (await engine.wait_flow(flow_id))["age"] == 36
        steps = engine.store.flow_steps(flow_id)
        # Run the same script again on the finished journal: no new command.
        fork = await engine.fork_flow(flow_id, 3)
        assert (await engine.wait_flow(fork))["age"] == 36
        assert len(engine.list()) == 2
    assert [s.kind for s in steps] == ["call", "call"]


# --- the structured-output field on each provider's wire ---------------------


def answer(provider: Provider, data: Any) -> Any:
    text = json.dumps(data)
    usage = {"input_tokens": 3, "output_tokens": 4}
    if provider is OPENAI:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        return json_response({"choices": [choice], "usage": {"prompt_tokens": 3}})
    if provider is ANTHROPIC:
        block = {"type": "tool_use", "id": "toolu_1", "name": "Person", "input": data}
        return json_response({"content": [block], "usage": usage})
    return json_response({"message": {"role": "assistant", "content": text}, "done": True})


def wire_schema(provider: Provider, body: dict[str, Any]) -> Any:
    if provider is OPENAI:
        assert body["response_format"]["type"] == "json_schema"
        assert body["response_format"]["json_schema"]["name"] == "Person"
        return body["response_format"]["json_schema"]["schema"]
    if provider is ANTHROPIC:
        assert "response_format" not in body
        [tool] = body["tools"]
        assert body["tool_choice"] == {"type": "tool", "name": tool["name"]} and tool["name"]
        return tool["input_schema"]
    return body["format"]


@pytest.mark.parametrize("provider", [OPENAI, ANTHROPIC, OLLAMA], ids=lambda p: p.kind)
async def test_each_provider_gets_the_schema_in_its_own_shape_and_is_re_asked(
    provider: Provider, db: Path | str
) -> None:
    with Server() as server:
        server.queue(answer(provider, {**PERSON, "age": "old"}), answer(provider, PERSON))
        async with flows.open_engine(db, adapters=[provider.adapter(server.url)]) as engine:
            with trio.fail_after(20):
                person = await engine.call("p", say("who?"), result=Person, timeout=5)
            assert len(engine.list()) == 2
        first, second = (r.body for r in server.requests)
    assert person.age == 36
    assert wire_schema(provider, first) == wire_schema(provider, second) == schema_for(Person)
    said = [m for m in second["messages"] if m["role"] != "system"]
    assert [m["role"] for m in said] == ["user", "assistant", "user"]
    assert json.loads(said[1]["content"])["age"] == "old"
    assert "Person.age must be integer" in said[2]["content"]


async def test_anthropic_streams_the_tool_input_as_the_reply_text(db: Path | str) -> None:
    from tests.fake_providers import sse_bytes, stream_response

    def event(kind: str, **data: Any) -> dict[str, Any]:
        return {"event": kind, "data": {"type": kind, **data}}

    def piece(text: str) -> dict[str, Any]:
        delta = {"type": "input_json_delta", "partial_json": text}
        return event("content_block_delta", index=0, delta=delta)

    tool = {"type": "tool_use", "id": "t", "name": "Person", "input": {}}
    events = [
        event("message_start", message={"usage": {"input_tokens": 5, "output_tokens": 1}}),
        event("content_block_start", index=0, content_block=tool),
        piece('{"name": "Ada", "age": 36, '),
        piece('"address": {"city": "London"}}'),
        event("content_block_stop", index=0),
        event("message_delta", delta={"stop_reason": "tool_use"}, usage={"output_tokens": 9}),
        event("message_stop"),
    ]
    with Server() as server:
        server.queue(stream_response(sse_bytes(events), "text/event-stream"))
        adapter = ANTHROPIC.adapter(server.url, stream=True)
        async with flows.open_engine(db, adapters=[adapter]) as engine:
            with trio.fail_after(20):
                person = await engine.call("p", say("who?"), result=Person, timeout=5)
    assert person == Person("Ada", 36, Address("London"))
