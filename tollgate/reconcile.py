"""The reconciler: compare Postgres with Temporal, record drift, repair where safe.

Two kinds of drift are found:

* **orphaned**: a row that is not at rest while its workflow is not running (terminated
  from the Web UI, timed out, failed on a bug). Nothing will ever move it again.
* **disagreement**: a finished workflow whose result names another final state than
  the row holds (a manual fix at psql that went wrong, say).

Every finding is printed and recorded in ``reconciliation_findings``. Orphaned orders
are repaired by ``OrderRecoveryWorkflow`` (compensate from the idempotency keys, end the
row FAILED, or CANCELLED if a cancellation was recorded). Messages and disagreements are
only reported: no automatic answer is safe for them.

It runs on demand (``starter.py reconcile``) and on a Temporal Schedule that the worker
keeps in place (``ReconcilerWorkflow`` every ``RECONCILE_EVERY_SECONDS``).
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any, Literal

import asyncpg
from pydantic import BaseModel, ConfigDict
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleSpec,
    WorkflowExecutionStatus,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from tollgate.message_models import MessageResult
from tollgate.models import OrderResult, RecoveryInput, RetrySettings
from tollgate.states import MessageStatus, OrderStatus

RECONCILE_SCHEDULE_ID = "tollgate-reconciler"

_log = logging.getLogger(__name__)

#: Message states a finished workflow legitimately leaves a row in: after the read
#: window a delivered or emailed message rests unread.
_MESSAGE_AT_REST = frozenset(
    {
        MessageStatus.DELIVERED,
        MessageStatus.EMAILED,
        MessageStatus.READ,
        MessageStatus.FAILED,
        MessageStatus.CANCELLED,
    }
)


class Finding(BaseModel):
    """One drift between a row and its workflow."""

    model_config = ConfigDict(frozen=True)

    entity_kind: Literal["order", "message"]
    entity_id: str
    finding: Literal["orphaned", "disagreement"]
    row_status: str
    workflow_status: str | None
    detail: str
    repair_workflow_id: str | None = None


class ReconcileInput(BaseModel):
    """Input of ``ReconcilerWorkflow`` and of a reconcile run."""

    model_config = ConfigDict(frozen=True)

    repair: bool = True
    #: Rows changed longer ago than this are not looked at again.
    lookback: timedelta = timedelta(days=1)
    #: A row younger than this may belong to a workflow still being started.
    grace: timedelta = timedelta(seconds=30)


class ReconcileReport(BaseModel):
    """What one reconcile run looked at and found."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    orders_checked: int
    messages_checked: int
    findings: list[Finding]


async def _workflow_status(client: Client, workflow_id: str) -> WorkflowExecutionStatus | None:
    try:
        description = await client.get_workflow_handle(workflow_id).describe()
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        return None
    return description.status


async def _final_status(client: Client, workflow_id: str, result_type: type[Any]) -> str | None:
    """The status a finished workflow returned; None if its result cannot be read here.

    A result this client cannot decode (written with another payload key, say) is not
    evidence of drift, so it is skipped with a warning rather than reported.
    """
    try:
        result = await client.get_workflow_handle(workflow_id, result_type=result_type).result()
    except (KeyError, ValueError) as exc:
        _log.warning(
            "reconciler cannot read a result", extra={"workflow_id": workflow_id, "error": str(exc)}
        )
        return None
    status = getattr(result, "status", None)
    return str(status) if status is not None else None


async def _check(
    client: Client,
    kind: Literal["order", "message"],
    row: asyncpg.Record,
    at_rest: bool,
    result_type: type[Any],
) -> Finding | None:
    status = await _workflow_status(client, row["workflow_id"])
    name = status.name if status is not None else None
    if not at_rest:
        if status == WorkflowExecutionStatus.RUNNING:
            return None
        return Finding(
            entity_kind=kind,
            entity_id=row["id"],
            finding="orphaned",
            row_status=row["status"],
            workflow_status=name,
            detail=f"row is {row['status']} but its workflow is {name or 'gone'}",
        )
    if status == WorkflowExecutionStatus.COMPLETED:
        final = await _final_status(client, row["workflow_id"], result_type)
        if final is not None and final != row["status"]:
            return Finding(
                entity_kind=kind,
                entity_id=row["id"],
                finding="disagreement",
                row_status=row["status"],
                workflow_status=name,
                detail=f"workflow ended {final}, row holds {row['status']}",
            )
    return None


async def reconcile(
    client: Client, pool: asyncpg.Pool, *, task_queue: str, options: ReconcileInput | None = None
) -> ReconcileReport:
    """Compare recent rows with their workflows; record findings; repair orphaned orders."""
    options = options or ReconcileInput()
    run_id = uuid.uuid4().hex[:12]
    findings: list[Finding] = []

    orders = await pool.fetch(
        "SELECT id, status, workflow_id FROM orders"
        " WHERE updated_at > now() - $1::interval AND updated_at < now() - $2::interval ORDER BY id",
        options.lookback,
        options.grace,
    )
    for row in orders:
        found = await _check(client, "order", row, OrderStatus(row["status"]).terminal, OrderResult)
        if found is not None:
            findings.append(found)

    messages = await pool.fetch(
        "SELECT id, status, workflow_id FROM messages"
        " WHERE updated_at > now() - $1::interval AND updated_at < now() - $2::interval ORDER BY id",
        options.lookback,
        options.grace,
    )
    for row in messages:
        at_rest = MessageStatus(row["status"]) in _MESSAGE_AT_REST
        found = await _check(client, "message", row, at_rest, MessageResult)
        if found is not None:
            findings.append(found)

    if options.repair:
        findings = [await _repair(client, f, task_queue) for f in findings]
    await _record(pool, run_id, findings)
    return ReconcileReport(
        run_id=run_id, orders_checked=len(orders), messages_checked=len(messages), findings=findings
    )


async def _repair(client: Client, finding: Finding, task_queue: str) -> Finding:
    if finding.entity_kind != "order" or finding.finding != "orphaned":
        return finding
    # Deferred import: the workflow module imports activity modules, which the CLI does
    # not otherwise need.
    from workflows.recovery import OrderRecoveryWorkflow

    workflow_id = f"order-{finding.entity_id}:recovery"
    await client.start_workflow(
        OrderRecoveryWorkflow.run,
        RecoveryInput(
            order_id=finding.entity_id,
            reason=f"recovered by the reconciler: {finding.detail}",
            retry=RetrySettings(),
        ),
        id=workflow_id,
        task_queue=task_queue,
        # a second reconcile run while the first recovery runs joins it
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
    )
    return finding.model_copy(update={"repair_workflow_id": workflow_id})


async def _record(pool: asyncpg.Pool, run_id: str, findings: list[Finding]) -> None:
    if not findings:
        return
    await pool.executemany(
        """
        INSERT INTO reconciliation_findings
            (run_id, entity_kind, entity_id, finding, row_status, workflow_status, detail, repair_workflow_id)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        """,
        [
            (
                run_id,
                f.entity_kind,
                f.entity_id,
                f.finding,
                f.row_status,
                f.workflow_status,
                f.detail,
                f.repair_workflow_id,
            )
            for f in findings
        ],
    )


async def ensure_schedule(client: Client, *, task_queue: str, every: timedelta) -> bool:
    """Create the reconciler's Temporal Schedule unless it exists. True if created."""
    from workflows.reconciler import ReconcilerWorkflow

    try:
        await client.create_schedule(
            RECONCILE_SCHEDULE_ID,
            Schedule(
                action=ScheduleActionStartWorkflow(
                    ReconcilerWorkflow.run,
                    ReconcileInput(),
                    id=f"{RECONCILE_SCHEDULE_ID}-run",
                    task_queue=task_queue,
                ),
                spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
            ),
        )
    except ScheduleAlreadyRunningError:
        return False
    return True
