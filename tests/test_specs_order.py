"""Specifications of the order saga and its recovery, branch by branch.

The real ``OrderWorkflow`` and ``OrderRecoveryWorkflow`` run on the time-skipping server
against stand-in activities (:mod:`tests.specs`). Each spec states the calls the workflow
made, in order, what it returned, and the compensations it ran (last in, first out).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import CancelledError

from activities.inventory import InventoryActivities
from activities.orders import OrderStoreActivities
from activities.payments import PaymentActivities
from tests import specs
from tests.specs import AS_USUAL, RETRY, Block, Fail, StandIns
from tollgate.errors import (
    InvalidProviderRequest,
    OrderCancelled,
    OutOfStock,
    PaymentDeclined,
    ProviderUnavailable,
    StoreUnavailable,
    VersionConflict,
)
from tollgate.names import (
    ALERT_ATTR,
    COMPENSATION_STUCK,
    order_workflow_id,
    recovery_workflow_id,
)
from tollgate.orders.models import (
    CancelOrderRequest,
    CompensationResult,
    OrderInput,
    OrderItem,
    OrderResult,
    OrderSnapshot,
    RecoveryInput,
    RecoveryResult,
    ValidateResult,
)
from tollgate.orders.states import OrderStatus
from workflows.order import OrderWorkflow
from workflows.recovery import OrderRecoveryWorkflow

# The shared fixtures, under the names the specs ask for.
env, acts = specs.env, specs.acts

S = OrderStatus

#: The checkout's calls up to and including the reservation, when every step succeeds.
FORWARD = [
    "begin_order",
    "validate_order",
    "transition_order:CHARGING",
    "charge_payment",
    "transition_order:RESERVING",
    "reserve_inventory",
]
#: How far into FORWARD the checkout is while each step's provider call is in flight.
IN_FLIGHT = {"validating": 2, "charging": 4, "reserving": 6}
#: An undo as the trail shows its call, and as the result reports it by default.
UNDO_CALL = {"refund": "refund_payment", "release": "release_inventory"}
UNDO_DONE = {"refund": "refund:refunded", "release": "release:released"}


def compensated(*undone: str) -> list[str]:
    """How a trail ends when the order fails: COMPENSATING, the calls of the ``undone``
    steps in the order given (last in, first out), FAILED."""
    return [
        "transition_order:COMPENSATING",
        *(UNDO_CALL[u] for u in undone),
        "transition_order:FAILED",
    ]


def step_failed(*undone: str) -> list[str]:
    """How a trail ends when a forward step fails for good: the workflow reads where the
    row stands (the step's activity moves it first, so it may or may not have), then
    compensates."""
    return ["read_order", *compensated(*undone)]


def cancelled(*undone: str) -> list[str]:
    """How a trail ends when the order is cancelled: the cancellation recorded, the calls
    of the ``undone`` steps in the order given, CANCELLED."""
    return [
        "begin_order_cancellation",
        *(UNDO_CALL[u] for u in undone),
        "transition_order:CANCELLED",
    ]


DECLINED = Fail(PaymentDeclined)


def order() -> OrderInput:
    return OrderInput(
        order_id=f"o-{uuid.uuid4().hex[:12]}",
        customer_id="alice",
        items=[OrderItem(sku="WIDGET", quantity=2)],
        amount_cents=1998,
        retry=RETRY,
    )


async def start(acts: StandIns, o: OrderInput) -> WorkflowHandle[Any, OrderResult]:
    return await acts.client.start_workflow(
        OrderWorkflow.run, o, id=order_workflow_id(o.order_id), task_queue=acts.task_queue
    )


async def check_out(acts: StandIns, o: OrderInput) -> OrderResult:
    return await (await start(acts, o)).result()


# --- the checkout ------------------------------------------------------------------


async def test_an_order_that_passes_every_step_completes_with_one_charge_and_one_reservation(
    acts: StandIns,
) -> None:
    o = order()
    result = await check_out(acts, o)

    assert acts.trail() == [*FORWARD, "transition_order:COMPLETED"]
    # each move expects the version the previous write left
    assert acts.moves(OrderStoreActivities.transition_order) == [
        (2, "CHARGING"),
        (3, "RESERVING"),
        (4, "COMPLETED"),
    ]
    assert result.status is S.COMPLETED and result.version == 5
    assert (result.charge_id, result.reservation_id) == (f"ch-{o.order_id}", f"rs-{o.order_id}")
    assert result.compensations == [] and result.failure_reason is None
    (charge,) = acts[PaymentActivities.charge].calls
    assert charge.idempotency_key == f"order-{o.order_id}:charge"
    assert charge.amount_cents == o.amount_cents


async def test_an_invalid_order_fails_at_validation_and_nothing_is_charged(
    acts: StandIns,
) -> None:
    acts[InventoryActivities.validate].then(ValidateResult(problems=["unknown SKU WIDGET"]))

    result = await check_out(acts, order())

    assert acts.trail() == [
        "begin_order",
        "validate_order",
        "transition_order:FAILED",
    ]
    assert result.status is S.FAILED
    assert result.failure_reason == "invalid order: unknown SKU WIDGET"
    assert result.compensations == [] and result.charge_id is None


async def test_a_declined_card_is_undone_by_the_refund_registered_before_the_charge(
    acts: StandIns,
) -> None:
    """The charge's outcome is unknown to the workflow when it fails, so the refund (a
    void of the charge's key) runs: it was registered before the charge was tried."""
    acts[PaymentActivities.charge].then(DECLINED)
    acts[PaymentActivities.refund].then(CompensationResult(outcome="voided"))

    result = await check_out(acts, order())

    assert acts.trail() == [*FORWARD[: IN_FLIGHT["charging"]], *step_failed("refund")]
    (charge,) = acts[PaymentActivities.charge].calls
    (refund,) = acts[PaymentActivities.refund].calls
    assert refund.charge_idempotency_key == charge.idempotency_key
    assert result.status is S.FAILED and result.compensations == ["refund:voided"]
    assert (result.failure_reason or "").startswith("PaymentDeclined")


async def test_out_of_stock_releases_the_reservation_then_refunds_the_charge(
    acts: StandIns,
) -> None:
    acts[InventoryActivities.reserve].then(Fail(OutOfStock))
    acts[InventoryActivities.release].then(CompensationResult(outcome="voided"))

    result = await check_out(acts, order())

    # last in, first out: the release was registered after the refund
    assert acts.trail() == [*FORWARD, *step_failed("release", "refund")]
    assert result.status is S.FAILED
    assert result.compensations == ["release:voided", "refund:refunded"]
    assert (result.failure_reason or "").startswith("OutOfStock")


@pytest.mark.parametrize(
    ("step", "stand_in", "undone"),
    [
        pytest.param("validating", InventoryActivities.validate, [], id="validating"),
        pytest.param("charging", PaymentActivities.charge, ["refund"], id="charging"),
        pytest.param(
            "reserving", InventoryActivities.reserve, ["release", "refund"], id="reserving"
        ),
    ],
)
async def test_a_cancel_signal_stops_the_step_in_flight_and_undoes_the_steps_reached(
    acts: StandIns, step: str, stand_in: Any, undone: list[str]
) -> None:
    in_flight = Block()
    acts[stand_in].then(in_flight)
    handle = await start(acts, order())
    await in_flight.reached()

    await handle.signal(
        OrderWorkflow.cancel, CancelOrderRequest(reason="changed my mind", requested_by="alice")
    )
    result = await handle.result()

    assert acts.trail() == [*FORWARD[: IN_FLIGHT[step]], *cancelled(*undone)]
    (begin,) = acts[OrderStoreActivities.begin_cancellation].calls
    assert begin.reason == "changed my mind" and begin.actor.endswith(":alice")
    assert result.status is S.CANCELLED and result.cancel_reason == "changed my mind"
    assert result.compensations == [UNDO_DONE[u] for u in undone]


async def test_a_transition_that_finds_the_order_cancelled_in_postgres_compensates(
    acts: StandIns,
) -> None:
    """The CLI recorded CANCELLING but its signal has not arrived: the next move finds it."""
    acts[OrderStoreActivities.transition_order].when(
        lambda move: move.to_status is S.RESERVING, Fail(OrderCancelled)
    )

    result = await check_out(acts, order())

    assert acts.trail() == [
        *FORWARD[: IN_FLIGHT["charging"]],
        "transition_order:RESERVING",
        *cancelled("refund"),
    ]
    assert result.status is S.CANCELLED
    assert result.cancel_reason == "cancellation recorded in Postgres"
    assert result.compensations == ["refund:refunded"] and result.reservation_id is None


async def test_a_move_refused_after_an_earlier_attempt_applied_it_still_undoes_the_step(
    acts: StandIns,
) -> None:
    """The first attempt moved the row to CHARGING, then lost the gateway's answer; the
    cancellation was recorded before the retry, whose move is refused. The charge may
    have landed, so the refund runs. (Refused before any attempt applied it, as in the
    spec above, the step never ran and nothing is undone.)"""
    acts[OrderStoreActivities.transition_order].when(
        lambda move: move.to_status is S.CHARGING, AS_USUAL, Fail(OrderCancelled)
    )
    acts[PaymentActivities.charge].then(Fail(ProviderUnavailable))

    result = await check_out(acts, order())

    assert acts.trail() == [
        *FORWARD[: IN_FLIGHT["charging"]],
        "transition_order:CHARGING",
        *cancelled("refund"),
    ]
    assert result.status is S.CANCELLED and result.compensations == ["refund:refunded"]


async def test_a_cancel_that_finds_the_stock_reserved_undoes_the_reservation_and_the_charge(
    acts: StandIns,
) -> None:
    """The reservation went through, then its activity's move to COMPLETED found the
    cancellation recorded: both steps ran, so both are undone."""
    acts[OrderStoreActivities.transition_order].when(
        lambda move: move.to_status is S.COMPLETED, Fail(OrderCancelled)
    )

    result = await check_out(acts, order())

    assert acts.trail() == [*FORWARD, "transition_order:COMPLETED", *cancelled("release", "refund")]
    assert result.status is S.CANCELLED
    assert result.compensations == ["release:released", "refund:refunded"]


async def test_a_postgres_outage_through_every_attempt_of_a_step_delays_the_order(
    acts: StandIns,
) -> None:
    """Postgres was out for every attempt of the charge's activity, so its move never
    reached the row. The workflow reads the row (still VALIDATING: the charge never
    ran), makes the move as a local activity, which is retried until Postgres is back,
    and charges: the outage delays the order, it does not fail it."""
    out = [Fail(StoreUnavailable)] * RETRY.maximum_attempts
    acts[OrderStoreActivities.transition_order].when(
        lambda move: move.to_status is S.CHARGING, *out
    )

    result = await check_out(acts, order())

    assert result.status is S.COMPLETED and result.compensations == []
    assert acts.trail() == [
        *FORWARD[: IN_FLIGHT["charging"] - 2],
        *["transition_order:CHARGING"] * RETRY.maximum_attempts,
        "read_order",
        "transition_order:CHARGING",
        *FORWARD[IN_FLIGHT["charging"] - 1 :],
        "transition_order:COMPLETED",
    ]
    assert acts.moves(OrderStoreActivities.transition_order)[-3:] == [
        (2, "CHARGING"),
        (3, "RESERVING"),
        (4, "COMPLETED"),
    ]


async def test_a_postgres_outage_through_every_attempt_of_validation_delays_the_order(
    acts: StandIns,
) -> None:
    """The same for the first step: no row yet, so the order is recorded by a local
    activity that waits the outage out, then validated alone."""
    acts[OrderStoreActivities.begin_order].then(*[Fail(StoreUnavailable)] * RETRY.maximum_attempts)

    result = await check_out(acts, order())

    assert result.status is S.COMPLETED
    assert acts.trail() == [
        *["begin_order"] * RETRY.maximum_attempts,
        "read_order",
        "begin_order",
        *FORWARD[1:],
        "transition_order:COMPLETED",
    ]


async def test_a_validation_that_fails_for_good_after_the_order_began_fails_it_cleanly(
    acts: StandIns,
) -> None:
    """Each attempt recorded the order and moved it to VALIDATING, then the catalog was
    down. The workflow reads where the row stands before it moves it to FAILED."""
    acts[InventoryActivities.validate].then(*[Fail(ProviderUnavailable)] * RETRY.maximum_attempts)

    result = await check_out(acts, order())

    assert acts.trail() == [
        *["begin_order", "validate_order"] * RETRY.maximum_attempts,
        "read_order",
        "transition_order:FAILED",
    ]
    assert acts.moves(OrderStoreActivities.transition_order) == [(2, "FAILED")]
    assert result.status is S.FAILED and result.compensations == []


async def test_a_reservation_whose_completion_applied_but_whose_answers_were_lost_completes(
    acts: StandIns,
) -> None:
    """Every attempt reserved and moved the order to COMPLETED, and every answer was lost.
    The row says COMPLETED: the order completed, and nothing is undone."""
    lost = acts.commits_then_fails(StoreUnavailable)
    acts[OrderStoreActivities.transition_order].when(
        lambda move: move.to_status is S.COMPLETED, *[lost] * RETRY.maximum_attempts
    )

    result = await check_out(acts, order())

    assert acts.trail() == [
        *FORWARD[: IN_FLIGHT["reserving"] - 2],
        *[*FORWARD[IN_FLIGHT["reserving"] - 2 :], "transition_order:COMPLETED"]
        * RETRY.maximum_attempts,
        "read_order",
    ]
    assert result.status is S.COMPLETED and result.compensations == []
    assert result.reservation_id is None  # its answer was lost with the attempts


async def test_a_temporal_cancel_compensates_and_ends_the_execution_canceled(
    acts: StandIns,
) -> None:
    reserving = Block()
    acts[InventoryActivities.reserve].then(reserving)
    handle = await start(acts, order())
    await reserving.reached()

    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()

    assert isinstance(failed.value.cause, CancelledError)
    assert (await handle.describe()).status is WorkflowExecutionStatus.CANCELED
    assert acts.trail() == [*FORWARD, *cancelled("release", "refund")]
    (begin,) = acts[OrderStoreActivities.begin_cancellation].calls
    assert begin.reason == "cancelled in Temporal"


async def test_a_charge_whose_retries_run_out_is_refunded_and_the_order_fails(
    acts: StandIns,
) -> None:
    acts[PaymentActivities.charge].then(*[Fail(ProviderUnavailable)] * RETRY.maximum_attempts)

    result = await check_out(acts, order())

    # Each attempt moves the row first; after the first, the gate finds the move applied.
    assert acts.trail() == [
        *FORWARD[: IN_FLIGHT["charging"] - 2],
        *["transition_order:CHARGING", "charge_payment"] * RETRY.maximum_attempts,
        *step_failed("refund"),
    ]
    assert result.status is S.FAILED and result.compensations == ["refund:refunded"]
    assert (result.failure_reason or "").startswith("ProviderUnavailable")


async def test_a_refund_refused_again_and_again_is_retried_until_it_succeeds_under_an_alert(
    acts: StandIns, caplog: pytest.LogCaptureFixture
) -> None:
    """A 4xx on a refund is not retried by Temporal; the saga retries it itself, forever,
    and raises the alert once ``compensation_alert_attempts`` attempts have failed."""
    refused = Fail(InvalidProviderRequest)
    below_threshold = Block(then=refused)  # held after 2 failures, then the 3rd fails
    past_threshold = Block()  # held after 4 failures, then the refund goes through
    acts[PaymentActivities.charge].then(DECLINED)
    acts[PaymentActivities.refund].then(refused, refused, below_threshold, refused, past_threshold)

    with caplog.at_level(logging.WARNING, logger="temporalio.workflow"):
        handle = await start(acts, order())
        await below_threshold.reached()
        quiet = await handle.describe()
        below_threshold.release()
        await past_threshold.reached()
        alerting = await handle.describe()
        past_threshold.release()
        result = await handle.result()
    cleared = await handle.describe()

    assert quiet.typed_search_attributes.get(ALERT_ATTR) is None
    assert alerting.typed_search_attributes.get(ALERT_ATTR) == COMPENSATION_STUCK
    assert cleared.typed_search_attributes.get(ALERT_ATTR) is None
    stuck = [r for r in caplog.records if "compensation keeps failing" in r.getMessage()]
    assert len(stuck) == 1, "the alert is raised once, not on every failure"
    assert len(acts[PaymentActivities.refund].calls) == 5
    assert result.status is S.FAILED and result.compensations == ["refund:refunded"]


# --- recovery of an order whose workflow is gone -----------------------------------


def recovery_of(order_id: str) -> RecoveryInput:
    return RecoveryInput(order_id=order_id, reason="its workflow was terminated", retry=RETRY)


async def recover(acts: StandIns, order_id: str) -> RecoveryResult:
    return await acts.client.execute_workflow(
        OrderRecoveryWorkflow.run,
        recovery_of(order_id),
        id=recovery_workflow_id(order_id),
        task_queue=acts.task_queue,
    )


async def test_recovery_leaves_a_finished_order_alone(acts: StandIns) -> None:
    acts[OrderStoreActivities.read_order].then(OrderSnapshot(status=S.COMPLETED, version=5))

    result = await recover(acts, "o-finished")

    assert acts.trail() == ["read_order"]
    assert result.outcome == "nothing to do"
    assert result.status is S.COMPLETED and result.compensations == []


async def test_recovery_claims_a_charging_order_before_it_refunds_and_releases(
    acts: StandIns,
) -> None:
    acts[OrderStoreActivities.read_order].then(OrderSnapshot(status=S.CHARGING, version=3))

    result = await recover(acts, "o-orphan")

    assert acts.trail() == ["read_order", *compensated("refund", "release")]
    assert acts.moves(OrderStoreActivities.transition_order) == [
        (3, "COMPENSATING"),
        (4, "FAILED"),
    ]
    # the undo uses the original workflow's keys, so it replays or voids that charge
    (refund,) = acts[PaymentActivities.refund].calls
    assert refund.charge_idempotency_key == "order-o-orphan:charge"
    assert result.outcome == "recovered" and result.status is S.FAILED
    assert result.compensations == ["refund:refunded", "release:released"]


@pytest.mark.parametrize(
    ("moved_to", "then_trail", "then_moves", "ends"),
    [
        pytest.param(
            OrderSnapshot(status=S.RESERVING, version=4),
            compensated("refund", "release"),
            [(4, "COMPENSATING"), (5, "FAILED")],
            RecoveryResult(
                order_id="o-moving",
                status=S.FAILED,
                compensations=["refund:refunded", "release:released"],
            ),
            id="still-open",
        ),
        pytest.param(
            OrderSnapshot(status=S.COMPLETED, version=4),
            [],
            [],
            RecoveryResult(
                order_id="o-moving", status=S.COMPLETED, compensations=[], outcome="nothing to do"
            ),
            id="completed",
        ),
    ],
)
async def test_recovery_reads_again_and_decides_again_when_the_row_moves_before_the_claim(
    acts: StandIns,
    moved_to: OrderSnapshot,
    then_trail: list[str],
    then_moves: list[tuple[int, str]],
    ends: RecoveryResult,
) -> None:
    acts[OrderStoreActivities.read_order].then(
        OrderSnapshot(status=S.CHARGING, version=3), moved_to
    )
    acts[OrderStoreActivities.transition_order].then(Fail(VersionConflict))

    result = await recover(acts, "o-moving")

    assert acts.trail() == [
        "read_order",
        "transition_order:COMPENSATING",
        "read_order",
        *then_trail,
    ]
    assert acts.moves(OrderStoreActivities.transition_order) == [(3, "COMPENSATING"), *then_moves]
    assert result == ends
