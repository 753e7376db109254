"""Payment gateway activities: charge a customer, refund a charge."""

from __future__ import annotations

from typing import Literal, Self

import httpx
from pydantic import model_validator
from temporalio import activity

from activities import classified
from tollgate.breaker import Breakers
from tollgate.models import ChargeInput, ChargeResult, CompensationResult, RefundInput
from tollgate.providers import NonEmptyStr, ProviderAnswer, ProviderClient


class ChargeAnswer(ProviderAnswer):
    """What a charge must answer: the id of the captured charge."""

    charge_id: NonEmptyStr


class RefundAnswer(ProviderAnswer):
    """What a refund must answer: ``refunded`` with the refund's id, or ``voided``."""

    status: Literal["refunded", "voided"]
    refund_id: NonEmptyStr | None = None

    @model_validator(mode="after")
    def _refunded_has_id(self) -> Self:
        if self.status == "refunded" and self.refund_id is None:
            raise ValueError("a refunded answer needs a refund_id")
        return self


class PaymentActivities:
    """Calls the payment gateway. Every call carries the step's idempotency key."""

    def __init__(self, http: httpx.AsyncClient, breakers: Breakers | None = None) -> None:
        breaker = breakers.get("payments") if breakers is not None else None
        self._gateway = ProviderClient(http, "payments", breaker)

    @activity.defn(name="charge_payment")
    @classified
    async def charge(self, req: ChargeInput) -> ChargeResult:
        """Capture the order total. A retry reuses the key, so the gateway charges once."""
        answer = await self._gateway.call_as(
            ChargeAnswer,
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
        return ChargeResult(charge_id=answer.charge_id)

    @activity.defn(name="refund_payment")
    @classified
    async def refund(self, req: RefundInput) -> CompensationResult:
        """Refund whatever the charge with ``charge_idempotency_key`` captured.

        Safe to call when the charge never happened or is still in flight: the gateway
        then voids the key, so a late charge with it is refused instead of kept.
        """
        answer = await self._gateway.call_as(
            RefundAnswer,
            "POST",
            "/payments/refunds",
            json={
                "order_id": req.order_id,
                "charge_idempotency_key": req.charge_idempotency_key,
                "reason": req.reason,
            },
            idempotency_key=req.idempotency_key,
        )
        if answer.status == "voided":
            return CompensationResult(outcome="voided")
        return CompensationResult(outcome="refunded", reference=answer.refund_id)
