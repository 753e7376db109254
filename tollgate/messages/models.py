"""Input and result models of the message-delivery workflows and their activities."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import Field

from tollgate.ids import Body, Reason, SafeId
from tollgate.messages.states import MessageStatus
from tollgate.models import Model, RetrySettings, StopRequest, TransitionRequest

#: An address the email provider can take: no spaces, quotes or control characters.
EMAIL_PATTERN = r"^[A-Za-z0-9._%+'-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+$"
PushKind = Literal["message", "read_receipt", "read_revert"]


class Device(Model):
    device_id: str
    user_id: str
    push_token: str
    platform: str


class DeliveryCarryOver(Model):
    """Where a message's lifecycle stood when it continued as new.

    A message waits for days and every device signal is an event in its history;
    Temporal caps signals per run (10,000 on the dev server), so after a few thousand
    the lifecycle continues as a new run of the same workflow id, carrying this.
    """

    phase: Literal["awaiting_delivery", "awaiting_read"]
    status: MessageStatus
    version: int
    devices: list[Device]
    pushed: dict[str, str] = {}
    removed: list[str] = []
    confirmed: list[str] = []
    reads: list[str] = []
    #: ``<device>|<fact>`` already written to Postgres.
    facts_recorded: list[str] = []
    delivered_on: str | None = None
    email_id: str | None = None
    ignored_signals: list[str] = []
    ignored_signal_count: int = 0
    read_syncs: int = 0
    #: When the delivery deadline passes (``awaiting_delivery``).
    deadline_at: datetime | None = None
    #: When the read window closes (``awaiting_read``).
    window_ends: datetime | None = None


class MessageInput(Model):
    """A message to deliver. The workflow id is derived from ``message_id``."""

    message_id: SafeId
    sender_id: SafeId
    recipient_id: SafeId
    recipient_email: str = Field(pattern=EMAIL_PATTERN, max_length=254)
    body: Body
    #: No delivery confirmation this long after dispatch: fall back to email.
    deadline: timedelta = Field(
        default=timedelta(seconds=30), ge=timedelta(milliseconds=100), le=timedelta(days=1)
    )
    #: How long the lifecycle waits for the message to be read before it rests.
    read_window: timedelta = Field(
        default=timedelta(days=7), ge=timedelta(milliseconds=100), le=timedelta(days=90)
    )
    #: Heartbeat timeout of the push fan-out: a killed worker is noticed this fast.
    push_heartbeat_timeout: timedelta = Field(default=timedelta(seconds=5), gt=timedelta(0))
    retry: RetrySettings = RetrySettings()
    #: The API client that sent the message (None: the CLI); recorded with the row.
    client_id: SafeId | None = None
    #: Set only by the workflow itself when it continues as new.
    carry_over: DeliveryCarryOver | None = None


class DeviceRegistration(Model):
    """A device to push to: whose it is and the provider's token for it."""

    device_id: SafeId
    user_id: SafeId
    #: The push provider's opaque token: printable ASCII, no spaces.
    push_token: str = Field(pattern=r"^[!-~]{1,512}$")
    platform: Literal["ios", "android", "web"]


class DeviceSignal(Model):
    """Payload of the ``delivered`` and ``read`` signals: which device says so."""

    device_id: SafeId


class RecallRequest(StopRequest):
    """Payload of the ``recall`` signal."""

    reason: Reason = "recalled by sender"


class MessageResult(Model):
    """Where a message's lifecycle left it."""

    message_id: str
    status: MessageStatus
    version: int
    devices_pushed: list[str] = []
    devices_removed: list[str] = []
    delivered_on: str | None = None
    read_on: str | None = None
    email_id: str | None = None
    failure_reason: str | None = None
    #: A sample (at most 10) of the signals set aside: for devices that are not the
    #: recipient's, or beyond what the workflow buffers before dispatch.
    ignored_signals: list[str] = []
    #: How many signals were set aside in all.
    ignored_signal_count: int = 0


class MessageProgress(Model):
    """Live view returned by the ``status`` query."""

    message_id: str
    status: MessageStatus
    version: int
    step: str
    devices_pushed: list[str]
    confirmed_devices: list[str]
    read_devices: list[str]


# --- activity inputs and results -------------------------------------------------


class MessageSnapshot(Model):
    """Where a message row stands right now."""

    status: MessageStatus
    version: int


class TransitionInput(TransitionRequest[MessageStatus]):
    message_id: str


class RecallMessageInput(Model):
    message_id: str
    reason: str
    requested_by: str


class DevicesInput(Model):
    user_id: str


class DevicesResult(Model):
    devices: list[Device]


class DispatchResult(MessageSnapshot):
    """Where a delivery's first step left the row, and the recipient's devices (none read
    when the row was found recalled)."""

    devices: list[Device] = []


class PushInput(Model):
    """Fan one notification out to devices; keys are ``<prefix>:<device id>``."""

    message_id: str
    devices: list[Device]
    kind: PushKind
    payload: dict[str, Any] = {}
    idempotency_prefix: str


class PushProgress(Model):
    """Heartbeat details of the fan-out: what a retried attempt must not redo."""

    pushed: dict[str, str] = {}
    removed: list[str] = []


class PushResult(Model):
    #: device id -> push id
    pushed: dict[str, str]
    #: devices whose token the provider no longer knows (now deactivated)
    removed: list[str]


class DeviceFactInput(Model):
    """Record per-device facts (first writer wins)."""

    message_id: str
    device_ids: list[str]
    fact: Literal["delivered", "read", "receipt"]


class DeliverInput(Model):
    """The per-device facts the signals brought, then the move to DELIVERED."""

    facts: list[DeviceFactInput]
    move: TransitionInput


class ClearReadInput(Model):
    message_id: str
    device_id: str


class EmailInput(Model):
    message_id: str
    to: str
    subject: str
    body: str
    idempotency_key: str


class EmailResult(Model):
    email_id: str


class ReadSyncInput(Model):
    """Input of the read-receipt sync saga (a child of the delivery workflow)."""

    message_id: str
    reader_device_id: str
    other_devices: list[Device]
    reader_device: Device | None
    expected_version: int
    #: The status to return to if the sync fails for good (DELIVERED or EMAILED).
    revert_to: MessageStatus
    retry: RetrySettings = RetrySettings()


class ReadSyncResult(Model):
    synced: bool
    status: MessageStatus
    version: int
    receipts_pushed: list[str] = []
    failure_reason: str | None = None
