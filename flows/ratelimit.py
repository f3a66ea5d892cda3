"""Requests and tokens per minute, per provider, enforced before a send.

A batch replay of 5,000 dead letters must not trip the provider's 429s on
purpose. The dispatcher asks the provider's ``RateLimit`` before claiming a
command; a command it may not send yet stays ``pending`` (no deadline runs)
and the dispatcher is woken when it may.

The algorithm is GCRA (the generic cell rate algorithm, a token bucket kept
as one timestamp per dimension): each request moves a "theoretical arrival
time" forward by ``60 / requests_per_minute`` seconds, each token by
``60 / tokens_per_minute``; a send is admitted while that time is no more
than ``burst`` seconds ahead of now. Sends are therefore spread evenly over
the minute, with at most ``burst`` seconds' worth at once, which is what
providers that enforce per-minute limits at a finer grain expect.

Limits are per engine process: two processes on one file each get the
whole budget. Give each a share in its configuration.
"""

from __future__ import annotations

import math

from adapters.base import Request


def estimate_tokens(request: Request) -> int:
    """A pessimistic token count: about four characters a token for what is
    sent, plus the completion the request allows (providers count it)."""
    chars = sum(len(m.content) for m in request.messages) + len(request.system or "")
    return math.ceil(chars / 4) + (request.max_tokens or 0)


class RateLimit:
    def __init__(
        self,
        requests_per_minute: float | None,
        tokens_per_minute: float | None = None,
        burst: float = 1.0,
    ) -> None:
        self.request_interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self.token_interval = 60.0 / tokens_per_minute if tokens_per_minute else 0.0
        self.burst = burst
        self._requests_at = -math.inf
        self._tokens_at = -math.inf

    def admit(self, now: float, tokens: int) -> float | None:
        """Record one send of ``tokens`` tokens and return ``None`` if it may
        go now; else the time (same clock as ``now``) from which it may."""
        requests_at = max(self._requests_at, now)
        tokens_at = max(self._tokens_at, now)
        wait = max(requests_at - now - self.burst, tokens_at - now - self.burst, 0.0)
        if wait > 0:
            return now + wait
        self._requests_at = requests_at + self.request_interval
        # A request bigger than the burst allowance still goes, alone.
        self._tokens_at = tokens_at + tokens * self.token_interval
        return None
