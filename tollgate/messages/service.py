"""What users and devices do to messages, shared by the CLI, the demo and the tests.

As for orders: Postgres first, Temporal second. ``send`` commits the row only if the
workflow started; ``recall`` records CANCELLED before it signals.
"""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from typing import Any, Literal

from temporalio.client import WorkflowHandle
from temporalio.common import (
    SearchAttributePair,
)

from tollgate.codec import search_token
from tollgate.errors import InputError, NotRunning
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
    MESSAGE_NAMES,
    MESSAGE_READ_SIGNAL,
    MESSAGE_RECALL_SIGNAL,
    RECIPIENT_ID_ATTR,
)
from tollgate.service import (
    AlsoWrite,
    LifecycleKind,
    LifecycleReport,
    LifecycleService,
    StopOutcome,
    start_lifecycle,
)
from tollgate.tracing import tracer

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


class RecallOutcome(StopOutcome[MessageStatus]):
    """What ``recall`` did."""

    message_id: str
    recalled: bool


class MessageReport(LifecycleReport[MessageStatus, MessageProgress]):
    """Everything ``message status`` shows."""

    message: store.MessageRow
    deliveries: list[store.DeliveryRow]


MESSAGE_KIND = LifecycleKind(store.MESSAGE_STORE, MESSAGE_NAMES, MessageResult, MessageProgress)


class MessageService(
    LifecycleService[MessageInput, store.MessageRow, MessageResult, MessageProgress]
):
    """Message and device operations over one Temporal client and one Postgres pool."""

    _kind = MESSAGE_KIND

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
        self, message: MessageInput, *, actor: str = "cli:send", also: AlsoWrite | None = None
    ) -> WorkflowHandle[Any, MessageResult]:
        """Insert the INITIATED row and start its workflow, both or neither. ``actor`` is
        who the audit names; ``also`` writes more in the same transaction, first (see
        :meth:`tollgate.orders.service.OrderService.create`)."""
        if message.carry_over is not None:
            raise InputError("carry_over is set by the workflow itself, never by a sender")
        with tracer.start_as_current_span(
            "message.send", attributes={"tollgate.message_id": message.message_id}
        ):
            start = self._start(message, message.message_id, actor=actor, also=also)
            return await start_lifecycle(self._client, self._pool, start)

    def _search_attribute(self, message: MessageInput) -> SearchAttributePair[str]:
        return SearchAttributePair(
            RECIPIENT_ID_ATTR, search_token(self._client, message.recipient_id)
        )

    def _summary(self, message: MessageInput) -> str:
        return f"Message {message.message_id}: {message.sender_id} -> {message.recipient_id}"

    async def device_says(
        self, message_id: str, device_id: str, what: Literal["delivered", "read"]
    ) -> None:
        """Deliver a device's confirmation or read acknowledgement to the workflow, in the
        message's trace."""
        payload = parse_input(DeviceSignal, {"device_id": device_id})
        row = await self._named_row(message_id)
        signal = MESSAGE_DELIVERED_SIGNAL if what == "delivered" else MESSAGE_READ_SIGNAL
        with self._joined(what, row, {"tollgate.device_id": device_id}):
            running = await self._signal(message_id, signal, payload)
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
        stopped = await self._stop("recall", message_id, request, actor, MESSAGE_RECALL_SIGNAL)
        return RecallOutcome(
            message_id=message_id,
            recalled=stopped.recorded,
            status=stopped.row.status,
            signalled=stopped.signalled,
            message=(
                f"message {message_id} recalled"
                if stopped.recorded
                else f"message {message_id} is already {stopped.row.status}; it cannot be recalled"
            ),
        )

    async def report(self, message_id: str) -> MessageReport:
        """The row, its per-device deliveries, its audited transitions, and the
        workflow's status and live progress."""
        row = await self.row(message_id)
        deliveries = await store.deliveries(self._pool, message_id)
        return MessageReport(message=row, deliveries=deliveries, **await self._history(row))
