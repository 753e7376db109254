"""Orders in Postgres: the row, its audit trail, and the order's face of the gate.

Every status change goes through :mod:`tollgate.gate` with :data:`ORDERS`; this module
adds what only orders have (their columns, the cancellation's reason) and returns rows,
never Temporal types: activities map rows to those.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from tollgate import gate
from tollgate.errors import OrderCancelled, OrderNotFound
from tollgate.gate import Lifecycle
from tollgate.orders.models import OrderInput, OrderItem
from tollgate.orders.states import ORDER_TERMINAL, OrderStatus

ORDERS = Lifecycle(
    kind="order",
    table="orders",
    initial=OrderStatus.PENDING,
    audit_table="order_transitions",
    audit_key="order_id",
    stopped=frozenset({OrderStatus.CANCELLING, OrderStatus.CANCELLED}),
    stop_status=OrderStatus.CANCELLING,
    # recorded already (CANCELLING, CANCELLED), or over (COMPLETED, FAILED)
    stop_refused=frozenset({OrderStatus.CANCELLING, *ORDER_TERMINAL}),
    stop_columns=lambda reason: {"cancel_reason": reason},
    identity=("customer_id", "items", "amount_cents", "currency", "workflow_id", "client_id"),
    stopped_error=OrderCancelled,
    not_found=OrderNotFound,
)


class OrderRow(BaseModel):
    """An order as Postgres holds it."""

    model_config = ConfigDict(frozen=True)

    id: str
    customer_id: str
    items: list[OrderItem]
    amount_cents: int
    currency: str
    workflow_id: str
    status: OrderStatus
    version: int
    last_transition_id: str | None
    failure_reason: str | None
    cancel_reason: str | None
    created_at: datetime
    updated_at: datetime
    #: The API client that owns the order; None for orders the CLI created.
    client_id: str | None = None
    #: W3C traceparent of the span that created the order: its lifecycle's trace.
    trace_parent: str | None = None


def _columns(order: OrderInput, workflow_id: str) -> dict[str, object]:
    return {
        "id": order.order_id,
        "customer_id": order.customer_id,
        "items": [i.model_dump() for i in order.items],
        "amount_cents": order.amount_cents,
        "currency": order.currency,
        "workflow_id": workflow_id,
        "client_id": order.client_id,
    }


ORDER_STORE = gate.Store(ORDERS, OrderRow.model_validate, OrderStatus, _columns)

#: The order row, or None.
get_order = ORDER_STORE.get
#: Insert the PENDING row, or recognise an identical one already there.
insert_order = ORDER_STORE.insert
#: Record a cancellation (move to CANCELLING) unless the order is past it. The row comes
#: back as it stands: CANCELLING (recorded now or earlier) or a terminal state, in which
#: case nothing was written and the caller reports the refusal.
request_cancellation = ORDER_STORE.stop
#: The audited transitions of an order, oldest first.
list_transitions = ORDER_STORE.audit_trail
