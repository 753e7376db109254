"""Orders in Postgres: the row, its audit trail, and the order's face of the gate.

Every status change goes through :mod:`tollgate.gate` with :data:`ORDERS`; this module
adds what only orders have (their columns, the cancellation's reason) and returns rows,
never Temporal types: activities map rows to those.
"""

from __future__ import annotations

from tollgate import gate
from tollgate.errors import OrderCancelled, OrderNotFound
from tollgate.gate import Lifecycle
from tollgate.lifecycle import EntityRow, entity_columns
from tollgate.orders.models import OrderInput, OrderItem
from tollgate.orders.states import ORDER_TERMINAL, OrderStatus

ORDERS = Lifecycle(
    kind="order",
    initial=OrderStatus.PENDING,
    stopped=frozenset({OrderStatus.CANCELLING, OrderStatus.CANCELLED}),
    stop_status=OrderStatus.CANCELLING,
    # recorded already (CANCELLING, CANCELLED), or over (COMPLETED, FAILED)
    stop_refused=frozenset({OrderStatus.CANCELLING, *ORDER_TERMINAL}),
    stop_columns=lambda reason: {"cancel_reason": reason},
    identity=("customer_id", "items", "amount_cents", "currency", "workflow_id", "client_id"),
    stopped_error=OrderCancelled,
    not_found=OrderNotFound,
)


class OrderRow(EntityRow[OrderStatus]):
    """An order as Postgres holds it."""

    customer_id: str
    items: list[OrderItem]
    amount_cents: int
    currency: str
    cancel_reason: str | None


def _columns(order: OrderInput, workflow_id: str) -> dict[str, object]:
    return {
        **entity_columns(order.order_id, workflow_id, order.client_id),
        "customer_id": order.customer_id,
        "items": [i.model_dump() for i in order.items],
        "amount_cents": order.amount_cents,
        "currency": order.currency,
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
