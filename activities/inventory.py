"""Inventory activities: validate an order against the catalog, reserve and release stock."""

from __future__ import annotations

from activities import StepActivities, compensation_result, defn, reaching_the_store
from activities.orders import OrderStoreActivities
from tollgate.orders.models import (
    CompensationResult,
    ReleaseInput,
    ReserveInput,
    ReserveResult,
    ValidateInput,
    ValidateResult,
    order_problems,
)
from tollgate.orders.states import OrderStatus
from tollgate.providers.inventory import Inventory


class InventoryActivities(StepActivities[Inventory]):
    """The inventory service's calls as activities."""

    _rows: OrderStoreActivities

    @defn("validate_order")
    async def validate(self, req: ValidateInput) -> ValidateResult:
        """Business checks an order must pass before money moves: every problem is listed.

        With ``begin``, first record the order and move it to VALIDATING (a checkout's
        first step); a row found cancelled is reported and nothing is checked.
        """
        order = req.order
        with reaching_the_store():
            begun = await self._rows.begin_order(order) if req.begin else None
        if begun is not None and begun.status is not OrderStatus.VALIDATING:
            return ValidateResult(begun=begun)
        unknown = await self._provider.unknown_skus(i.sku for i in order.items)
        return ValidateResult(
            problems=order_problems(order) + [f"unknown SKU {s}" for s in unknown], begun=begun
        )

    @defn("reserve_inventory")
    async def reserve(self, req: ReserveInput) -> ReserveResult:
        """Move the order to RESERVING (when asked), reserve every item or none, then move
        it on to COMPLETED (when asked).

        A retry whose earlier attempt got as far as COMPLETED (its reply was lost) only
        asks the reservation again: the same key answers with the same reservation.
        """
        with reaching_the_store():
            finished = await self._rows.finished_by(req.order_id, req.then)
        moved = finished or await self._move_first(req.order_id, req.move)
        answer = await self._provider.reserve(
            order_id=req.order_id,
            items=[i.model_dump() for i in req.items],
            idempotency_key=req.idempotency_key,
        )
        if req.then is not None and finished is None:
            with reaching_the_store():
                moved = await self._rows.move_after_step(req.order_id, req.then)
        return ReserveResult(reservation_id=answer.reservation_id, moved=moved)

    @defn("release_inventory")
    async def release(self, req: ReleaseInput) -> CompensationResult:
        """Release the reservation made with ``reservation_idempotency_key``, if any."""
        answer = await self._provider.release(
            order_id=req.order_id,
            reservation_idempotency_key=req.reservation_idempotency_key,
            idempotency_key=req.idempotency_key,
        )
        return compensation_result(answer)
