"""The order checkout saga: validate, charge, reserve; compensate on failure or cancel.

Postgres is the authority on where an order stands. Every step first moves the row
(version-checked, trigger-guarded) and only then calls the provider. Each undo is
registered *before* its step runs, so a step whose outcome is unknown (timed out,
cancelled mid-flight) is undone too; the providers' idempotency keys make an undo of
something that never happened a harmless void.

Cancellation arrives three ways and ends the same way (compensate, CANCELLED): the
``cancel`` signal (the service records CANCELLING in Postgres first, then signals), a
transition that finds CANCELLING in Postgres, or a Temporal cancel (e.g. the Web UI).
:class:`~workflows._lifecycle.LifecycleWorkflow` turns the three into one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import NamedTuple, Protocol, TypeVar

from temporalio import workflow

from workflows._lifecycle import (
    STEP_FAILURES,
    ActivityMethod,
    Frame,
    LifecycleWorkflow,
    StepFailed,
    Undo,
    error_type,
    is_cancellation,
    step_may_have_run,
)

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

    from activities.inventory import InventoryActivities
    from activities.orders import OrderStoreActivities
    from activities.payments import PaymentActivities
    from tollgate.errors import OrderCancelled, OrderNotFound, StoreUnavailable
    from tollgate.models import TransitionResult
    from tollgate.names import (
        ORDER_CANCEL_SIGNAL,
        ORDER_CHARGED_UPDATE,
        ORDER_STATUS_ATTR,
        ORDER_STATUS_QUERY,
        ORDER_WORKFLOW,
        step_key,
    )
    from tollgate.orders.models import (
        BeginCancelInput,
        CancelOrderRequest,
        ChargeInput,
        OrderInput,
        OrderProgress,
        OrderResult,
        OrderSnapshot,
        ReadOrderInput,
        RefundInput,
        ReleaseInput,
        ReserveInput,
        TransitionInput,
        ValidateInput,
        ValidateResult,
    )
    from tollgate.orders.states import OrderStatus

S = OrderStatus


class _Moved(Protocol):
    """A step's result: it says where the step's moves left the row."""

    @property
    def moved(self) -> TransitionResult | None: ...


T = TypeVar("T")
#: A step's input: a model with a ``move`` field.
StepInputT = TypeVar("StepInputT", bound=BaseModel)
StepResultT = TypeVar("StepResultT", bound=_Moved)

#: Where an order stands before its charge is known: the ``charged`` update waits them out.
_BEFORE_CHARGED = frozenset({S.PENDING, S.VALIDATING, S.CHARGING})


class Step(StrEnum):
    """What the checkout is doing, as the ``status`` query reports it."""

    STARTING = "starting"
    VALIDATING = "validating"
    CHARGING = "charging"
    RESERVING = "reserving"
    COMPENSATING = "compensating"
    CANCELLING = "cancelling"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class CheckoutUndos(NamedTuple):
    """The undos of a checkout's steps, in the order the steps run."""

    #: Refund what the charge captured (a void when nothing was, so that a late charge
    #: with that key is refused).
    refund: Undo
    #: Release what the reservation held.
    release: Undo


def checkout_undos(order_id: str, owner: str, reason: str) -> CheckoutUndos:
    """The undos of the checkout that the workflow ``owner`` runs: each finds the step it
    undoes by that step's idempotency key, ``<owner>:charge`` or ``<owner>:reserve``.
    The recovery passes the original workflow's id, and so undoes with its keys."""
    refund = RefundInput(
        order_id=order_id,
        charge_idempotency_key=step_key(owner, "charge"),
        idempotency_key=step_key(owner, "refund"),
        reason=reason,
    )
    release = ReleaseInput(
        order_id=order_id,
        reservation_idempotency_key=step_key(owner, "reserve"),
        idempotency_key=step_key(owner, "release"),
    )
    return CheckoutUndos(
        refund=Undo("refund", PaymentActivities.refund, refund),
        release=Undo("release", InventoryActivities.release, release),
    )


#: What the lifecycle frame knows of a checkout.
CHECKOUT: Frame[OrderStatus, CancelOrderRequest] = Frame(
    initial=S.PENDING,
    status_attr=ORDER_STATUS_ATTR,
    stopped_error=OrderCancelled.__name__,
    stopped_status=S.CANCELLED,
    transition=OrderStoreActivities.transition_order,
    transition_input=lambda order_id, **move: TransitionInput(order_id=order_id, **move),
    stop_from_postgres=CancelOrderRequest(
        reason="cancellation recorded in Postgres", requested_by="postgres"
    ),
    stop_from_temporal=CancelOrderRequest(reason="cancelled in Temporal", requested_by="temporal"),
)


@workflow.defn(name=ORDER_WORKFLOW)
class OrderWorkflow(LifecycleWorkflow[OrderStatus, CancelOrderRequest]):
    """One order's checkout, from PENDING to COMPLETED, FAILED or CANCELLED."""

    @workflow.init
    def __init__(self, order: OrderInput) -> None:
        self._order = order
        super().__init__(CHECKOUT, order.order_id, order.retry, step=Step.STARTING)
        #: Compensations, registered before their step runs; run last-in first-out.
        self._undo: list[Undo] = []
        self._compensations_done: list[str] = []
        self._charge_id: str | None = None
        self._reservation_id: str | None = None

    # --- the process ---------------------------------------------------------------

    @workflow.run
    async def run(self, order: OrderInput) -> OrderResult:
        """Check out; on failure or cancellation, compensate. Returns the final state."""
        if not self.patch_store():
            self._recorded(
                await self.activity(
                    OrderStoreActivities.record_order, order, retry=self._until_done_retry
                )
            )
        elif not self._moves_in_steps:
            # Record the order (unless the service did) and move it to VALIDATING at once.
            self._recorded(await self.store(OrderStoreActivities.begin_order, order))
        # else the validation records the order and moves it first, in one activity
        return await self.run_lifecycle(self._check_out, self._finish)

    async def _check_out(self) -> None:
        o = self._order
        self._step = Step.VALIDATING
        validated = await self._begin_and_validate()
        if validated is None:
            return  # cancelled before the checkout began
        if validated.problems:
            raise StepFailed("invalid order: " + "; ".join(validated.problems))

        undos = checkout_undos(o.order_id, self._id, f"order {o.order_id} did not complete")
        charge = await self._step_to(
            S.CHARGING,
            Step.CHARGING,
            undos.refund,
            PaymentActivities.charge,
            ChargeInput(
                order_id=o.order_id,
                customer_id=o.customer_id,
                amount_cents=o.amount_cents,
                currency=o.currency,
                idempotency_key=step_key(self._id, "charge"),
            ),
        )
        self._charge_id = charge.charge_id if charge else None

        reservation = await self._step_to(
            S.RESERVING,
            Step.RESERVING,
            undos.release,
            InventoryActivities.reserve,
            ReserveInput(
                order_id=o.order_id, items=o.items, idempotency_key=step_key(self._id, "reserve")
            ),
            then=S.COMPLETED,
        )
        # None: an attempt finished the step (COMPLETED) and its answer was lost
        self._reservation_id = reservation.reservation_id if reservation else None

        if self._status is not S.COMPLETED:
            await self.move(S.COMPLETED)
        self._step = Step.DONE

    async def _begin_and_validate(self) -> ValidateResult | None:
        """Record the order (unless the service did), move it to VALIDATING and check it
        against the catalog, in one activity; None if the row was found cancelled."""
        o = self._order
        if not self._moves_in_steps:
            if self._status is not S.VALIDATING:
                await self.move(S.VALIDATING)
            return await self.activity(InventoryActivities.validate, ValidateInput(order=o))
        try:
            validated = await self.activity(
                InventoryActivities.validate, ValidateInput(order=o, begin=True)
            )
        except STEP_FAILURES as err:
            if is_cancellation(err) or self.found_stopped(err):
                raise

            async def record() -> bool:
                return self._recorded(await self.store(OrderStoreActivities.begin_order, o))

            async def alone() -> ValidateResult:
                return await self.activity(InventoryActivities.validate, ValidateInput(order=o))

            return await self._after_failed_step(
                err, S.PENDING, 1, S.VALIDATING, make_move=record, step_alone=alone
            )
        assert validated.begun is not None, "a validation asked to begin says where it began"
        return validated if self._recorded(validated.begun) else None

    def _recorded(self, row: OrderSnapshot) -> bool:
        """Take where the order's first write left its row; False if it found it cancelled."""
        self._version, self._status = row.version, row.status
        if row.status.cancelling:
            self.note_stopped_in_postgres()
            return False
        return True

    async def _step_to(
        self,
        status: OrderStatus,
        step: Step,
        undo: Undo,
        method: ActivityMethod[StepInputT, StepResultT],
        arg: StepInputT,
        *,
        then: OrderStatus | None = None,
    ) -> StepResultT | None:
        """Move the row to ``status``, then run the step (then move it on to ``then``); its
        undo is registered before the step runs, so that a step whose outcome is never
        known is undone too.

        The moves ride in the step's activity, which makes the first before it calls the
        provider and ``then`` after; the workflow shows the row where the first takes it
        from the moment it sends it. If the first move was refused before any attempt
        applied it (a cancellation got there first), the step never ran and its undo is
        dropped again. If the step failed otherwise, see :meth:`_after_failed_step`.
        None: an earlier attempt finished the step, and its answer was lost.
        """
        if not self._moves_in_steps:
            await self.move(status)
            self._step = step
            self._undo.append(undo)
            return await self.activity(method, arg)
        before, before_version = self._status, self._version
        moves = {"move": self.next_move(status)}
        self._step = step
        self._undo.append(undo)
        self.set_status(status, self._version + 1, sent=True)  # the gate adds one per write
        if then is not None:
            moves["then"] = self.next_move(then)
        try:
            result = await self.activity(method, arg.model_copy(update=moves))
        except STEP_FAILURES as err:
            if self.found_stopped(err):
                if not step_may_have_run(err):
                    self._undo.pop()
                raise
            if is_cancellation(err):
                raise

            async def move() -> bool:
                await self.move(status)
                return True

            async def alone() -> StepResultT:
                return await self.activity(method, arg)

            return await self._after_failed_step(
                err, before, before_version, status, then, make_move=move, step_alone=alone
            )
        assert result.moved is not None, "a step given a move reports where it left the row"
        if then is None and result.moved.version == self._version:
            self._sent = False  # arrived where it was sent: nothing new to show
        else:
            self.set_status(then or status, result.moved.version)
        return result

    async def _after_failed_step(
        self,
        err: BaseException,
        before: OrderStatus,
        before_version: int,
        status: OrderStatus,
        then: OrderStatus | None = None,
        *,
        make_move: Callable[[], Awaitable[bool]],
        step_alone: Callable[[], Awaitable[T]],
    ) -> T | None:
        """A step's activity failed for good, not stopped. Where its moves got to is not
        known (a timeout says nothing of them), so read the row, and go on from there:

        * at ``then``: the step finished, and its answer was lost. None: nothing to add.
        * where the step moves it: the step may have run, and it failed. That stands
          (compensation follows), unless what failed was Postgres (StoreUnavailable),
          which a step waits out: then it runs again alone, under the same key.
        * where it was: the move never applied, so the provider was never called, and
          what failed was Postgres or the activity's time. The move is made as a local
          activity (``make_move``), which waits an outage out, and the step runs alone.
        * anywhere else (or gone): another writer moved it; the next move finds out.
        """
        row = await self._row_now()
        if row is not None and then is not None and row.status is then:
            self.set_status(then, row.version)
            return None
        if row is not None and row.status is status:
            self.set_status(status, row.version)
            if error_type(err) != StoreUnavailable.__name__:
                raise err
            return await step_alone()
        self.set_status(before, before_version)
        if row is None or (row.status is before and row.version == before_version):
            if not await make_move():
                return None
            return await step_alone()
        raise err

    async def _row_now(self) -> OrderSnapshot | None:
        """Where the order's row stands now (a local activity, retried until Postgres
        answers); None if there is no row."""
        try:
            return await self.store(
                OrderStoreActivities.read_order, ReadOrderInput(order_id=self._order.order_id)
            )
        except STEP_FAILURES as err:
            if error_type(err) == OrderNotFound.__name__:
                return None
            raise

    async def _finish(self) -> OrderResult:
        """Fail (compensating first) or cancel, or just report a completed checkout."""
        if self._stop is None and self._failure_reason is not None:
            try:
                return await self._fail(self._failure_reason)
            except STEP_FAILURES as err:
                if not self.found_stopped(err):
                    raise
                self.note_stopped_in_postgres()
        if self._stop is not None:
            return await self._cancel(self._stop)
        return self._result()

    async def _fail(self, reason: str) -> OrderResult:
        if not self._undo:
            await self.move(S.FAILED, failure_reason=reason)
        else:
            await self.move(S.COMPENSATING, failure_reason=reason)
            await self._compensate()
            await self.move(S.FAILED, failure_reason=reason)
        self._step = Step.FAILED
        return self._result()

    async def _cancel(self, request: CancelOrderRequest) -> OrderResult:
        self._step = Step.CANCELLING
        begin = BeginCancelInput(
            order_id=self._order.order_id,
            reason=request.reason,
            transition_id=step_key(self._id, "cancel"),
            actor=f"workflow:{self._id}:{request.requested_by}",
        )
        try:
            state = await self.store(OrderStoreActivities.begin_cancellation, begin)
        except STEP_FAILURES as err:
            if error_type(err) != OrderNotFound.__name__ or self._version:
                raise
            # Stopped before its first activity recorded the order, which the service
            # did not record either: record it, so that the cancellation has a row.
            await self.store(OrderStoreActivities.record_order, self._order)
            state = await self.store(OrderStoreActivities.begin_cancellation, begin)
        self.set_status(state.status, state.version)
        if state.status.terminal:
            # The order ended before the cancellation could be recorded: nothing to undo.
            self._step = Step.DONE
            return self._result()
        await self._compensate()
        await self.move(S.CANCELLED, reason=state.cancel_reason or request.reason)
        self._step = Step.CANCELLED
        return self._result()

    async def _compensate(self) -> None:
        self._step = Step.COMPENSATING
        while self._undo:
            done = await self.undo(self._undo[-1])
            self._undo.pop()
            self._compensations_done.append(done)

    # --- human actions and live status ---------------------------------------------

    @workflow.signal(name=ORDER_CANCEL_SIGNAL)
    def cancel(self, request: CancelOrderRequest) -> None:
        """Stop the step in flight and compensate. Later signals change nothing."""
        self.interrupt(request)

    @workflow.query(name=ORDER_STATUS_QUERY)
    def status(self) -> OrderProgress:
        """Status and version as this workflow last wrote them, plus the step it is on."""
        return OrderProgress(
            order_id=self._order.order_id,
            status=self._status,
            version=self._version,
            step=self._step,
            cancel_requested=self._stop is not None,
            compensations_done=list(self._compensations_done),
            failure_reason=self._failure_reason,
        )

    @workflow.update(name=ORDER_CHARGED_UPDATE)
    async def charged(self) -> OrderProgress:
        """Answer once the order is charged (RESERVING or later), failing or failed, or
        being cancelled: what a caller waits for before it tells its customer, while the
        checkout goes on. Every way the workflow ends passes one of these, so the
        handler always finishes before the workflow does. A status only sent (a step's
        activity is moving the row) does not count: the row must be there. It only waits
        and reads, so histories without it replay unchanged."""
        await workflow.wait_condition(
            lambda: self._status not in _BEFORE_CHARGED and not self._sent
        )
        return self.status()

    # --- plumbing ------------------------------------------------------------------

    def _result(self) -> OrderResult:
        return OrderResult(
            order_id=self._order.order_id,
            status=self._status,
            version=self._version,
            failure_reason=self._failure_reason,
            cancel_reason=self._stop.reason if self._stop else None,
            charge_id=self._charge_id,
            reservation_id=self._reservation_id,
            compensations=list(self._compensations_done),
        )
