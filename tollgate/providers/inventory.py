"""The inventory service: what it sells, and stock held for orders."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from tollgate.errors import UnknownSku
from tollgate.providers.client import NonEmptyStr, Provider, ProviderAnswer, UndoAnswer


class ReservationAnswer(ProviderAnswer):
    """What a reservation must answer: the id of the reservation."""

    reservation_id: NonEmptyStr


class ReleaseAnswer(UndoAnswer):
    """What a release must answer: ``released`` with the release's id, or ``voided``."""

    done = "released"
    id_field = "release_id"

    status: Literal["released", "voided"]
    release_id: NonEmptyStr | None = None


class Inventory(Provider):
    """Calls the inventory service. Reservations are all-or-nothing on its side."""

    name = "inventory"

    async def unknown_skus(self, skus: Iterable[str]) -> list[str]:
        """The SKUs the inventory does not know, in the order given."""
        unknown: list[str] = []
        for sku in skus:
            try:
                await self._client.call("GET", f"/inventory/skus/{sku}")
            except UnknownSku:
                unknown.append(sku)
        return unknown

    async def reserve(
        self, *, order_id: str, items: list[dict[str, Any]], idempotency_key: str
    ) -> ReservationAnswer:
        """Reserve every item, or none."""
        return await self._client.call_as(
            ReservationAnswer,
            "POST",
            "/inventory/reservations",
            json={"order_id": order_id, "items": items},
            idempotency_key=idempotency_key,
        )

    async def release(
        self, *, order_id: str, reservation_idempotency_key: str, idempotency_key: str
    ) -> ReleaseAnswer:
        """Release the reservation made with ``reservation_idempotency_key``, if any."""
        return await self._client.call_as(
            ReleaseAnswer,
            "POST",
            "/inventory/releases",
            json={
                "order_id": order_id,
                "reservation_idempotency_key": reservation_idempotency_key,
            },
            idempotency_key=idempotency_key,
        )
