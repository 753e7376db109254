"""Which client a request comes from: its ``Authorization: Bearer <key>``, checked against
the hashes in Postgres (:mod:`tollgate.access`), with a short cache.

The cache holds, per key id, the stored hash and client (or that there is none) for
``API_KEY_CACHE_SECONDS``: a burst of requests costs one query, and a revoked key stops
working within that time. The secret itself is compared on every request, in constant
time, and never kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import asyncpg

from tollgate.access import parse_key, secret_matches, stored_key

#: Cache entries kept at most; past that the oldest half is dropped.
_MAX_ENTRIES = 10_000


class KeyCache:
    """Presented key -> client id, through a short-lived cache of stored hashes."""

    def __init__(
        self, pool: asyncpg.Pool, ttl: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._pool, self._ttl, self._clock = pool, ttl, clock
        self._entries: dict[str, tuple[float, tuple[str, str] | None]] = {}

    async def client_for(self, presented: str) -> str | None:
        """The client of a valid, unrevoked key; None for anything else."""
        parsed = parse_key(presented)
        if parsed is None:
            return None
        key_id, secret = parsed
        now = self._clock()
        cached = self._entries.get(key_id)
        if cached is not None and now - cached[0] < self._ttl:
            found = cached[1]
        else:
            found = await stored_key(self._pool, key_id)
            if len(self._entries) >= _MAX_ENTRIES:
                for old in sorted(self._entries, key=lambda k: self._entries[k][0])[
                    : _MAX_ENTRIES // 2
                ]:
                    del self._entries[old]
            self._entries[key_id] = (now, found)
        if not secret_matches(secret, found[1] if found else None) or found is None:
            return None
        return found[0]
