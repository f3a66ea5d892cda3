"""Anthropic's Messages API.

``base_url`` is the host root *without* the version, as in Anthropic's own
SDKs: ``https://api.anthropic.com`` (the default); requests go to
``{base_url}/v1/messages``. A proxy that mounts the API under a path is
written with that path (``https://proxy.example/anthropic``).

Differences from the provider-neutral ``Request`` that the mapping absorbs:

* ``system`` is a top-level field, not a message; ``system``-role messages in
  the conversation are folded into it (after ``Request.system``), since the
  API accepts only ``user`` and ``assistant`` turns;
* ``max_tokens`` is required by the API, so a request without one gets the
  adapter's ``default_max_tokens``;
* ``response_format`` has no counterpart, except a ``json_schema`` one (a
  typed call's): that becomes the one tool the model must call
  (``tool_choice``), its input schema the schema, and the reply's text is the
  tool input as JSON. Any other format is not sent.

Streams are server-sent events: ``message_start`` (input usage),
``content_block_delta`` with ``text_delta`` pieces, ``message_delta``
(cumulative output usage), then ``message_stop``; an ``error`` event may come
instead, and is classified like the HTTP status its type stands for.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import attrs

from adapters._http import (
    MISSING,
    HttpAdapter,
    ProgressThrottle,
    SSEDecoder,
    StreamCut,
    as_count,
    as_dict,
    as_list,
    as_str,
    drain,
    member,
    parse_json,
    strip_slash,
)
from adapters.base import PermanentError, Reply, Request, Usage, positive_int

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024

ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
"""The status each documented error type is sent with. An unknown type in a
stream counts as a server error: the request itself was accepted."""


def error_message(data: Any) -> str | None:
    """``{"type": "error", "error": {"type": ..., "message": ...}}``."""
    if not isinstance(data, dict) or not isinstance(data.get("error"), dict):
        return None
    error = data["error"]
    message = error.get("message")
    kind = error.get("type")
    if isinstance(message, str) and isinstance(kind, str):
        return f"{kind}: {message}"
    return message if isinstance(message, str) else None


def parse_usage(value: Any, where: str = "usage") -> Usage:
    usage = as_dict(value, where)
    return Usage(
        input_tokens=as_count(member(usage, "input_tokens"), f"{where}.input_tokens"),
        output_tokens=as_count(member(usage, "output_tokens"), f"{where}.output_tokens"),
    )


def _merge(usage: dict[str, Any], update: dict[str, Any]) -> None:
    usage.update((key, value) for key, value in update.items() if value is not None)


def _schema_tool(response_format: Any) -> dict[str, Any] | None:
    """The tool a ``json_schema`` response format stands for, else None."""
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise PermanentError('a json_schema response_format needs {"json_schema": {"schema": ...}}')
    return {
        "name": str(spec.get("name") or "result"),
        "description": "Reply by calling this tool with the answer as its input.",
        "input_schema": spec["schema"],
    }


@attrs.define(eq=False)
class AnthropicAdapter(HttpAdapter):
    """``AnthropicAdapter(settings, *, model, base_url=DEFAULT_BASE_URL,
    api_key=None, api_key_env=None, stream=True, default_max_tokens=1024,
    client=None)``."""

    KIND = "anthropic"

    base_url: str = attrs.field(default=DEFAULT_BASE_URL, kw_only=True, converter=strip_slash)
    model: str = attrs.field(kw_only=True, validator=attrs.validators.instance_of(str))
    default_max_tokens: int = attrs.field(
        default=DEFAULT_MAX_TOKENS, kw_only=True, validator=positive_int
    )

    def endpoint(self) -> str:
        return f"{self.base_url}/v1/messages"

    def headers(self) -> dict[str, str]:
        headers = {
            "anthropic-version": API_VERSION,
            "accept": "text/event-stream" if self.stream else "application/json",
        }
        if self.api_key:
            headers["x-api-key"] = self.api_key
        return headers

    def body(self, request: Request) -> dict[str, Any]:
        systems = [request.system] if request.system else []
        messages = []
        for message in request.messages:
            if message.role == "system":
                systems.append(message.content)
            else:
                messages.append(message.to_json())
        if not messages:
            raise PermanentError(
                f"{self.settings.name}: the Messages API needs at least one user or "
                "assistant message, and this request has only system text"
            )
        body: dict[str, Any] = {
            "model": request.model or self.model,
            "max_tokens": request.max_tokens or self.default_max_tokens,
            "messages": messages,
        }
        if systems:
            body["system"] = "\n\n".join(systems)
        if request.temperature is not None:
            body["temperature"] = request.temperature
        tool = _schema_tool(request.response_format)
        if tool is not None:
            body["tools"] = [tool]
            body["tool_choice"] = {"type": "tool", "name": tool["name"]}
        if self.stream:
            body["stream"] = True
        return body

    def error_message(self, data: Any) -> str | None:
        return error_message(data)

    def parse_reply(self, data: Any) -> Reply:
        body = as_dict(data, "the reply body")
        content = as_list(member(body, "content"), "content")
        texts = []
        for index, item in enumerate(content):
            block = as_dict(item, f"content[{index}]")
            if member(block, "type") == "text":
                texts.append(as_str(member(block, "text"), f"content[{index}].text"))
            elif member(block, "type") == "tool_use":
                texts.append(json.dumps(member(block, "input"), ensure_ascii=False))
        return Reply(text="".join(texts), usage=parse_usage(member(body, "usage")), raw=data)

    async def read_stream(self, lines: AsyncIterator[str], progress: ProgressThrottle) -> Reply:
        decoder = SSEDecoder()
        parts: list[str] = []
        message: dict[str, Any] = {}
        usage: dict[str, Any] = {}
        stop: dict[str, Any] = {}
        done = False
        async for line in lines:
            event = decoder.feed(line)
            if event is None:
                continue
            data = as_dict(parse_json(event.data, f"a {event.event} event's data"), event.event)
            kind = data.get("type", event.event)
            if kind == "message_start":
                message = as_dict(member(data, "message"), "message_start.message")
                _merge(usage, as_dict(member(message, "usage"), "message_start.message.usage"))
            elif kind == "content_block_start":
                block = as_dict(member(data, "content_block"), "content_block_start.content_block")
                if block.get("type") == "text" and block.get("text"):
                    parts.append(as_str(block["text"], "content_block_start.content_block.text"))
                    progress.update("".join(parts))
            elif kind == "content_block_delta":
                delta = as_dict(member(data, "delta"), "content_block_delta.delta")
                if delta.get("type") == "text_delta":
                    parts.append(as_str(member(delta, "text"), "content_block_delta.delta.text"))
                    progress.update("".join(parts))
                elif delta.get("type") == "input_json_delta":
                    piece = member(delta, "partial_json")
                    parts.append(as_str(piece, "content_block_delta.delta.partial_json"))
                    progress.update("".join(parts))
            elif kind == "message_delta":
                # Counts here are cumulative: they replace, not add to, the earlier ones.
                if member(data, "usage") is not MISSING:
                    _merge(usage, as_dict(data["usage"], "message_delta.usage"))
                if isinstance(data.get("delta"), dict):
                    stop.update(data["delta"])
            elif kind == "message_stop":
                done = True
                break
            elif kind == "error":
                error = as_dict(member(data, "error"), "error event's error")
                status = ERROR_STATUS.get(str(error.get("type")), 500)
                raise self.stream_error(error_message(data) or str(error), status)
        if not done:
            raise StreamCut("the body ended before the message_stop event")
        await drain(lines)
        text = "".join(parts)
        progress.finish(text)
        counts = parse_usage(usage, "the stream's usage") if usage else None
        # Reassembled in the shape of a non-streamed message for ``raw``.
        raw = {**message, **stop, "content": [{"type": "text", "text": text}], "usage": usage}
        return Reply(text=text, usage=counts, raw=raw)
