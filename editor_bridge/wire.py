"""Wire names and shapes: the one place where camelCase lives.

The core speaks snake_case records; editors speak camelCase JSON. Records
are turned into wire objects here on the way out, and wire params are read
and checked here on the way in (``Params``), so that a handler never sees a
dict it has not validated.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from editor_bridge.rpc import INVALID_PARAMS, RpcError
from flows.records import Command, Event, Flow

# Application error codes (JSON-RPC reserves -32000 to -32099 for servers).
UNKNOWN_COMMAND: Final = -32000
ILLEGAL_TRANSITION: Final = -32001
UNKNOWN_DOCUMENT: Final = -32002
UNAUTHORIZED: Final = -32003
NOT_INITIALIZED: Final = -32004
DOCUMENT_REFUSED: Final = -32005
STORE_FAILED: Final = -32006
UNKNOWN_FLOW: Final = -32007
NO_CONFLICT: Final = -32008

_CAPS = re.compile(r"_([a-z])")
_HUMPS = re.compile(r"(?<!^)([A-Z])")


@functools.lru_cache(maxsize=256)
def camel(name: str) -> str:
    return _CAPS.sub(lambda m: m.group(1).upper(), name)


def snake(name: str) -> str:
    return _HUMPS.sub(lambda m: "_" + m.group(1).lower(), name)


_wire_names: dict[str, str] = {}
"""snake_case -> camelCase for the keys ``_camel_keys`` renames: the fields
of records, a small fixed set (a plain dict is cheaper to ask than even the
cache of ``camel``, and every command listed asks it thirty times)."""


def _camel_keys(value: Mapping[str, Any]) -> dict[str, Any]:
    names = _wire_names
    try:
        return {names[k]: v for k, v in value.items()}
    except KeyError:  # a key seen for the first time
        names.update((k, camel(k)) for k in value)
        return {names[k]: v for k, v in value.items()}


def command(c: Command) -> dict[str, Any]:
    record = c.to_json()  # request and reply in it already, as their to_json
    data = _camel_keys(record)
    data["request"] = _camel_keys(record["request"])
    reply = record["reply"]
    if reply is not None and reply["usage"] is not None:
        reply["usage"] = _camel_keys(reply["usage"])
    return data


def flow(f: Flow) -> dict[str, Any]:
    data = _camel_keys(f.to_json())
    data.pop("owner", None)
    data.pop("leaseUntil", None)
    return data


def event(e: Event) -> dict[str, Any]:
    return {
        "at": e.at,
        "from": e.from_state,
        "to": e.to_state,
        "event": e.event,
        "detail": e.detail,
    }


def request_from_wire(method: str, value: Any) -> dict[str, Any]:
    """A wire request (``maxTokens``...) as the core's JSON (``max_tokens``)."""
    if not isinstance(value, Mapping):
        raise RpcError(INVALID_PARAMS, f"{method}: request must be an object with messages")
    return {snake(k): v for k, v in value.items()}


class Params:
    """Checked access to a method's params; every complaint names the field.

    ``ready()`` is the connection's: a method that must do part of its work
    in frame order (a snapshot) calls it when that part is done."""

    def __init__(self, method: str, params: Any, ready: Callable[[], None] = lambda: None) -> None:
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            raise RpcError(INVALID_PARAMS, f"{method}: params must be an object")
        self.method = method
        self.raw: Mapping[str, Any] = params
        self.ready = ready

    def _bad(self, name: str, expected: str) -> RpcError:
        value = self.raw.get(name)
        shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
        return RpcError(INVALID_PARAMS, f"{self.method}: {name} must be {expected}, got {shown}")

    def has(self, name: str) -> bool:
        return self.raw.get(name) is not None

    def string(self, name: str, *, optional: bool = False) -> Any:
        value = self.raw.get(name)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise self._bad(name, "a non-empty string")
        return value

    def integer(self, name: str, *, optional: bool = False, minimum: int = 0) -> Any:
        value = self.raw.get(name)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._bad(name, f"an integer >= {minimum}")
        return value

    def text(self, name: str) -> str:
        """A string, possibly empty (a reply, a replacement)."""
        value = self.raw.get(name)
        if not isinstance(value, str):
            raise self._bad(name, "a string")
        return value

    def number(self, name: str, *, optional: bool = False) -> Any:
        value = self.raw.get(name)
        if value is None and optional:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise self._bad(name, "a positive number")
        return float(value)

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.raw.get(name, default)
        if not isinstance(value, bool):
            raise self._bad(name, "true or false")
        return value

    def cache(self, name: str = "cache") -> bool | str | None:
        """A call's cache option (flows.cache): true, false, "always", or
        absent for the adapter's own setting."""
        value = self.raw.get(name)
        if not (value is None or isinstance(value, bool) or value == "always"):
            raise self._bad(name, 'true, false or "always"')
        return value

    def strings(self, name: str, *, optional: bool = False) -> Any:
        value = self.raw.get(name)
        if value is None and optional:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(name, "an array of strings")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str | None = None) -> Any:
        value = self.raw.get(name, default)
        if value not in choices:
            raise self._bad(name, "one of " + ", ".join(choices))
        return value

    def section(self, name: str, *, optional: bool = False) -> Params | None:
        value = self.raw.get(name)
        if value is None and optional:
            return None
        if not isinstance(value, Mapping):
            raise self._bad(name, "an object")
        return Params(f"{self.method}: {name}", value)
