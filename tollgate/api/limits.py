"""Backpressure at the door: a token bucket per client and a bound on starts in flight.

Both refuse at once rather than queue: a request the system cannot take now is answered
429 with a ``Retry-After`` that says when it could be, and the caller (``starter.py load
--via api`` among them) waits that long. Queueing would only move the wait into
timeouts deeper inside.

The limits are per API process: with N processes behind a balancer a client gets N
times its rate. They hold no I/O and take the clock as an argument, so they are tested
without waiting.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; one per request."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._updated = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 if granted, else the seconds until one will be there."""
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


class ClientLimits:
    """One :class:`TokenBucket` per client, made on its first request."""

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst = rate, burst
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def retry_after(self, client: str) -> int | None:
        """None if ``client`` may go ahead (a token is taken), else whole seconds to wait
        (``Retry-After`` is in seconds; rounded up, at least 1)."""
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = TokenBucket(self.rate, self.burst, now)
        wait = bucket.take(now)
        return None if wait == 0 else max(1, math.ceil(wait))


class StartSlots:
    """At most ``limit`` creates in flight; :meth:`try_take` never waits."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.in_flight = 0

    def try_take(self) -> bool:
        """Take a slot if one is free."""
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def give_back(self) -> None:
        """Return a slot taken with :meth:`try_take`."""
        self.in_flight -= 1
