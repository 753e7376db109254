"""The reconciler as an activity, so a Temporal Schedule can run it."""

from __future__ import annotations

import asyncpg
from temporalio import activity
from temporalio.client import Client

from activities import defn
from tollgate.ops.reconcile import ReconcileInput, ReconcileReport, reconcile


class ReconcileActivities:
    """Holds the Temporal client and Postgres pool the comparison needs."""

    def __init__(self, client: Client, pool: asyncpg.Pool, task_queue: str) -> None:
        self._client = client
        self._pool = pool
        self._task_queue = task_queue

    @defn("reconcile")
    async def reconcile(self, options: ReconcileInput) -> ReconcileReport:
        """One reconcile run; findings are logged, recorded and (orders) repaired."""
        report = await reconcile(
            self._client, self._pool, task_queue=self._task_queue, options=options
        )
        for finding in report.findings:
            activity.logger.warning("reconciler finding", extra=finding.model_dump())
        return report
