"""Backpressure at the door: a token bucket per client, a bound on starts in flight, and
a bound on lifecycles under way (the backlog the workers have yet to work off).

Both refuse at once rather than queue: a request the system cannot take now is answered
429 with a ``Retry-After`` that says when it could be, and the caller (``starter.py load
--via api`` among them) waits that long. Queueing would only move the wait into
timeouts deeper inside.

The limits are per API process: with N processes behind a balancer a client gets N
times its rate. They hold no I/O and take the clock as an argument, so they are tested
without waiting (the backlog's count is a function passed in).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable


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


class Backlog:
    """Lifecycles under way per kind, counted by ``count`` (a query) at most every
    ``refresh`` seconds, plus the ones this process started since: is a kind full?

    The count comes from Postgres, so the bound holds for all API processes together;
    between refreshes a process adds its own starts, so a burst cannot overshoot it.
    """

    def __init__(
        self,
        limit: int,
        count: Callable[[], Awaitable[dict[str, int]]],
        *,
        refresh: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self._count, self._refresh, self._clock = count, refresh, clock
        self._counts: dict[str, int] = {}
        self._since: dict[str, int] = {}
        self._at = -math.inf
        self._lock = asyncio.Lock()

    async def open(self, kind: str) -> int:
        """Lifecycles of ``kind`` under way, as far as this process knows."""
        if self._clock() - self._at >= self._refresh:
            async with self._lock:  # one query for a crowd of requests
                if self._clock() - self._at >= self._refresh:
                    self._counts = await self._count()
                    self._since = {}
                    self._at = self._clock()
        return self._counts.get(kind, 0) + self._since.get(kind, 0)

    async def full(self, kind: str) -> bool:
        """Whether ``kind`` is at the limit."""
        return await self.open(kind) >= self.limit

    def started(self, kind: str) -> None:
        """Count a start of ``kind`` until the next refresh sees it."""
        self._since[kind] = self._since.get(kind, 0) + 1
