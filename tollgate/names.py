"""Names that cross process boundaries: workflow ids, signals, queries, search attributes.

The CLI, the worker, the tests and the docs all import these, so a rename happens in
one place. Workflow ids are built from the business key: starting the same order twice
hits Temporal's id-conflict check instead of creating a second lifecycle.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

ORDER_WORKFLOW_PREFIX = "order-"

#: Signal that asks an order to stop and compensate. Carries a ``CancelOrderRequest``.
ORDER_CANCEL_SIGNAL = "cancel"
#: Query returning the order's live ``OrderProgress``.
ORDER_STATUS_QUERY = "status"

ORDER_STATUS_ATTR = SearchAttributeKey.for_keyword("OrderStatus")
CUSTOMER_ID_ATTR = SearchAttributeKey.for_keyword("CustomerId")

MESSAGE_WORKFLOW_PREFIX = "message-"

#: Signals a device (or its push provider) sends: carries a ``DeviceSignal``.
MESSAGE_DELIVERED_SIGNAL = "delivered"
MESSAGE_READ_SIGNAL = "read"
#: Signal the sender's recall sends: carries a ``RecallRequest``.
MESSAGE_RECALL_SIGNAL = "recall"
#: Query returning the message's live ``MessageProgress``.
MESSAGE_STATUS_QUERY = "status"

MESSAGE_STATUS_ATTR = SearchAttributeKey.for_keyword("MessageStatus")
RECIPIENT_ID_ATTR = SearchAttributeKey.for_keyword("RecipientId")

#: Set on a lifecycle that needs an operator: a compensation keeps failing (value
#: ``compensation-stuck``). Cleared once it went through. Search ``TollgateAlert != ""``.
ALERT_ATTR = SearchAttributeKey.for_keyword("TollgateAlert")
COMPENSATION_STUCK = "compensation-stuck"

#: Every custom search attribute Tollgate uses, with its Temporal type. The local stack
#: registers them on the dev server; docker-compose users register them once with
#: ``temporal operator search-attribute create``.
SEARCH_ATTRIBUTES: dict[str, str] = {
    ORDER_STATUS_ATTR.name: "Keyword",
    CUSTOMER_ID_ATTR.name: "Keyword",
    MESSAGE_STATUS_ATTR.name: "Keyword",
    RECIPIENT_ID_ATTR.name: "Keyword",
    ALERT_ATTR.name: "Keyword",
}


def order_workflow_id(order_id: str) -> str:
    """The workflow id of an order's lifecycle: ``order-<order id>``."""
    return f"{ORDER_WORKFLOW_PREFIX}{order_id}"


def order_id_from_workflow_id(workflow_id: str) -> str:
    """Inverse of :func:`order_workflow_id`."""
    if not workflow_id.startswith(ORDER_WORKFLOW_PREFIX):
        raise ValueError(f"not an order workflow id: {workflow_id!r}")
    return workflow_id[len(ORDER_WORKFLOW_PREFIX) :]


def recovery_workflow_id(order_id: str) -> str:
    """The id of the reconciler's recovery run for an order: ``order-<id>:recovery``.

    Distinct from every order's own workflow id because ``:`` is outside the id alphabet
    (:mod:`tollgate.ids`).
    """
    return f"{order_workflow_id(order_id)}:recovery"


def message_workflow_id(message_id: str) -> str:
    """The workflow id of a message's delivery lifecycle: ``message-<message id>``."""
    return f"{MESSAGE_WORKFLOW_PREFIX}{message_id}"


def read_sync_workflow_id(message_id: str, attempt: int) -> str:
    """The id of the n-th read-receipt sync saga of a message (a child workflow)."""
    return f"{message_workflow_id(message_id)}:read-sync:{attempt}"
