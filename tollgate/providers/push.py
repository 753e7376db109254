"""The push provider (APNs/FCM-like): hand one notification to one device's token."""

from __future__ import annotations

from typing import Any

import httpx

from tollgate.providers.breaker import Breakers
from tollgate.providers.client import NonEmptyStr, ProviderAnswer, ProviderClient


class PushAnswer(ProviderAnswer):
    """What a push must answer: the id of the notification handed over."""

    push_id: NonEmptyStr


class PushProvider:
    """Calls the push provider; a token it no longer knows is ``TokenUnregistered``."""

    def __init__(self, http: httpx.AsyncClient, breakers: Breakers | None = None) -> None:
        breaker = breakers.get("push") if breakers is not None else None
        self._client = ProviderClient(http, "push", breaker)

    async def push(
        self,
        *,
        token: str,
        message_id: str,
        kind: str,
        payload: dict[str, Any],
        idempotency_key: str,
    ) -> PushAnswer:
        """Hand one notification over; a retry with the key pushes once."""
        return await self._client.call_as(
            PushAnswer,
            "POST",
            "/push/notifications",
            json={"token": token, "message_id": message_id, "kind": kind, "payload": payload},
            idempotency_key=idempotency_key,
        )
