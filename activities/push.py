"""Push notifications: fan a notification out to devices, heartbeating per device."""

from __future__ import annotations

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
        """Push to every device in order, heartbeating the devices done after each one.

        A retried attempt (the worker died, a provider call failed) starts from the last
        heartbeat's details and skips devices already reached; the per-device idempotency
        key covers the one device that may have been pushed after the last heartbeat.
        A token the provider no longer knows (410) deactivates that device; it is not an
        error and is not retried.
        """
        progress = _resume(activity.info().heartbeat_details)
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
            activity.heartbeat(progress.model_dump())
        return PushResult(pushed=progress.pushed, removed=progress.removed)


def _resume(details: object) -> PushProgress:
    """The last heartbeat's progress, or a fresh start."""
    if isinstance(details, (list, tuple)) and details:
        last = details[-1]
        if isinstance(last, dict):
            return PushProgress.model_validate(last)
    return PushProgress()
