"""Inventory activities: validate an order against the catalog, reserve and release stock."""

from __future__ import annotations

import asyncio

from temporalio import activity

from activities import StepActivities, compensation_result, defn, reaching_the_store
from activities.orders import OrderStoreActivities
from tollgate.orders.models import (
    CompensationResult,
    OrderInput,
    OrderSnapshot,
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

        With ``begin``, also record the order and move it to VALIDATING (a checkout's
        first step); a row found cancelled is reported, and the catalog's answer dropped.
        """
        order = req.order
        skus = [i.sku for i in order.items]
        if not req.begin:
            return self._problems(order, await self._provider.unknown_skus(skus))
        # Asking the catalog changes nothing, so on a first attempt it need not wait for
        # the move: it runs while the row is recorded and moved (one round trip less of
        # waiting per order), and its answer is dropped if the row was found cancelled
        # or the move failed. A retry, which may be waiting Postgres out, moves first.
        asking = None
        if activity.info().attempt == 1:
            asking = asyncio.ensure_future(self._provider.unknown_skus(skus))
        try:
            with reaching_the_store():
                begun = await self._rows.begin_order(order)
        except BaseException:
            await _drop(asking)
            raise
        if begun.status is not OrderStatus.VALIDATING:
            await _drop(asking)
            return ValidateResult(begun=begun)
        unknown = await (asking if asking is not None else self._provider.unknown_skus(skus))
        return self._problems(order, unknown, begun)

    @staticmethod
    def _problems(
        order: OrderInput, unknown: list[str], begun: OrderSnapshot | None = None
    ) -> ValidateResult:
        problems = order_problems(order) + [f"unknown SKU {s}" for s in unknown]
        return ValidateResult(problems=problems, begun=begun)

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


async def _drop(asking: asyncio.Future[list[str]] | None) -> None:
    """Cancel a catalog question whose answer is no longer wanted, and let it end."""
    if asking is not None:
        asking.cancel()
        await asyncio.gather(asking, return_exceptions=True)
