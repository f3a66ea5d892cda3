"""Typed calls: a model's reply as an instance of an attrs class.

``engine.call(..., result=Person)`` and ``ctx.call(..., result=Person)``
send the class's JSON schema in the request's ``response_format`` (the
provider-neutral ``{"type": "json_schema", "json_schema": {"name", "schema"}}``,
which each adapter maps to its provider's structured output), then parse the
reply and build the class, so its validators judge it. A reply that does not
fit is sent back with the error as a new user message: a re-ask, which is a
command of its own, journaled with the id of the first call it re-asks. After
``max_reasks`` of them, ``ResultInvalid`` carries the last error.

Everything here is pure (no engine): the loops that submit live beside the
calls they extend (``Engine.call``, ``FlowContext.call``).
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, Union

import attrs

from adapters.base import Message, Reply, Request

T = TypeVar("T")

DEFAULT_MAX_REASKS = 2

_SCALARS: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
}


class ResultInvalid(Exception):
    """The model's last reply to a typed call still did not fit the class.

    ``error`` is the last validation error; ``command_ids`` every call made
    (the first, then each re-ask), for ``dovecote show``."""

    def __init__(self, cls: type, error: str, command_ids: list[str]) -> None:
        super().__init__(
            f"no valid {cls.__name__} after {len(command_ids)} call(s) "
            f"({', '.join(command_ids)}): {error}"
        )
        self.error = error
        self.command_ids = command_ids


def schema_for(cls: type) -> dict[str, Any]:
    """The JSON schema of an attrs class, or ``TypeError`` for a field
    whose type it cannot express."""
    return _object_schema(cls, ())


def _object_schema(cls: type, seen: tuple[type, ...]) -> dict[str, Any]:
    if not (isinstance(cls, type) and attrs.has(cls)):
        raise TypeError(f"result must be an attrs class, not {cls!r}")
    if cls in seen:
        raise TypeError(f"{cls.__name__} contains itself: a recursive schema cannot be sent")
    try:
        hints = typing.get_type_hints(cls)
    except NameError as exc:
        raise TypeError(f"{cls.__name__}'s annotations cannot be resolved: {exc}") from None
    properties: dict[str, Any] = {}
    required: list[str] = []
    for field in attrs.fields(cls):
        if not field.init:
            continue
        if field.name not in hints:
            raise TypeError(f"{cls.__name__}.{field.name} has no type annotation")
        where = f"{cls.__name__}.{field.name}"
        properties[field.name] = _schema(hints[field.name], where, (*seen, cls))
        if field.default is attrs.NOTHING:
            required.append(field.name)
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def _schema(kind: Any, where: str, seen: tuple[type, ...]) -> dict[str, Any]:
    if kind in _SCALARS:
        return dict(_SCALARS[kind])
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (Union, types.UnionType):
        others = [a for a in args if a is not type(None)]
        if len(others) == 1 and len(args) == 2:
            return {"anyOf": [_schema(others[0], where, seen), {"type": "null"}]}
        raise TypeError(f"{where}: only Optional[X] unions can be expressed, not {kind!r}")
    if origin is list and len(args) == 1:
        return {"type": "array", "items": _schema(args[0], f"{where}[]", seen)}
    if isinstance(kind, type) and attrs.has(kind):
        return _object_schema(kind, seen)
    raise TypeError(
        f"{where}: {kind!r} has no JSON schema here (str, int, float, bool, list[X], "
        "Optional[X] and attrs classes do)"
    )


def response_format_for(cls: type) -> dict[str, Any]:
    """The provider-neutral ``response_format`` asking for ``cls``."""
    return {
        "type": "json_schema",
        "json_schema": {"name": cls.__name__, "schema": schema_for(cls)},
    }


def typed_request(request: Request, cls: type) -> Request:
    """``request`` asking for ``cls`` in its provider's structured output."""
    return attrs.evolve(request, response_format=response_format_for(cls))


def parse_result(cls: type[T], text: str) -> T:
    """``cls`` built from the reply ``text``, or ``ValueError`` saying why not."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the reply is not JSON: {exc}") from None
    except RecursionError:
        raise ValueError("the reply's JSON is nested too deep to read") from None
    return typing.cast(T, _build(cls, data, cls.__name__))


def _build(kind: Any, value: Any, where: str) -> Any:
    if kind in _SCALARS:
        # JSON has one number type: an int is a fine float; a bool is no number.
        fits = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not fits:
            raise ValueError(f"{where} must be {_SCALARS[kind]['type']}, not {value!r}")
        return value
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _build(inner, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be an array, not {value!r}")
        return [_build(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be an object, not {value!r}")
    hints = typing.get_type_hints(kind)
    fields = {f.name: f for f in attrs.fields(kind) if f.init}
    unknown = set(value) - set(fields)
    if unknown:
        raise ValueError(f"{where} has unexpected keys: {sorted(unknown)}")
    missing = [n for n, f in fields.items() if f.default is attrs.NOTHING and n not in value]
    if missing:
        raise ValueError(f"{where} is missing {missing}")
    built = {n: _build(hints[n], v, f"{where}.{n}") for n, v in value.items()}
    try:
        return kind(**built)
    except (TypeError, ValueError) as exc:
        # attrs puts the readable sentence first in its validators' errors.
        raise ValueError(f"{where}: {exc.args[0] if exc.args else exc}") from None


def reask_request(request: Request, text: str, error: str) -> Request:
    """``request`` continued: the reply that did not fit, then why, asking again."""
    return attrs.evolve(
        request,
        messages=(
            *request.messages,
            Message("assistant", text),
            Message(
                "user",
                f"That reply does not fit: {error}. Reply again with only the corrected JSON.",
            ),
        ),
    )


def reask_detail(first: str, number: int, error: str) -> dict[str, Any]:
    """What a re-ask's ``submit`` journal row says: whose re-ask, which, why."""
    return {"reask_of": first, "reask": number, "error": error}


Ask = Callable[[Request, Any], Awaitable[tuple[str, Reply]]]
"""Send a request (with its submit journal detail) as one command; its id and reply."""


async def ask_until_valid(cls: type[T], request: Request, max_reasks: int, ask: Ask) -> T:
    """The typed-call loop, shared by ``Engine.call`` and ``FlowContext.call``:
    ask, validate, re-ask with the error, at most ``max_reasks`` times."""
    check_max_reasks(max_reasks)
    request = typed_request(request, cls)
    first, reply = await ask(request, None)
    ids = [first]
    while True:
        try:
            return parse_result(cls, reply.text)
        except ValueError as exc:
            error = str(exc)
        if len(ids) > max_reasks:
            raise ResultInvalid(cls, error, ids)
        request = reask_request(request, reply.text, error)
        command_id, reply = await ask(request, reask_detail(first, len(ids), error))
        ids.append(command_id)


def check_max_reasks(max_reasks: Any) -> int:
    if isinstance(max_reasks, bool) or not isinstance(max_reasks, int) or max_reasks < 0:
        raise ValueError(f"max_reasks must be a non-negative integer, not {max_reasks!r}")
    return max_reasks
