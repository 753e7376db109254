"""Message state in Postgres: the row's transitions, devices, per-device facts."""

from __future__ import annotations

import asyncpg
from temporalio import activity

from activities import classified, current_actor, current_trace_id, current_workflow_id
from tollgate import db, message_db
from tollgate.message_models import (
    ClearReadInput,
    DeviceFactInput,
    DevicesInput,
    DevicesResult,
    MessageInput,
    MessageTransitionInput,
    RecallMessageInput,
    RecordMessageResult,
)
from tollgate.models import TransitionResult


class MessageStoreActivities:
    """Activities that read and write ``messages``, ``devices`` and ``message_deliveries``."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @activity.defn(name="record_message")
    @classified
    async def record_message(self, message: MessageInput) -> RecordMessageResult:
        """Ensure the INITIATED row exists (the CLI usually inserted it already)."""
        async with self._pool.acquire() as conn:
            return await message_db.insert_message(
                conn,
                message,
                workflow_id=current_workflow_id(),
                actor=current_actor(),
                trace_id=current_trace_id(),
            )

    @activity.defn(name="transition_message")
    @classified
    async def transition_message(self, req: MessageTransitionInput) -> TransitionResult:
        """Apply one version-checked transition to a message row."""
        result = await db.transition_row(
            self._pool,
            db.MESSAGES,
            entity_id=req.message_id,
            expected_version=req.expected_version,
            to_status=req.to_status.value,
            transition_id=req.transition_id,
            actor=req.actor,
            reason=req.reason,
            failure_reason=req.failure_reason,
            trace_id=current_trace_id(),
        )
        activity.logger.info(
            "message transition",
            extra={
                "message_id": req.message_id,
                "to_status": req.to_status.value,
                "version": result.version,
            },
        )
        return result

    @activity.defn(name="recall_message")
    @classified
    async def recall_message(self, req: RecallMessageInput) -> RecordMessageResult:
        """Record CANCELLED (unless already recorded, read or ended); return where it stands."""
        row = await message_db.recall_message(
            self._pool,
            req.message_id,
            reason=req.reason,
            actor=f"{current_actor()}:{req.requested_by}",
        )
        return RecordMessageResult(status=row.status, version=row.version)

    @activity.defn(name="recipient_devices")
    @classified
    async def recipient_devices(self, req: DevicesInput) -> DevicesResult:
        """The recipient's active devices, oldest first."""
        rows = await message_db.active_devices(self._pool, req.user_id)
        return DevicesResult(devices=[r.ref() for r in rows])

    @activity.defn(name="record_device_fact")
    @classified
    async def record_device_fact(self, req: DeviceFactInput) -> None:
        """Record delivered / read / receipt-shown for devices (first writer wins)."""
        await message_db.record_fact(self._pool, req.message_id, req.device_ids, req.fact)

    @activity.defn(name="clear_device_read")
    @classified
    async def clear_device_read(self, req: ClearReadInput) -> None:
        """Undo a device's read mark (compensation of the read-receipt sync)."""
        await message_db.clear_read(self._pool, req.message_id, req.device_id)
