"""Wire models of the provider sandbox, shared by the server and :class:`SandboxAdmin`.

Everything that crosses HTTP is a pydantic model here, so the server validates exactly
what the admin client sends and the client parses exactly what the server returns.
Money is always integer cents: floats would make "charged exactly once" checks lie.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Every provider the sandbox simulates. Adding one (e.g. ``sms``) means adding its name
#: here, its routes in ``app.py`` and, if it keeps records, a list on :class:`Ledger`.
PROVIDERS: tuple[str, ...] = ("payments", "inventory", "push", "email")

#: The SKU load runs and the benchmark order: in every sandbox's catalog, never sold out.
UNLIMITED_SKU = "LOADTEST"

Phase = Literal["before", "after"]
#: What a push notification tells the device: a new message, or a read receipt set / undone.
PushKind = Literal["message", "read_receipt", "read_revert"]


class _Strict(BaseModel):
    """Base for request bodies: unknown fields are a 400, not silently dropped.

    A misspelt field (``amount`` for ``amount_cents``) would otherwise validate as
    "missing" at best, or be ignored at worst; rejecting it surfaces client bugs early.
    """

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- config


class SandboxConfig(BaseModel):
    """How a sandbox app starts, and what ``POST /admin/reset`` restores."""

    #: Seed of the fault RNG (``fail_rate``), so probabilistic outages are reproducible.
    seed: int = 0
    #: Charges above this amount are declined with ``insufficient_funds``.
    card_limit_cents: int = Field(default=1_000_000, ge=0)
    initial_stock: dict[str, int] = Field(
        default_factory=lambda: {"WIDGET": 100, "GADGET": 50, "GIZMO": 25, "SOLDOUT": 0}
    )
    #: SKUs whose stock never runs out, for load runs and the benchmark: thousands of
    #: orders of a finite SKU would empty it, and every later order would fail and
    #: compensate, measuring the unhappy path by accident. Kept out of the stock table.
    unlimited_skus: set[str] = Field(default_factory=lambda: {UNLIMITED_SKU})
    declined_customers: set[str] = Field(default_factory=set)
    #: Device tokens push refuses with 410 ``unregistered`` (an uninstalled app).
    unregistered_tokens: set[str] = Field(default_factory=set)
    #: Addresses email refuses with 422 ``bounced``.
    bounced_addresses: set[str] = Field(default_factory=set)


# --------------------------------------------------------------------------- faults


class FaultSpec(_Strict):
    """Run-time fault injection for one provider (see the module docs of ``app.py``)."""

    #: Extra delay for each request, applied before or after the ledger is touched.
    latency_ms: int = Field(default=0, ge=0)
    latency_phase: Phase = "before"
    #: Fail exactly the next N requests (decremented as they fail), then behave.
    fail_next: int = Field(default=0, ge=0)
    #: Otherwise fail each request with this probability, from the seeded RNG.
    fail_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    #: Only error statuses make sense: a 2xx "fault" would be indistinguishable from success.
    fail_status: int = Field(default=503, ge=400, le=599)
    #: "before": fail without touching the ledger. "after": do the work, lose the response.
    fail_phase: Phase = "before"
    #: Sleep this long before anything else: a provider slower than the client's timeout.
    hang_ms: int = Field(default=0, ge=0)


# --------------------------------------------------------------------------- requests


class ChargeRequest(_Strict):
    """Body of ``POST /payments/charges``."""

    order_id: str = Field(min_length=1)
    customer_id: str = Field(min_length=1)
    amount_cents: int = Field(gt=0, strict=True)
    currency: str = Field(pattern=r"^[A-Z]{3}$")


class RefundRequest(_Strict):
    """Body of ``POST /payments/refunds``: undo the charge made with that idempotency key."""

    order_id: str = Field(min_length=1)
    charge_idempotency_key: str = Field(min_length=1)
    reason: str | None = None


class ReservationItem(_Strict):
    """One line of a reservation."""

    sku: str = Field(min_length=1)
    quantity: int = Field(gt=0, strict=True)


class ReservationRequest(_Strict):
    """Body of ``POST /inventory/reservations``."""

    order_id: str = Field(min_length=1)
    items: list[ReservationItem] = Field(min_length=1)


class ReleaseRequest(_Strict):
    """Body of ``POST /inventory/releases``: undo the reservation made with that key."""

    order_id: str = Field(min_length=1)
    reservation_idempotency_key: str = Field(min_length=1)


class StockUpdate(_Strict):
    """Body of ``PUT /admin/stock/{sku}``."""

    quantity: int = Field(ge=0, strict=True)


class PushRequest(_Strict):
    """Body of ``POST /push/notifications``."""

    token: str = Field(min_length=1, max_length=512)
    message_id: str = Field(min_length=1)
    kind: PushKind
    #: Free-form data for the app; any JSON object.
    payload: dict[str, Any] = Field(default_factory=dict)


#: A header value: no control characters at all.
_HEADER_SAFE = r"^[^\x00-\x1f\x7f]*$"


class EmailRequest(_Strict):
    """Body of ``POST /email/messages``."""

    to: str = Field(pattern=_HEADER_SAFE)
    # Headers are one line: a CR/LF in them would let the sender write further headers
    # (Bcc:), which is why real providers refuse them, and so does the sandbox.
    subject: str = Field(min_length=1, max_length=200, pattern=_HEADER_SAFE)
    body: str = Field(max_length=100_000)
    message_id: str = Field(min_length=1)

    @field_validator("to")
    @classmethod
    def _has_at(cls, value: str) -> str:
        # Deliberately loose: the sandbox only needs to catch "not an address at all".
        if "@" not in value:
            raise ValueError("must be an email address (contain '@')")
        return value


# --------------------------------------------------------------------------- responses


class ChargeResponse(BaseModel):
    """201 answer of a successful charge."""

    charge_id: str
    order_id: str
    customer_id: str
    amount_cents: int
    currency: str
    status: Literal["captured"] = "captured"
    idempotency_key: str


class RefundResponse(BaseModel):
    """Answer of a refund: ``refunded`` (201 or 200 if already done) or ``voided`` (200)."""

    status: Literal["refunded", "voided"]
    refund_id: str | None
    charge_id: str | None
    amount_cents: int


class SkuResponse(BaseModel):
    """Answer of ``GET /inventory/skus/{sku}``."""

    sku: str
    #: None for a SKU whose stock never runs out (``SandboxConfig.unlimited_skus``).
    available: int | None


class ReservationResponse(BaseModel):
    """201 answer of a successful reservation."""

    reservation_id: str
    order_id: str
    items: list[ReservationItem]
    status: Literal["reserved"] = "reserved"
    idempotency_key: str


class ReleaseResponse(BaseModel):
    """Answer of a release: ``released`` (201 or 200 if already done) or ``voided`` (200)."""

    status: Literal["released", "voided"]
    release_id: str | None
    reservation_id: str | None


class PushResponse(BaseModel):
    """201 answer of a sent push notification."""

    push_id: str
    token: str
    message_id: str
    kind: PushKind
    status: Literal["sent"] = "sent"
    idempotency_key: str


class EmailResponse(BaseModel):
    """201 answer of a sent email."""

    email_id: str
    to: str
    message_id: str
    status: Literal["sent"] = "sent"
    idempotency_key: str


class TokenList(BaseModel):
    """Answer of ``GET|PUT|DELETE /admin/push/unregistered[/{token}]``."""

    unregistered: list[str]


class AddressList(BaseModel):
    """Answer of ``GET|PUT|DELETE /admin/email/bounced[/{address}]``."""

    bounced: list[str]


class ErrorResponse(BaseModel):
    """Shape every error shares; some errors add fields (``sku``, ``requested``, ...)."""

    model_config = ConfigDict(extra="allow")

    error: str
    message: str


# --------------------------------------------------------------------------- ledger


class _Entry(BaseModel):
    """Base of a ledger entry: what the provider did, and on whose trace."""

    #: W3C ``traceparent`` header of the request that made the entry (None without
    #: one): the span of the caller's attempt, so the entry can be followed back to the
    #: lifecycle's trace.
    traceparent: str | None = None


class Charge(_Entry):
    """A captured card charge. ``status`` becomes ``refunded`` when a refund lands."""

    charge_id: str
    order_id: str
    customer_id: str
    amount_cents: int
    currency: str
    status: Literal["captured", "refunded"]
    idempotency_key: str
    created_at: datetime


class Refund(_Entry):
    """A refund of a whole charge."""

    refund_id: str
    charge_id: str
    order_id: str
    amount_cents: int
    currency: str
    reason: str | None
    status: Literal["refunded"] = "refunded"
    #: Key of the refund request itself.
    idempotency_key: str
    #: Key of the charge that was refunded.
    charge_idempotency_key: str
    created_at: datetime


class Reservation(_Entry):
    """Stock held for an order. ``status`` becomes ``released`` when it is given back."""

    reservation_id: str
    order_id: str
    items: list[ReservationItem]
    status: Literal["reserved", "released"]
    idempotency_key: str
    created_at: datetime


class Release(_Entry):
    """Stock given back from a reservation."""

    release_id: str
    reservation_id: str
    order_id: str
    items: list[ReservationItem]
    status: Literal["released"] = "released"
    #: Key of the release request itself.
    idempotency_key: str
    #: Key of the reservation that was released.
    reservation_idempotency_key: str
    created_at: datetime


class Void(_Entry):
    """Tombstone: an undo arrived before the thing it undoes, so that key is now refused.

    This is what makes "compensate, then the slow original lands" safe: the late request
    finds the tombstone and gets 409 ``voided`` instead of charging or reserving.
    """

    provider: str
    #: What the voided key would have created: ``charge`` or ``reservation`` today. A plain
    #: string rather than a Literal so a new provider's undo needs no change here.
    kind: str
    order_id: str
    #: The voided key: a later charge / reservation with it is refused.
    idempotency_key: str
    #: Key of the refund / release request that left the tombstone.
    voided_by: str
    created_at: datetime


class Push(_Entry):
    """A push notification handed to the (fake) APNs / FCM."""

    push_id: str
    token: str
    message_id: str
    kind: PushKind
    payload: dict[str, Any]
    idempotency_key: str
    created_at: datetime


class Email(_Entry):
    """An email handed to the (fake) mail provider."""

    email_id: str
    to: str
    subject: str
    body: str
    message_id: str
    idempotency_key: str
    created_at: datetime


class Ledger(BaseModel):
    """Everything the providers did, oldest first, as ``GET /admin/ledger`` returns it.

    Order entries (charges ... voids) carry an ``order_id``; message entries (pushes,
    emails) a ``message_id``. The lists default to empty, so a ledger serialised before a
    provider existed still parses.
    """

    charges: list[Charge] = Field(default_factory=list)
    refunds: list[Refund] = Field(default_factory=list)
    reservations: list[Reservation] = Field(default_factory=list)
    releases: list[Release] = Field(default_factory=list)
    voids: list[Void] = Field(default_factory=list)
    pushes: list[Push] = Field(default_factory=list)
    emails: list[Email] = Field(default_factory=list)
