"""dovecote: a flow engine for LLM calls that editors and scripts can trust.

Every call to a model is a ``Command`` in one pending table (a SQLite file);
an ``Engine`` sends it, matches the reply by id, dead-letters it when its
deadline passes and replays it when asked::

    async with flows.open_engine("dovecote.db") as engine:
        reply = await engine.call(adapter="scripted",
                                  request={"messages": [{"role": "user", "content": "Teh end"}]})
"""

from adapters.base import Message, Reply, Request, Usage
from flows import builtin as _builtin  # noqa: F401  (registers the built-in flows)
from flows.declared import DeclaredFlow, Stage, declare
from flows.engine import Engine, Progress, Subscription, open_engine
from flows.errors import (
    CommandFailed,
    IllegalTransition,
    SchemaTooNew,
    StoreError,
    UnknownCommand,
)
from flows.handlers import handler
from flows.options import CallOptions
from flows.records import (
    Command,
    CommandError,
    Delivery,
    Event,
    Flow,
    FlowChange,
    FlowStep,
    LateReply,
    StateChange,
)
from flows.runtime import FlowContext, FlowFailed, UnknownFlow, flow
from flows.store import Store

__all__ = [
    "CallOptions",
    "Command",
    "CommandError",
    "CommandFailed",
    "DeclaredFlow",
    "Delivery",
    "Engine",
    "Event",
    "Flow",
    "FlowChange",
    "FlowContext",
    "FlowFailed",
    "FlowStep",
    "IllegalTransition",
    "LateReply",
    "Message",
    "Progress",
    "Reply",
    "Request",
    "SchemaTooNew",
    "Stage",
    "StateChange",
    "Store",
    "StoreError",
    "Subscription",
    "UnknownCommand",
    "UnknownFlow",
    "Usage",
    "declare",
    "flow",
    "handler",
    "open_engine",
]
