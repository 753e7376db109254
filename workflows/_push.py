"""Pushes from a workflow: one activity fans a notification out to a list of devices."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.push import PushActivities
    from tollgate.messages.models import PushInput, PushResult


async def fan_out(
    push: PushInput, *, per_device: timedelta, heartbeat: timedelta, retry: RetryPolicy
) -> PushResult:
    """Push to every device of ``push`` in one activity.

    The activity calls the provider once per device, so its time grows with them
    (``per_device`` each, at least one). Once it has run for a quarter of ``heartbeat``
    it heartbeats after each device, so a stalled fan-out is noticed within
    ``heartbeat``; a retry skips the devices already reached (see ``PushActivities.push``).
    """
    return await workflow.execute_activity_method(
        PushActivities.push,
        push,
        start_to_close_timeout=per_device * max(1, len(push.devices)),
        heartbeat_timeout=heartbeat,
        retry_policy=retry,
    )
