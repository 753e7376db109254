"""What users do to orders (create, cancel, inspect), shared by the CLI, demo and tests.

Each operation writes Postgres first and talks to Temporal second, and is arranged so
that a failure in between leaves nothing half-done: an order row is committed only if
its workflow started; a cancellation is recorded before the workflow is told.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from decimal import Decimal
from typing import Any

import asyncpg
from opentelemetry.trace import Span
from temporalio.client import Client, WorkflowHandle
from temporalio.common import (
    SearchAttributePair,
)

from tollgate.codec import search_token
from tollgate.errors import InputError, ProviderError
from tollgate.models import parse_input
from tollgate.names import CUSTOMER_ID_ATTR, ORDER_CANCEL_SIGNAL, ORDER_CHARGED_UPDATE, ORDER_NAMES
from tollgate.orders import store
from tollgate.orders.models import (
    MAX_AMOUNT_CENTS,
    CancelOrderRequest,
    OrderInput,
    OrderProgress,
    OrderResult,
    order_problems,
)
from tollgate.orders.states import OrderStatus
from tollgate.providers.inventory import Inventory
from tollgate.service import (
    AlsoWrite,
    LifecycleKind,
    LifecycleReport,
    LifecycleService,
    LifecycleStart,
    StopOutcome,
    start_lifecycle,
)
from tollgate.tracing import tracer

#: ``SKU:QTY`` with ASCII digits only (``str.isdigit`` accepts '²', which int() refuses).
_ITEM = re.compile(r"([A-Za-z0-9][A-Za-z0-9_-]{0,31}):([0-9]{1,6})", re.ASCII)
#: A plain decimal: no exponent; bounded length, so Decimal never sees a huge exponent.
_AMOUNT = re.compile(r"-?[0-9]{1,30}(\.[0-9]{1,30})?", re.ASCII)


def parse_item(text: str) -> dict[str, object]:
    """``SKU:QTY`` -> ``{"sku": ..., "quantity": ...}``; a clear error otherwise."""
    match = _ITEM.fullmatch(text.strip())
    if match is None:
        raise InputError(f"item {text!r} is not SKU:QTY (e.g. WIDGET:2)")
    return {"sku": match.group(1).upper(), "quantity": int(match.group(2))}


def parse_amount(text: str) -> int:
    """A decimal amount in major units (``12.34``) -> integer cents."""
    if not _AMOUNT.fullmatch(text.strip()):
        raise InputError(f"amount {text!r} is not a number like 12.34")
    value = Decimal(text.strip())
    if value <= 0:
        raise InputError(f"amount must be positive, got {text}")
    if value != value.quantize(Decimal("0.01")):
        raise InputError(f"amount {text} has more than two decimal places")
    if value * 100 > MAX_AMOUNT_CENTS:
        raise InputError(f"amount {text} is over the limit of {MAX_AMOUNT_CENTS / 100:.2f}")
    return int(value * 100)


def build_order(**fields: object) -> OrderInput:
    """Validate an order; a pydantic error becomes one line naming the field."""
    return parse_input(OrderInput, fields)


class CancelOutcome(StopOutcome[OrderStatus]):
    """What ``cancel`` did."""

    order_id: str
    recorded: bool
    version: int


class OrderReport(LifecycleReport[OrderStatus, OrderProgress]):
    """Everything ``order status`` shows: the row, its audit trail, the workflow."""

    order: store.OrderRow


ORDER_KIND = LifecycleKind(store.ORDER_STORE, ORDER_NAMES, OrderResult, OrderProgress)


class KnownSkus:
    """SKUs the catalog knew a moment ago, so that the door does not ask it about every
    order. The door's check is an early refusal only: the workflow's validation asks the
    catalog again, and decides. An unknown SKU is never remembered (it is asked again
    next time, so a SKU added to the catalog is taken at once); a known one for
    ``ttl_seconds``, and at most ``size`` of them."""

    def __init__(
        self,
        *,
        ttl_seconds: float = 60.0,
        size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl, self._size, self._clock = ttl_seconds, size, clock
        self._until: dict[str, float] = {}

    def not_known(self, skus: Iterable[str]) -> list[str]:
        """The SKUs to ask the catalog about, in the order given, each once."""
        now = self._clock()
        return [sku for sku in dict.fromkeys(skus) if self._until.get(sku, float("-inf")) <= now]

    def learn(self, known: Iterable[str]) -> None:
        """Remember SKUs the catalog just said it knows."""
        until = self._clock() + self._ttl
        for sku in known:
            self._until.pop(sku, None)
            self._until[sku] = until
        while len(self._until) > self._size:  # the oldest learned go first
            del self._until[next(iter(self._until))]


class OrderService(LifecycleService[OrderInput, store.OrderRow, OrderResult, OrderProgress]):
    """Order operations over one Temporal client and one Postgres pool."""

    _kind = ORDER_KIND

    def __init__(
        self, client: Client, pool: asyncpg.Pool, task_queue: str, *, inventory: Inventory
    ) -> None:
        super().__init__(client, pool, task_queue)
        self._inventory = inventory
        self._known_skus = KnownSkus()

    async def create(
        self, order: OrderInput, *, actor: str = "cli:create", also: AlsoWrite | None = None
    ) -> WorkflowHandle[Any, OrderResult]:
        """Check the order, then insert the PENDING row and start its workflow, both or
        neither (see :func:`tollgate.service.start_lifecycle`). ``actor`` is who the
        audit names; ``also`` writes more in the same transaction, before the row.

        The span ``order.create`` (a child of the caller's, if any) is where the order's
        trace begins: the row records it, and the workflow descends from it."""
        with self._creating(order):
            start = await self._checked_start(order, actor, also)
            return await start_lifecycle(self._client, self._pool, start)

    async def until_charged(self, order_id: str) -> OrderProgress:
        """The ``charged`` update's answer for a running order: once it is charged, has
        failed or is being cancelled, while the checkout goes on. A workflow that ended
        already answers NOT_FOUND (``RPCError``): its row is the answer then."""
        progress: OrderProgress = await self.handle(order_id).execute_update(
            ORDER_CHARGED_UPDATE, result_type=OrderProgress
        )
        return progress

    @staticmethod
    def _creating(order: OrderInput) -> AbstractContextManager[Span]:
        return tracer.start_as_current_span(
            "order.create", attributes={"tollgate.order_id": order.order_id}
        )

    async def _checked_start(
        self, order: OrderInput, actor: str, also: AlsoWrite | None
    ) -> LifecycleStart[OrderResult]:
        await self.check(order)
        return self._start(order, order.order_id, actor=actor, also=also)

    def _search_attribute(self, order: OrderInput) -> SearchAttributePair[str]:
        return SearchAttributePair(CUSTOMER_ID_ATTR, search_token(self._client, order.customer_id))

    def _summary(self, order: OrderInput) -> str:
        return (
            f"Order {order.order_id}: {len(order.items)} item(s), "
            f"{order.amount_cents / 100:.2f} {order.currency} for {order.customer_id}"
        )

    async def check(self, order: OrderInput) -> None:
        """Refuse an order that breaks a business rule or names an unknown SKU, before
        anything is written or started (``InputError`` listing every problem).

        When the inventory cannot be asked (down, slow), the order is accepted and the
        workflow's validation step asks again with retries: an outage delays a checkout,
        it does not refuse one.
        """
        problems = order_problems(order)
        to_ask = self._known_skus.not_known(i.sku for i in order.items)
        try:
            unknown = await self._inventory.unknown_skus(to_ask) if to_ask else []
        except ProviderError:
            unknown = []
        self._known_skus.learn(sku for sku in to_ask if sku not in unknown)
        problems += [f"unknown SKU {sku}" for sku in unknown]
        if problems:
            raise InputError(f"order {order.order_id} refused: {'; '.join(problems)}")

    async def cancel(
        self, order_id: str, *, reason: str, requested_by: str, actor: str | None = None
    ) -> CancelOutcome:
        """Record CANCELLING in Postgres (version-checked), then signal the workflow.

        The whole request is validated first: a reason the signal could not carry must
        not leave a row CANCELLING that its workflow never hears of. The audit names
        ``actor`` (default ``cli:<requested_by>``). It runs in the order's trace, under
        the span that created the order, with a link to the caller's span.
        """
        request = parse_input(CancelOrderRequest, {"reason": reason, "requested_by": requested_by})
        stopped = await self._stop("cancel", order_id, request, actor, ORDER_CANCEL_SIGNAL)
        if not stopped.recorded:
            message = f"order {order_id} is already {stopped.row.status}; nothing to cancel"
        elif stopped.signalled:
            message = f"cancellation of {order_id} recorded; the workflow is compensating"
        else:
            message = f"cancellation of {order_id} recorded, but its workflow is not running"
        return CancelOutcome(
            order_id=order_id,
            recorded=stopped.recorded,
            status=stopped.row.status,
            version=stopped.row.version,
            signalled=stopped.signalled,
            message=message,
        )

    async def report(self, order_id: str) -> OrderReport:
        """The row, its audited transitions, and the workflow's status and live progress."""
        row = await self.row(order_id)
        return OrderReport(order=row, **await self._history(row))
