"""Email fallback: one email per message, whatever the retries."""

from __future__ import annotations

import httpx
from temporalio import activity

from activities import classified
from tollgate.message_models import EmailInput, EmailResult
from tollgate.providers import ProviderClient, require_str


class EmailActivities:
    """Calls the email provider with the message's idempotency key."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._email = ProviderClient(http, "email")

    @activity.defn(name="send_fallback_email")
    @classified
    async def send(self, req: EmailInput) -> EmailResult:
        """Send the message by email; a retry reuses the key, so at most one is sent."""
        _, body = await self._email.call(
            "POST",
            "/email/messages",
            json={
                "to": req.to,
                "subject": req.subject,
                "body": req.body,
                "message_id": req.message_id,
            },
            idempotency_key=req.idempotency_key,
        )
        return EmailResult(email_id=require_str("email", body, "email_id"))
