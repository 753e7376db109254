"""What users and devices do to messages, shared by the CLI, the demo and the tests.

As for orders: Postgres first, Temporal second. ``send`` commits the row only if the
workflow started; ``recall`` records CANCELLED before it signals.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, Literal

import asyncpg
from pydantic import BaseModel, ConfigDict
from temporalio.client import Client, WorkflowHandle
from temporalio.common import (
    SearchAttributePair,
)

from tollgate.codec import search_token
from tollgate.errors import InputError, MessageNotFound, NotRunning
from tollgate.gate import AuditRow
from tollgate.ids import require_safe_id
from tollgate.messages import store
from tollgate.messages.models import (
    DeviceRegistration,
    DeviceSignal,
    MessageInput,
    MessageProgress,
    MessageResult,
    RecallRequest,
)
from tollgate.messages.states import MessageStatus
from tollgate.models import parse_input
from tollgate.names import (
    MESSAGE_DELIVERED_SIGNAL,
    MESSAGE_READ_SIGNAL,
    MESSAGE_RECALL_SIGNAL,
    MESSAGE_STATUS_ATTR,
    MESSAGE_STATUS_QUERY,
    MESSAGE_WORKFLOW,
    RECIPIENT_ID_ATTR,
    message_workflow_id,
)
from tollgate.postgres import Connection
from tollgate.temporal import inspect_workflow, signal_if_running, start_lifecycle
from tollgate.tracing import joined, tracer

_DURATION = re.compile(r"(\d{1,12}(?:\.\d{1,9})?)(ms|s|m|h|d)", re.ASCII)
#: No knob of Tollgate takes a longer duration; anything past it is a typo.
_LONGEST_DURATION = timedelta(days=3650)
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``500ms``, ``30s``, ``5m``, ``2h``, ``7d`` -> timedelta; a clear error otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise InputError(
            f"duration {text!r} is not a number with a unit (ms, s, m, h, d), e.g. 30s"
        )
    value = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if value <= 0:
        raise InputError(f"duration {text!r} must be positive")
    if value > _LONGEST_DURATION.total_seconds():
        raise InputError(f"duration {text!r} is longer than {_LONGEST_DURATION.days} days")
    return timedelta(seconds=value)


def build_message(**fields: object) -> MessageInput:
    """Validate a message; a pydantic error becomes one line naming the field."""
    return parse_input(MessageInput, fields)


class RecallOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)

    message_id: str
    recalled: bool
    status: MessageStatus
    signalled: bool
    message: str


class MessageReport(BaseModel):
    """Everything ``message status`` shows."""

    model_config = ConfigDict(frozen=True)

    message: store.MessageRow
    deliveries: list[store.DeliveryRow]
    transitions: list[AuditRow[MessageStatus]]
    workflow_id: str
    workflow_status: str | None
    workflow_progress: MessageProgress | None
    checked_at: datetime


class MessageService:
    """Message and device operations over one Temporal client and one Postgres pool."""

    def __init__(self, client: Client, pool: asyncpg.Pool, task_queue: str) -> None:
        self._client = client
        self._pool = pool
        self._task_queue = task_queue

    def handle(self, message_id: str) -> WorkflowHandle[Any, MessageResult]:
        """The workflow handle of a message's delivery."""
        return self._client.get_workflow_handle(
            message_workflow_id(message_id), result_type=MessageResult
        )

    async def row(self, message_id: str) -> store.MessageRow:
        row = await store.get_message(self._pool, message_id)
        if row is None:
            raise MessageNotFound(message_id)
        return row

    async def register_device(
        self,
        *,
        device_id: str,
        user_id: str,
        push_token: str,
        platform: str,
        client_id: str | None = None,
    ) -> store.DeviceRow:
        """Register a device of ``user_id`` with its push token (validated first);
        ``client_id`` is the API client registering it (None: the CLI)."""
        device = parse_input(
            DeviceRegistration,
            {
                "device_id": device_id,
                "user_id": user_id,
                "push_token": push_token,
                "platform": platform,
            },
        )
        return await store.register_device(
            self._pool,
            device_id=device.device_id,
            user_id=device.user_id,
            push_token=device.push_token,
            platform=device.platform,
            client_id=client_id,
        )

    async def remove_device(self, device_id: str) -> store.DeviceRow:
        """Stop pushing to a device (it keeps its history); ``DeviceNotFound`` if unknown."""
        require_safe_id("device id", device_id)
        await store.deactivate_device(self._pool, device_id, "removed by its user")
        return await store.get_device(self._pool, device_id)

    async def wait_until(
        self, message_id: str, until: frozenset[MessageStatus]
    ) -> store.MessageRow:
        """Poll the row until its status is in ``until`` or it ended elsewhere.

        A message rests for its whole read window, so waiting for its workflow to end
        would mean waiting days; callers bound this with ``asyncio.timeout``.
        """
        while True:
            row = await self.row(message_id)
            if row.status in until or row.status.terminal:
                return row
            await asyncio.sleep(0.1)

    async def send(
        self,
        message: MessageInput,
        *,
        actor: str = "cli:send",
        also: Callable[[Connection], Awaitable[object]] | None = None,
    ) -> WorkflowHandle[Any, MessageResult]:
        """Insert the INITIATED row and start its workflow, both or neither. ``actor`` is
        who the audit names; ``also`` writes more in the same transaction, first (see
        :meth:`tollgate.orders.service.OrderService.create`)."""
        if message.carry_over is not None:
            raise InputError("carry_over is set by the workflow itself, never by a sender")
        with tracer.start_as_current_span(
            "message.send", attributes={"tollgate.message_id": message.message_id}
        ):
            return await self._send(message, actor, also)

    async def _send(
        self,
        message: MessageInput,
        actor: str,
        also: Callable[[Connection], Awaitable[object]] | None,
    ) -> WorkflowHandle[Any, MessageResult]:
        workflow_id = message_workflow_id(message.message_id)

        async def insert(conn: Connection) -> None:
            if also is not None:
                await also(conn)
            await store.insert_message(conn, message, workflow_id=workflow_id, actor=actor)

        return await start_lifecycle(
            self._client,
            self._pool,
            store.MESSAGES,
            message.message_id,
            insert=insert,
            workflow=MESSAGE_WORKFLOW,
            arg=message,
            workflow_id=workflow_id,
            task_queue=self._task_queue,
            result_type=MessageResult,
            search_attributes=[
                SearchAttributePair(MESSAGE_STATUS_ATTR, MessageStatus.INITIATED.value),
                SearchAttributePair(
                    RECIPIENT_ID_ATTR, search_token(self._client, message.recipient_id)
                ),
            ],
            summary=f"Message {message.message_id}: {message.sender_id} -> {message.recipient_id}",
        )

    async def device_says(
        self, message_id: str, device_id: str, what: Literal["delivered", "read"]
    ) -> None:
        """Deliver a device's confirmation or read acknowledgement to the workflow, in the
        message's trace."""
        payload = parse_input(DeviceSignal, {"device_id": device_id})
        require_safe_id("message id", message_id)
        row = await self.row(message_id)
        signal = MESSAGE_DELIVERED_SIGNAL if what == "delivered" else MESSAGE_READ_SIGNAL
        with joined(
            f"message.{what}",
            row.trace_parent,
            attributes={"tollgate.message_id": message_id, "tollgate.device_id": device_id},
        ):
            running = await signal_if_running(self.handle(message_id), signal, payload)
        if not running:
            raise NotRunning(f"message {message_id} is no longer running (it is {row.status})")

    async def recall(
        self, message_id: str, *, reason: str, requested_by: str, actor: str | None = None
    ) -> RecallOutcome:
        """Record CANCELLED in Postgres (version-checked), then signal the workflow.

        The request is validated whole before the write, as for an order's cancel. The
        audit names ``actor`` (default ``cli:<requested_by>``).
        """
        request = parse_input(RecallRequest, {"reason": reason, "requested_by": requested_by})
        require_safe_id("message id", message_id)
        existing = await self.row(message_id)
        with joined(
            "message.recall", existing.trace_parent, attributes={"tollgate.message_id": message_id}
        ):
            return await self._recall(message_id, request, actor)

    async def _recall(
        self, message_id: str, request: RecallRequest, actor: str | None
    ) -> RecallOutcome:
        row = await store.recall_message(
            self._pool,
            message_id,
            reason=request.reason,
            actor=actor or f"cli:{request.requested_by}",
        )
        if row.status is not MessageStatus.CANCELLED:
            return RecallOutcome(
                message_id=message_id,
                recalled=False,
                status=row.status,
                signalled=False,
                message=f"message {message_id} is already {row.status}; it cannot be recalled",
            )
        signalled = await signal_if_running(self.handle(message_id), MESSAGE_RECALL_SIGNAL, request)
        return RecallOutcome(
            message_id=message_id,
            recalled=True,
            status=MessageStatus.CANCELLED,
            signalled=signalled,
            message=f"message {message_id} recalled",
        )

    async def report(self, message_id: str) -> MessageReport:
        row = await self.row(message_id)
        workflow_status, progress = await inspect_workflow(
            self.handle(message_id), MESSAGE_STATUS_QUERY, MessageProgress
        )
        return MessageReport(
            message=row,
            deliveries=await store.deliveries(self._pool, message_id),
            transitions=await store.list_transitions(self._pool, message_id),
            workflow_id=row.workflow_id,
            workflow_status=workflow_status,
            workflow_progress=progress,
            checked_at=datetime.now().astimezone(),
        )
