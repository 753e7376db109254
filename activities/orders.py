"""Order state in Postgres: record the order, move it along the graph, record cancellation."""

from __future__ import annotations

import asyncpg
from temporalio import activity

from activities import classified, current_workflow_id, writer
from tollgate import gate
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
from tollgate.orders.store import ORDERS


class OrderStoreActivities:
    """Activities that read and write the ``orders`` table through the gate."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @activity.defn(name="record_order")
    @classified
    async def record_order(self, order: OrderInput) -> OrderSnapshot:
        """Ensure the PENDING row exists (the service usually inserted it already)."""
        me = writer()
        async with self._pool.acquire() as conn:
            row = await store.insert_order(
                conn,
                order,
                workflow_id=current_workflow_id(),
                actor=me.actor,
                trace_id=me.trace_id,
            )
        return OrderSnapshot(status=row.status, version=row.version)

    @activity.defn(name="transition_order")
    @classified
    async def transition_order(self, req: TransitionInput) -> TransitionResult:
        """Apply one version-checked transition; see :func:`tollgate.gate.transition`."""
        moved = await gate.transition(
            self._pool,
            ORDERS,
            gate.Move(
                req.order_id,
                req.expected_version,
                req.to_status,
                req.transition_id,
                req.failure_reason,
            ),
            writer(req.actor, req.reason),
        )
        activity.logger.info(
            "order transition",
            extra={
                "order_id": req.order_id,
                "to_status": req.to_status.value,
                "version": moved.version,
                "already_applied": moved.already_applied,
            },
        )
        return TransitionResult(version=moved.version, already_applied=moved.already_applied)

    @activity.defn(name="read_order")
    @classified
    async def read_order(self, req: ReadOrderInput) -> OrderSnapshot:
        """The row's status and version, for a workflow that did not write it last."""
        row = await store.get_order(self._pool, req.order_id)
        if row is None:
            raise OrderNotFound(req.order_id)
        return OrderSnapshot(status=row.status, version=row.version)

    @activity.defn(name="begin_order_cancellation")
    @classified
    async def begin_cancellation(self, req: BeginCancelInput) -> BeginCancelResult:
        """Record CANCELLING unless it is already recorded or the order has ended."""
        row = await store.request_cancellation(
            self._pool,
            req.order_id,
            reason=req.reason,
            actor=req.actor,
            transition_id=req.transition_id,
            trace_id=writer().trace_id,
        )
        return BeginCancelResult(
            status=row.status, version=row.version, cancel_reason=row.cancel_reason
        )
