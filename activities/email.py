"""Email fallback: one email per message, whatever the retries."""

from __future__ import annotations

import httpx
from temporalio import activity

from activities import classified
from tollgate.breaker import Breakers
from tollgate.ids import one_line
from tollgate.message_models import EmailInput, EmailResult
from tollgate.providers import NonEmptyStr, ProviderAnswer, ProviderClient


class EmailAnswer(ProviderAnswer):
    """What sending must answer: the id of the email handed over."""

    email_id: NonEmptyStr


class EmailActivities:
    """Calls the email provider with the message's idempotency key."""

    def __init__(self, http: httpx.AsyncClient, breakers: Breakers | None = None) -> None:
        breaker = breakers.get("email") if breakers is not None else None
        self._email = ProviderClient(http, "email", breaker)

    @activity.defn(name="send_fallback_email")
    @classified
    async def send(self, req: EmailInput) -> EmailResult:
        """Send the message by email; a retry reuses the key, so at most one is sent."""
        answer = await self._email.call_as(
            EmailAnswer,
            "POST",
            "/email/messages",
            json={
                "to": one_line(req.to, limit=254),
                # The subject is built from ids in the safe alphabet; flattened anyway,
                # because a header is where a stray newline becomes structure.
                "subject": one_line(req.subject),
                "body": req.body,
                "message_id": req.message_id,
            },
            idempotency_key=req.idempotency_key,
        )
        return EmailResult(email_id=answer.email_id)
