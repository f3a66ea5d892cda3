"""OpenAI Chat Completions, and every server that speaks it.

One dialect serves OpenAI itself and the local servers that copy it (vLLM,
llama.cpp's server, Ollama's ``/v1``, LM Studio) and OpenRouter, so the
adapter asks for nothing beyond the common subset: ``model``, ``messages``,
``max_tokens``, ``temperature``, ``response_format`` and, when streaming,
``stream_options.include_usage`` (servers that do not know it ignore it, and
then the reply simply has no usage).

``base_url`` is the API root *including* the version, as in the OpenAI SDKs:
``https://api.openai.com/v1`` or ``http://127.0.0.1:8080/v1``; requests go to
``{base_url}/chat/completions``. The ``Authorization`` header is sent only
when a key is configured, since local servers need none.

Streams are server-sent events whose ``data`` is a chunk
(``choices[0].delta.content``), then a usage chunk with empty ``choices``, and
finally ``data: [DONE]``; a body that ends before ``[DONE]`` was cut.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import attrs

from adapters._http import (
    MISSING,
    HttpAdapter,
    Malformed,
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
from adapters.base import Reply, Request, Usage

DEFAULT_BASE_URL = "https://api.openai.com/v1"


def parse_usage(value: Any, where: str = "usage") -> Usage | None:
    if value is MISSING or value is None:
        return None
    usage = as_dict(value, where)
    return Usage(
        input_tokens=as_count(member(usage, "prompt_tokens"), f"{where}.prompt_tokens", 0),
        output_tokens=as_count(member(usage, "completion_tokens"), f"{where}.completion_tokens", 0),
    )


def error_message(data: Any) -> str | None:
    """``{"error": {"message": ...}}``; some compatible servers put a bare
    string in ``error`` or use ``detail``/``message`` at the top level."""
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    for key in ("message", "detail"):
        if isinstance(data.get(key), str):
            return str(data[key])
    return None


@attrs.define(eq=False)
class OpenAIAdapter(HttpAdapter):
    """``OpenAIAdapter(settings, *, base_url=DEFAULT_BASE_URL, model=None,
    api_key=None, api_key_env=None, stream=True, client=None)``.

    ``model`` may be left out for single-model servers (llama.cpp) that
    ignore it; a request's own ``model`` wins over it.
    """

    KIND = "openai"

    base_url: str = attrs.field(default=DEFAULT_BASE_URL, kw_only=True, converter=strip_slash)

    def endpoint(self) -> str:
        return f"{self.base_url}/chat/completions"

    def headers(self) -> dict[str, str]:
        headers = {"accept": "text/event-stream" if self.stream else "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    def body(self, request: Request) -> dict[str, Any]:
        body: dict[str, Any] = {}
        model = request.model or self.model
        if model:
            body["model"] = model
        messages = [{"role": "system", "content": request.system}] if request.system else []
        body["messages"] = messages + [m.to_json() for m in request.messages]
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.response_format is not None:
            body["response_format"] = request.response_format
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def error_message(self, data: Any) -> str | None:
        return error_message(data)

    def parse_reply(self, data: Any) -> Reply:
        body = as_dict(data, "the reply body")
        choices = as_list(member(body, "choices"), "choices")
        if not choices:
            raise Malformed("choices is an empty list")
        choice = as_dict(choices[0], "choices[0]")
        message = as_dict(member(choice, "message"), "choices[0].message")
        text = as_str(member(message, "content"), "choices[0].message.content")
        return Reply(text=text, usage=parse_usage(member(body, "usage")), raw=data)

    async def read_stream(self, lines: AsyncIterator[str], progress: ProgressThrottle) -> Reply:
        decoder = SSEDecoder()
        parts: list[str] = []
        usage: Usage | None = None
        raw: dict[str, Any] = {"object": "chat.completion"}
        finish_reason: Any = None
        done = False
        async for line in lines:
            event = decoder.feed(line)
            if event is None:
                continue
            if event.data.strip() == "[DONE]":
                done = True
                break
            chunk = as_dict(parse_json(event.data, "a stream event's data"), "a stream chunk")
            if "error" in chunk:
                error = chunk["error"]
                code = error.get("code") if isinstance(error, dict) else None
                status = code if isinstance(code, int) and not isinstance(code, bool) else None
                raise self.stream_error(error_message(chunk) or str(error), status)
            for key in ("id", "created", "model", "system_fingerprint"):
                if key in chunk and key not in raw:
                    raw[key] = chunk[key]
            if chunk.get("usage") is not None:
                usage = parse_usage(chunk["usage"])
                raw["usage"] = chunk["usage"]
            for index, item in enumerate(as_list(member(chunk, "choices"), "chunk.choices")):
                choice = as_dict(item, f"chunk.choices[{index}]")
                if choice.get("index", 0) != 0:
                    continue
                finish_reason = choice.get("finish_reason") or finish_reason
                delta = as_dict(member(choice, "delta"), "chunk.choices[0].delta")
                content = delta.get("content")
                if content is not None:
                    parts.append(as_str(content, "chunk.choices[0].delta.content"))
                    progress.update("".join(parts))
        if not done:
            raise StreamCut("the body ended before data: [DONE]")
        await drain(lines)
        text = "".join(parts)
        progress.finish(text)
        # Reassembled in the shape of a non-streamed completion, so whoever
        # reads ``raw`` need not care whether the reply was streamed.
        message = {"role": "assistant", "content": text}
        raw["choices"] = [{"index": 0, "message": message, "finish_reason": finish_reason}]
        return Reply(text=text, usage=usage, raw=raw)
