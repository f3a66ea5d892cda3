"""Budgets: a ceiling on what calls may cost, checked before each send.

Two ceilings, in the price's currency: an adapter's ``budget_per_day``
(``dovecote.toml``; the day is UTC) and a flow's ``budget`` (given when it
is started). The dispatcher asks before it sends a command: would the spend
so far (the recorded costs of that adapter's replies today, or of the flow's
commands) plus this command's *estimate* pass the ceiling? If so the command
is not sent: it goes ``pending -> dead`` (event ``refuse``, reason
``budget``), journaled, and a flow waiting on it stalls as for any dead
step. Replaying it asks again: while the budget is still spent it dies
again, with reason ``budget``.

The estimate is what the call could cost at most that can be known before
it is sent: the request's tokens (the rate limiter's estimate) at the input
price, plus its ``max_tokens`` at the output price; a request without
``max_tokens`` counts no output, and an adapter without a price costs 0
(its budget never refuses). Commands in flight have no recorded cost yet:
calls sent together in one dispatcher round count each other's estimates,
but a reply may still take spend past the ceiling by what it cost beyond
its estimate.
"""

from __future__ import annotations

from typing import Final

from adapters.base import Price, Request
from flows.ratelimit import estimate_tokens

DAY: Final = 86400.0


def estimate(request: Request, price: Price | None) -> float:
    """What ``request`` may cost at ``price`` (see the module docstring)."""
    if price is None:
        return 0.0
    output = request.max_tokens or 0
    sent = estimate_tokens(request) - output  # it counts the completion too
    return (sent * price.input + output * price.output) / 1e6


def day_start(now: float) -> float:
    """The start of the UTC day that ``now`` (epoch seconds) is in."""
    return now - now % DAY
