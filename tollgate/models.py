"""Input and result models of the order workflow and its activities.

One model per workflow/activity input and result, so a field can be added without
breaking running workflows. They cross Temporal through the pydantic data converter
and are validated on the way in: a malformed order never reaches Postgres.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tollgate.errors import InputError
from tollgate.ids import SAFE_ID_PATTERN, SAFE_ID_RULE, Reason, Requester, SafeId
from tollgate.states import OrderStatus

Sku = Annotated[str, Field(pattern=r"^[A-Z0-9][A-Z0-9_-]{0,31}$")]

#: Currencies the payment gateway settles. An order in any other is refused.
SUPPORTED_CURRENCIES = frozenset({"USD", "EUR", "GBP"})
#: Largest order total accepted, in minor units (100,000.00).
MAX_AMOUNT_CENTS = 10_000_000
#: Largest amount the model accepts at all: an integer every JSON reader keeps exact
#: (2**53 - 1) and Postgres' bigint holds. The business limit is MAX_AMOUNT_CENTS.
AMOUNT_CEILING = 2**53 - 1


ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_input(model: type[ModelT], fields: dict[str, object]) -> ModelT:
    """Validate input at an edge; the first problem becomes one line naming the field."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or model.__name__
        message = first["msg"]
        if first.get("ctx", {}).get("pattern") == SAFE_ID_PATTERN:
            message = f"not a valid id: {SAFE_ID_RULE}"
        raise InputError(f"{where}: {message}") from None


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OrderItem(_Model):
    """One line of an order."""

    sku: Sku
    quantity: int = Field(gt=0, le=10_000)


class RetrySettings(_Model):
    """Retry and timeout knobs for an order's activities. Inputs, so tests run them short."""

    activity_timeout: timedelta = timedelta(seconds=10)
    initial_interval: timedelta = timedelta(seconds=1)
    maximum_interval: timedelta = timedelta(seconds=30)
    backoff_coefficient: float = Field(default=2.0, ge=1.0)
    #: Attempts for a forward step before the order gives up and compensates.
    maximum_attempts: int = Field(default=8, ge=1)
    #: Compensations never give up; after this many failed attempts the lifecycle
    #: raises an alert (search attribute ``TollgateAlert``, a warning, a metric).
    compensation_alert_attempts: int = Field(default=10, ge=1)


class OrderInput(_Model):
    """What a customer ordered. The workflow id is derived from ``order_id``."""

    order_id: SafeId
    customer_id: SafeId
    items: list[OrderItem] = Field(min_length=1, max_length=100)
    amount_cents: int = Field(gt=0, le=AMOUNT_CEILING)
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    retry: RetrySettings = RetrySettings()

    @field_validator("items")
    @classmethod
    def _distinct_skus(cls, items: list[OrderItem]) -> list[OrderItem]:
        skus = [i.sku for i in items]
        dupes = sorted({s for s in skus if skus.count(s) > 1})
        if dupes:
            raise ValueError(f"each SKU may appear once; repeated: {', '.join(dupes)}")
        return items


def order_problems(order: OrderInput) -> list[str]:
    """The business rules an order breaks that need no provider to check, each named.

    The service refuses such an order before anything is written; the workflow's
    validation step checks them again (with the catalog), for starts that did not come
    through the service.
    """
    problems: list[str] = []
    if order.currency not in SUPPORTED_CURRENCIES:
        problems.append(f"currency {order.currency} is not supported")
    if order.amount_cents > MAX_AMOUNT_CENTS:
        problems.append(
            f"amount {order.amount_cents} cents exceeds the limit of {MAX_AMOUNT_CENTS}"
        )
    return problems


class OrderResult(_Model):
    """How an order ended."""

    order_id: str
    status: OrderStatus
    version: int
    failure_reason: str | None = None
    cancel_reason: str | None = None
    charge_id: str | None = None
    reservation_id: str | None = None
    compensations: list[str] = []


class OrderProgress(_Model):
    """Live view returned by the ``status`` query."""

    order_id: str
    status: OrderStatus
    version: int
    step: str
    cancel_requested: bool
    compensations_done: list[str]


class CancelOrderRequest(_Model):
    """Payload of the ``cancel`` signal."""

    reason: Reason = "cancelled by request"
    requested_by: Requester = "unknown"


# --- activity inputs and results -------------------------------------------------


class RecordOrderResult(_Model):
    status: OrderStatus
    version: int


class TransitionInput(_Model):
    order_id: str
    expected_version: int
    to_status: OrderStatus
    #: Deterministic id of this transition (workflow id + from-version + target).
    transition_id: str
    actor: str
    reason: str | None = None
    failure_reason: str | None = None


class TransitionResult(_Model):
    version: int
    #: True when an earlier attempt of this very transition had already committed.
    already_applied: bool = False


class BeginCancelInput(_Model):
    order_id: str
    reason: str
    transition_id: str
    actor: str


class BeginCancelResult(_Model):
    """Where the row stands after asking for CANCELLING."""

    status: OrderStatus
    version: int
    cancel_reason: str | None = None


class ValidateResult(_Model):
    problems: list[str] = []


class ChargeInput(_Model):
    order_id: str
    customer_id: str
    amount_cents: int
    currency: str
    idempotency_key: str


class ChargeResult(_Model):
    charge_id: str


class RefundInput(_Model):
    order_id: str
    charge_idempotency_key: str
    idempotency_key: str
    reason: str


class ReserveInput(_Model):
    order_id: str
    items: list[OrderItem]
    idempotency_key: str


class ReserveResult(_Model):
    reservation_id: str


class ReleaseInput(_Model):
    order_id: str
    reservation_idempotency_key: str
    idempotency_key: str


class CompensationResult(_Model):
    """What an undo did: ``refunded``/``released``, or ``voided`` when the step never landed."""

    outcome: Literal["refunded", "released", "voided"]
    reference: str | None = None


class OrderSnapshot(_Model):
    """Where an order row stands right now."""

    status: OrderStatus
    version: int


class RecoveryInput(_Model):
    """Input of ``OrderRecoveryWorkflow``: finish an order whose lifecycle is gone."""

    order_id: str
    reason: str
    retry: RetrySettings = RetrySettings()


class RecoveryResult(_Model):
    order_id: str
    status: OrderStatus
    compensations: list[str]
    #: ``recovered`` (claimed, compensated, ended), or ``nothing to do`` (the row had
    #: already ended: a finished order is never undone).
    outcome: Literal["recovered", "nothing to do"] = "recovered"


class ReadOrderInput(_Model):
    order_id: str
