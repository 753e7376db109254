"""Push notifications: fan a notification out to devices, heartbeating a slow fan-out."""

from __future__ import annotations

import time
from datetime import timedelta

import asyncpg
from temporalio import activity

from activities import defn
from tollgate.errors import TokenUnregistered
from tollgate.messages import store
from tollgate.messages.models import PushInput, PushProgress, PushResult
from tollgate.providers.push import PushProvider


class PushActivities:
    """Calls the push provider and records what reached which device."""

    def __init__(self, pool: asyncpg.Pool, provider: PushProvider) -> None:
        self._pool = pool
        self._provider = provider

    @defn("push_to_devices")
    async def push(self, req: PushInput) -> PushResult:
        """Push to every device in order; once the attempt has run for a while, heartbeat
        the devices done after each one.

        A retried attempt (the worker died, a provider call failed) skips the devices an
        earlier attempt reached: those its heartbeats named and, for a message, those
        recorded as pushed in Postgres. The per-device idempotency key covers a device
        pushed after both. A token the provider no longer knows (410) deactivates that
        device; it is not an error and is not retried.

        Heartbeats begin once the attempt has run for a quarter of its heartbeat timeout
        (:func:`_quiet_for`). A fan-out that ends sooner, the usual one at a few
        milliseconds a device, sends none: the SDK sends a first heartbeat at once, and
        that server write under the workflow's lock came just as the first device
        confirmed delivery, slowing the signal and the activity's completion. A stalled
        fan-out still heartbeats, or times out, well within its heartbeat timeout.
        """
        info = activity.info()
        progress = _resume(info.heartbeat_details)
        if req.kind == "message" and info.attempt > 1:
            recorded = {
                row.device_id: row.push_id
                for row in await store.deliveries(self._pool, req.message_id)
                if row.pushed_at is not None and row.push_id is not None
            }
            progress = progress.model_copy(update={"pushed": {**recorded, **progress.pushed}})
        heartbeat_from = time.monotonic() + _quiet_for(info.heartbeat_timeout)
        for device in req.devices:
            if device.device_id in progress.pushed or device.device_id in progress.removed:
                continue
            try:
                answer = await self._provider.push(
                    token=device.push_token,
                    message_id=req.message_id,
                    kind=req.kind,
                    payload=req.payload,
                    idempotency_key=f"{req.idempotency_prefix}:{device.device_id}",
                )
            except TokenUnregistered:
                await store.deactivate_device(
                    self._pool, device.device_id, "push token unregistered"
                )
                progress = progress.model_copy(
                    update={"removed": [*progress.removed, device.device_id]}
                )
            else:
                if req.kind == "message":
                    await store.record_push(
                        self._pool, req.message_id, device.device_id, answer.push_id
                    )
                progress = progress.model_copy(
                    update={"pushed": {**progress.pushed, device.device_id: answer.push_id}}
                )
            if time.monotonic() >= heartbeat_from:
                activity.heartbeat(progress.model_dump())
        return PushResult(pushed=progress.pushed, removed=progress.removed)


#: Without a heartbeat timeout, how long an attempt runs before it heartbeats.
_QUIET_WITHOUT_TIMEOUT = timedelta(seconds=1)


def _quiet_for(heartbeat_timeout: timedelta | None) -> float:
    """Seconds an attempt pushes before its first heartbeat: a quarter of its heartbeat
    timeout, so the heartbeats that follow still come well within it."""
    if heartbeat_timeout is None:
        return _QUIET_WITHOUT_TIMEOUT.total_seconds()
    return heartbeat_timeout.total_seconds() / 4


def _resume(details: object) -> PushProgress:
    """The last heartbeat's progress, or a fresh start."""
    if isinstance(details, (list, tuple)) and details:
        last = details[-1]
        if isinstance(last, dict):
            return PushProgress.model_validate(last)
    return PushProgress()
