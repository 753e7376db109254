"""The inventory service: what it sells, and stock held for orders."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Literal

from tollgate.errors import UnknownSku
from tollgate.providers.client import NonEmptyStr, Provider, ProviderAnswer, UndoAnswer

#: Catalog questions in flight at most in one :meth:`Inventory.unknown_skus` (the door's
#: check of an order, or its validation).
ASKED_AT_ONCE = 8


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
        """The SKUs the inventory does not know, in the order given.

        They are asked :data:`ASKED_AT_ONCE` at a time rather than one after another (an
        order may hold a hundred). Any other failure is raised once every question has
        ended, the first in the order given.
        """
        room = asyncio.Semaphore(ASKED_AT_ONCE)

        async def known(sku: str) -> bool:
            async with room:
                try:
                    await self._client.call("GET", f"/inventory/skus/{sku}")
                except UnknownSku:
                    return False
                return True

        asked = list(skus)
        answers = await asyncio.gather(*map(known, asked), return_exceptions=True)
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        return [sku for sku, answer in zip(asked, answers, strict=True) if answer is False]

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
