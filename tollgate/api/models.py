"""The API's request and response bodies; the OpenAPI document is generated from them.

Requests are validated whole before anything is written: unknown fields are refused,
ids use the safe alphabet, text must be printable. They are separate from the workflow
inputs on purpose: a caller cannot set an entity's id (derived from its Idempotency-Key),
its owner, or its retry knobs. Responses never carry a push token.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from tollgate.ids import Body, Reason, SafeId
from tollgate.messages.models import EMAIL_PATTERN
from tollgate.messages.states import MessageStatus
from tollgate.orders.models import AMOUNT_CEILING, OrderItem
from tollgate.orders.states import OrderStatus


class Request(BaseModel):
    """Base of request bodies: unknown fields are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class View(BaseModel):
    """Base of response bodies."""

    model_config = ConfigDict(frozen=True)

    @classmethod
    def of(cls, source: object, **extra: Any) -> Self:
        """This view of ``source`` (a store row, a service's outcome): each of the view's
        fields read from the attribute of that name, the ones ``source`` lacks from
        ``extra`` or their defaults. The view's fields are the list of what a client
        may see; nothing else of the row leaves."""
        fields = {
            name: getattr(source, name)
            for name in cls.model_fields
            if name not in extra and hasattr(source, name)
        }
        return cls(**fields, **extra)


# --- requests ----------------------------------------------------------------------------


class OrderCreate(Request):
    """``POST /v1/orders``: what the customer ordered. The order id is derived from the
    client and its Idempotency-Key."""

    customer_id: SafeId
    items: list[OrderItem] = Field(min_length=1, max_length=100)
    #: Total in minor units (cents); the business limit is 100,000.00.
    amount_cents: int = Field(gt=0, le=AMOUNT_CEILING)
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")


class CancelRequest(Request):
    """``POST /v1/orders/{id}/cancel``."""

    reason: Reason = "cancelled by request"


class MessageCreate(Request):
    """``POST /v1/messages``: a message to deliver to every device of the recipient,
    with email as the fallback."""

    sender_id: SafeId
    recipient_id: SafeId
    recipient_email: str = Field(pattern=EMAIL_PATTERN, max_length=254)
    body: Body
    #: No delivery confirmation this long after dispatch: fall back to email.
    deadline_seconds: float = Field(default=30.0, ge=0.1, le=86_400)
    #: How long a read receipt is waited for before the message rests.
    read_window_seconds: float = Field(default=7 * 86_400, ge=0.1, le=90 * 86_400)


class RecallRequest(Request):
    """``POST /v1/messages/{id}/recall``."""

    reason: Reason = "recalled by sender"


class DeviceCreate(Request):
    """``POST /v1/devices``: a device of ``user_id`` and its push token. Without a
    ``device_id`` one is made up."""

    device_id: SafeId | None = None
    user_id: SafeId
    push_token: Annotated[str, Field(pattern=r"^[!-~]{1,512}$")]
    platform: Literal["ios", "android", "web"]


class Receipt(Request):
    """``POST /v1/receipts``: a device (or its push provider) says a message was
    delivered to it, or read on it. ``receipt_id`` makes a resend harmless."""

    receipt_id: SafeId
    message_id: SafeId
    device_id: SafeId
    kind: Literal["delivered", "read"]


# --- responses ---------------------------------------------------------------------------


class Transition(View):
    """One audited status change."""

    from_status: str | None
    to_status: str
    from_version: int | None
    to_version: int
    actor: str
    reason: str | None
    at: datetime


class WorkflowView(View):
    """The lifecycle's workflow as Temporal knows it (``status`` None: not found)."""

    id: str
    status: str | None
    step: str | None = None


class OrderView(View):
    """An order: its row, and on ``GET`` its audited transitions and workflow."""

    id: str
    status: OrderStatus
    version: int
    customer_id: str
    items: list[OrderItem]
    amount_cents: int
    currency: str
    failure_reason: str | None
    cancel_reason: str | None
    created_at: datetime
    updated_at: datetime
    transitions: list[Transition] | None = None
    workflow: WorkflowView | None = None


class CancelView(View):
    """What a cancel did: recorded in Postgres, and whether the workflow was told."""

    order_id: str
    status: OrderStatus
    version: int
    signalled: bool


class DeliveryView(View):
    """Per-device facts of a message."""

    device_id: str
    pushed_at: datetime | None
    delivered_at: datetime | None
    read_at: datetime | None
    receipt_at: datetime | None


class MessageView(View):
    """A message: its row (without body or address), and on ``GET`` its per-device
    facts, audited transitions and workflow."""

    id: str
    status: MessageStatus
    version: int
    sender_id: str
    recipient_id: str
    deadline_ms: int
    failure_reason: str | None
    created_at: datetime
    updated_at: datetime
    deliveries: list[DeliveryView] | None = None
    transitions: list[Transition] | None = None
    workflow: WorkflowView | None = None


class RecallView(View):
    """What a recall did."""

    message_id: str
    status: MessageStatus
    signalled: bool


class DeviceView(View):
    """A device (never its push token)."""

    id: str
    user_id: str
    platform: str
    active: bool
    registered_at: datetime
    removed_at: datetime | None


class ReceiptOutcome(View):
    """What became of a receipt: ``applied`` (the workflow was told), ``duplicate`` (this
    id was seen before; nothing changed), or ignored: ``unknown_device``,
    ``unknown_message``, ``not_running`` (the message's lifecycle has ended)."""

    receipt_id: str
    outcome: Literal["applied", "duplicate", "unknown_device", "unknown_message", "not_running"]


class Health(View):
    """``/healthz`` and ``/readyz``: ``ok``, or what is unreachable."""

    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = {}


class ProblemView(View):
    """RFC 9457 problem details; ``type`` is stable per kind of problem."""

    type: str
    title: str
    status: int
    detail: str
