"""Order lifecycles end to end: real Temporal, real Postgres, providers over HTTP.

Every test checks the four places a user would: the workflow's result, the Postgres
row, its audit trail, and the sandbox ledger (what money and stock actually did).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import CancelledError, WorkflowAlreadyStartedError
from temporalio.service import RPCError
from temporalio.worker import Worker

from activities.inventory import InventoryActivities
from activities.orders import OrderStoreActivities
from activities.payments import PaymentActivities
from tests.conftest import Harness
from tests.recording import maybe_record
from tests.waiting import eventually, order_status, order_step
from tollgate.errors import InputError
from tollgate.models import TransitionResult
from tollgate.names import (
    ALERT_ATTR,
    COMPENSATION_STUCK,
    ORDER_STATUS_ATTR,
    ORDER_STATUS_QUERY,
    order_workflow_id,
)
from tollgate.orders import store as order_store
from tollgate.orders.models import (
    ChargeInput,
    ChargeResult,
    OrderInput,
    OrderProgress,
    OrderResult,
    ReserveInput,
    ReserveResult,
    TransitionInput,
    ValidateInput,
    ValidateResult,
)
from tollgate.orders.states import OrderStatus
from tollgate.providers.client import build_http_client
from tollgate.providers.inventory import Inventory
from tollgate.providers.payments import PaymentGateway
from tollgate.worker import activities_for
from tollgate_dev.sandbox import FaultSpec
from workflows.order import OrderWorkflow

S = OrderStatus
PIPELINE = [
    (None, S.PENDING),
    (S.PENDING, S.VALIDATING),
    (S.VALIDATING, S.CHARGING),
    (S.CHARGING, S.RESERVING),
]


async def _audit(h: Harness, order_id: str) -> list[tuple[OrderStatus | None, OrderStatus]]:
    return [
        (a.from_status, a.to_status) for a in await order_store.list_transitions(h.pool, order_id)
    ]


async def _started_with_late_answers(
    h: Harness, provider: str, latency_ms: int, step: str
) -> tuple[OrderInput, WorkflowHandle[Any, Any]]:
    """An order started while ``provider`` acts at once but answers ``latency_ms`` late,
    once its workflow is at ``step``: the moment a cancellation finds the outcome unknown."""
    await h.sandbox.set_fault(provider, FaultSpec(latency_ms=latency_ms, latency_phase="after"))
    order = h.order()
    handle = await h.service.create(order)
    await order_step(h.service, order.order_id, step)
    return order, handle


async def test_happy_path_completes_with_one_charge_and_one_reservation(h: Harness) -> None:
    order = h.order(items=[{"sku": "WIDGET", "quantity": 2}], amount_cents=1998)
    stock_before = (await h.sandbox.stock())["WIDGET"]
    handle = await h.service.create(order)
    result = await handle.result()

    assert result.status == S.COMPLETED and result.charge_id and result.reservation_id
    row = await h.service.row(order.order_id)
    assert (row.status, row.version) == (S.COMPLETED, 5)
    assert result.version == row.version
    assert await _audit(h, order.order_id) == [*PIPELINE, (S.RESERVING, S.COMPLETED)]
    audit = await order_store.list_transitions(h.pool, order.order_id)
    assert audit[0].actor == "cli:create"
    assert all(a.actor == f"workflow:order-{order.order_id}" for a in audit[1:])
    assert all(a.trace_id and len(a.trace_id) == 32 for a in audit[1:]), "trace id recorded"

    ledger = await h.sandbox.ledger(order.order_id)
    assert [(c.amount_cents, c.status) for c in ledger.charges] == [(1998, "captured")]
    assert [r.status for r in ledger.reservations] == ["reserved"]
    assert not ledger.refunds and not ledger.releases
    assert (await h.sandbox.stock())["WIDGET"] == stock_before - 2

    description = await handle.describe()
    assert description.status == WorkflowExecutionStatus.COMPLETED
    assert description.typed_search_attributes.get(ORDER_STATUS_ATTR) == "COMPLETED"

    await maybe_record(handle, h.settings, "order_completed")


async def test_declined_card_fails_with_nothing_charged(h: Harness) -> None:
    await h.sandbox.decline_customer("mallory")
    try:
        order = h.order(customer_id="mallory")
        result = await (await h.service.create(order)).result()
    finally:
        await h.sandbox.allow_customer("mallory")
    assert result.status == S.FAILED
    assert result.failure_reason and result.failure_reason.startswith("PaymentDeclined")
    # the refund registered before the charge ran, and found nothing to refund
    assert result.compensations == ["refund:voided"]
    row = await h.service.row(order.order_id)
    assert row.status == S.FAILED and row.failure_reason == result.failure_reason
    assert await _audit(h, order.order_id) == [
        *PIPELINE[:3],
        (S.CHARGING, S.COMPENSATING),
        (S.COMPENSATING, S.FAILED),
    ]
    ledger = await h.sandbox.ledger(order.order_id)
    assert ledger.charges == [] and ledger.refunds == [] and ledger.reservations == []


async def test_out_of_stock_fails_with_the_charge_refunded(h: Harness) -> None:
    order = h.order(items=[{"sku": "SOLDOUT", "quantity": 1}], amount_cents=4999)
    handle = await h.service.create(order)
    result = await handle.result()
    assert result.status == S.FAILED
    assert result.failure_reason and result.failure_reason.startswith("OutOfStock")
    assert result.compensations == ["release:voided", "refund:refunded"]
    assert await _audit(h, order.order_id) == [
        *PIPELINE,
        (S.RESERVING, S.COMPENSATING),
        (S.COMPENSATING, S.FAILED),
    ]
    ledger = await h.sandbox.ledger(order.order_id)
    assert [(c.amount_cents, c.status) for c in ledger.charges] == [(4999, "refunded")]
    assert [r.amount_cents for r in ledger.refunds] == [4999]
    assert ledger.reservations == []
    await maybe_record(handle, h.settings, "order_out_of_stock")


async def test_invalid_order_is_refused_before_anything_is_written(h: Harness) -> None:
    order = h.order(items=[{"sku": "NO-SUCH-THING", "quantity": 1}], currency="JPY")
    with pytest.raises(InputError) as refused:
        await h.service.create(order)
    assert "unknown SKU NO-SUCH-THING" in str(refused.value)
    assert "currency JPY is not supported" in str(refused.value)
    assert await order_store.get_order(h.pool, order.order_id) is None
    with pytest.raises(RPCError):
        await h.service.handle(order.order_id).describe()


async def test_invalid_order_fails_in_validation_before_any_money_moves(h: Harness) -> None:
    """A start that did not come through the service (another client, or a catalog that
    changed after the check) is still caught by the workflow's own validation."""
    order = h.order(items=[{"sku": "NO-SUCH-THING", "quantity": 1}], currency="JPY")
    handle = await h.client.start_workflow(
        OrderWorkflow.run,
        order,
        id=order_workflow_id(order.order_id),
        task_queue=h.task_queue,
    )
    result = await handle.result()
    assert result.status == S.FAILED
    assert result.failure_reason is not None
    assert "unknown SKU NO-SUCH-THING" in result.failure_reason
    assert "currency JPY is not supported" in result.failure_reason
    assert result.compensations == []
    assert await _audit(h, order.order_id) == [*PIPELINE[:2], (S.VALIDATING, S.FAILED)]
    ledger = await h.sandbox.ledger(order.order_id)
    assert ledger.charges == [] and ledger.voids == []


@pytest.mark.parametrize("phase", ["before", "after"])
async def test_gateway_failing_three_times_then_recovering_charges_once(
    h: Harness, phase: str
) -> None:
    """'after': the gateway charged but the answer was lost; retries reuse the key."""
    await h.sandbox.set_fault("payments", FaultSpec(fail_next=3, fail_status=503, fail_phase=phase))
    before = (await h.sandbox.request_counts())["payments"]
    order = h.order()
    result = await (await h.service.create(order)).result()
    assert result.status == S.COMPLETED
    assert (await h.sandbox.request_counts())["payments"] - before == 4
    ledger = await h.sandbox.ledger(order.order_id)
    assert len(ledger.charges) == 1 and ledger.charges[0].charge_id == result.charge_id
    assert ledger.charges[0].idempotency_key == f"order-{order.order_id}:charge"


async def test_retries_exhausted_compensate_and_fail(h: Harness) -> None:
    """Inventory down for good: reserving gives up, and the refund waits for recovery."""
    order = h.order()
    handle = await h.charging(order)
    await h.sandbox.set_fault("inventory", FaultSpec(fail_rate=1.0, fail_status=500))
    await order_status(h.service, order.order_id, S.COMPENSATING)
    # The release cannot reach inventory either; the order must wait, not give up on it.
    await asyncio.sleep(0.5)
    assert (await h.service.row(order.order_id)).status == S.COMPENSATING
    await h.sandbox.clear_faults()
    result = await handle.result()
    assert result.status == S.FAILED
    assert result.failure_reason and result.failure_reason.startswith("ProviderUnavailable")
    assert result.compensations == ["release:voided", "refund:refunded"]
    ledger = await h.sandbox.ledger(order.order_id)
    assert [c.status for c in ledger.charges] == ["refunded"]


async def test_cancel_while_reservation_is_slow_refunds_and_releases(h: Harness) -> None:
    """The reservation lands at once but its answer is slow: cancel, and both are undone."""
    order, handle = await _started_with_late_answers(h, "inventory", 1500, "reserving")
    await asyncio.sleep(0.2)
    outcome = await h.service.cancel(
        order.order_id, reason="changed my mind", requested_by="tester"
    )
    assert outcome.recorded and outcome.signalled and outcome.status == S.CANCELLING
    result = await handle.result()

    assert result.status == S.CANCELLED and result.cancel_reason == "changed my mind"
    row = await h.service.row(order.order_id)
    assert (row.status, row.cancel_reason) == (S.CANCELLED, "changed my mind")
    audit = await order_store.list_transitions(h.pool, order.order_id)
    assert [(a.from_status, a.to_status) for a in audit] == [
        *PIPELINE,
        (S.RESERVING, S.CANCELLING),
        (S.CANCELLING, S.CANCELLED),
    ]
    assert audit[-2].actor == "cli:tester" and audit[-2].reason == "changed my mind"
    ledger = await h.sandbox.ledger(order.order_id)
    assert [c.status for c in ledger.charges] == ["refunded"]
    assert [r.status for r in ledger.reservations] == ["released"]
    assert len(ledger.refunds) == 1 and len(ledger.releases) == 1
    await maybe_record(handle, h.settings, "order_cancelled")


@pytest.mark.parametrize(
    ("step", "provider"),
    [("validating", "inventory"), ("charging", "payments"), ("reserving", "inventory")],
)
async def test_cancellation_racing_each_step_leaves_nothing_charged_or_reserved(
    h: Harness, step: str, provider: str
) -> None:
    """The provider is slow *before* acting: the undo voids the key and the late call is refused."""
    order = h.order()
    if step == "reserving":
        handle = await h.charging(order)
        await h.sandbox.set_fault(provider, FaultSpec(latency_ms=1000))
    else:
        await h.sandbox.set_fault(provider, FaultSpec(latency_ms=1000))
        handle = await h.service.create(order)
    await order_step(h.service, order.order_id, step)
    await h.service.cancel(order.order_id, reason=f"cancel during {step}", requested_by="tester")
    result = await handle.result()
    await asyncio.sleep(1.2)  # let the slowed request land (and be refused) at the provider

    assert result.status == S.CANCELLED
    assert (await h.service.row(order.order_id)).status == S.CANCELLED
    audit = await _audit(h, order.order_id)
    assert audit[-2:] == [(S(step.upper()), S.CANCELLING), (S.CANCELLING, S.CANCELLED)]
    ledger = await h.sandbox.ledger(order.order_id)
    assert not [c for c in ledger.charges if c.status == "captured"], "money left charged"
    assert not [r for r in ledger.reservations if r.status == "reserved"], "stock left reserved"


async def test_cancellation_recorded_only_in_postgres_still_wins(h: Harness) -> None:
    """No signal at all: the next transition finds CANCELLING and the order compensates."""
    order, handle = await _started_with_late_answers(h, "payments", 800, "charging")
    state = await order_store.request_cancellation(
        h.pool, order.order_id, reason="from psql", actor="ops"
    )
    assert state.status == S.CANCELLING
    result = await handle.result()
    assert result.status == S.CANCELLED and result.compensations == ["refund:refunded"]
    ledger = await h.sandbox.ledger(order.order_id)
    assert [c.status for c in ledger.charges] == ["refunded"]


async def test_cancel_from_temporal_compensates_and_ends_cancelled(h: Harness) -> None:
    """A cancel from the Web UI (a Temporal cancel request) ends the same way."""
    order, handle = await _started_with_late_answers(h, "inventory", 1000, "reserving")
    await asyncio.sleep(0.2)
    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as caught:
        await handle.result()
    assert isinstance(caught.value.cause, CancelledError)
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    row = await h.service.row(order.order_id)
    assert row.status == S.CANCELLED and row.cancel_reason == "cancelled in Temporal"
    ledger = await h.sandbox.ledger(order.order_id)
    assert [c.status for c in ledger.charges] == ["refunded"]
    assert [r.status for r in ledger.reservations] == ["released"]


async def test_cancel_of_a_finished_order_is_refused_and_changes_nothing(h: Harness) -> None:
    order = h.order()
    await (await h.service.create(order)).result()
    before = await h.service.row(order.order_id)
    outcome = await h.service.cancel(order.order_id, reason="too late", requested_by="tester")
    assert not outcome.recorded and outcome.status == S.COMPLETED
    assert "already COMPLETED" in outcome.message
    assert await h.service.row(order.order_id) == before


async def test_a_second_start_for_the_same_order_is_refused(h: Harness) -> None:
    order = h.order()
    handle = await h.service.create(order)
    with pytest.raises(InputError, match="already exists"):
        await h.service.create(order)
    # straight at Temporal, bypassing the row check: the workflow id refuses it
    with pytest.raises(WorkflowAlreadyStartedError):
        await h.client.start_workflow(
            OrderWorkflow.run,
            order,
            id=handle.id,
            task_queue=h.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
        )
    assert (await handle.result()).status == S.COMPLETED


async def test_a_start_temporal_refuses_writes_no_row(h: Harness) -> None:
    """An order whose workflow cannot start leaves no PENDING row behind."""
    order = h.order()
    handle = await h.service.create(order)
    await handle.result()
    await h.pool.execute("SELECT 1")  # the first order exists; now reuse its id on a new row
    twin = h.order(order_id=order.order_id + "-twin")
    # occupy the twin's workflow id directly in Temporal, so the service's start fails
    await h.client.start_workflow(
        OrderWorkflow.run, twin, id=f"order-{twin.order_id}", task_queue=h.task_queue
    )
    await h.client.get_workflow_handle(f"order-{twin.order_id}").result()
    await h.pool.execute("SELECT 1")
    row = await order_store.get_order(h.pool, twin.order_id)
    assert row is not None  # the workflow's own first activity recorded it
    third = h.order(order_id=f"t-{uuid.uuid4().hex[:10]}")
    await h.client.start_workflow(
        OrderWorkflow.run, third, id=f"order-{third.order_id}", task_queue=f"{h.task_queue}-nobody"
    )
    with pytest.raises(InputError, match="already has a lifecycle"):
        await h.service.create(third)
    assert await order_store.get_order(h.pool, third.order_id) is None
    await h.client.get_workflow_handle(f"order-{third.order_id}").terminate("test cleanup")


class _LosesFirstReply:
    """Stand-in for the activities that move an order: each commits, then 'loses' its
    reply once. ``validate_order`` takes the first step (it begins the order),
    ``charge_payment`` and ``reserve_inventory`` move the row before their calls (and the
    reservation to COMPLETED after it), and ``transition_order`` makes any other."""

    def __init__(
        self,
        store: OrderStoreActivities,
        payments: PaymentActivities,
        inventory: InventoryActivities,
    ) -> None:
        self.store, self.payments, self.inventory = store, payments, inventory
        self.lost: set[str] = set()

    def _lose_once(self, transition: str) -> None:
        if transition not in self.lost:
            self.lost.add(transition)
            raise RuntimeError("connection reset after commit (simulated)")

    @activity.defn(name="validate_order")
    async def validate(self, req: ValidateInput) -> ValidateResult:
        result = await self.inventory.validate(req)
        self._lose_once("begin")
        return result

    @activity.defn(name="charge_payment")
    async def charge(self, req: ChargeInput) -> ChargeResult:
        result = await self.payments.charge(req)
        self._lose_once(req.move.transition_id if req.move else "charge")
        return result

    @activity.defn(name="reserve_inventory")
    async def reserve(self, req: ReserveInput) -> ReserveResult:
        result = await self.inventory.reserve(req)
        self._lose_once(req.move.transition_id if req.move else "reserve")
        return result

    @activity.defn(name="transition_order")
    async def transition(self, req: TransitionInput) -> TransitionResult:
        result = await self.store.transition_order(req)
        self._lose_once(req.transition_id)
        return result

    def definitions(self) -> list[Any]:
        return [self.validate, self.charge, self.reserve, self.transition]


async def test_transitions_retried_after_a_committed_first_attempt_apply_once(h: Harness) -> None:
    async with build_http_client(h.settings) as http:
        store = OrderStoreActivities(h.pool)
        flaky = _LosesFirstReply(
            store,
            PaymentActivities(PaymentGateway(http), store),
            InventoryActivities(Inventory(http), store),
        )
        replaced = {"validate_order", "charge_payment", "reserve_inventory", "transition_order"}
        acts = [a for a in activities_for(h.pool, http) if activity_name(a) not in replaced]
        queue = f"{h.task_queue}-flaky"
        async with Worker(
            h.client,
            task_queue=queue,
            workflows=[OrderWorkflow],
            activities=[*acts, *flaky.definitions()],
        ):
            order = h.order()
            result = await h.client.execute_workflow(
                OrderWorkflow.run, order, id=f"order-{order.order_id}", task_queue=queue
            )
    assert result.status == S.COMPLETED and result.version == 5
    # validate (PENDING -> VALIDATING), charge (CHARGING), reserve (RESERVING, COMPLETED)
    assert len(flaky.lost) == 3, "every activity that moves the row lost its first reply"
    audit = await order_store.list_transitions(h.pool, order.order_id)
    assert [(a.from_status, a.to_status) for a in audit] == [*PIPELINE, (S.RESERVING, S.COMPLETED)]


def activity_name(fn: Any) -> str | None:
    """The name an activity is registered under."""
    definition = activity._Definition.from_callable(fn)
    return definition.name if definition else None


async def test_status_query_reports_live_progress(h: Harness) -> None:
    await h.sandbox.set_fault("payments", FaultSpec(latency_ms=600))
    order = h.order()
    handle = await h.service.create(order)
    await order_step(h.service, order.order_id, "charging")
    progress = await handle.query(ORDER_STATUS_QUERY, result_type=OrderProgress)
    assert progress.status == S.CHARGING and progress.version == 3 and not progress.cancel_requested
    report = await h.service.report(order.order_id)
    assert report.workflow_status == "RUNNING" and report.workflow_progress is not None
    result: OrderResult = await handle.result()
    assert result.status == S.COMPLETED
    report = await h.service.report(order.order_id)
    assert report.workflow_status == "COMPLETED" and len(report.transitions) == 5


async def test_a_refund_answered_4xx_is_retried_until_done_and_raises_an_alert(
    h: Harness,
) -> None:
    """Once, a refund answered 4xx failed the workflow and left the row COMPENSATING with
    the money charged. Now the undo keeps trying, and says so where operators look."""
    await h.sandbox.set_fault("inventory", FaultSpec(latency_ms=600))
    retry = h.order().retry.model_copy(update={"compensation_alert_attempts": 3})
    order = h.order(items=[{"sku": "SOLDOUT", "quantity": 1}], retry=retry)
    handle = await h.service.create(order)
    await order_status(h.service, order.order_id, S.RESERVING, every=0.01)
    # every payments call now answers 400: the refund the order is about to need
    await h.sandbox.set_fault("payments", FaultSpec(fail_rate=1.0, fail_status=400))

    async def alert() -> str | None:
        return (await handle.describe()).typed_search_attributes.get(ALERT_ATTR)

    async def raised() -> bool:
        return await alert() == COMPENSATION_STUCK

    await eventually(raised, within=60, what="the stuck-compensation alert raised")
    assert (await h.service.row(order.order_id)).status == S.COMPENSATING
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING

    await h.sandbox.clear_faults()
    result = await asyncio.wait_for(handle.result(), timeout=30)
    assert result.status == S.FAILED
    assert result.compensations == ["release:voided", "refund:refunded"], "last in, first out"
    assert await alert() is None, "the alert is cleared once the undo went through"
    ledger = await h.sandbox.ledger(order.order_id)
    assert [c.status for c in ledger.charges] == ["refunded"]
