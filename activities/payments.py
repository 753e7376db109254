"""Payment activities: charge a customer, refund a charge."""

from __future__ import annotations

from temporalio import activity

from activities import classified
from tollgate.orders.models import ChargeInput, ChargeResult, CompensationResult, RefundInput
from tollgate.providers.payments import PaymentGateway


class PaymentActivities:
    """The gateway's calls as activities; the step's idempotency key goes with each."""

    def __init__(self, gateway: PaymentGateway) -> None:
        self._gateway = gateway

    @activity.defn(name="charge_payment")
    @classified
    async def charge(self, req: ChargeInput) -> ChargeResult:
        """Capture the order total. A retry reuses the key, so the gateway charges once."""
        answer = await self._gateway.charge(
            order_id=req.order_id,
            customer_id=req.customer_id,
            amount_cents=req.amount_cents,
            currency=req.currency,
            idempotency_key=req.idempotency_key,
        )
        return ChargeResult(charge_id=answer.charge_id)

    @activity.defn(name="refund_payment")
    @classified
    async def refund(self, req: RefundInput) -> CompensationResult:
        """Refund whatever the charge with ``charge_idempotency_key`` captured (a void when
        it never happened, so a late charge with that key is refused)."""
        answer = await self._gateway.refund(
            order_id=req.order_id,
            charge_idempotency_key=req.charge_idempotency_key,
            reason=req.reason,
            idempotency_key=req.idempotency_key,
        )
        if answer.status == "voided":
            return CompensationResult(outcome="voided")
        return CompensationResult(outcome="refunded", reference=answer.refund_id)
