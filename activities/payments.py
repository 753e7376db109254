"""Payment activities: charge a customer, refund a charge."""

from __future__ import annotations

from activities import StepActivities, compensation_result, defn
from tollgate.orders.models import ChargeInput, ChargeResult, CompensationResult, RefundInput
from tollgate.providers.payments import PaymentGateway


class PaymentActivities(StepActivities[PaymentGateway]):
    """The gateway's calls as activities; the step's idempotency key goes with each."""

    @defn("charge_payment")
    async def charge(self, req: ChargeInput) -> ChargeResult:
        """Move the order to CHARGING (when asked), then capture the order total. A retry
        reuses the key, so the gateway charges once."""
        moved = await self._move_first(req.order_id, req.move)
        answer = await self._provider.charge(
            order_id=req.order_id,
            customer_id=req.customer_id,
            amount_cents=req.amount_cents,
            currency=req.currency,
            idempotency_key=req.idempotency_key,
        )
        return ChargeResult(charge_id=answer.charge_id, moved=moved)

    @defn("refund_payment")
    async def refund(self, req: RefundInput) -> CompensationResult:
        """Refund whatever the charge with ``charge_idempotency_key`` captured (a void when
        it never happened, so a late charge with that key is refused)."""
        answer = await self._provider.refund(
            order_id=req.order_id,
            charge_idempotency_key=req.charge_idempotency_key,
            reason=req.reason,
            idempotency_key=req.idempotency_key,
        )
        return compensation_result(answer)
