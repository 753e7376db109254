"""Order state in Postgres: record the order, move it along the graph, record cancellation."""

from __future__ import annotations

import asyncpg
from temporalio import activity

from activities import classified, current_actor, current_trace_id, current_workflow_id
from tollgate import db
from tollgate.errors import OrderNotFound
from tollgate.models import (
    BeginCancelInput,
    BeginCancelResult,
    OrderInput,
    OrderSnapshot,
    ReadOrderInput,
    RecordOrderResult,
    TransitionInput,
    TransitionResult,
)


class OrderStoreActivities:
    """Activities that read and write the ``orders`` table through the transition gate."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @activity.defn(name="record_order")
    @classified
    async def record_order(self, order: OrderInput) -> RecordOrderResult:
        """Ensure the PENDING row exists (the CLI usually inserted it already)."""
        async with self._pool.acquire() as conn:
            return await db.insert_order(
                conn,
                order,
                workflow_id=current_workflow_id(),
                actor=current_actor(),
                trace_id=current_trace_id(),
            )

    @activity.defn(name="transition_order")
    @classified
    async def transition_order(self, req: TransitionInput) -> TransitionResult:
        """Apply one version-checked transition; see :func:`tollgate.db.apply_transition`."""
        result = await db.apply_transition(self._pool, req, trace_id=current_trace_id())
        activity.logger.info(
            "order transition",
            extra={
                "order_id": req.order_id,
                "to_status": req.to_status.value,
                "version": result.version,
                "already_applied": result.already_applied,
            },
        )
        return result

    @activity.defn(name="read_order")
    @classified
    async def read_order(self, req: ReadOrderInput) -> OrderSnapshot:
        """The row's status and version, for a workflow that did not write it last."""
        row = await db.get_order(self._pool, req.order_id)
        if row is None:
            raise OrderNotFound(req.order_id)
        return OrderSnapshot(status=row.status, version=row.version)

    @activity.defn(name="begin_order_cancellation")
    @classified
    async def begin_cancellation(self, req: BeginCancelInput) -> BeginCancelResult:
        """Record CANCELLING unless it is already recorded or the order has ended."""
        return await db.request_cancellation(
            self._pool,
            req.order_id,
            reason=req.reason,
            actor=req.actor,
            transition_id=req.transition_id,
            trace_id=current_trace_id(),
        )
