"""Input and result models of the order workflow and its activities.

One model per workflow/activity input and result, so a field can be added without
breaking running workflows. They cross Temporal through the pydantic data converter
and are validated on the way in: a malformed order never reaches Postgres.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from tollgate.ids import Reason, SafeId
from tollgate.models import (
    Model,
    RetrySettings,
    StopRequest,
    TransitionRequest,
    TransitionResult,
)
from tollgate.orders.states import OrderStatus

Sku = Annotated[str, Field(pattern=r"^[A-Z0-9][A-Z0-9_-]{0,31}$")]

#: Currencies the payment gateway settles. An order in any other is refused.
SUPPORTED_CURRENCIES = frozenset({"USD", "EUR", "GBP"})
#: Largest order total accepted, in minor units (100,000.00).
MAX_AMOUNT_CENTS = 10_000_000
#: Largest amount the model accepts at all: an integer every JSON reader keeps exact
#: (2**53 - 1) and Postgres' bigint holds. The business limit is MAX_AMOUNT_CENTS.
AMOUNT_CEILING = 2**53 - 1


class OrderItem(Model):
    """One line of an order."""

    sku: Sku
    quantity: int = Field(gt=0, le=10_000)


class OrderInput(Model):
    """What a customer ordered. The workflow id is derived from ``order_id``."""

    order_id: SafeId
    customer_id: SafeId
    items: list[OrderItem] = Field(min_length=1, max_length=100)
    amount_cents: int = Field(gt=0, le=AMOUNT_CEILING)
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    retry: RetrySettings = RetrySettings()
    #: The API client that created the order (None: the CLI). Whoever inserts the row,
    #: the service or the workflow's first activity, records it; it never changes.
    client_id: SafeId | None = None

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


class OrderResult(Model):
    """How an order ended."""

    order_id: str
    status: OrderStatus
    version: int
    failure_reason: str | None = None
    cancel_reason: str | None = None
    charge_id: str | None = None
    reservation_id: str | None = None
    compensations: list[str] = []


class OrderProgress(Model):
    """Live view returned by the ``status`` query."""

    order_id: str
    status: OrderStatus
    version: int
    step: str
    cancel_requested: bool
    compensations_done: list[str]
    #: Why the order is failing or failed, once it is.
    failure_reason: str | None = None


class CancelOrderRequest(StopRequest):
    """Payload of the ``cancel`` signal."""

    reason: Reason = "cancelled by request"


# --- activity inputs and results -------------------------------------------------


class TransitionInput(TransitionRequest[OrderStatus]):
    order_id: str


class BeginCancelInput(Model):
    order_id: str
    reason: str
    transition_id: str
    actor: str


class BeginCancelResult(Model):
    """Where the row stands after asking for CANCELLING."""

    status: OrderStatus
    version: int
    cancel_reason: str | None = None


class ValidateInput(Model):
    order: OrderInput
    #: Record the order (unless the service did) and move it to VALIDATING first: a
    #: checkout's first step, in the same activity as the check.
    begin: bool = False

    @model_validator(mode="before")
    @classmethod
    def _bare_order(cls, data: Any) -> Any:
        """Code before this model scheduled the validation with the order itself; a
        task it left behind still runs on a worker of today's code."""
        if isinstance(data, dict) and "order" not in data and "order_id" in data:
            return {"order": data}
        return data


class ValidateResult(Model):
    problems: list[str] = []
    #: Where ``begin`` left the row. Not VALIDATING (cancelled before the workflow ran):
    #: nothing was checked.
    begun: OrderSnapshot | None = None


class ChargeInput(Model):
    order_id: str
    customer_id: str
    amount_cents: int
    currency: str
    idempotency_key: str
    #: The move to CHARGING the activity makes before it calls the gateway.
    move: TransitionInput | None = None


class ChargeResult(Model):
    charge_id: str
    #: Where ``move`` left the row.
    moved: TransitionResult | None = None


class RefundInput(Model):
    order_id: str
    charge_idempotency_key: str
    idempotency_key: str
    reason: str


class ReserveInput(Model):
    order_id: str
    items: list[OrderItem]
    idempotency_key: str
    #: The move to RESERVING the activity makes before it calls the inventory service.
    move: TransitionInput | None = None
    #: The move to COMPLETED it makes once the stock is reserved.
    then: TransitionInput | None = None


class ReserveResult(Model):
    reservation_id: str
    #: Where ``move``, then ``then``, left the row.
    moved: TransitionResult | None = None


class ReleaseInput(Model):
    order_id: str
    reservation_idempotency_key: str
    idempotency_key: str


class CompensationResult(Model):
    """What an undo did: ``refunded``/``released``, or ``voided`` when the step never landed."""

    outcome: Literal["refunded", "released", "voided"]
    reference: str | None = None


class OrderSnapshot(Model):
    """Where an order row stands right now."""

    status: OrderStatus
    version: int


class RecoveryInput(Model):
    """Input of ``OrderRecoveryWorkflow``: finish an order whose lifecycle is gone."""

    order_id: str
    reason: str
    retry: RetrySettings = RetrySettings()


class RecoveryResult(Model):
    order_id: str
    status: OrderStatus
    compensations: list[str]
    #: ``recovered`` (claimed, compensated, ended), or ``nothing to do`` (the row had
    #: already ended: a finished order is never undone).
    outcome: Literal["recovered", "nothing to do"] = "recovered"


class ReadOrderInput(Model):
    order_id: str
