"""Push notifications: fan a notification out to devices, heartbeating per device."""

from __future__ import annotations

import asyncpg
import httpx
from temporalio import activity

from activities import classified
from tollgate import message_db
from tollgate.breaker import Breakers
from tollgate.errors import TokenUnregistered
from tollgate.message_models import PushInput, PushProgress, PushResult
from tollgate.providers import NonEmptyStr, ProviderAnswer, ProviderClient


class PushAnswer(ProviderAnswer):
    """What a push must answer: the id of the notification handed over."""

    push_id: NonEmptyStr


class PushActivities:
    """Calls the push provider (APNs/FCM-like) and records what reached which device."""

    def __init__(
        self, pool: asyncpg.Pool, http: httpx.AsyncClient, breakers: Breakers | None = None
    ) -> None:
        self._pool = pool
        breaker = breakers.get("push") if breakers is not None else None
        self._push = ProviderClient(http, "push", breaker)

    @activity.defn(name="push_to_devices")
    @classified
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
                answer = await self._push.call_as(
                    PushAnswer,
                    "POST",
                    "/push/notifications",
                    json={
                        "token": device.push_token,
                        "message_id": req.message_id,
                        "kind": req.kind,
                        "payload": req.payload,
                    },
                    idempotency_key=f"{req.idempotency_prefix}:{device.device_id}",
                )
            except TokenUnregistered:
                await message_db.deactivate_device(
                    self._pool, device.device_id, "push token unregistered"
                )
                progress = progress.model_copy(
                    update={"removed": [*progress.removed, device.device_id]}
                )
            else:
                push_id = answer.push_id
                if req.kind == "message":
                    await message_db.record_push(
                        self._pool, req.message_id, device.device_id, push_id
                    )
                progress = progress.model_copy(
                    update={"pushed": {**progress.pushed, device.device_id: push_id}}
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
