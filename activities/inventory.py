"""Inventory activities: validate an order against the catalog, reserve and release stock."""

from __future__ import annotations

from typing import Literal, Self

import httpx
from pydantic import model_validator
from temporalio import activity

from activities import classified
from tollgate.breaker import Breakers
from tollgate.models import (
    CompensationResult,
    OrderInput,
    ReleaseInput,
    ReserveInput,
    ReserveResult,
    ValidateResult,
    order_problems,
)
from tollgate.providers import Catalog, NonEmptyStr, ProviderAnswer, ProviderClient


class ReservationAnswer(ProviderAnswer):
    """What a reservation must answer: the id of the reservation."""

    reservation_id: NonEmptyStr


class ReleaseAnswer(ProviderAnswer):
    """What a release must answer: ``released`` with the release's id, or ``voided``."""

    status: Literal["released", "voided"]
    release_id: NonEmptyStr | None = None

    @model_validator(mode="after")
    def _released_has_id(self) -> Self:
        if self.status == "released" and self.release_id is None:
            raise ValueError("a released answer needs a release_id")
        return self


class InventoryActivities:
    """Calls the inventory service. Reservations are all-or-nothing on its side."""

    def __init__(self, http: httpx.AsyncClient, breakers: Breakers | None = None) -> None:
        breaker = breakers.get("inventory") if breakers is not None else None
        self._inventory = ProviderClient(http, "inventory", breaker)
        self._catalog = Catalog(http, breaker)

    @activity.defn(name="validate_order")
    @classified
    async def validate(self, order: OrderInput) -> ValidateResult:
        """Business checks an order must pass before money moves: every problem is listed."""
        unknown = await self._catalog.unknown_skus(i.sku for i in order.items)
        return ValidateResult(
            problems=order_problems(order) + [f"unknown SKU {s}" for s in unknown]
        )

    @activity.defn(name="reserve_inventory")
    @classified
    async def reserve(self, req: ReserveInput) -> ReserveResult:
        """Reserve every item of the order, or none."""
        answer = await self._inventory.call_as(
            ReservationAnswer,
            "POST",
            "/inventory/reservations",
            json={"order_id": req.order_id, "items": [i.model_dump() for i in req.items]},
            idempotency_key=req.idempotency_key,
        )
        return ReserveResult(reservation_id=answer.reservation_id)

    @activity.defn(name="release_inventory")
    @classified
    async def release(self, req: ReleaseInput) -> CompensationResult:
        """Release the reservation made with ``reservation_idempotency_key``, if any."""
        answer = await self._inventory.call_as(
            ReleaseAnswer,
            "POST",
            "/inventory/releases",
            json={
                "order_id": req.order_id,
                "reservation_idempotency_key": req.reservation_idempotency_key,
            },
            idempotency_key=req.idempotency_key,
        )
        if answer.status == "voided":
            return CompensationResult(outcome="voided")
        return CompensationResult(outcome="released", reference=answer.release_id)
