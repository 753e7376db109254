"""Message state in Postgres: the row's transitions, devices, per-device facts."""

from __future__ import annotations

from activities import LifecycleStoreActivities, Rows, current_actor, defn
from tollgate.messages import store
from tollgate.messages.models import (
    ClearReadInput,
    DeliverInput,
    DeviceFactInput,
    DevicesInput,
    DevicesResult,
    DispatchResult,
    MessageInput,
    MessageSnapshot,
    RecallMessageInput,
    TransitionInput,
)
from tollgate.messages.states import MessageStatus
from tollgate.messages.store import MESSAGE_STORE, MessageRow
from tollgate.models import TransitionResult


class MessageStoreActivities(LifecycleStoreActivities[MessageInput, MessageRow, MessageSnapshot]):
    """Activities that read and write ``messages``, ``devices`` and ``message_deliveries``."""

    rows = Rows(MESSAGE_STORE, MessageSnapshot)

    @defn("begin_message")
    async def begin_message(self, message: MessageInput) -> MessageSnapshot:
        """Ensure the INITIATED row exists and move it to STORED: a delivery's first step."""
        return await self._begin(message, message.message_id, MessageStatus.STORED)

    @defn("dispatch_message")
    async def dispatch_message(self, message: MessageInput) -> DispatchResult:
        """What a delivery does before the push, in one local activity: record the message
        (unless the service did) and move it to STORED, find the recipient's devices, and
        move it to DISPATCHED. A retry finds its writes done and reads the devices again;
        a row found recalled is reported as it is, and nothing is read."""
        at = await self._begin(message, message.message_id, MessageStatus.STORED)
        if at.status not in (MessageStatus.STORED, MessageStatus.DISPATCHED):
            return DispatchResult(status=at.status, version=at.version)
        devices = await self.recipient_devices(DevicesInput(user_id=message.recipient_id))
        if at.status is MessageStatus.STORED:
            at = await self._move_as_workflow(message.message_id, at, MessageStatus.DISPATCHED)
        return DispatchResult(status=at.status, version=at.version, devices=devices.devices)

    @defn("deliver_message")
    async def deliver_message(self, req: DeliverInput) -> TransitionResult:
        """Record what the devices' signals brought (first writer wins), then move the row
        to DELIVERED: one local activity."""
        for fact in req.facts:
            await self.record_device_fact(fact)
        return await self._move(req.move.message_id, req.move)

    @defn("record_message")
    async def record_message(self, message: MessageInput) -> MessageSnapshot:
        """Ensure the INITIATED row exists (the service usually inserted it already)."""
        return await self._record(message)

    @defn("transition_message")
    async def transition_message(self, req: TransitionInput) -> TransitionResult:
        """Apply one version-checked transition to a message row."""
        return await self._move(req.message_id, req)

    @defn("recall_message")
    async def recall_message(self, req: RecallMessageInput) -> MessageSnapshot:
        """Record CANCELLED (unless already recorded, read or ended); return where it stands."""
        row = await self._stop(
            req.message_id, reason=req.reason, actor=f"{current_actor()}:{req.requested_by}"
        )
        return MessageSnapshot(status=row.status, version=row.version)

    @defn("recipient_devices")
    async def recipient_devices(self, req: DevicesInput) -> DevicesResult:
        """The recipient's active devices, oldest first."""
        rows = await store.active_devices(self._pool, req.user_id)
        return DevicesResult(devices=[r.ref() for r in rows])

    @defn("record_device_fact")
    async def record_device_fact(self, req: DeviceFactInput) -> None:
        """Record delivered / read / receipt-shown for devices (first writer wins)."""
        await store.record_fact(self._pool, req.message_id, req.device_ids, req.fact)

    @defn("clear_device_read")
    async def clear_device_read(self, req: ClearReadInput) -> None:
        """Undo a device's read mark (compensation of the read-receipt sync)."""
        await store.clear_read(self._pool, req.message_id, req.device_id)
