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
from tollgate_dev.api_client import ApiCaller
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


#: How a message scenario ended: (message id, final status, effects, detail).
MessageRun = tuple[str, MessageStatus, MessageEffects, str]

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
) -> MessageRun:
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


#: The API scenario's name and expectation: the phone confirms and reads through signed
#: receipts (the first one sent twice); the tablet gets the read receipt.
API_MESSAGE_SCENARIO = MessageScenario(
    "via the HTTP API, signed receipts",
    2,
    MessageStatus.READ,
    MessageEffects(devices_pushed=2, duplicate_pushes=0, receipts=1, emails=0),
    _nobody_confirms,
    read_window=timedelta(seconds=2),
)


async def run_api_message_scenario(
    api: ApiCaller, service: MessageService, sandbox: SandboxAdmin, run_id: str
) -> MessageRun:
    """Register two devices, send a message and report it read, all over HTTP: devices
    and the message with the API key, receipts signed with the webhook secret. Returns
    (message id, final status, effects, detail) like :func:`run_message_scenario`."""
    user = f"demo-{run_id}-api"
    ids = []
    for k, kind in enumerate(("phone", "tablet")):
        reply = await api.post(
            "/v1/devices",
            {
                "device_id": f"{user}-{kind}",
                "user_id": user,
                "push_token": f"tok-{user}-{k}",
                "platform": "ios",
            },
        )
        reply.raise_for_status()
        ids.append(reply.json()["id"])
    await sandbox.clear_faults()
    sent = await api.send_message(
        {
            "sender_id": "sam",
            "recipient_id": user,
            "recipient_email": f"{user}@example.com",
            "body": "Demo: sent over HTTP",
            "read_window_seconds": API_MESSAGE_SCENARIO.read_window.total_seconds(),
        }
    )
    sent.raise_for_status()
    message_id: str = sent.json()["id"]
    await _progress(service, message_id, lambda p: len(p.devices_pushed) == len(ids))
    delivered = {
        "receipt_id": f"{user}-r1",
        "message_id": message_id,
        "device_id": ids[0],
        "kind": "delivered",
    }
    outcomes = [(await api.receipt(delivered)).json()["outcome"]]
    outcomes.append((await api.receipt(delivered)).json()["outcome"])  # a provider's resend
    await _progress(service, message_id, lambda p: p.status is MessageStatus.DELIVERED)
    read = {**delivered, "receipt_id": f"{user}-r2", "kind": "read"}
    outcomes.append((await api.receipt(read)).json()["outcome"])
    await service.handle(message_id).result()
    row = await service.row(message_id)
    effects = MessageEffects.of(await sandbox.ledger(message_id=message_id))
    detail = "receipts: " + ", ".join(outcomes)
    if outcomes != ["applied", "duplicate", "applied"]:
        detail += " (want applied, duplicate, applied)"
    return message_id, row.status, effects, detail
