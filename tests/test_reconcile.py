"""The reconciler finds rows whose workflow is gone and recovers them from the ledger."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.workflowservice.v1 import ResetWorkflowExecutionRequest
from temporalio.client import (
    Client,
    DescribeWorkflowInput,
    Interceptor,
    OutboundInterceptor,
    ScheduleActionExecutionStartWorkflow,
    ScheduleActionResult,
)
from temporalio.service import RPCError, RPCStatusCode

from tests.conftest import FAST_RETRY, Harness
from tests.waiting import eventually, order_step
from tollgate.messages.states import MessageStatus
from tollgate.names import order_workflow_id, recovery_workflow_id
from tollgate.ops import reconcile as reconcile_module
from tollgate.ops.reconcile import ReconcileInput, ReconcileReport, reconcile
from tollgate.orders import store as order_store
from tollgate.orders.models import RecoveryInput
from tollgate.orders.states import OrderStatus
from tollgate_dev.sandbox import FaultSpec
from workflows.recovery import OrderRecoveryWorkflow

S = OrderStatus
M = MessageStatus
#: How much earlier than the test the reconciler looks: rows of the test before it are
#: harmless, and this covers the moment between reading the clock here and in Postgres.
SLACK = timedelta(seconds=5)


@pytest.fixture
def now() -> Callable[..., ReconcileInput]:
    """Options for a reconcile run right now that repairs, with no grace period, over the
    rows changed since this test began. The database is the whole session's: a longer
    lookback would describe every row the earlier tests left (one call each) and
    recover the ones without a workflow, on this test's worker, while the test waits."""
    began = time.monotonic()

    def options(**changes: Any) -> ReconcileInput:
        lookback = timedelta(seconds=time.monotonic() - began) + SLACK
        options_now = ReconcileInput(repair=True, grace=timedelta(0), lookback=lookback)
        return options_now.model_copy(update=changes)

    return options


async def _terminate_at(
    h: Harness, step: str, provider: str, *, cancel_first: bool = False, answer_ms: int = 1500
) -> str:
    """Start an order, let its provider call land, and terminate it mid-flight; the
    provider answers ``answer_ms`` after it acted."""
    slow = FaultSpec(latency_ms=answer_ms, latency_phase="after")
    order = h.order()
    if provider == "inventory":
        handle = await h.charging(order)
        await h.sandbox.set_fault(provider, slow)
    else:
        await h.sandbox.set_fault(provider, slow)
        handle = await h.service.create(order)
    await order_step(h.service, order.order_id, step)
    await asyncio.sleep(0.3)  # the provider has acted; its answer is still on the way
    if cancel_first:
        await order_store.request_cancellation(
            h.pool, order.order_id, reason="customer asked", actor="ops"
        )
    await handle.terminate("operator pressed Terminate in the Web UI")
    await h.sandbox.clear_faults()
    return order.order_id


async def test_terminated_orders_are_recovered_with_no_money_left_charged(
    h: Harness, now: Callable[..., ReconcileInput]
) -> None:
    # Terminating a workflow does not stop its activity in flight: once the stock is
    # held, the reservation's activity moves the row to COMPLETED, a whole checkout,
    # unless a recovery claimed the row first (the move then finds the version moved).
    # Here the inventory answers after the recovery claimed it.
    reserved = await _terminate_at(h, "reserving", "inventory", answer_ms=8000)
    charged = await _terminate_at(h, "charging", "payments")
    cancelling = await _terminate_at(h, "charging", "payments", cancel_first=True)
    ours = {reserved, charged, cancelling}
    for order_id in ours:
        ledger = await h.sandbox.ledger(order_id)
        assert [c.status for c in ledger.charges] == ["captured"], (
            "money is charged before recovery"
        )

    report = await reconcile(h.client, h.pool, task_queue=h.task_queue, options=now())
    found = {f.entity_id: f for f in report.findings if f.entity_id in ours}
    assert set(found) == ours
    assert all(
        f.finding == "orphaned" and f.workflow_status == "TERMINATED" for f in found.values()
    )
    assert (
        found[reserved].row_status == "RESERVING" and found[cancelling].row_status == "CANCELLING"
    )
    recorded = await h.pool.fetch(
        "SELECT entity_id, repair_workflow_id FROM reconciliation_findings WHERE run_id = $1",
        report.run_id,
    )
    assert ours <= {r["entity_id"] for r in recorded}

    for order_id in ours:
        repair_id = found[order_id].repair_workflow_id
        assert repair_id == f"order-{order_id}:recovery"
        await h.client.get_workflow_handle(repair_id).result()

    for order_id, final in ((reserved, S.FAILED), (charged, S.FAILED), (cancelling, S.CANCELLED)):
        row = await h.service.row(order_id)
        assert row.status == final, (order_id, row.status)
        audit = await order_store.list_transitions(h.pool, order_id)
        assert audit[-1].actor.startswith("reconciler:order-")
        ledger = await h.sandbox.ledger(order_id)
        assert [c.status for c in ledger.charges] == ["refunded"], "no money left charged"
        assert not [r for r in ledger.reservations if r.status == "reserved"], "no stock left held"
    reason = (await h.service.row(reserved)).failure_reason
    assert reason is not None and reason.startswith("recovered by the reconciler")

    again = await reconcile(h.client, h.pool, task_queue=h.task_queue, options=now())
    assert not [f for f in again.findings if f.entity_id in ours], "a repaired row is at rest"


async def test_a_row_that_disagrees_with_its_workflow_is_reported_not_repaired(
    h: Harness, now: Callable[..., ReconcileInput], owner_url: str
) -> None:
    order = h.order()
    result = await (await h.service.create(order)).result()
    assert result.status == S.COMPLETED
    # A manual "fix" by the schema owner, past the trigger: exactly what must be caught.
    conn = await asyncpg.connect(owner_url)
    try:
        async with conn.transaction():
            await conn.execute("ALTER TABLE orders DISABLE TRIGGER orders_guard")
            await conn.execute("UPDATE orders SET status = 'FAILED' WHERE id = $1", order.order_id)
            await conn.execute("ALTER TABLE orders ENABLE TRIGGER orders_guard")
    finally:
        await conn.close()

    report = await reconcile(h.client, h.pool, task_queue=h.task_queue, options=now())
    mine = [f for f in report.findings if f.entity_id == order.order_id]
    assert len(mine) == 1
    assert mine[0].finding == "disagreement" and mine[0].repair_workflow_id is None
    assert "COMPLETED" in mine[0].detail and "FAILED" in mine[0].detail
    assert (await h.service.row(order.order_id)).status == S.FAILED


async def test_the_schedule_is_created_once_and_its_run_reconciles(h: Harness) -> None:
    from tollgate.ops.reconcile import RECONCILE_SCHEDULE_ID, ReconcileReport, ensure_schedule

    assert await ensure_schedule(h.client, task_queue=h.task_queue, every=timedelta(hours=1))
    schedule = h.client.get_schedule_handle(RECONCILE_SCHEDULE_ID)
    try:
        assert not await ensure_schedule(
            h.client, task_queue=h.task_queue, every=timedelta(hours=1)
        )
        await schedule.trigger()

        async def recent_actions() -> Sequence[ScheduleActionResult]:
            return (await schedule.describe()).info.recent_actions

        recent = await eventually(recent_actions, what="the schedule's run recorded")
        run = recent[0].action
        assert isinstance(run, ScheduleActionExecutionStartWorkflow), run  # it starts a workflow
        report = await h.client.get_workflow_handle(
            run.workflow_id, run_id=run.first_execution_run_id, result_type=ReconcileReport
        ).result()
        assert run.workflow_id.startswith(f"{RECONCILE_SCHEDULE_ID}-run")
        assert len(report.run_id) == 12, "the scheduled run went through the reconcile activity"
    finally:
        await schedule.delete()


def _client_seeing_describes(h: Harness, on_describe: Callable[[str], Awaitable[None]]) -> Client:
    """The harness's client, but every describe first awaits ``on_describe(workflow_id)``."""

    class _Outbound(OutboundInterceptor):
        async def describe_workflow(self, input: DescribeWorkflowInput) -> Any:
            await on_describe(input.id)
            return await super().describe_workflow(input)

    class _Interceptor(Interceptor):
        def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
            return _Outbound(next)

    return Client(
        h.client.service_client,
        namespace=h.client.namespace,
        data_converter=h.client.data_converter,
        interceptors=[_Interceptor()],
    )


async def _reconcile_read_rows_then_described(
    h: Harness,
    options: ReconcileInput,
    order_id: str,
    on_describe: Callable[[], Awaitable[None]],
) -> ReconcileReport:
    """Run the reconciler with a client that, when it describes ``order_id``'s workflow,
    first lets ``on_describe`` happen: the row was read before, the describe sees after."""

    async def racing_on(workflow_id: str) -> None:
        if workflow_id == order_workflow_id(order_id):
            await on_describe()

    racing = _client_seeing_describes(h, racing_on)
    return await reconcile(racing, h.pool, task_queue=h.task_queue, options=options)


async def test_an_order_that_completes_while_the_reconciler_looks_is_not_refunded(
    h: Harness,
    now: Callable[..., ReconcileInput],
) -> None:
    """The reconciler reads rows first and describes workflows later; an order whose
    workflow completes in between was once taken for orphaned and refunded."""
    await h.sandbox.set_fault("inventory", FaultSpec(latency_ms=800, latency_phase="after"))
    order = h.order()
    handle = await h.service.create(order)
    await order_step(h.service, order.order_id, "reserving")
    assert (await h.service.row(order.order_id)).status == S.RESERVING

    async def let_it_complete() -> None:
        assert (await handle.result()).status == S.COMPLETED

    report = await _reconcile_read_rows_then_described(h, now(), order.order_id, let_it_complete)
    assert not [f for f in report.findings if f.entity_id == order.order_id]
    assert (await h.service.row(order.order_id)).status == S.COMPLETED
    ledger = await h.sandbox.ledger(order.order_id)
    assert [c.status for c in ledger.charges] == ["captured"], "one charge, kept"
    assert ledger.refunds == [] and ledger.releases == [] and ledger.voids == []
    with pytest.raises(RPCError):  # no recovery was started for it
        await h.client.get_workflow_handle(recovery_workflow_id(order.order_id)).describe()


async def test_recovery_of_a_completed_order_undoes_nothing(h: Harness) -> None:
    order = h.order()
    assert (await (await h.service.create(order)).result()).status == S.COMPLETED
    before_row = await h.service.row(order.order_id)
    before_ledger = await h.sandbox.ledger(order.order_id)

    result = await h.client.execute_workflow(
        OrderRecoveryWorkflow.run,
        RecoveryInput(order_id=order.order_id, reason="started by mistake", retry=FAST_RETRY),
        id=recovery_workflow_id(order.order_id),
        task_queue=h.task_queue,
    )
    assert result.outcome == "nothing to do" and result.compensations == []
    assert result.status == S.COMPLETED
    assert await h.service.row(order.order_id) == before_row, "row untouched, same version"
    assert await h.sandbox.ledger(order.order_id) == before_ledger, "ledger untouched"


async def test_recovery_claims_before_it_compensates(h: Harness) -> None:
    """The claim is a version-checked move out of the forward path, committed before any
    refund: the audit shows COMPENSATING written by the recovery, then FAILED."""
    order_id = await _terminate_at(h, "charging", "payments")
    refunds_before = len((await h.sandbox.ledger(order_id)).refunds)
    assert refunds_before == 0
    result = await h.client.execute_workflow(
        OrderRecoveryWorkflow.run,
        RecoveryInput(order_id=order_id, reason="recovered by hand", retry=FAST_RETRY),
        id=recovery_workflow_id(order_id),
        task_queue=h.task_queue,
    )
    assert result.outcome == "recovered" and result.status == S.FAILED
    audit = await order_store.list_transitions(h.pool, order_id)
    claim, end = audit[-2], audit[-1]
    assert (claim.from_status, claim.to_status) == (S.CHARGING, S.COMPENSATING)
    assert claim.actor.startswith("reconciler:") and end.to_status == S.FAILED
    ledger = await h.sandbox.ledger(order_id)
    assert ledger.refunds and all(r.created_at > claim.at for r in ledger.refunds), (
        "every refund came after the claim committed"
    )


async def test_a_row_temporal_does_not_know_is_reported_and_repaired_only_on_request(
    h: Harness,
    now: Callable[..., ReconcileInput],
) -> None:
    order = h.order()
    async with h.pool.acquire() as conn:
        await order_store.insert_order(
            conn, order, workflow_id=order_workflow_id(order.order_id), actor="test"
        )
    report = await reconcile(h.client, h.pool, task_queue=h.task_queue, options=now())
    (mine,) = [f for f in report.findings if f.entity_id == order.order_id]
    assert mine.finding == "missing" and mine.workflow_status is None
    assert mine.repair_workflow_id is None, "NOT_FOUND is reported, never repaired by default"
    assert (await h.service.row(order.order_id)).status == S.PENDING

    # --repair-missing alone: the operator asked for exactly this repair
    asked = now(repair=False, repair_missing=True)
    report = await reconcile(h.client, h.pool, task_queue=h.task_queue, options=asked)
    (mine,) = [f for f in report.findings if f.entity_id == order.order_id]
    assert mine.repair_workflow_id == recovery_workflow_id(order.order_id)
    await h.client.get_workflow_handle(mine.repair_workflow_id).result()
    assert (await h.service.row(order.order_id)).status == S.FAILED


async def test_a_message_at_rest_whose_workflow_was_terminated_is_reported(
    h: Harness, now: Callable[..., ReconcileInput]
) -> None:
    user, devices = await h.devices(1)
    msg = h.message(user, read_window=timedelta(minutes=5))
    handle = await h.messages.send(msg)
    await h.messages.device_says(msg.message_id, devices[0], "delivered")

    async def delivered() -> bool:
        return (await h.messages.row(msg.message_id)).status == M.DELIVERED

    await eventually(delivered, what="delivered")
    await handle.terminate("operator pressed Terminate")
    report = await reconcile(h.client, h.pool, task_queue=h.task_queue, options=now())
    (mine,) = [f for f in report.findings if f.entity_id == msg.message_id]
    assert mine.finding == "failed_at_rest" and mine.workflow_status == "TERMINATED"
    assert mine.row_status == "DELIVERED" and mine.repair_workflow_id is None


async def test_rows_at_rest_that_agree_with_their_completed_workflow_cost_no_describe(
    h: Harness, now: Callable[..., ReconcileInput], owner_url: str
) -> None:
    """A scheduled run looks at every row that came to rest since the run before. Those
    whose workflow completed with the row's own status are settled by one visibility
    list call, not a describe and a history read each; the rest are still looked into."""
    agreeing, fixed_by_hand = h.order(), h.order()
    for order in (agreeing, fixed_by_hand):
        assert (await (await h.service.create(order)).result()).status == S.COMPLETED
    conn = await asyncpg.connect(owner_url)
    try:
        async with conn.transaction():
            await conn.execute("ALTER TABLE orders DISABLE TRIGGER orders_guard")
            await conn.execute(
                "UPDATE orders SET status = 'FAILED' WHERE id = $1", fixed_by_hand.order_id
            )
            await conn.execute("ALTER TABLE orders ENABLE TRIGGER orders_guard")
    finally:
        await conn.close()

    async def listed_completed() -> bool:
        ids = {order_workflow_id(o.order_id) for o in (agreeing, fixed_by_hand)}
        query = "ExecutionStatus = 'Completed' AND WorkflowId IN ({})".format(
            ", ".join(f"'{i}'" for i in sorted(ids))
        )
        return len([e async for e in h.client.list_workflows(query)]) == len(ids)

    await eventually(listed_completed, what="visibility lists both workflows completed")
    described: list[str] = []

    async def count(workflow_id: str) -> None:
        described.append(workflow_id)

    counting = _client_seeing_describes(h, count)
    report = await reconcile(counting, h.pool, task_queue=h.task_queue, options=now())

    assert order_workflow_id(agreeing.order_id) not in described
    assert described.count(order_workflow_id(fixed_by_hand.order_id)) == 1
    mine = {f.entity_id: f.finding for f in report.findings}
    assert agreeing.order_id not in mine
    assert mine[fixed_by_hand.order_id] == "disagreement"


async def test_an_order_reset_after_it_completed_whose_new_run_was_terminated_is_reported(
    h: Harness, now: Callable[..., ReconcileInput]
) -> None:
    """An operator resets a completed order (the Web UI allows it) and its new run is
    terminated: the order's latest run ended badly, though an older one completed with
    the row's status. Visibility lists both; only a single completed run settles a row."""
    order = h.order()
    handle = await h.service.create(order)
    assert (await handle.result()).status == S.COMPLETED
    history = await handle.fetch_history()
    first_task = next(
        e.event_id
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    )
    # The new run's validation waits on the catalog while it is terminated.
    await h.sandbox.set_fault("inventory", FaultSpec(latency_ms=5000))
    try:
        await h.client.workflow_service.reset_workflow_execution(
            ResetWorkflowExecutionRequest(
                namespace=h.client.namespace,
                workflow_execution=WorkflowExecution(workflow_id=handle.id),
                reason="operator reset",
                workflow_task_finish_event_id=first_task,
                request_id=str(uuid.uuid4()),
            )
        )
        await h.client.get_workflow_handle(handle.id).terminate("the reset went wrong")
    finally:
        await h.sandbox.clear_faults()

    async def both_runs_listed() -> bool:
        runs = [e async for e in h.client.list_workflows(f"WorkflowId = '{handle.id}'")]
        return sorted(r.status.name for r in runs if r.status) == ["COMPLETED", "TERMINATED"]

    await eventually(both_runs_listed, what="visibility lists the completed and the reset run")
    report = await reconcile(h.client, h.pool, task_queue=h.task_queue, options=now())
    (mine,) = [f for f in report.findings if f.entity_id == order.order_id]
    assert mine.finding == "failed_at_rest" and mine.workflow_status == "TERMINATED"
    assert mine.row_status == "COMPLETED"


async def test_a_cluster_that_cannot_answer_the_visibility_query_is_asked_row_by_row() -> None:
    """Without advanced visibility the list query is refused; the run must not fail, and
    every row at rest then goes the slow way (describe, result)."""

    class _NoAdvancedVisibility:
        def list_workflows(self, query: str) -> Any:
            raise RPCError("unsupported query", RPCStatusCode.INVALID_ARGUMENT, b"")

    rows = [
        {"id": "o-1", "status": "COMPLETED", "version": 5, "workflow_id": "order-o-1"},
        {"id": "o-2", "status": "FAILED", "version": 3, "workflow_id": "order-o-2"},
    ]
    agreed = await reconcile_module._completed_as_recorded(
        _NoAdvancedVisibility(),  # type: ignore[arg-type]
        reconcile_module._ORDERS,
        rows,  # type: ignore[arg-type]
    )
    assert agreed == set()
