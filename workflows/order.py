"""The order checkout saga: validate, charge, reserve; compensate on failure or cancel.

Postgres is the authority on where an order stands. Every step first moves the row
(version-checked, trigger-guarded) and only then calls the provider. Each undo is
registered *before* its step runs, so a step whose outcome is unknown (timed out,
cancelled mid-flight) is undone too; the providers' idempotency keys make an undo of
something that never happened a harmless void.

Cancellation arrives three ways and ends the same way (compensate, CANCELLED):
the ``cancel`` signal (the CLI records CANCELLING in Postgres first, then signals),
a transition that finds CANCELLING in Postgres, or a Temporal cancel (e.g. the Web UI).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

from workflows._support import (
    describe,
    error_type,
    is_cancellation,
    run_activity,
    run_to_completion,
    step_retry,
    until_done_retry,
    until_undone,
)

with workflow.unsafe.imports_passed_through():
    from activities.inventory import InventoryActivities
    from activities.orders import OrderStoreActivities
    from activities.payments import PaymentActivities
    from tollgate.errors import OrderCancelled
    from tollgate.models import (
        BeginCancelInput,
        CancelOrderRequest,
        ChargeInput,
        CompensationResult,
        OrderInput,
        OrderProgress,
        OrderResult,
        RefundInput,
        ReleaseInput,
        ReserveInput,
        TransitionInput,
    )
    from tollgate.names import ORDER_CANCEL_SIGNAL, ORDER_STATUS_ATTR, ORDER_STATUS_QUERY
    from tollgate.states import OrderStatus

ArgT = TypeVar("ArgT")
ResultT = TypeVar("ResultT")

_TEMPORAL_CANCEL = CancelOrderRequest(reason="cancelled in Temporal", requested_by="temporal")
_POSTGRES_CANCEL = CancelOrderRequest(
    reason="cancellation recorded in Postgres", requested_by="postgres"
)


class _StepFailed(Exception):
    """A forward step cannot succeed; the order compensates and ends FAILED."""


@workflow.defn(name="OrderWorkflow")
class OrderWorkflow:
    """One order's checkout, from PENDING to COMPLETED, FAILED or CANCELLED."""

    @workflow.init
    def __init__(self, order: OrderInput) -> None:
        self._order = order
        self._id = workflow.info().workflow_id
        self._status = OrderStatus.PENDING
        self._version = 0
        self._step = "starting"
        self._cancel: CancelOrderRequest | None = None
        self._temporal_cancelled = False
        self._failure_reason: str | None = None
        self._checkout: asyncio.Task[None] | None = None
        # Undo actions registered before their step runs; run last-in first-out.
        self._undo: list[RefundInput | ReleaseInput] = []
        self._compensations_done: list[str] = []
        self._charge_id: str | None = None
        self._reservation_id: str | None = None

        self._step_retry = step_retry(order.retry)
        self._until_done_retry = until_done_retry(order.retry)

    # --- the process ---------------------------------------------------------------

    @workflow.run
    async def run(self, order: OrderInput) -> OrderResult:
        """Run checkout; on failure or cancellation, compensate. Returns the final state."""
        recorded = await self._activity(
            OrderStoreActivities.record_order, order, retry=self._until_done_retry
        )
        self._version, self._status = recorded.version, recorded.status
        if recorded.status.cancelling:
            self._note_cancel(_POSTGRES_CANCEL)

        if self._cancel is None:
            self._checkout = asyncio.create_task(self._run_checkout())
            try:
                await self._checkout
            except asyncio.CancelledError:
                self._note_cancel(_TEMPORAL_CANCEL, from_temporal=True)
            except _StepFailed as failed:
                self._failure_reason = str(failed)
            except ActivityError as err:
                if error_type(err) == OrderCancelled.__name__:
                    self._note_cancel(_POSTGRES_CANCEL)
                elif is_cancellation(err):
                    self._note_cancel(_TEMPORAL_CANCEL, from_temporal=True)
                else:
                    self._failure_reason = describe(err)

        result = await run_to_completion(
            self._finish(), lambda: self._note_cancel(_TEMPORAL_CANCEL, from_temporal=True)
        )
        await workflow.wait_condition(workflow.all_handlers_finished)
        if self._temporal_cancelled and result.status is OrderStatus.CANCELLED:
            # Let Temporal record the execution as Canceled, matching the row.
            raise asyncio.CancelledError(result.cancel_reason)
        return result

    async def _run_checkout(self) -> None:
        o = self._order
        await self._move(OrderStatus.VALIDATING)
        self._step = "validating"
        problems = (await self._activity(InventoryActivities.validate, o)).problems
        if problems:
            raise _StepFailed("invalid order: " + "; ".join(problems))

        await self._move(OrderStatus.CHARGING)
        self._step = "charging"
        charge_key = self._key("charge")
        self._undo.append(
            RefundInput(
                order_id=o.order_id,
                charge_idempotency_key=charge_key,
                idempotency_key=self._key("refund"),
                reason=f"order {o.order_id} did not complete",
            )
        )
        charge = await self._activity(
            PaymentActivities.charge,
            ChargeInput(
                order_id=o.order_id,
                customer_id=o.customer_id,
                amount_cents=o.amount_cents,
                currency=o.currency,
                idempotency_key=charge_key,
            ),
        )
        self._charge_id = charge.charge_id

        await self._move(OrderStatus.RESERVING)
        self._step = "reserving"
        reserve_key = self._key("reserve")
        self._undo.append(
            ReleaseInput(
                order_id=o.order_id,
                reservation_idempotency_key=reserve_key,
                idempotency_key=self._key("release"),
            )
        )
        reservation = await self._activity(
            InventoryActivities.reserve,
            ReserveInput(order_id=o.order_id, items=o.items, idempotency_key=reserve_key),
        )
        self._reservation_id = reservation.reservation_id

        await self._move(OrderStatus.COMPLETED)
        self._step = "done"

    async def _finish(self) -> OrderResult:
        if self._cancel is None and self._failure_reason is not None:
            try:
                return await self._fail(self._failure_reason)
            except ActivityError as err:
                if error_type(err) != OrderCancelled.__name__:
                    raise
                self._note_cancel(_POSTGRES_CANCEL)
        if self._cancel is not None:
            return await self._cancel_order(self._cancel)
        return self._result()

    async def _fail(self, reason: str) -> OrderResult:
        if not self._undo:
            await self._move(OrderStatus.FAILED, failure_reason=reason)
        else:
            await self._move(OrderStatus.COMPENSATING, failure_reason=reason)
            await self._compensate()
            await self._move(OrderStatus.FAILED, failure_reason=reason)
        self._step = "failed"
        return self._result()

    async def _cancel_order(self, request: CancelOrderRequest) -> OrderResult:
        self._step = "cancelling"
        state = await self._activity(
            OrderStoreActivities.begin_cancellation,
            BeginCancelInput(
                order_id=self._order.order_id,
                reason=request.reason,
                transition_id=f"{self._id}:cancel",
                actor=f"workflow:{self._id}:{request.requested_by}",
            ),
            retry=self._until_done_retry,
        )
        self._set_status(state.status, state.version)
        if state.status.terminal:
            # The order ended before the cancellation could be recorded: nothing to undo.
            self._step = "done"
            return self._result()
        await self._compensate()
        await self._move(OrderStatus.CANCELLED, reason=state.cancel_reason or request.reason)
        self._step = "cancelled"
        return self._result()

    async def _compensate(self) -> None:
        self._step = "compensating"
        while self._undo:
            undo = self._undo[-1]
            outcome: CompensationResult
            name = "refund" if isinstance(undo, RefundInput) else "release"
            if isinstance(undo, RefundInput):
                outcome = await until_undone(
                    PaymentActivities.refund, undo, settings=self._order.retry, what=name
                )
            else:
                outcome = await until_undone(
                    InventoryActivities.release, undo, settings=self._order.retry, what=name
                )
            self._undo.pop()
            self._compensations_done.append(f"{name}:{outcome.outcome}")

    # --- human actions and live status ---------------------------------------------

    @workflow.signal(name=ORDER_CANCEL_SIGNAL)
    def cancel(self, request: CancelOrderRequest) -> None:
        """Stop the step in flight and compensate. Later signals change nothing."""
        self._note_cancel(request)
        if self._checkout is not None and not self._checkout.done():
            self._checkout.cancel()

    @workflow.query(name=ORDER_STATUS_QUERY)
    def status(self) -> OrderProgress:
        """Status and version as this workflow last wrote them, plus the step it is on."""
        return OrderProgress(
            order_id=self._order.order_id,
            status=self._status,
            version=self._version,
            step=self._step,
            cancel_requested=self._cancel is not None,
            compensations_done=list(self._compensations_done),
        )

    # --- helpers -------------------------------------------------------------------

    def _note_cancel(self, request: CancelOrderRequest, *, from_temporal: bool = False) -> None:
        if self._cancel is None:
            self._cancel = request
            self._temporal_cancelled = from_temporal

    def _key(self, step: str) -> str:
        # Derived from the workflow id, never from a clock or an attempt: every retry of
        # a step, and every replay, sends the same key.
        return f"{self._id}:{step}"

    def _set_status(self, status: OrderStatus, version: int) -> None:
        self._status, self._version = status, version
        workflow.upsert_search_attributes([ORDER_STATUS_ATTR.value_set(status.value)])
        workflow.set_current_details(f"**{status.value}** (v{version})")

    async def _move(
        self, to: OrderStatus, *, reason: str | None = None, failure_reason: str | None = None
    ) -> None:
        result = await self._activity(
            OrderStoreActivities.transition_order,
            TransitionInput(
                order_id=self._order.order_id,
                expected_version=self._version,
                to_status=to,
                transition_id=f"{self._id}:v{self._version}:{to.value}",
                actor=f"workflow:{self._id}",
                reason=reason,
                failure_reason=failure_reason,
            ),
            retry=self._until_done_retry,
        )
        self._set_status(to, result.version)

    async def _activity(
        self,
        method: Callable[[Any, ArgT], Awaitable[ResultT]],
        arg: ArgT,
        *,
        retry: RetryPolicy | None = None,
    ) -> ResultT:
        return await run_activity(
            method,
            arg,
            start_to_close=self._order.retry.activity_timeout,
            retry=retry or self._step_retry,
        )

    def _result(self) -> OrderResult:
        return OrderResult(
            order_id=self._order.order_id,
            status=self._status,
            version=self._version,
            failure_reason=self._failure_reason,
            cancel_reason=self._cancel.reason if self._cancel else None,
            charge_id=self._charge_id,
            reservation_id=self._reservation_id,
            compensations=list(self._compensations_done),
        )
