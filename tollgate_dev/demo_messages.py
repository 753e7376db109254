"""The message-delivery demo scenarios, run after the order scenarios by ``make demo``.

Each scenario registers fresh devices for a fresh recipient, sends one message, plays
the devices' part (delivery confirmations, reads) through the same signals a device
would send, and compares the end with what the sandbox ledger shows was pushed/emailed.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from pydantic import BaseModel, ConfigDict

from tollgate.messages.models import MessageProgress
from tollgate.messages.service import MessageService
from tollgate.messages.states import MessageStatus
from tollgate.models import RetrySettings
from tollgate.names import MESSAGE_STATUS_QUERY
from tollgate_dev.recipients import message_to, register_phones
from tollgate_dev.sandbox import FaultSpec, Ledger, SandboxAdmin

#: Short backoffs for every demo scenario, orders and messages alike: the flaky gateway
#: and the push outage recover in seconds, not minutes.
DEMO_RETRY = RetrySettings(
    activity_timeout=timedelta(seconds=10),
    initial_interval=timedelta(milliseconds=300),
    maximum_interval=timedelta(seconds=2),
)


class MessageEffects(BaseModel):
    """What the ledger holds for one message."""

    model_config = ConfigDict(frozen=True)

    devices_pushed: int
    duplicate_pushes: int
    receipts: int
    emails: int

    @classmethod
    def of(cls, ledger: Ledger) -> MessageEffects:
        per_token = Counter(p.token for p in ledger.pushes if p.kind == "message")
        return cls(
            devices_pushed=len(per_token),
            duplicate_pushes=sum(n - 1 for n in per_token.values()),
            receipts=sum(1 for p in ledger.pushes if p.kind == "read_receipt"),
            emails=len(ledger.emails),
        )

    def describe(self) -> str:
        return (
            f"pushes: {self.devices_pushed} devices, {self.duplicate_pushes} dup; "
            f"receipts: {self.receipts}; emails: {self.emails}"
        )


@dataclass(frozen=True)
class Devices:
    user: str
    ids: list[str]


Drive = Callable[[MessageService, SandboxAdmin, str, Devices], Awaitable[None]]


@dataclass(frozen=True)
class MessageScenario:
    name: str
    devices: int
    expected_status: MessageStatus
    #: None: this scenario does not pin the number of devices pushed (timing decides).
    expected: MessageEffects | None
    drive: Drive
    deadline: timedelta = timedelta(seconds=30)
    read_window: timedelta = timedelta(seconds=2)
    fault: FaultSpec | None = None


async def _progress(
    service: MessageService, message_id: str, done: Callable[[MessageProgress], bool]
) -> None:
    handle = service.handle(message_id)
    for _ in range(600):
        if done(await handle.query(MESSAGE_STATUS_QUERY, result_type=MessageProgress)):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"message {message_id} made no progress")


async def _read_on_first(
    service: MessageService, sandbox: SandboxAdmin, message_id: str, d: Devices
) -> None:
    await _progress(service, message_id, lambda p: len(p.devices_pushed) == len(d.ids))
    await service.device_says(message_id, d.ids[0], "delivered")
    await _progress(service, message_id, lambda p: p.status is MessageStatus.DELIVERED)
    await service.device_says(message_id, d.ids[0], "read")


async def _nobody_confirms(
    service: MessageService, sandbox: SandboxAdmin, message_id: str, d: Devices
) -> None:
    return None


async def _confirm_after_outage(
    service: MessageService, sandbox: SandboxAdmin, message_id: str, d: Devices
) -> None:
    await _progress(service, message_id, lambda p: len(p.devices_pushed) == len(d.ids))
    await service.device_says(message_id, d.ids[1], "delivered")


async def _recall_while_pushing(
    service: MessageService, sandbox: SandboxAdmin, message_id: str, d: Devices
) -> None:
    await _progress(service, message_id, lambda p: p.step == "pushing")
    await service.recall(message_id, reason="sent to the wrong person", requested_by="demo")


MESSAGE_SCENARIOS: tuple[MessageScenario, ...] = (
    MessageScenario(
        "read on one device, receipts synced",
        3,
        MessageStatus.READ,
        MessageEffects(devices_pushed=3, duplicate_pushes=0, receipts=2, emails=0),
        _read_on_first,
    ),
    MessageScenario(
        "no confirmation by a 2s deadline",
        2,
        MessageStatus.EMAILED,
        MessageEffects(devices_pushed=2, duplicate_pushes=0, receipts=0, emails=1),
        _nobody_confirms,
        deadline=timedelta(seconds=2),
        read_window=timedelta(seconds=1),
    ),
    MessageScenario(
        "push provider down, then back",
        3,
        MessageStatus.DELIVERED,
        MessageEffects(devices_pushed=3, duplicate_pushes=0, receipts=0, emails=0),
        _confirm_after_outage,
        # "after": the first device is pushed but the answers are lost four times
        fault=FaultSpec(fail_next=4, fail_status=503, fail_phase="after"),
    ),
    MessageScenario(
        "recalled before delivery",
        2,
        MessageStatus.CANCELLED,
        None,
        _recall_while_pushing,
        fault=FaultSpec(latency_ms=1500),
    ),
)


async def run_message_scenario(
    service: MessageService, sandbox: SandboxAdmin, scenario: MessageScenario, run_id: str, n: int
) -> tuple[str, MessageStatus, MessageEffects, str]:
    """Run one scenario; returns (message id, final status, effects, detail)."""
    user = f"demo-{run_id}-{n}"
    ids = await register_phones(service, user, scenario.devices)
    message = message_to(
        user,
        message_id=f"demo-{run_id}-msg{n}",
        sender_id="sam",
        body=f"Demo: {scenario.name}",
        deadline=scenario.deadline,
        read_window=scenario.read_window,
        retry=DEMO_RETRY,
    )
    await sandbox.clear_faults()
    if scenario.fault is not None:
        await sandbox.set_fault("push", scenario.fault)
    try:
        handle = await service.send(message)
        await scenario.drive(service, sandbox, message.message_id, Devices(user, ids))
        if scenario.expected_status is not MessageStatus.CANCELLED:
            await handle.result()
        else:
            await _progress(
                service, message.message_id, lambda p: p.status is MessageStatus.CANCELLED
            )
    finally:
        await sandbox.clear_faults()
    row = await service.row(message.message_id)
    effects = MessageEffects.of(await sandbox.ledger(message_id=message.message_id))
    return message.message_id, row.status, effects, row.failure_reason or ""
