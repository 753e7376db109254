"""The email provider: the message's fallback when no device confirmed it."""

from __future__ import annotations

from tollgate.ids import one_line
from tollgate.providers.client import NonEmptyStr, Provider, ProviderAnswer


class EmailAnswer(ProviderAnswer):
    """What sending must answer: the id of the email handed over."""

    email_id: NonEmptyStr


class EmailProvider(Provider):
    """Calls the email provider with the message's idempotency key."""

    name = "email"

    async def send(
        self, *, to: str, subject: str, body: str, message_id: str, idempotency_key: str
    ) -> EmailAnswer:
        """Send one email; a retry reuses the key, so at most one is sent."""
        return await self._client.call_as(
            EmailAnswer,
            "POST",
            "/email/messages",
            json={
                "to": one_line(to, limit=254),
                # Built from ids in the safe alphabet; flattened anyway, because a header
                # is where a stray newline becomes structure.
                "subject": one_line(subject),
                "body": body,
                "message_id": message_id,
            },
            idempotency_key=idempotency_key,
        )
