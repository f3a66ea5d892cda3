"""Providers: one module per LLM provider, each a narrow transport behind
``adapters.base.Adapter``. This package imports nothing of the engine."""

from adapters.base import (
    Adapter,
    AdapterError,
    AdapterSettings,
    Message,
    PermanentError,
    Price,
    Reply,
    Request,
    RetryableError,
    SendContext,
    Usage,
)

__all__ = [
    "Adapter",
    "AdapterError",
    "AdapterSettings",
    "Message",
    "PermanentError",
    "Price",
    "Reply",
    "Request",
    "RetryableError",
    "SendContext",
    "Usage",
]
