"""The push provider (APNs/FCM-like): hand one notification to one device's token."""

from __future__ import annotations

from typing import Any

from tollgate.providers.client import NonEmptyStr, Provider, ProviderAnswer


class PushAnswer(ProviderAnswer):
    """What a push must answer: the id of the notification handed over."""

    push_id: NonEmptyStr


class PushProvider(Provider):
    """Calls the push provider; a token it no longer knows is ``TokenUnregistered``."""

    name = "push"

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
