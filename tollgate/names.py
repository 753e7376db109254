"""Names that cross process boundaries: workflow types and ids, signals, queries, search
attributes, and the ids Tollgate derives from them (idempotency keys, transition ids).

The CLI, the worker, the tests and the docs all import these, so a rename happens in
one place. Workflow ids are built from the business key: starting the same order twice
hits Temporal's id-conflict check instead of creating a second lifecycle. Derived ids
join their parts with ``:``, which no entity id may contain (:mod:`tollgate.ids`), so no
entity can spell another one's derived id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from temporalio.common import SearchAttributeKey

from tollgate.ids import DERIVED_ID_SEPARATOR

#: Workflow types, for starting and describing lifecycles without importing their code.
ORDER_WORKFLOW = "OrderWorkflow"
ORDER_RECOVERY_WORKFLOW = "OrderRecoveryWorkflow"
MESSAGE_WORKFLOW = "MessageDeliveryWorkflow"
READ_SYNC_WORKFLOW = "ReadReceiptSyncWorkflow"
RECONCILER_WORKFLOW = "ReconcilerWorkflow"

ORDER_WORKFLOW_PREFIX = "order-"

#: Signal that asks an order to stop and compensate. Carries a ``CancelOrderRequest``.
ORDER_CANCEL_SIGNAL = "cancel"
#: Query returning the order's live ``OrderProgress``.
ORDER_STATUS_QUERY = "status"
#: Update that answers (an ``OrderProgress``) once the order is charged, failing or
#: cancelled, while the checkout goes on: the API's ``?wait=charged``.
ORDER_CHARGED_UPDATE = "charged"

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


@dataclass(frozen=True)
class LifecycleNames:
    """What Temporal knows one lifecycle by, for the code written once over every
    lifecycle (:mod:`tollgate.service`)."""

    workflow: str
    #: The workflow id of an entity's lifecycle, from the entity's id.
    workflow_id: Callable[[str], str]
    #: The query that answers the lifecycle's live progress.
    status_query: str
    #: The search attribute that mirrors the row's status.
    status_attr: SearchAttributeKey[str]


#: Orders and messages, as Temporal knows them.
ORDER_NAMES = LifecycleNames(
    ORDER_WORKFLOW, order_workflow_id, ORDER_STATUS_QUERY, ORDER_STATUS_ATTR
)
MESSAGE_NAMES = LifecycleNames(
    MESSAGE_WORKFLOW, message_workflow_id, MESSAGE_STATUS_QUERY, MESSAGE_STATUS_ATTR
)


def step_key(workflow_id: str, *parts: str) -> str:
    """The idempotency key of one step of a lifecycle: ``<workflow id>:<step>[:<part>...]``.

    Derived from the workflow id, never from a clock or an attempt: every retry of a
    step, and every replay, sends the same key, so the provider acts once.
    """
    return DERIVED_ID_SEPARATOR.join((workflow_id, *parts))


def transition_id(owner: str, from_version: int, to_status: str) -> str:
    """The id of one transition, ``<owner>:v<from version>:<target>``: a retried write that
    finds it on the row knows its earlier attempt committed."""
    return f"{owner}:v{from_version}:{to_status}"


def entity_of(workflow_id: str) -> tuple[str, str] | None:
    """``("order", id)`` or ``("message", id)`` for a workflow of that lifecycle (its own,
    its recovery, its read-receipt syncs); None for any other workflow id."""
    for kind, prefix in (("order", ORDER_WORKFLOW_PREFIX), ("message", MESSAGE_WORKFLOW_PREFIX)):
        if workflow_id.startswith(prefix):
            entity_id = workflow_id[len(prefix) :].split(":", 1)[0]
            return (kind, entity_id) if entity_id else None
    return None
