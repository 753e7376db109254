"""Payment gateway activities: charge a customer, refund a charge."""

from __future__ import annotations

import httpx
from temporalio import activity

from activities import classified
from tollgate.models import ChargeInput, ChargeResult, CompensationResult, RefundInput
from tollgate.providers import ProviderClient, require_str


class PaymentActivities:
    """Calls the payment gateway. Every call carries the step's idempotency key."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._gateway = ProviderClient(http, "payments")

    @activity.defn(name="charge_payment")
    @classified
    async def charge(self, req: ChargeInput) -> ChargeResult:
        """Capture the order total. A retry reuses the key, so the gateway charges once."""
        _, body = await self._gateway.call(
            "POST",
            "/payments/charges",
            json={
                "order_id": req.order_id,
                "customer_id": req.customer_id,
                "amount_cents": req.amount_cents,
                "currency": req.currency,
            },
            idempotency_key=req.idempotency_key,
        )
        return ChargeResult(charge_id=require_str("payments", body, "charge_id"))

    @activity.defn(name="refund_payment")
    @classified
    async def refund(self, req: RefundInput) -> CompensationResult:
        """Refund whatever the charge with ``charge_idempotency_key`` captured.

        Safe to call when the charge never happened or is still in flight: the gateway
        then voids the key, so a late charge with it is refused instead of kept.
        """
        _, body = await self._gateway.call(
            "POST",
            "/payments/refunds",
            json={
                "order_id": req.order_id,
                "charge_idempotency_key": req.charge_idempotency_key,
                "reason": req.reason,
            },
            idempotency_key=req.idempotency_key,
        )
        if require_str("payments", body, "status") == "voided":
            return CompensationResult(outcome="voided")
        return CompensationResult(
            outcome="refunded", reference=require_str("payments", body, "refund_id")
        )
