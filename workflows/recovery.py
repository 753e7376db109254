"""Recovery of an order whose lifecycle is gone (terminated from the Web UI, say).

Started by the reconciler for an orphaned row. It undoes every side effect the order
could have had, using the keys the original workflow used (``order-<id>:charge`` and
so on), so an undo that already ran is replayed and one whose step never ran voids the
key. Then it ends the row: CANCELLED if a cancellation was recorded, FAILED otherwise.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

from workflows._support import error_type, run_activity, until_done_retry

with workflow.unsafe.imports_passed_through():
    from activities.inventory import InventoryActivities
    from activities.orders import OrderStoreActivities
    from activities.payments import PaymentActivities
    from tollgate.errors import OrderCancelled, VersionConflict
    from tollgate.models import (
        ReadOrderInput,
        RecoveryInput,
        RecoveryResult,
        RefundInput,
        ReleaseInput,
        TransitionInput,
    )
    from tollgate.names import order_workflow_id
    from tollgate.states import OrderStatus

S = OrderStatus

#: How the row ends from each non-terminal state (each hop is an edge of the graph).
_ENDINGS: dict[OrderStatus, tuple[OrderStatus, ...]] = {
    S.PENDING: (S.FAILED,),
    S.VALIDATING: (S.FAILED,),
    S.CHARGING: (S.COMPENSATING, S.FAILED),
    S.RESERVING: (S.COMPENSATING, S.FAILED),
    S.COMPENSATING: (S.FAILED,),
    S.CANCELLING: (S.CANCELLED,),
}

_ATTEMPTS = 5


@workflow.defn(name="OrderRecoveryWorkflow")
class OrderRecoveryWorkflow:
    """Compensate from the ledger's idempotency keys, then end the row."""

    @workflow.run
    async def run(self, inp: RecoveryInput) -> RecoveryResult:
        retry = until_done_retry(inp.retry)
        timeout = inp.retry.activity_timeout
        original = order_workflow_id(inp.order_id)
        done: list[str] = []

        refund = await run_activity(
            PaymentActivities.refund,
            RefundInput(
                order_id=inp.order_id,
                charge_idempotency_key=f"{original}:charge",
                idempotency_key=f"{original}:refund",
                reason=inp.reason,
            ),
            start_to_close=timeout,
            retry=retry,
        )
        done.append(f"refund:{refund.outcome}")
        release = await run_activity(
            InventoryActivities.release,
            ReleaseInput(
                order_id=inp.order_id,
                reservation_idempotency_key=f"{original}:reserve",
                idempotency_key=f"{original}:release",
            ),
            start_to_close=timeout,
            retry=retry,
        )
        done.append(f"release:{release.outcome}")

        for _ in range(_ATTEMPTS):
            row = await run_activity(
                OrderStoreActivities.read_order,
                ReadOrderInput(order_id=inp.order_id),
                start_to_close=timeout,
                retry=retry,
            )
            if row.status.terminal:
                return RecoveryResult(order_id=inp.order_id, status=row.status, compensations=done)
            version = row.version
            try:
                for to in _ENDINGS[row.status]:
                    moved = await run_activity(
                        OrderStoreActivities.transition_order,
                        TransitionInput(
                            order_id=inp.order_id,
                            expected_version=version,
                            to_status=to,
                            transition_id=f"{workflow.info().workflow_id}:v{version}:{to.value}",
                            actor=f"reconciler:{workflow.info().workflow_id}",
                            reason=inp.reason,
                            failure_reason=None if to is S.CANCELLED else inp.reason,
                        ),
                        start_to_close=timeout,
                        retry=retry,
                    )
                    version = moved.version
                return RecoveryResult(
                    order_id=inp.order_id, status=_ENDINGS[row.status][-1], compensations=done
                )
            except ActivityError as err:
                # someone moved the row meanwhile (a cancellation, say): read it again
                if error_type(err) not in (VersionConflict.__name__, OrderCancelled.__name__):
                    raise
        raise ApplicationError(
            f"order {inp.order_id} kept moving under the recovery", non_retryable=True
        )
