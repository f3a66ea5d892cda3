"""Ollama's native chat API.

``base_url`` is the server root, ``http://127.0.0.1:11434`` by default;
requests go to ``{base_url}/api/chat``. (Ollama's OpenAI-compatible ``/v1`` is
served by ``OpenAIAdapter`` instead; the native API is here because it
reports token counts and takes Ollama's own options.)

Mapping: ``temperature`` and ``max_tokens`` become ``options.temperature``
and ``options.num_predict``; a JSON ``response_format`` becomes ``format``
(``"json"``, or the schema of a ``json_schema`` format, which Ollama accepts
as is). ``stream`` is always sent, because Ollama streams unless told not to.

A stream is NDJSON, not SSE: one JSON object per line, each with a piece of
``message.content``, the last with ``done: true`` and the counts
(``prompt_eval_count``, ``eval_count``). An ``{"error": ...}`` line may end a
stream; it has no status, so it counts as the server's failure (retryable).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import attrs

from adapters._http import (
    HttpAdapter,
    ProgressThrottle,
    StreamCut,
    as_count,
    as_dict,
    as_str,
    drain,
    member,
    parse_json,
    strip_slash,
)
from adapters.base import JSON, PermanentError, Reply, Request, Usage

DEFAULT_BASE_URL = "http://127.0.0.1:11434"


def error_message(data: Any) -> str | None:
    """``{"error": "..."}``."""
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])
    return None


def parse_usage(body: dict[str, Any]) -> Usage:
    # Ollama leaves prompt_eval_count out when the whole prompt came from its cache.
    return Usage(
        input_tokens=as_count(member(body, "prompt_eval_count"), "prompt_eval_count", 0),
        output_tokens=as_count(member(body, "eval_count"), "eval_count", 0),
    )


@attrs.define(eq=False)
class OllamaAdapter(HttpAdapter):
    """``OllamaAdapter(settings, *, model, base_url=DEFAULT_BASE_URL,
    api_key=None, api_key_env=None, stream=True, client=None)``.

    A key is sent as ``Authorization: Bearer`` when configured, for an Ollama
    behind an authenticating proxy; Ollama itself needs none.
    """

    KIND = "ollama"

    base_url: str = attrs.field(default=DEFAULT_BASE_URL, kw_only=True, converter=strip_slash)
    model: str = attrs.field(kw_only=True, validator=attrs.validators.instance_of(str))

    def endpoint(self) -> str:
        return f"{self.base_url}/api/chat"

    def headers(self) -> dict[str, str]:
        headers = {"accept": "application/x-ndjson" if self.stream else "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    def body(self, request: Request) -> dict[str, Any]:
        messages = [{"role": "system", "content": request.system}] if request.system else []
        body: dict[str, Any] = {
            "model": request.model or self.model,
            "messages": messages + [m.to_json() for m in request.messages],
            "stream": self.stream,
        }
        options: dict[str, Any] = {}
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if request.max_tokens is not None:
            options["num_predict"] = request.max_tokens
        if options:
            body["options"] = options
        fmt = self._format(request.response_format)
        if fmt is not None:
            body["format"] = fmt
        return body

    def _format(self, response_format: JSON) -> JSON:
        if response_format is None or response_format == "json":
            return response_format
        if isinstance(response_format, dict):
            kind = response_format.get("type")
            if kind == "text":
                return None
            if kind == "json_object":
                return "json"
            schema = (response_format.get("json_schema") or {}).get("schema")
            if kind == "json_schema" and isinstance(schema, dict):
                return schema
        raise PermanentError(
            f"{self.settings.name}: response_format {response_format!r} has no Ollama "
            'equivalent (expected {"type": "json_object"}, {"type": "json_schema", '
            '"json_schema": {"schema": {...}}} or {"type": "text"})'
        )

    def error_message(self, data: Any) -> str | None:
        return error_message(data)

    def parse_reply(self, data: Any) -> Reply:
        body = as_dict(data, "the reply body")
        message = as_dict(member(body, "message"), "message")
        text = as_str(member(message, "content"), "message.content")
        if body.get("done") is False:
            raise PermanentError(f"{self.settings.name}: malformed reply: done is false")
        return Reply(text=text, usage=parse_usage(body), raw=data)

    async def read_stream(self, lines: AsyncIterator[str], progress: ProgressThrottle) -> Reply:
        parts: list[str] = []
        final: dict[str, Any] | None = None
        async for line in lines:
            if not line.strip():
                continue
            chunk = as_dict(parse_json(line, "a stream line"), "a stream line")
            if "error" in chunk:
                raise self.stream_error(error_message(chunk) or str(chunk["error"]), None)
            message = member(chunk, "message")
            if isinstance(message, dict) and message.get("content"):
                parts.append(as_str(message["content"], "a stream line's message.content"))
                progress.update("".join(parts))
            if chunk.get("done") is True:
                final = chunk
                break
        if final is None:
            raise StreamCut('the body ended before the line with "done": true')
        await drain(lines)
        text = "".join(parts)
        progress.finish(text)
        # The last line with the whole text is what a non-streamed reply would be.
        raw = {**final, "message": {"role": "assistant", "content": text}}
        return Reply(text=text, usage=parse_usage(final), raw=raw)
