"""Recovery of an order whose lifecycle is gone (terminated from the Web UI, say).

Started by the reconciler for an orphaned row, it first *claims* the row: one
version-checked transition out of the forward path, before any money or stock moves.
Only once that claim committed does it undo, with the keys the original workflow used
(``order-<id>:charge`` and so on), so an undo that already ran is replayed and one whose
step never ran voids the key. Then it ends the row: CANCELLED if a cancellation was
recorded, FAILED otherwise.

What the claim rules out: an order that completed while the reconciler looked (or whose
recovery was started by hand by mistake) is never refunded. A terminal row is left
alone ("nothing to do"), and a row that moves between our read and our claim makes the
claim fail on its version, so we read again and decide again.

How the claim looks from each state (every hop an edge of the graph, or a write that
keeps the status and bumps the version):

    PENDING, VALIDATING   -> FAILED          nothing to undo: the row reaches CHARGING
                                             before any provider is called
    CHARGING, RESERVING   -> COMPENSATING    then refund, release, -> FAILED
    COMPENSATING          -> (same, claimed) then refund, release, -> FAILED
    CANCELLING            -> (same, claimed) then refund, release, -> CANCELLED
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

from workflows._lifecycle import (
    ActivityMethod,
    error_type,
    run_activity,
    run_undo,
    until_done_retry,
)
from workflows.order import checkout_undos

with workflow.unsafe.imports_passed_through():
    from activities.orders import OrderStoreActivities
    from tollgate.errors import OrderCancelled, VersionConflict
    from tollgate.names import (
        ORDER_RECOVERY_WORKFLOW,
        order_workflow_id,
        transition_id,
    )
    from tollgate.orders.models import (
        OrderSnapshot,
        ReadOrderInput,
        RecoveryInput,
        RecoveryResult,
        TransitionInput,
    )
    from tollgate.orders.states import OrderStatus

S = OrderStatus
ArgT = TypeVar("ArgT")
ResultT = TypeVar("ResultT")

#: Where the claim moves the row from each non-terminal state.
_CLAIM: Mapping[OrderStatus, OrderStatus] = MappingProxyType(
    {
        S.PENDING: S.FAILED,
        S.VALIDATING: S.FAILED,
        S.CHARGING: S.COMPENSATING,
        S.RESERVING: S.COMPENSATING,
        S.COMPENSATING: S.COMPENSATING,
        S.CANCELLING: S.CANCELLING,
    }
)

#: Reads and claims before giving up on a row that keeps moving under us.
_ATTEMPTS = 5


@workflow.defn(name=ORDER_RECOVERY_WORKFLOW)
class OrderRecoveryWorkflow:
    """Claim the row, compensate from the ledger's idempotency keys, then end the row."""

    @workflow.run
    async def run(self, inp: RecoveryInput) -> RecoveryResult:
        self._inp = inp
        self._retry = until_done_retry(inp.retry)
        claimed: OrderSnapshot | None = None
        for _ in range(_ATTEMPTS):
            row = await self._activity(
                OrderStoreActivities.read_order, ReadOrderInput(order_id=inp.order_id)
            )
            if row.status.terminal:
                return RecoveryResult(
                    order_id=inp.order_id,
                    status=row.status,
                    compensations=[],
                    outcome="nothing to do",
                )
            try:
                claimed = await self._move(row, _CLAIM[row.status])
            except ActivityError as err:
                # someone moved the row since we read it: read again and decide again
                if error_type(err) not in (VersionConflict.__name__, OrderCancelled.__name__):
                    raise
                continue
            break
        if claimed is None:
            raise ApplicationError(
                f"order {inp.order_id} kept moving under the recovery", non_retryable=True
            )
        if claimed.status.terminal:
            return RecoveryResult(order_id=inp.order_id, status=claimed.status, compensations=[])

        done = await self._compensate()
        end = S.CANCELLED if claimed.status is S.CANCELLING else S.FAILED
        final = await self._move(claimed, end)
        return RecoveryResult(order_id=inp.order_id, status=final.status, compensations=done)

    async def _compensate(self) -> list[str]:
        """Undo with the original workflow's keys: replayed if done, voided if never run."""
        order_id = self._inp.order_id
        original = order_workflow_id(order_id)
        undos = checkout_undos(order_id, original, self._inp.reason)
        return [await run_undo(undo, self._inp.retry) for undo in undos]

    async def _move(self, row: OrderSnapshot, to: OrderStatus) -> OrderSnapshot:
        """One version-checked write from where ``row`` stands (to the same status: a claim)."""
        me = workflow.info().workflow_id
        moved = await self._activity(
            OrderStoreActivities.transition_order,
            TransitionInput(
                order_id=self._inp.order_id,
                expected_version=row.version,
                to_status=to,
                transition_id=transition_id(me, row.version, to.value),
                actor=f"reconciler:{me}",
                reason=self._inp.reason,
                failure_reason=None if to in (S.CANCELLED, S.CANCELLING) else self._inp.reason,
            ),
        )
        return OrderSnapshot(status=to, version=moved.version)

    async def _activity(self, method: ActivityMethod[ArgT, ResultT], arg: ArgT) -> ResultT:
        return await run_activity(
            method, arg, start_to_close=self._inp.retry.activity_timeout, retry=self._retry
        )
