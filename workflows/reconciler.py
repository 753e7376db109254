"""The workflow a Temporal Schedule starts to reconcile Postgres with Temporal."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.reconcile import ReconcileActivities
    from tollgate.names import RECONCILER_WORKFLOW
    from tollgate.ops.reconcile import ReconcileInput, ReconcileReport


@workflow.defn(name=RECONCILER_WORKFLOW)
class ReconcilerWorkflow:
    """Run the reconcile activity once; the schedule provides the repetition."""

    @workflow.run
    async def run(self, options: ReconcileInput) -> ReconcileReport:
        return await workflow.execute_activity_method(
            ReconcileActivities.reconcile,
            options,
            start_to_close_timeout=timedelta(minutes=5),
            retry_policy=RetryPolicy(maximum_attempts=3),
        )
