"""Made-up message recipients: a user's phones, and a message to that user.

The demo, the chaos suite and the tests invent users on the fly. They name devices,
push tokens and addresses one way, here, so that a ledger, a log or a failing assertion
reads the same whichever of them made the user.
"""

from __future__ import annotations

from tollgate.messages.models import MessageInput
from tollgate.messages.service import MessageService, build_message


async def register_phones(service: MessageService, user: str, count: int) -> list[str]:
    """Register ``count`` iOS devices of ``user``: ``<user>-d<n>``, with the push token
    ``tok-<user>-<n>``. Their ids, in that order."""
    ids = []
    for n in range(count):
        device = await service.register_device(
            device_id=f"{user}-d{n}", user_id=user, push_token=f"tok-{user}-{n}", platform="ios"
        )
        ids.append(device.id)
    return ids


def message_to(user: str, **fields: object) -> MessageInput:
    """A valid message to ``user``, whose address is ``<user>@example.com`` unless
    ``fields`` give another; ``fields`` give the rest (id, sender, body, timings) as
    :func:`build_message` takes them."""
    return build_message(
        **{"recipient_id": user, "recipient_email": f"{user}@example.com", **fields}
    )
