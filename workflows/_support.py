"""Deterministic helpers shared by the workflows (no I/O, no clocks)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import MetricCounter, RetryPolicy
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
    from tollgate.models import RetrySettings
    from tollgate.names import ALERT_ATTR, COMPENSATION_STUCK

T = TypeVar("T")
ArgT = TypeVar("ArgT")
ResultT = TypeVar("ResultT")


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


def step_retry(settings: RetrySettings) -> RetryPolicy:
    """Retries for a forward step: bounded, so a dead provider ends in compensation."""
    return RetryPolicy(
        initial_interval=settings.initial_interval,
        backoff_coefficient=settings.backoff_coefficient,
        maximum_interval=settings.maximum_interval,
        maximum_attempts=settings.maximum_attempts,
        non_retryable_error_types=list(PERMANENT_ERROR_TYPES),
    )


def until_done_retry(settings: RetrySettings) -> RetryPolicy:
    """Retries for Postgres writes and compensations: they must eventually happen.

    An outage delays the lifecycle; it never leaves money charged or a row half-moved.
    """
    return RetryPolicy(
        initial_interval=settings.initial_interval,
        backoff_coefficient=settings.backoff_coefficient,
        maximum_interval=settings.maximum_interval,
        maximum_attempts=0,
        non_retryable_error_types=list(PERMANENT_ERROR_TYPES),
    )


async def until_undone(
    method: Callable[[Any, ArgT], Awaitable[ResultT]],
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
    policy = RetryPolicy(
        initial_interval=settings.initial_interval,
        backoff_coefficient=settings.backoff_coefficient,
        maximum_interval=settings.maximum_interval,
        maximum_attempts=alert_after,
    )
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
    method: Callable[[Any, ArgT], Awaitable[ResultT]],
    arg: ArgT,
    *,
    start_to_close: timedelta,
    retry: RetryPolicy,
) -> ResultT:
    """One activity-method call with the lifecycle's timeout and retry policy."""
    return await workflow.execute_activity_method(
        method, arg, start_to_close_timeout=start_to_close, retry_policy=retry
    )
