"""The personal-data canary scenario, shared by the log and the span canary tests.

Orders and messages run with a canary in every personal field (customer, sender,
recipient, address, body, push token), through a decline, a bounce and an unregistered
token, whose provider answers quote what they were sent. The tests then look for the
canaries where they must not be.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from tests.conftest import Harness
from tollgate.messages.models import MessageResult
from tollgate.messages.service import MessageService
from tollgate.orders.service import OrderService


def canaries() -> dict[str, str]:
    """One fresh canary per personal field, each unique to this run."""
    tag = uuid.uuid4().hex[:8]
    return {
        "customer": f"CANARYcust{tag}",
        "sender": f"CANARYsndr{tag}",
        "recipient": f"CANARYrcpt{tag}",
        "email": f"canarymail{tag}@example.com",
        "body": f"CANARY body {tag}",
        "token": f"CANARYtoken{tag}",
    }


async def script_failures(h: Harness, canary: dict[str, str]) -> None:
    """A declined customer, a bouncing address and an unregistered token, scripted
    through the sandbox's admin API (whose paths carry the canaries)."""
    await h.sandbox.decline_customer(canary["customer"] + "d")
    await h.sandbox.bounce_address(canary["email"])
    await h.sandbox.unregister_token(canary["token"] + "-gone")


async def run_lifecycles(
    h: Harness, canary: dict[str, str], orders: OrderService, messages: MessageService
) -> MessageResult:
    """An order that completes (then a refused cancel), one declined, and a message to
    two devices, one of them gone, that falls back to a bouncing email."""
    happy = h.order(customer_id=canary["customer"])
    declined = h.order(customer_id=canary["customer"] + "d")
    for order in (happy, declined):
        await (await orders.create(order)).result()
    await orders.cancel(happy.order_id, reason="too late", requested_by="tests")

    tag = canary["token"].removeprefix("CANARYtoken")
    for n, (token, platform) in enumerate(
        [(canary["token"], "ios"), (canary["token"] + "-gone", "android")]
    ):
        await messages.register_device(
            device_id=f"cd-{tag}-{n}",
            user_id=canary["recipient"],
            push_token=token,
            platform=platform,
        )
    message = h.message(
        canary["recipient"],
        sender_id=canary["sender"],
        recipient_email=canary["email"],
        body=canary["body"],
        deadline=timedelta(milliseconds=500),
        read_window=timedelta(milliseconds=500),
    )
    result = await (await messages.send(message)).result()
    assert result.failure_reason is not None and "EmailBounced" in result.failure_reason
    return result
