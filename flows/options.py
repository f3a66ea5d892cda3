"""How one call is to be made: the options every way of submitting shares.

``Engine.submit``, ``submit_many``, ``call``, a scripted flow's ``ctx.call``,
a declared flow's stages and the editor bridge's ``command/submit`` all take
the same options. They are one record, checked once where it is made, so
that each way in does not spell (and check) them again, and a wrong value is
refused before anything is stored.

What needs the engine to judge (is the adapter known? is the handler
registered?) is checked by the engine when it makes the command.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

import attrs

from flows.cache import check_option as check_cache_option
from flows.records import storable, storable_int

MAX_TIMEOUT: Final = 30 * 24 * 3600.0  # a month: a person may be the provider
MAX_ATTEMPTS: Final = 100
DEFAULT_MAX_ATTEMPTS: Final = 3
PRIORITY_INTERACTIVE: Final = 10
PRIORITY_BATCH: Final = 0


def check_timeout(timeout: Any) -> None:
    """A timeout is a number of seconds, more than 0 and at most a month."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds, not {timeout!r}")
    if not math.isfinite(timeout) or timeout <= 0 or timeout > MAX_TIMEOUT:
        raise ValueError(
            f"timeout must be more than 0 and at most {MAX_TIMEOUT:.0f} s, not {timeout}"
        )


def _timeout(_: Any, __: Any, timeout: Any) -> None:
    if timeout is not None:
        check_timeout(timeout)


def _max_attempts(_: Any, __: Any, max_attempts: Any) -> None:
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
        raise TypeError(f"max_attempts must be an integer, not {max_attempts!r}")
    if not 1 <= max_attempts <= MAX_ATTEMPTS:
        raise ValueError(f"max_attempts must be from 1 to {MAX_ATTEMPTS}, not {max_attempts}")


def _handler(_: Any, __: Any, handler: Any) -> None:
    if handler is not None and not isinstance(handler, str):
        raise TypeError(f"handler must be a handler's name, not {handler!r}")


def _handler_args(_: Any, __: Any, handler_args: Any) -> None:
    try:
        json.dumps(handler_args)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"handler_args must be JSON: {exc}") from None
    storable(handler_args, "handler_args")


def _priority(_: Any, __: Any, priority: Any) -> None:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an integer, not {priority!r}")
    storable_int(priority, "priority")


def _expires_at(_: Any, __: Any, expires_at: Any) -> None:
    if expires_at is not None and not (
        isinstance(expires_at, int | float)
        and not isinstance(expires_at, bool)
        and math.isfinite(expires_at)
    ):
        raise ValueError(f"expires_at must be epoch seconds, not {expires_at!r}")


def _cache(_: Any, __: Any, cache: Any) -> None:
    check_cache_option(cache)


@attrs.frozen
class CallOptions:
    """The options of a call; every field is checked when the record is made.

    ``timeout``: seconds from each send to its reply (``None``: the adapter's
    own). ``max_attempts``: sends before a retryable error dead-letters it.
    ``handler``/``handler_args``: the reply handler to run, by name, and its
    JSON arguments. ``priority``: higher is sent first. ``expires_at``: epoch
    seconds after which it is dead whatever its state of sending. ``cache``:
    ``True``, ``"always"``, ``False`` or ``None`` (the adapter's setting), see
    flows/cache.py."""

    timeout: float | None = attrs.field(default=None, validator=_timeout)
    max_attempts: int = attrs.field(default=DEFAULT_MAX_ATTEMPTS, validator=_max_attempts)
    handler: str | None = attrs.field(default=None, validator=_handler)
    handler_args: Any = attrs.field(default=None, validator=_handler_args)
    priority: int = attrs.field(default=PRIORITY_BATCH, validator=_priority)
    expires_at: float | None = attrs.field(default=None, validator=_expires_at)
    cache: bool | str | None = attrs.field(default=None, validator=_cache)
