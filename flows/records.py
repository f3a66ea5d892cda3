"""The records that flow through the core: commands, journal events, late
replies. All frozen: a record is a fact as of one moment; a change makes a
new record, and the store is where the newest one lives."""

from __future__ import annotations

import operator
import os
import threading
import time
from collections.abc import Mapping
from typing import Any, Final

import attrs

from adapters.base import JSON, Reply, Request
from flows.states import COMMAND_STATES, PENDING, TERMINAL_STATES

_id_lock = threading.Lock()
_last_id_ms = 0
_last_id_rand = 0


def new_id() -> str:
    """A UUIDv7 (RFC 9562): unique, and sortable by creation time.

    Within one millisecond the random part is incremented rather than drawn
    again, so ids made by one process are strictly increasing: the pending
    table's ``ORDER BY id`` is first-come, first-served."""
    global _last_id_ms, _last_id_rand
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_id_ms:
            ms = _last_id_ms
            rand = _last_id_rand + 1
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 6  # 74 random bits
        _last_id_ms, _last_id_rand = ms, rand
    value = (ms & (2**48 - 1)) << 80
    value |= 0x7 << 76  # version 7
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a: 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & (2**62 - 1)  # rand_b: 62 bits
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


# --- What SQLite can hold -----------------------------------------------------
#
# SQLite stores text as UTF-8 and integers in 64 bits. Python strings may hold
# lone surrogates (JSON's "\ud800" decodes to one) and Python integers have no
# bound: neither can be written, and the error would come from the committer,
# long after the caller that brought the value has gone on. So values are
# checked where they enter, and the caller gets a ``ValueError`` that says
# which value and why.

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1


def storable_text(value: str, what: str) -> str:
    """``value``, if SQLite can store it as text; else ``ValueError``."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{what} is not valid Unicode: a lone surrogate "
                f"{value[exc.start]!r} at position {exc.start}".lstrip()
            ) from None
    return value


def storable_int(value: int, what: str) -> int:
    """``value``, if it fits SQLite's 64-bit integers; else ``ValueError``."""
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{what} must be from {INT64_MIN} to {INT64_MAX}, not {value}".lstrip())
    return value


def storable(value: Any, what: str) -> Any:
    """``value`` (JSON-shaped, or a record of them such as a ``Request``) if
    every string in it is valid Unicode and every integer fits 64 bits; else
    ``ValueError`` naming the field. Every request and reply passes here: a
    quick look first, and only a value it cannot vouch for is walked again
    to name what is wrong."""
    try:
        if _fine(value):
            return value
    except RecursionError:
        pass  # nested too deep for a quick look: the walk below has no depth limit
    pending: list[tuple[Any, Any]] = [(value, what)]
    while pending:
        item, path = pending.pop()
        try:
            if isinstance(item, str):
                storable_text(item, "")
            elif isinstance(item, bool) or item is None or isinstance(item, float):
                continue
            elif isinstance(item, int):
                storable_int(item, "")
            elif isinstance(item, Mapping):
                pending.extend((key, (path, "<key>")) for key in item)
                pending.extend((v, (path, k)) for k, v in item.items())
            elif isinstance(item, list | tuple):
                pending.extend((v, (path, i)) for i, v in enumerate(item))
            elif attrs.has(type(item)):
                pending.extend(
                    (getattr(item, field.name), (path, field.name))
                    for field in attrs.fields(type(item))
                )
        except ValueError as exc:
            raise ValueError(f"{_spelled(path)} {exc}") from None
    return value


_FIELDS: dict[type, tuple[str, ...]] = {}


def _fine(item: Any) -> bool:
    """True if ``item`` is surely storable; False if it may not be (a value
    of a type this does not know is left to ``storable``'s walk)."""
    kind = type(item)
    if kind is str:
        if item.isascii():
            return True
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if item is None or kind is bool or kind is float:
        return True
    if kind is int:
        return bool(INT64_MIN <= item <= INT64_MAX)
    if kind is tuple or kind is list:
        return all(_fine(element) for element in item)
    if kind is dict:
        return all(_fine(key) and _fine(element) for key, element in item.items())
    names = _FIELDS.get(kind)
    if names is None:
        if not attrs.has(kind):
            return False
        names = _FIELDS[kind] = tuple(field.name for field in attrs.fields(kind))
    return all(_fine(getattr(item, name)) for name in names)


def _spelled(path: Any) -> str:
    """``(("the request", "messages"), 0)`` as ``the request.messages[0]``."""
    keys = []
    while isinstance(path, tuple):
        path, key = path
        keys.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    return str(path) + "".join(reversed(keys))


def _readable(value: str) -> str:
    r"""Error text as it can be stored: a lone surrogate becomes ``\ud800``."""
    return value if value.isascii() else value.encode("utf-8", "backslashreplace").decode()


@attrs.frozen
class CommandError:
    """The last thing that went wrong with a command's send or handler.

    Its text comes from exceptions, which may quote what a provider sent:
    it is made storable here rather than refused, because an error that
    cannot be recorded would leave its command stuck."""

    type: str = attrs.field(converter=_readable)
    message: str = attrs.field(converter=_readable)
    status: int | None = None

    def to_json(self) -> dict[str, JSON]:
        return {"type": self.type, "message": self.message, "status": self.status}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CommandError:
        return cls(type=data["type"], message=data["message"], status=data.get("status"))


def _state(instance: Command, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in COMMAND_STATES:
        raise ValueError(f"unknown command state {value!r}")


@attrs.frozen
class Command:
    """One call to a model, as the pending table holds it.

    How to handle the reply is stored by NAME (``handler``) with JSON
    arguments (``handler_args``), never as a closure, so that a new process
    can finish what a dead one started."""

    id: str
    adapter: str
    request: Request
    state: str = attrs.field(validator=_state)
    created_at: float
    timeout: float
    attempt: int = 1
    max_attempts: int = 1
    reason: str | None = None
    expires_at: float | None = None
    sent_at: float | None = None
    deadline: float | None = None
    replied_at: float | None = None
    finished_at: float | None = None
    not_before: float | None = None
    reply: Reply | None = None
    error: CommandError | None = None
    handler: str | None = None
    handler_args: JSON = None
    flow_id: str | None = None
    step: int | None = None
    snapshot_id: str | None = None
    replay_of: str | None = None
    priority: int = 0
    owner: str | None = None
    lease_until: float | None = None
    cost: float | None = None

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def replayed(self, command_id: str, at: float, timeout: float | None = None) -> Command:
        """A new pending command asking again what this one asked, with the
        same handling and place in its flow: a fresh life, ``replay_of`` this."""
        return Command(
            id=command_id,
            adapter=self.adapter,
            request=self.request,
            state=PENDING,
            created_at=at,
            timeout=self.timeout if timeout is None else timeout,
            max_attempts=self.max_attempts,
            handler=self.handler,
            handler_args=self.handler_args,
            flow_id=self.flow_id,
            step=self.step,
            snapshot_id=self.snapshot_id,
            replay_of=self.id,
            priority=self.priority,
        )

    def evolve(self, **changes: Any) -> Command:
        """A copy with ``changes``: ``attrs.evolve``, five times faster, which
        matters because every transition of every command makes one."""
        return self.changed(changes)

    def changed(self, *changes: Mapping[str, Any]) -> Command:
        """``evolve`` with the changes as mappings, applied in order (a later
        one wins): a move's table-given and own changes without merging them."""
        values = list(_command_values(self))
        at = _COMMAND_INDEX.get
        for mapping in changes:
            for name, value in mapping.items():
                index = at(name)
                if index is None:
                    raise TypeError(f"Command has no field {name!r}")
                values[index] = value
        return Command(*values)

    def to_json(self) -> dict[str, JSON]:
        """Every field, JSON-ready, snake_case (the bridge renames for the wire)."""
        data: dict[str, JSON] = attrs.asdict(self, recurse=False)
        data["request"] = self.request.to_json()
        data["reply"] = self.reply.to_json() if self.reply else None
        data["error"] = self.error.to_json() if self.error else None
        return data


_COMMAND_INDEX: dict[str, int] = {name: i for i, name in enumerate(attrs.fields_dict(Command))}
_command_values = operator.attrgetter(*_COMMAND_INDEX)


@attrs.frozen
class Event:
    """One row of the journal: a command (or flow) moved from one state to
    another because of ``event``, at wall-clock time ``at``."""

    seq: int
    command_id: str | None
    flow_id: str | None
    at: float
    from_state: str | None
    to_state: str
    event: str
    detail: JSON = None

    def to_json(self) -> dict[str, JSON]:
        return attrs.asdict(self)


@attrs.frozen
class LateReply:
    """A reply that arrived for a command no longer waiting for one."""

    id: int
    command_id: str
    reply: Reply
    received_at: float
    used_by: str | None = None


@attrs.frozen
class Delivery:
    """What became of a delivered reply: ``accepted`` if it was matched to a
    ``sent`` command, ``late`` if it was stored as a late reply instead."""

    accepted: bool
    late: bool


@attrs.frozen
class StateChange:
    """What subscribers receive for every committed transition."""

    command: Command
    event: Event


@attrs.frozen
class Flow:
    """A multi-step piece of work, as the ``flows`` table holds it.

    ``step`` counts the steps taken (a scripted flow's calls, sleeps and
    journaled values); ``stage`` is a declared flow's current stage;
    ``params`` are what it was started with, ``vars`` what a declared flow
    has gathered, ``result`` what it returned."""

    id: str
    name: str
    state: str
    created_at: float
    updated_at: float
    params: JSON = None
    step: int = 0
    stage: str | None = None
    vars: JSON = None
    result: JSON = None
    error: str | None = None
    forked_from: str | None = None
    owner: str | None = None
    lease_until: float | None = None
    budget: float | None = None
    """The most its commands may cost together (flows.budget), if bounded."""

    def to_json(self) -> dict[str, JSON]:
        return attrs.asdict(self)


@attrs.frozen
class FlowStep:
    """One journaled step of a flow: a call (its command), or a value the
    script asked for (``now``, ``random``, a ``sleep``'s wake-up time)."""

    flow_id: str
    step: int
    kind: str
    command_id: str | None
    value: JSON
    created_at: float


@attrs.frozen
class FlowChange:
    """What subscribers receive for every committed flow transition."""

    flow: Flow
    event: Event
