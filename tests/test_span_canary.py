"""No personal data in spans: the twin of ``test_log_canary.py`` for traces.

Orders and messages run with a canary in every personal field (customer, sender,
recipient, address, body, push token), through a decline, a bounce and an unregistered
token, whose provider answers quote what they were sent. Every span the session
exports meanwhile (the services', the worker's activities and workflows, SQL, HTTP, the
sandbox's server spans) goes over OTLP/HTTP to the in-process receiver; the canaries
appear in none of the bytes it received, and in none of the traces it kept.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from tests.conftest import Harness
from tests.tracing_support import Receiver


async def test_canaries_in_personal_fields_reach_no_exported_span(
    h: Harness, otlp: Receiver
) -> None:
    tag = uuid.uuid4().hex[:8]
    canary = {
        "customer": f"CANARYcust{tag}",
        "sender": f"CANARYsndr{tag}",
        "recipient": f"CANARYrcpt{tag}",
        "email": f"canarymail{tag}@example.com",
        "body": f"CANARY body {tag}",
        "token": f"CANARYtoken{tag}",
    }
    first_body = len(otlp.bodies)
    with otlp.capturing():
        # scripted through the sandbox's admin API, whose paths carry them
        await h.sandbox.decline_customer(canary["customer"] + "d")
        await h.sandbox.bounce_address(canary["email"])
        await h.sandbox.unregister_token(canary["token"] + "-gone")
        happy = h.order(customer_id=canary["customer"])
        declined = h.order(customer_id=canary["customer"] + "d")
        for order in (happy, declined):
            await (await h.service.create(order)).result()
        await h.service.cancel(happy.order_id, reason="too late", requested_by="tests")

        await h.messages.register_device(
            device_id=f"sd-{tag}-0",
            user_id=canary["recipient"],
            push_token=canary["token"],
            platform="ios",
        )
        await h.messages.register_device(
            device_id=f"sd-{tag}-1",
            user_id=canary["recipient"],
            push_token=canary["token"] + "-gone",
            platform="android",
        )
        message = h.message(
            canary["recipient"],
            sender_id=canary["sender"],
            recipient_email=canary["email"],
            body=canary["body"],
            deadline=timedelta(milliseconds=500),
            read_window=timedelta(milliseconds=500),
        )
        result = await (await h.messages.send(message)).result()
        await otlp.flush()

    assert result.failure_reason is not None and "EmailBounced" in result.failure_reason
    received = otlp.bodies[first_body:]
    assert received, "spans were exported"
    kept = "".join(
        "\n".join(s.model_dump_json() for s in otlp.spans(t)) for t in otlp.store.trace_ids()
    )
    assert "RunActivity:send_fallback_email" in kept and "RunActivity:charge_payment" in kept
    assert '"error"' in kept, "the failing paths were traced too"
    for field, value in canary.items():
        assert not any(value.encode() in body for body in received), (
            f"the {field} canary was exported in a span"
        )
        assert value not in kept, f"the {field} canary is in a kept trace"
