"""The reconciler: compare Postgres with Temporal, record drift, repair where safe.

Four kinds of drift are found:

* **orphaned**: a row that is not at rest while its workflow was seen closed
  (terminated from the Web UI, timed out, failed on a bug), and the row, read again
  after that, had not moved. Nothing will ever move it again.
* **missing**: a row that is not at rest and whose workflow Temporal does not know.
  That is also what a client pointed at the wrong namespace or cluster sees, so it is
  reported and repaired only when the operator asks (``--repair-missing``).
* **failed_at_rest**: a row at rest whose workflow ended FAILED, TERMINATED or
  TIMED_OUT: the row may not be where the lifecycle meant to leave it.
* **disagreement**: a finished workflow whose result names another final state than
  the row holds (a manual fix at psql that went wrong, say).

Every finding is printed and recorded in ``reconciliation_findings``. Orphaned orders
are repaired by ``OrderRecoveryWorkflow``, which claims the row (version-checked) before
it compensates from the idempotency keys, then ends it FAILED, or CANCELLED if a
cancellation was recorded. Messages and the other findings are only reported: no
automatic answer is safe for them.

It runs on demand (``starter.py reconcile``) and on a Temporal Schedule that the worker
keeps in place (``ReconcilerWorkflow`` every ``RECONCILE_EVERY_SECONDS``).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
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
    ScheduleUpdate,
    WorkflowExecution,
    WorkflowExecutionStatus,
)
from temporalio.common import SearchAttributeKey, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from tollgate.messages.models import MessageResult
from tollgate.messages.states import DELIVERY_SETTLED
from tollgate.models import RetrySettings
from tollgate.names import (
    MESSAGE_STATUS_ATTR,
    MESSAGE_WORKFLOW,
    ORDER_RECOVERY_WORKFLOW,
    ORDER_STATUS_ATTR,
    ORDER_WORKFLOW,
    RECONCILER_WORKFLOW,
    recovery_workflow_id,
)
from tollgate.orders.models import OrderResult, RecoveryInput
from tollgate.orders.states import ORDER_TERMINAL
from tollgate.tracing import joined

RECONCILE_SCHEDULE_ID = "tollgate-reconciler"

_log = logging.getLogger(__name__)

#: Message states a finished workflow legitimately leaves a row in: delivery settled,
#: one way or the other (after the read window a delivered or emailed message rests
#: unread).
_MESSAGE_AT_REST = DELIVERY_SETTLED


FindingKind = Literal["orphaned", "missing", "disagreement", "failed_at_rest"]


class Finding(BaseModel):
    """One drift between a row and its workflow."""

    model_config = ConfigDict(frozen=True)

    entity_kind: Literal["order", "message"]
    entity_id: str
    finding: FindingKind
    row_status: str
    workflow_status: str | None
    detail: str
    repair_workflow_id: str | None = None


class ReconcileInput(BaseModel):
    """Input of ``ReconcilerWorkflow`` and of a reconcile run."""

    model_config = ConfigDict(frozen=True)

    repair: bool = True
    #: Recover orders whose workflow Temporal does not know (``repair`` or not). Off: a
    #: NOT_FOUND also answers a client pointed at the wrong namespace or cluster, or a
    #: history past its retention, and recovery refunds.
    repair_missing: bool = False
    #: Rows changed longer ago than this are not looked at again.
    lookback: timedelta = timedelta(days=1)
    #: Rows at rest are looked at only if they changed within this (None: ``lookback``).
    #: A row at rest does not move again, so a run on a schedule needs to see only what
    #: came to rest since the run before; looking at every row of the last day at every
    #: run made each order cost one workflow describe (and a history read) per run,
    #: 288 a day at the default interval. (Rows at rest that agree with their completed
    #: workflow are now settled from visibility: see :func:`_completed_as_recorded`.)
    at_rest_lookback: timedelta | None = None
    #: A row younger than this may belong to a workflow still being started.
    grace: timedelta = timedelta(seconds=30)


class ReconcileReport(BaseModel):
    """What one reconcile run looked at and found."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    orders_checked: int
    messages_checked: int
    findings: list[Finding]


#: Workflow ends that mean the lifecycle did not finish its own way.
_ENDED_BADLY = frozenset(
    {
        WorkflowExecutionStatus.FAILED,
        WorkflowExecutionStatus.TERMINATED,
        WorkflowExecutionStatus.TIMED_OUT,
    }
)


async def _workflow_status(client: Client, workflow_id: str) -> WorkflowExecutionStatus | None:
    """The execution's status; None when Temporal answers NOT_FOUND."""
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


@dataclass(frozen=True)
class _Kind:
    """How to read one kind of row and when it is at rest."""

    name: Literal["order", "message"]
    table: str
    #: The statuses a finished lifecycle leaves its row in.
    resting: frozenset[str]
    result_type: type[Any]
    #: The lifecycle's workflow type, and the search attribute its workflow keeps its
    #: status in (the last one it moved the row to).
    workflow_type: str
    status_attr: SearchAttributeKey[str]

    def at_rest(self, status: str) -> bool:
        return status in self.resting


_ORDERS = _Kind("order", "orders", ORDER_TERMINAL, OrderResult, ORDER_WORKFLOW, ORDER_STATUS_ATTR)
_MESSAGES = _Kind(
    "message",
    "messages",
    _MESSAGE_AT_REST,
    MessageResult,
    MESSAGE_WORKFLOW,
    MESSAGE_STATUS_ATTR,
)

#: Rows at rest asked of Temporal's visibility in one list call.
_LISTED_PER_CALL = 100
#: What a workflow id must look like to be quoted in a visibility query; the schema's
#: ids are narrower still (schema/005_safe_input.sql), so this only keeps odd rows on
#: the slow path.
_QUOTABLE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,200}")


async def _completed_as_recorded(
    client: Client, kind: _Kind, rows: Sequence[asyncpg.Record]
) -> set[str]:
    """The ids of rows at rest whose workflow completed having moved its row to just the
    status the row holds: nothing to look into, found with one visibility list call
    per :data:`_LISTED_PER_CALL` rows instead of a describe and a history read each.

    Only agreement is taken from visibility, which lags and keeps only what the
    workflow last set. A row is settled only when its workflow id has exactly one run
    besides those that continued as new, and that run completed with the row's status;
    every other row (not listed yet, ended another way, another status, a reset or any
    other second run under the id) goes through :func:`_check` as before. The list is
    only a shortcut: when visibility cannot answer, every row takes the slow path.
    """
    holds = {
        row["workflow_id"]: (row["id"], row["status"])
        for row in rows
        if kind.at_rest(row["status"]) and _QUOTABLE_ID.fullmatch(row["workflow_id"])
    }
    ids = sorted(holds)
    agreed: set[str] = set()
    for start in range(0, len(ids), _LISTED_PER_CALL):
        batch = ids[start : start + _LISTED_PER_CALL]
        quoted = ", ".join(f"'{workflow_id}'" for workflow_id in batch)
        query = f"WorkflowType = '{kind.workflow_type}' AND WorkflowId IN ({quoted})"
        runs: dict[str, list[WorkflowExecution]] = {}
        try:
            async for execution in client.list_workflows(query):
                if execution.status != WorkflowExecutionStatus.CONTINUED_AS_NEW:
                    runs.setdefault(execution.id, []).append(execution)
        except RPCError as exc:
            # No advanced visibility, no permission to list, a slow index: the rows
            # are described one by one, as they were before the shortcut.
            _log.warning("reconciler cannot query visibility", extra={"error": str(exc)})
            return set()
        for workflow_id, (only, *others) in runs.items():
            entity_id, status = holds[workflow_id]
            if (
                not others
                and only.status == WorkflowExecutionStatus.COMPLETED
                and only.typed_search_attributes.get(kind.status_attr) == status
            ):
                agreed.add(entity_id)
    return agreed


async def _recovered(client: Client, order_id: str) -> bool:
    """Whether a recovery run of this order completed (so the row ended its way)."""
    status = await _workflow_status(client, recovery_workflow_id(order_id))
    return status == WorkflowExecutionStatus.COMPLETED


async def _check(
    client: Client, pool: asyncpg.Pool, kind: _Kind, row: asyncpg.Record
) -> Finding | None:
    """Compare one row with its workflow; None when they agree (or the row moved).

    The row was read before the workflow was described, and a lifecycle may finish in
    between: a RESERVING row read a moment before its workflow completed looks orphaned.
    So a row that is not at rest is only reported after its workflow was seen closed
    *and* the row was read again, unchanged. (Recovery then claims the row
    version-checked, so even a report that turns stale cannot undo a finished order.)
    """
    status = await _workflow_status(client, row["workflow_id"])
    name = status.name if status is not None else None

    def finding(kind_of: FindingKind, detail: str) -> Finding:
        return Finding(
            entity_kind=kind.name,
            entity_id=row["id"],
            finding=kind_of,
            row_status=row["status"],
            workflow_status=name,
            detail=detail,
        )

    if not kind.at_rest(row["status"]):
        if status == WorkflowExecutionStatus.RUNNING:
            return None
        again = await pool.fetchrow(
            f"SELECT status, version FROM {kind.table} WHERE id = $1", row["id"]
        )
        if again is None or (again["status"], again["version"]) != (row["status"], row["version"]):
            return None  # it moved since we read it: the next run looks again
        if status is None:
            return finding(
                "missing",
                f"row is {row['status']} but Temporal does not know its workflow "
                "(wrong namespace or cluster, or retention expired?)",
            )
        return finding("orphaned", f"row is {row['status']} but its workflow is {name}")
    if status in _ENDED_BADLY:
        if kind.name == "order" and await _recovered(client, row["id"]):
            return None  # the reconciler's own recovery finished this row
        return finding(
            "failed_at_rest", f"row rests at {row['status']} but its workflow ended {name}"
        )
    if status == WorkflowExecutionStatus.COMPLETED:
        final = await _final_status(client, row["workflow_id"], kind.result_type)
        if final is not None and final != row["status"]:
            return finding("disagreement", f"workflow ended {final}, row holds {row['status']}")
    return None


async def reconcile(
    client: Client, pool: asyncpg.Pool, *, task_queue: str, options: ReconcileInput | None = None
) -> ReconcileReport:
    """Compare recent rows with their workflows; record findings; repair orphaned orders."""
    options = options or ReconcileInput()
    run_id = uuid.uuid4().hex[:12]
    findings: list[Finding] = []
    checked: dict[str, int] = {}
    for kind in (_ORDERS, _MESSAGES):
        rows = await pool.fetch(
            f"SELECT id, status, version, workflow_id FROM {kind.table}"
            " WHERE updated_at > now() - $1::interval AND updated_at < now() - $2::interval"
            "   AND (status <> ALL($3::text[]) OR updated_at > now() - $4::interval)"
            " ORDER BY id",
            options.lookback,
            options.grace,
            sorted(kind.resting),
            options.at_rest_lookback or options.lookback,
        )
        checked[kind.name] = len(rows)
        agreed = await _completed_as_recorded(client, kind, rows)
        for row in rows:
            if row["id"] in agreed:
                continue
            found = await _check(client, pool, kind, row)
            if found is not None:
                findings.append(found)

    if options.repair or options.repair_missing:
        findings = [await _repair(client, pool, f, task_queue, options) for f in findings]
    await _record(pool, run_id, findings)
    return ReconcileReport(
        run_id=run_id,
        orders_checked=checked["order"],
        messages_checked=checked["message"],
        findings=findings,
    )


async def _repair(
    client: Client,
    pool: asyncpg.Pool,
    finding: Finding,
    task_queue: str,
    options: ReconcileInput,
) -> Finding:
    repairable = (finding.finding == "orphaned" and options.repair) or (
        finding.finding == "missing" and options.repair_missing
    )
    if finding.entity_kind != "order" or not repairable:
        return finding
    workflow_id = recovery_workflow_id(finding.entity_id)
    # The recovery is part of the order's lifecycle: its trace, and its audit rows.
    trace_parent = await pool.fetchval(
        "SELECT trace_parent FROM orders WHERE id = $1", finding.entity_id
    )
    with joined("order.recover", trace_parent, attributes={"tollgate.order_id": finding.entity_id}):
        await _start_recovery(client, finding, workflow_id, task_queue)
    return finding.model_copy(update={"repair_workflow_id": workflow_id})


async def _start_recovery(
    client: Client, finding: Finding, workflow_id: str, task_queue: str
) -> None:
    await client.start_workflow(
        ORDER_RECOVERY_WORKFLOW,
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


def scheduled_input(every: timedelta) -> ReconcileInput:
    """What each scheduled run looks at: rows still in flight (as far back as the
    lookback), and rows that came to rest since about two runs ago, so that a run that
    was late or failed is covered by the next one."""
    defaults = ReconcileInput()
    return ReconcileInput(at_rest_lookback=2 * every + defaults.grace)


async def ensure_schedule(client: Client, *, task_queue: str, every: timedelta) -> bool:
    """Create the reconciler's Temporal Schedule, or bring an existing one's interval
    and runs' input up to date (a newer worker may have changed them) while keeping its
    state and policies: an operator's pause stays. True if it was created."""
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            RECONCILER_WORKFLOW,
            scheduled_input(every),
            id=f"{RECONCILE_SCHEDULE_ID}-run",
            task_queue=task_queue,
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
    )
    try:
        await client.create_schedule(RECONCILE_SCHEDULE_ID, schedule)
    except ScheduleAlreadyRunningError:
        await client.get_schedule_handle(RECONCILE_SCHEDULE_ID).update(
            lambda current: ScheduleUpdate(
                schedule=replace(
                    current.description.schedule, action=schedule.action, spec=schedule.spec
                )
            )
        )
        return False
    return True
