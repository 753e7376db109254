"""Inventory activities: validate an order against the catalog, reserve and release stock."""

from __future__ import annotations

from activities import ProviderActivities, compensation_result, defn
from tollgate.orders.models import (
    CompensationResult,
    OrderInput,
    ReleaseInput,
    ReserveInput,
    ReserveResult,
    ValidateResult,
    order_problems,
)
from tollgate.providers.inventory import Inventory


class InventoryActivities(ProviderActivities[Inventory]):
    """The inventory service's calls as activities."""

    @defn("validate_order")
    async def validate(self, order: OrderInput) -> ValidateResult:
        """Business checks an order must pass before money moves: every problem is listed."""
        unknown = await self._provider.unknown_skus(i.sku for i in order.items)
        return ValidateResult(
            problems=order_problems(order) + [f"unknown SKU {s}" for s in unknown]
        )

    @defn("reserve_inventory")
    async def reserve(self, req: ReserveInput) -> ReserveResult:
        """Reserve every item of the order, or none."""
        answer = await self._provider.reserve(
            order_id=req.order_id,
            items=[i.model_dump() for i in req.items],
            idempotency_key=req.idempotency_key,
        )
        return ReserveResult(reservation_id=answer.reservation_id)

    @defn("release_inventory")
    async def release(self, req: ReleaseInput) -> CompensationResult:
        """Release the reservation made with ``reservation_idempotency_key``, if any."""
        answer = await self._provider.release(
            order_id=req.order_id,
            reservation_idempotency_key=req.reservation_idempotency_key,
            idempotency_key=req.idempotency_key,
        )
        return compensation_result(answer)
