"""The frame every Tollgate lifecycle runs in, and the helpers it is made of.

A lifecycle workflow (an order's checkout, a message's delivery) does its business in
one method and leaves the rest to :class:`LifecycleWorkflow`:

* it holds where the row stands (status, version) and shows it: the status search
  attribute and the Web UI's current details follow every move;
* :meth:`LifecycleWorkflow.move` is the version-checked transition through the gate,
  with a deterministic transition id;
* :meth:`LifecycleWorkflow.run_lifecycle` runs the business as a task and turns the three
  ways a person stops a lifecycle into one: the stop signal (the row was moved first),
  a transition that finds the row stopped in Postgres, and a Temporal cancel (the Web
  UI's button). Then it runs the ending to completion, even through a second cancel;
  waits for signal handlers; and ends the execution as Canceled when Temporal cancelled.

Everything here is deterministic: no I/O, no clocks, no randomness outside ``workflow``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeAlias, TypeVar

from temporalio import workflow
from temporalio.common import MetricCounter, RetryPolicy, SearchAttributeKey
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    FailureError,
    RetryState,
)
from temporalio.exceptions import CancelledError as TemporalCancelledError

with workflow.unsafe.imports_passed_through():
    from tollgate.errors import PERMANENT_ERROR_TYPES
    from tollgate.models import RetrySettings, TransitionRequest, TransitionResult
    from tollgate.names import ALERT_ATTR, COMPENSATION_STUCK, transition_id

T = TypeVar("T")
ArgT = TypeVar("ArgT")
ResultT = TypeVar("ResultT")
StatusT = TypeVar("StatusT", bound=StrEnum)

#: An activity method as a workflow names it (``PaymentActivities.charge``): unbound,
#: one input model, one result.
ActivityMethod: TypeAlias = Callable[[Any, ArgT], Awaitable[ResultT]]


#: What a failed activity or child surfaces as in workflow code. A local activity's
#: failure arrives as its ApplicationError itself, not wrapped in an ActivityError.
STEP_FAILURES = (ActivityError, ChildWorkflowError, ApplicationError)


def root_cause(err: BaseException) -> BaseException:
    """The innermost failure behind activity and child-workflow wrappers."""
    while isinstance(err, (ActivityError, ChildWorkflowError)) and err.cause is not None:
        err = err.cause
    return err


def error_type(err: BaseException) -> str | None:
    """The ``ApplicationError.type`` at the root of ``err``, if there is one."""
    cause = root_cause(err)
    return cause.type if isinstance(cause, ApplicationError) else None


def is_cancellation(err: BaseException) -> bool:
    """Whether an activity/child failure is only the echo of a cancellation."""
    return isinstance(root_cause(err), TemporalCancelledError)


def step_may_have_run(err: BaseException) -> bool:
    """Whether the step behind a failed step activity may have reached its provider: False
    only when the activity's move was refused and it checked that no attempt of the move
    ever applied (``VersionConflict.step_may_have_run``)."""
    cause = root_cause(err)
    if not isinstance(cause, ApplicationError) or not cause.details:
        return True
    details = cause.details[0]
    return not (isinstance(details, dict) and details.get("step_may_have_run") is False)


def describe(err: BaseException) -> str:
    """``Type: message`` of the root failure, for failure reasons people read."""
    cause = root_cause(err)
    kind = error_type(cause) or type(cause).__name__
    message = cause.message if isinstance(cause, FailureError) else str(cause)
    return f"{kind}: {message}"


async def run_to_completion(work: Coroutine[Any, Any, T], on_cancel: Callable[[], None]) -> T:
    """Run ``work`` to the end even if the workflow is cancelled meanwhile.

    Compensations and final transitions must not be abandoned half-way by a second
    cancel, so they run as their own task; each cancellation is reported to
    ``on_cancel`` and otherwise ignored.
    """
    task: asyncio.Task[T] = asyncio.create_task(work)
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                return task.result()
            on_cancel()


def retry_policy(
    settings: RetrySettings,
    *,
    maximum_attempts: int,
    non_retryable: Sequence[str] | None = PERMANENT_ERROR_TYPES,
) -> RetryPolicy:
    """The lifecycle's backoff from ``settings``, with the attempts and non-retryable
    error types of one kind of call (0 attempts: until it succeeds)."""
    return RetryPolicy(
        initial_interval=settings.initial_interval,
        backoff_coefficient=settings.backoff_coefficient,
        maximum_interval=settings.maximum_interval,
        maximum_attempts=maximum_attempts,
        non_retryable_error_types=None if non_retryable is None else list(non_retryable),
    )


def step_retry(settings: RetrySettings) -> RetryPolicy:
    """Retries for a forward step: bounded, so a dead provider ends in compensation."""
    return retry_policy(settings, maximum_attempts=settings.maximum_attempts)


def until_done_retry(settings: RetrySettings) -> RetryPolicy:
    """Retries for Postgres writes and compensations: they must eventually happen.

    An outage delays the lifecycle; it never leaves money charged or a row half-moved.
    """
    return retry_policy(settings, maximum_attempts=0)


async def until_undone(
    method: ActivityMethod[ArgT, ResultT],
    arg: ArgT,
    *,
    settings: RetrySettings,
    what: str,
) -> ResultT:
    """Run a compensation until it succeeds, whatever the error; alert while it does not.

    An undo that gives up leaves money charged or stock held, so no answer ends it: a
    transient failure is retried by Temporal, a permanent one (a refund answered 4xx) by
    this loop after a backoff timer. Once ``settings.compensation_alert_attempts``
    attempts failed, the lifecycle raises an operator-visible alert: the
    ``TollgateAlert`` search attribute (``compensation-stuck``), a warning in the
    worker's log and the ``tollgate_compensation_stuck`` metric. The alert is cleared
    when the compensation finally goes through.
    """
    alert_after = settings.compensation_alert_attempts
    # Every error is retried: a permanent one too, by the loop below, after a timer.
    policy = retry_policy(settings, maximum_attempts=alert_after, non_retryable=None)
    delay = settings.initial_interval
    failed = 0
    alerted = False
    while True:
        try:
            result = await workflow.execute_activity_method(
                method, arg, start_to_close_timeout=settings.activity_timeout, retry_policy=policy
            )
        except ActivityError as err:
            if is_cancellation(err):
                raise
            gave_up = err.retry_state == RetryState.MAXIMUM_ATTEMPTS_REACHED
            failed += alert_after if gave_up else 1
            if failed >= alert_after and not alerted:
                alerted = True
                workflow.upsert_search_attributes([ALERT_ATTR.value_set(COMPENSATION_STUCK)])
                _stuck_counter().add(1, {"compensation": what})
                workflow.logger.warning(
                    "compensation keeps failing; it is retried until it succeeds",
                    extra={"compensation": what, "failed_attempts": failed, "error": describe(err)},
                )
            await workflow.sleep(delay)
            delay = min(delay * settings.backoff_coefficient, settings.maximum_interval)
            continue
        if alerted:
            workflow.upsert_search_attributes([ALERT_ATTR.value_unset()])
            workflow.logger.info(
                "stuck compensation went through",
                extra={"compensation": what, "failed_attempts": failed},
            )
        return result


def _stuck_counter() -> MetricCounter:
    return workflow.metric_meter().create_counter(
        "tollgate_compensation_stuck",
        "Compensations that failed past the alert threshold (retried until they succeed)",
    )


async def run_activity(
    method: ActivityMethod[ArgT, ResultT],
    arg: ArgT,
    *,
    start_to_close: timedelta,
    retry: RetryPolicy,
) -> ResultT:
    """One activity-method call with the lifecycle's timeout and retry policy."""
    return await workflow.execute_activity_method(
        method, arg, start_to_close_timeout=start_to_close, retry_policy=retry
    )


#: Patch that made store activities (gate writes, Postgres reads) local activities and
#: folded a lifecycle's record into its first transition. Histories recorded before it
#: replay the old way: regular activities, record and first move apart.
LOCAL_STORE_PATCH = "local-store-activities"
#: Patch that folded the move before each forward step into the step's activity (an
#: order's first move and its validation, CHARGING and the charge, RESERVING and the
#: reservation): one activity instead of a local one and a regular one. Histories
#: recorded before it replay with the moves apart.
MOVES_IN_STEPS_PATCH = "moves-in-steps"
#: Patch that stands for both of the above in a run that records it, as one marker.
#: Each patch a run records costs a marker event and a search-attribute write
#: (``TemporalChangeVersion``) on the server, and every run of today's code recorded
#: both. Histories recorded before it replay through the two above, as they were
#: recorded; the code they select is today's either way.
LIFECYCLE_PATCH = "local-store-and-moves-in-steps"


class StepFailed(Exception):
    """A forward step cannot succeed; the lifecycle undoes what it did and ends FAILED."""


@dataclass(frozen=True)
class Undo:
    """One compensation, registered before the step it undoes runs."""

    #: What it is called in results and alerts: ``refund``, ``release``.
    name: str
    method: ActivityMethod[Any, Any]
    arg: Any


async def run_undo(undo: Undo, settings: RetrySettings) -> str:
    """Run one compensation until it goes through (:func:`until_undone`);
    ``<name>:<outcome>``, e.g. ``refund:voided``."""
    outcome = await until_undone(undo.method, undo.arg, settings=settings, what=undo.name)
    return f"{undo.name}:{outcome.outcome}"


class StopRequest(Protocol):
    """What a cancel or recall carries: why, and who asked."""

    @property
    def reason(self) -> str: ...

    @property
    def requested_by(self) -> str: ...


StopT = TypeVar("StopT", bound=StopRequest)


@dataclass(frozen=True)
class Frame(Generic[StatusT, StopT]):
    """What the frame knows of one lifecycle, the same for every run of it: one per
    lifecycle (``CHECKOUT``, ``DELIVERY``), as :class:`tollgate.gate.Lifecycle` is one per
    table on the SQL side."""

    #: Where a new row starts (version 0 until the first write says otherwise).
    initial: StatusT
    #: The search attribute that shows the status.
    status_attr: SearchAttributeKey[str]
    #: ``ApplicationError.type`` of a transition that found the row stopped in Postgres.
    stopped_error: str
    #: The status a stopped lifecycle ends in.
    stopped_status: StatusT
    #: The activity that moves the row.
    transition: ActivityMethod[Any, TransitionResult]
    #: That activity's input, as ``transition_input(entity_id, **move)``: the entity's
    #: id under its own name, and one move's fields.
    transition_input: Callable[..., TransitionRequest[StatusT]]
    #: The stop a transition stands for when it found the row stopped in Postgres.
    stop_from_postgres: StopT
    #: The stop a Temporal cancel (the Web UI's button) stands for.
    stop_from_temporal: StopT


class LifecycleWorkflow(Generic[StatusT, StopT]):
    """Base of a lifecycle workflow: its row's state, its moves, and its stop frame.

    A subclass describes its lifecycle once, in a :class:`Frame`, hands it over with its
    entity's id when it is built (``super().__init__(CHECKOUT, order_id, ...)``), and
    keeps only its business steps.
    """

    def __init__(
        self,
        frame: Frame[StatusT, StopT],
        entity_id: str,
        retry: RetrySettings,
        *,
        step: StrEnum,
    ) -> None:
        self._frame = frame
        self._entity_id = entity_id
        self._id = workflow.info().workflow_id
        self._status: StatusT = frame.initial
        self._version = 0
        #: What the lifecycle is doing, from the workflow's own ``Step`` enum.
        self._step: StrEnum = step
        self._retry = retry
        self._step_retry = step_retry(retry)
        self._until_done_retry = until_done_retry(retry)
        self._stop: StopT | None = None
        self._temporal_stopped = False
        self._main: asyncio.Task[None] | None = None
        self._failure_reason: str | None = None
        self._local_store = False
        self._moves_in_steps = False
        self._sent = False

    def patch_store(self) -> bool:
        """Whether store activities run local (this code) or regular (a history recorded
        before :data:`LOCAL_STORE_PATCH`), and whether forward steps make their own moves
        (:data:`MOVES_IN_STEPS_PATCH`). Call once, at the start of the run.

        A run of today's code records one marker, :data:`LIFECYCLE_PATCH`; only a history
        without it (recorded before it) is asked about the two older patches.
        """
        if workflow.patched(LIFECYCLE_PATCH):
            self._local_store = self._moves_in_steps = True
        else:
            self._local_store = workflow.patched(LOCAL_STORE_PATCH)
            self._moves_in_steps = self._local_store and workflow.patched(MOVES_IN_STEPS_PATCH)
        return self._local_store

    async def store(
        self, method: ActivityMethod[ArgT, ResultT], arg: ArgT, *, retry: RetryPolicy | None = None
    ) -> ResultT:
        """A store activity: one short Postgres statement or two, retried until done.

        Local: it runs in this worker right away, with no round trip through the
        Temporal server (a regular activity costs one each way), and its result is
        recorded in the workflow task that follows. It is idempotent like every gate
        write (a retried transition finds its own transition id), so a worker that dies
        after it committed only makes the next worker find the row already moved.
        """
        policy = retry or self._until_done_retry
        if not self._local_store:
            return await self.activity(method, arg, retry=policy)
        return await workflow.execute_local_activity_method(
            method, arg, start_to_close_timeout=self._retry.activity_timeout, retry_policy=policy
        )

    async def run_lifecycle(
        self,
        business: Callable[[], Coroutine[Any, Any, None]],
        ending: Callable[[], Coroutine[Any, Any, ResultT]],
    ) -> ResultT:
        """Run ``business`` unless stopped already, then ``ending`` to completion.

        A :class:`StepFailed` from the business becomes ``_failure_reason``; a failed
        activity or child goes to :meth:`on_step_failure` unless it only echoes a stop.
        Other errors fail the workflow task (Temporal retries it), as a bug should.
        """
        if self._stop is None:
            self._main = asyncio.create_task(business())
            try:
                await self._main
            except asyncio.CancelledError:
                self._note_stopped_in_temporal()
            except StepFailed as failed:
                self._failure_reason = str(failed)
            except STEP_FAILURES as err:
                if self.found_stopped(err):
                    self.note_stopped_in_postgres()
                elif is_cancellation(err):
                    self._note_stopped_in_temporal()
                else:
                    self.on_step_failure(err)
        result = await run_to_completion(ending(), self._note_stopped_in_temporal)
        await workflow.wait_condition(workflow.all_handlers_finished)
        if self._temporal_stopped and self._status == self._frame.stopped_status:
            # Let Temporal record the execution as Canceled, matching the row.
            raise asyncio.CancelledError(self._stop.reason if self._stop else None)
        return result

    def on_step_failure(self, err: ActivityError | ChildWorkflowError | ApplicationError) -> None:
        """A step failed for good: by default the ending undoes and ends FAILED."""
        self._failure_reason = describe(err)

    def note_stop(self, request: StopT, *, from_temporal: bool = False) -> None:
        """Remember the first stop request; later ones change nothing."""
        if self._stop is None:
            self._stop = request
            self._temporal_stopped = from_temporal

    def found_stopped(self, err: BaseException) -> bool:
        """Whether a failed activity is a transition that found the row stopped in Postgres."""
        return error_type(err) == self._frame.stopped_error

    def note_stopped_in_postgres(self) -> None:
        """A write found the row stopped (cancelled, recalled) before this workflow knew."""
        self.note_stop(self._frame.stop_from_postgres)

    def _note_stopped_in_temporal(self) -> None:
        self.note_stop(self._frame.stop_from_temporal, from_temporal=True)

    def interrupt(self, request: StopT) -> None:
        """A person's stop, by signal: note it and cancel the step in flight."""
        self.note_stop(request)
        if self._main is not None and not self._main.done():
            self._main.cancel()

    def set_status(self, status: StatusT, version: int, *, sent: bool = False) -> None:
        """Where the row stands now, or with ``sent`` where a step's activity is moving it
        before its provider call; shown in the search attribute and the Web UI."""
        self._status, self._version = status, version
        #: Whether the status is where the row was sent, not yet known to have arrived.
        self._sent = sent
        workflow.upsert_search_attributes([self._frame.status_attr.value_set(status.value)])
        workflow.set_current_details(f"**{status.value}** (v{version})")

    async def move(
        self, to: StatusT, *, reason: str | None = None, failure_reason: str | None = None
    ) -> None:
        """One version-checked transition from where this workflow last left the row."""
        result = await self.store(
            self._frame.transition,
            self.next_move(to, reason=reason, failure_reason=failure_reason),
        )
        self.set_status(to, result.version)

    def next_move(
        self, to: StatusT, *, reason: str | None = None, failure_reason: str | None = None
    ) -> Any:
        """The transition activity's input for a move to ``to`` from where this workflow
        last left the row, with its deterministic transition id."""
        return self._frame.transition_input(
            self._entity_id,
            expected_version=self._version,
            to_status=to,
            transition_id=transition_id(self._id, self._version, to.value),
            actor=f"workflow:{self._id}",
            reason=reason,
            failure_reason=failure_reason,
        )

    async def activity(
        self, method: ActivityMethod[ArgT, ResultT], arg: ArgT, *, retry: RetryPolicy | None = None
    ) -> ResultT:
        """One activity call with this lifecycle's timeout; a forward step's retries unless
        ``retry`` says otherwise."""
        return await run_activity(
            method,
            arg,
            start_to_close=self._retry.activity_timeout,
            retry=retry or self._step_retry,
        )

    async def undo(self, undo: Undo) -> str:
        """Run one compensation until it goes through; ``<name>:<outcome>``."""
        return await run_undo(undo, self._retry)
