"""The response cache: when an identical call may reuse an earlier reply.

A call opts in with ``cache=True`` (per call) or ``cache = true`` on its
adapter in ``dovecote.toml``. Its key is a sha256 of canonical JSON (sorted
keys) of the adapter's kind, base URL and model and the whole request
(messages, system, max_tokens, temperature, response_format, model): two
adapters that reach the same model at the same address share entries, and a
reply of one model or server is never served for another.

A hit is not a shortcut around the command record: it makes a NEW command,
resolved (``pending -> replied``, as a replay from a late reply is) with
the source command's reply, cost 0, the source's id in the journal. A miss
is an ordinary call; its command is entered in the cache as it is
submitted, and is served to later calls once it is ``done``. The store keeps
the entries (table ``cache``), so hits survive a restart.

Sampling with ``temperature > 0`` asks for a different answer each time, so
such a call is not cached unless its caller says ``cache="always"``; an
adapter's ``cache = true`` never overrides that.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Final

from adapters.base import Adapter, AdapterSettings, Request

ALWAYS: Final = "always"


def check_option(value: Any) -> None:
    """``ValueError`` unless ``value`` is a cache option: ``None`` (the
    adapter decides), ``True``, ``False`` or ``"always"``."""
    if not (value is None or isinstance(value, bool) or value == ALWAYS):
        raise ValueError(f'cache must be true, false or "always", not {value!r}')


def wanted(option: Any, settings: AdapterSettings, request: Request) -> bool:
    """Whether a call with this ``cache`` option may be served from, and
    entered in, the cache."""
    if option is None:
        option = settings.cache
    if option is ALWAYS or option == ALWAYS:
        return True
    return bool(option) and not (request.temperature or 0) > 0


def key(adapter: Adapter, request: Request) -> str:
    """The cache key of ``request`` sent to ``adapter``."""
    identity = {
        "kind": getattr(adapter, "KIND", type(adapter).__name__),
        "base_url": getattr(adapter, "base_url", None),
        "model": str(getattr(adapter, "model", None) or getattr(adapter, "model_path", "")),
        "request": request.to_json(),
    }
    text = json.dumps(identity, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
