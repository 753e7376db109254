"""A small client of Tollgate's HTTP API for the demo and ``load --via api``.

It does what a well-behaved caller does: one ``Idempotency-Key`` per request, reused
on every retry; on 429 or 503 it waits ``Retry-After`` and tries again (up to a
deadline), adding a random backoff that doubles with each refusal of the same request,
so a crowd of refused callers does not come back in step (measured: with
``Retry-After`` alone, 300 orders offered at twice the capacity drew 8,000 refusals in
97 s and the API spent its time answering them); receipts are signed with the webhook
secret. Every answer is recorded in
:attr:`ApiCaller.answers` (status counts) so a load run can report refusals.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from typing import Any

import httpx

from tollgate.api.signatures import SIGNATURE_HEADER, sign

#: Answers after which the same request is tried again, once Retry-After has passed.
RETRYABLE = frozenset({429, 503})
#: Largest random backoff added to a Retry-After (seconds): more leaves capacity idle
#: while refused callers sleep.
MAX_BACKOFF = 4.0


class ApiGaveUp(Exception):
    """A request was still refused when its deadline came."""


class ApiCaller:
    """Calls the API at ``base_url`` as the holder of ``key``."""

    def __init__(
        self, base_url: str, key: str | None, *, webhook_secret: str | None = None
    ) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, timeout=60)
        self._key = key
        self._webhook_secret = webhook_secret
        #: Every answer received, by status code (refusals included).
        self.answers: Counter[int] = Counter()
        #: Refusals by problem type slug (``rate-limited``, ``overloaded``, ...).
        self.refusals: Counter[str] = Counter()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    def auth_headers(self, idempotency_key: str | None = None) -> dict[str, str]:
        """The Authorization header, and an Idempotency-Key when one is given."""
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        deadline: float = 60.0,
        content: bytes | None = None,
    ) -> httpx.Response:
        """One request, repeated after ``Retry-After`` while it is refused with 429/503,
        until ``deadline`` seconds have passed (then :class:`ApiGaveUp`)."""
        give_up = time.monotonic() + deadline
        refused = 0
        while True:
            response = await self._http.request(
                method, path, json=body, content=content, headers=headers
            )
            self.answers[response.status_code] += 1
            if response.status_code not in RETRYABLE:
                return response
            slug = str(response.json().get("type", "")).rsplit(":", 1)[-1]
            self.refusals[slug] += 1
            # Never sooner than asked; later by a random share of a doubling backoff.
            refused += 1
            backoff = min(MAX_BACKOFF, 0.5 * 2**refused)
            wait = float(response.headers.get("retry-after", "1")) + random.uniform(0, backoff)
            if time.monotonic() + wait > give_up:
                raise ApiGaveUp(f"{method} {path}: still {response.status_code} ({slug})")
            await asyncio.sleep(wait)

    async def create_order(
        self, body: dict[str, Any], *, wait_charged: bool = False, deadline: float = 60.0
    ) -> httpx.Response:
        """``POST /v1/orders`` with a fresh Idempotency-Key (the same on every retry)."""
        path = "/v1/orders?wait=charged" if wait_charged else "/v1/orders"
        return await self.request(
            "POST", path, body=body, headers=self.auth_headers(uuid.uuid4().hex), deadline=deadline
        )

    async def send_message(self, body: dict[str, Any], *, deadline: float = 60.0) -> httpx.Response:
        """``POST /v1/messages`` with a fresh Idempotency-Key."""
        return await self.request(
            "POST",
            "/v1/messages",
            body=body,
            headers=self.auth_headers(uuid.uuid4().hex),
            deadline=deadline,
        )

    async def get(self, path: str) -> httpx.Response:
        """An authenticated ``GET``."""
        return await self.request("GET", path, headers=self.auth_headers())

    async def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """An authenticated ``POST`` without an Idempotency-Key (cancel, recall, devices)."""
        return await self.request("POST", path, body=body, headers=self.auth_headers())

    async def receipt(self, receipt: dict[str, Any]) -> httpx.Response:
        """``POST /v1/receipts``, signed now with the webhook secret."""
        if self._webhook_secret is None:
            raise ValueError("no webhook secret to sign receipts with")
        raw = json.dumps(receipt).encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self._webhook_secret, raw, int(time.time())),
        }
        return await self.request("POST", "/v1/receipts", content=raw, headers=headers)
