"""Email fallback: one email per message, whatever the retries."""

from __future__ import annotations

from activities import ProviderActivities, defn
from tollgate.messages.models import EmailInput, EmailResult
from tollgate.providers.email import EmailProvider


class EmailActivities(ProviderActivities[EmailProvider]):
    """The email provider's call as an activity."""

    @defn("send_fallback_email")
    async def send(self, req: EmailInput) -> EmailResult:
        """Send the message by email; a retry reuses the key, so at most one is sent."""
        answer = await self._provider.send(
            to=req.to,
            subject=req.subject,
            body=req.body,
            message_id=req.message_id,
            idempotency_key=req.idempotency_key,
        )
        return EmailResult(email_id=answer.email_id)
