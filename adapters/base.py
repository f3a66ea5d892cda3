"""The adapter protocol: how the engine talks to one LLM provider.

An adapter is a *transport*, in httpx's sense: it turns one provider-neutral
``Request`` into one ``Reply`` and knows nothing of commands, retries, timers
or the store. Everything that makes a call trustworthy (deadlines, retries,
dead letters, replay) lives in the engine, so that every provider gets it the
same way. An adapter's whole job is:

* map the ``Request`` to the provider's wire format and the answer back to a
  ``Reply``;
* say what went wrong in the two words the engine understands:
  ``RetryableError`` (try again later, maybe after ``retry_after`` seconds) or
  ``PermanentError`` (sending it again will not help);
* report streamed partial text through ``SendContext.report_progress``.

Cancellation is the engine's: when a deadline passes it cancels the task that
awaits ``send``, and a well-behaved adapter lets that cancellation through.

An adapter that can serve many requests from one task (a model in this
process, a local server taking a batch, the scripted adapter) may also offer
``send_many`` (``BatchAdapter``): the engine then hands it each claimed batch
in one call instead of one task per request, which is most of what a request
in flight costs. Each answer is given back by index as soon as it is known;
the engine cancels the call when no request in it waits any more.

This module imports nothing from ``flows`` or ``editor_bridge``: a provider
knows no engine.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import attrs

ROLES = ("system", "user", "assistant")

JSON = Any
"""A value that ``json.dumps`` accepts. Kept as ``Any`` on purpose: JSON is
the one shape we cannot make narrower without lying to the type checker."""


def _to_messages(value: Sequence[Message | Mapping[str, Any]]) -> tuple[Message, ...]:
    return tuple(m if isinstance(m, Message) else Message.from_json(m) for m in value)


def _check_role(instance: Message, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in ROLES:
        raise ValueError(f"message role must be one of {', '.join(ROLES)}, not {value!r}")


def _check_messages(
    instance: Request, attribute: attrs.Attribute[tuple[Message, ...]], value: tuple[Message, ...]
) -> None:
    if not value:
        raise ValueError("a request needs at least one message")


def positive_int(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """attrs validator: an integer above 0 (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{attribute.name} must be a positive integer, not {value!r}")


def _optional_positive_int(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        positive_int(instance, attribute, value)


def _optional_temperature(instance: Request, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= 2
    ):
        raise ValueError(f"temperature must be a number from 0 to 2, not {value!r}")


@attrs.frozen
class Message:
    role: str = attrs.field(validator=[attrs.validators.instance_of(str), _check_role])
    content: str = attrs.field(validator=attrs.validators.instance_of(str))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Message:
        if not isinstance(data, Mapping):
            raise ValueError(f"a message must be an object with role and content, not {data!r}")
        unknown = set(data) - {"role", "content"}
        if unknown:
            raise ValueError(f"unknown message field(s): {', '.join(sorted(unknown))}")
        if "role" not in data or "content" not in data:
            raise ValueError("a message needs both role and content")
        return cls(role=data["role"], content=data["content"])

    def to_json(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@attrs.frozen
class Request:
    """What to ask a model, in no provider's dialect.

    ``system`` is the instruction; ``messages`` the conversation, the last one
    usually from the user. ``model`` overrides the adapter's configured model
    for this one call; ``response_format`` is passed through to providers that
    understand it (e.g. ``{"type": "json_object"}``).
    """

    messages: tuple[Message, ...] = attrs.field(converter=_to_messages, validator=_check_messages)
    system: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(str))
    )
    max_tokens: int | None = attrs.field(default=None, validator=_optional_positive_int)
    temperature: float | None = attrs.field(default=None, validator=_optional_temperature)
    response_format: JSON = None
    model: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(str))
    )

    FIELDS = ("messages", "system", "max_tokens", "temperature", "response_format", "model")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Request:
        """Validate a JSON request (snake_case keys) at the boundary."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a request must be an object, not {type(data).__name__}")
        unknown = set(data) - set(cls.FIELDS)
        if unknown:
            raise ValueError(
                f"unknown request field(s): {', '.join(sorted(unknown))} "
                f"(expected {', '.join(cls.FIELDS)})"
            )
        messages = data.get("messages")
        if not isinstance(messages, list | tuple):
            raise ValueError("request.messages must be a list of {role, content} objects")
        return cls(**{k: v for k, v in data.items() if k != "messages"}, messages=messages)

    def to_json(self) -> dict[str, JSON]:
        data: dict[str, JSON] = {"messages": [m.to_json() for m in self.messages]}
        for name in ("system", "max_tokens", "temperature", "response_format", "model"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        return data

    @property
    def last_user_text(self) -> str:
        """The text of the last user message ('' when there is none)."""
        for message in reversed(self.messages):
            if message.role == "user":
                return message.content
        return ""


@attrs.frozen
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0

    def to_json(self) -> dict[str, int]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Usage | None:
        if data is None:
            return None
        return cls(int(data.get("input_tokens", 0)), int(data.get("output_tokens", 0)))


@attrs.frozen
class Reply:
    """A model's answer: its text, what it cost in tokens, and the provider's
    own body (``raw``) for whoever needs more than the text."""

    text: str = attrs.field(validator=attrs.validators.instance_of(str))
    usage: Usage | None = None
    raw: JSON = None

    def to_json(self) -> dict[str, JSON]:
        return {
            "text": self.text,
            "usage": self.usage.to_json() if self.usage else None,
            "raw": self.raw,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Reply:
        if not isinstance(data, Mapping) or not isinstance(data.get("text"), str):
            raise ValueError("a reply must be an object with a string 'text'")
        return cls(text=data["text"], usage=Usage.from_json(data.get("usage")), raw=data.get("raw"))


@attrs.frozen
class Price:
    """US dollars per million tokens."""

    input: float = 0.0
    output: float = 0.0

    def cost(self, usage: Usage) -> float:
        return (usage.input_tokens * self.input + usage.output_tokens * self.output) / 1e6


@attrs.frozen
class AdapterSettings:
    """What the engine needs to know about a provider to schedule its calls.

    ``on_interrupt`` says what recovery does with a call that was in flight
    when its engine died: ``"retry"`` sends it again (if attempts are left),
    ``"dead"`` dead-letters it with reason ``interrupted`` for a person to
    decide, for providers where a repeated call would cost or act twice.

    ``cache`` reuses the replies of identical calls for ``cache_ttl``
    seconds (flows.cache); ``budget_per_day`` bounds what its calls may cost
    in a UTC day, in the price's currency (flows.budget).
    """

    name: str
    max_in_flight: int = 16
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    price: Price | None = None
    timeout: float = 60.0
    on_interrupt: Literal["retry", "dead"] = "retry"
    cache: bool = False
    cache_ttl: float = 7 * 86400.0
    budget_per_day: float | None = None


@attrs.frozen
class SendContext:
    """What an adapter may know about the command it serves.

    ``deadline`` is the wall-clock time (epoch seconds) after which the engine
    will cancel the send: an adapter sets its HTTP timeouts below it.
    ``report_progress`` takes the whole text so far of a streamed reply.
    """

    command_id: str
    attempt: int
    deadline: float
    report_progress: Callable[[str], None] = lambda text: None


class Adapter(Protocol):
    settings: AdapterSettings

    async def send(self, request: Request, context: SendContext) -> Reply: ...

    async def aclose(self) -> None: ...


Answer = Callable[[int, "Reply | Exception"], None]
"""How ``send_many`` gives back the answer to its ``index``-th request: the
``Reply``, or the exception ``send`` would have raised."""


class BatchAdapter(Adapter, Protocol):
    async def send_many(self, sends: Sequence[tuple[Request, SendContext]], answer: Answer) -> None:
        """Send every request of ``sends`` and call ``answer(index, reply or
        error)`` once for each, from this task, as each is known (an answer
        for an index already answered is ignored). The engine cancels the
        call once no request in it waits (each answered, timed out or
        cancelled) and when it closes; a request left unanswered when the
        call returns fails, with the exception it raised if it raised one.
        A subclass that overrides ``send`` and not ``send_many`` is sent
        through its ``send`` (flows.sending.batch_sender)."""
        ...


class AdapterError(Exception):
    """A send that failed. ``status`` is the HTTP status (or what it would be)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class RetryableError(AdapterError):
    """Sending again later may succeed: connection errors, 408, 409, 429, 5xx."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class PermanentError(AdapterError):
    """Sending the same request again will fail the same way: other 4xx, bad replies."""


RETRYABLE_STATUSES = frozenset({408, 409, 429})


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUSES or 500 <= status <= 599


def error_for_status(
    status: int, message: str, *, retry_after: float | None = None
) -> RetryableError | PermanentError:
    """The error an HTTP ``status`` means, classified once for every adapter."""
    if is_retryable_status(status):
        return RetryableError(message, status=status, retry_after=retry_after)
    return PermanentError(message, status=status)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP
    date (RFC 9110 §10.2.3). ``None`` when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        return max(0.0, when.timestamp() - now)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds
