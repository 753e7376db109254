"""Order state in Postgres: record the order, move it along the graph, record cancellation."""

from __future__ import annotations

from activities import LifecycleStoreActivities, Rows, defn
from tollgate.errors import OrderNotFound
from tollgate.models import TransitionResult
from tollgate.orders import store
from tollgate.orders.models import (
    BeginCancelInput,
    BeginCancelResult,
    OrderInput,
    OrderSnapshot,
    ReadOrderInput,
    TransitionInput,
)
from tollgate.orders.states import OrderStatus
from tollgate.orders.store import ORDER_STORE, OrderRow


class OrderStoreActivities(LifecycleStoreActivities[OrderInput, OrderRow, OrderSnapshot]):
    """Activities that read and write the ``orders`` table through the gate."""

    rows = Rows(ORDER_STORE, OrderSnapshot)

    @defn("read_order")
    async def read_order(self, req: ReadOrderInput) -> OrderSnapshot:
        """The row's status and version, for a workflow that did not write it last."""
        row = await store.get_order(self._pool, req.order_id)
        if row is None:
            raise OrderNotFound(req.order_id)
        return OrderSnapshot(status=row.status, version=row.version)

    @defn("begin_order")
    async def begin_order(self, order: OrderInput) -> OrderSnapshot:
        """Ensure the PENDING row exists and move it to VALIDATING: a checkout's first step."""
        return await self._begin(order, order.order_id, OrderStatus.VALIDATING)

    @defn("record_order")
    async def record_order(self, order: OrderInput) -> OrderSnapshot:
        """Ensure the PENDING row exists (the service usually inserted it already)."""
        return await self._record(order)

    @defn("begin_order_cancellation")
    async def begin_cancellation(self, req: BeginCancelInput) -> BeginCancelResult:
        """Record CANCELLING unless it is already recorded or the order has ended."""
        row = await self._stop(
            req.order_id, reason=req.reason, actor=req.actor, transition_id=req.transition_id
        )
        return BeginCancelResult(
            status=row.status, version=row.version, cancel_reason=row.cancel_reason
        )

    @defn("transition_order")
    async def transition_order(self, req: TransitionInput) -> TransitionResult:
        """Apply one version-checked transition; see :func:`tollgate.gate.transition`."""
        return await self._move(req.order_id, req)
