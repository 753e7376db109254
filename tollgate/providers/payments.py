"""The payment gateway: capture an order's total, refund a capture."""

from __future__ import annotations

from typing import Literal

from tollgate.providers.client import NonEmptyStr, Provider, ProviderAnswer, UndoAnswer


class ChargeAnswer(ProviderAnswer):
    """What a charge must answer: the id of the captured charge."""

    charge_id: NonEmptyStr


class RefundAnswer(UndoAnswer):
    """What a refund must answer: ``refunded`` with the refund's id, or ``voided``."""

    done = "refunded"
    id_field = "refund_id"

    status: Literal["refunded", "voided"]
    refund_id: NonEmptyStr | None = None


class PaymentGateway(Provider):
    """Calls the gateway; every call carries the step's idempotency key."""

    name = "payments"

    async def charge(
        self,
        *,
        order_id: str,
        customer_id: str,
        amount_cents: int,
        currency: str,
        idempotency_key: str,
    ) -> ChargeAnswer:
        """Capture the total. A retry reuses the key, so the gateway charges once."""
        return await self._client.call_as(
            ChargeAnswer,
            "POST",
            "/payments/charges",
            json={
                "order_id": order_id,
                "customer_id": customer_id,
                "amount_cents": amount_cents,
                "currency": currency,
            },
            idempotency_key=idempotency_key,
        )

    async def refund(
        self, *, order_id: str, charge_idempotency_key: str, reason: str, idempotency_key: str
    ) -> RefundAnswer:
        """Refund whatever the charge with ``charge_idempotency_key`` captured.

        Safe when the charge never happened or is still in flight: the gateway then
        voids the key, so a late charge with it is refused instead of kept.
        """
        return await self._client.call_as(
            RefundAnswer,
            "POST",
            "/payments/refunds",
            json={
                "order_id": order_id,
                "charge_idempotency_key": charge_idempotency_key,
                "reason": reason,
            },
            idempotency_key=idempotency_key,
        )
