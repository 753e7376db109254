"""No personal data in spans: the twin of ``test_log_canary.py`` for traces.

Orders and messages run with a canary in every personal field (customer, sender,
recipient, address, body, push token), through a decline, a bounce and an unregistered
token, whose provider answers quote what they were sent. Every span the session
exports meanwhile (the services', the worker's activities and workflows, SQL, HTTP, the
sandbox's server spans) goes over OTLP/HTTP to the in-process receiver; the canaries
appear in none of the bytes it received, and in none of the traces it kept.
"""

from __future__ import annotations

from tests.canaries import canaries, run_lifecycles, script_failures
from tests.conftest import Harness
from tests.tracing_support import Receiver


async def test_canaries_in_personal_fields_reach_no_exported_span(
    h: Harness, otlp: Receiver
) -> None:
    canary = canaries()
    first_body = len(otlp.bodies)
    with otlp.capturing():
        await script_failures(h, canary)
        await run_lifecycles(h, canary, h.service, h.messages)
        await otlp.flush()

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
