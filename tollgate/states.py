"""The order state graph, mirrored from ``schema/001_orders.sql``.

SQL holds the authoritative copy (the trigger reads it); this module lets workflow and
CLI code reason about states without a round trip. ``tests/test_graph.py`` proves the
two are the same graph, so an edge is always added in SQL first and here second.
"""

from __future__ import annotations

import itertools
from enum import StrEnum


class OrderStatus(StrEnum):
    """Every state an order row can be in."""

    PENDING = "PENDING"
    VALIDATING = "VALIDATING"
    CHARGING = "CHARGING"
    RESERVING = "RESERVING"
    COMPENSATING = "COMPENSATING"
    CANCELLING = "CANCELLING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        """True for states an order never leaves."""
        return self in ORDER_TERMINAL

    @property
    def cancelling(self) -> bool:
        """True once a cancellation is recorded: the order can only end CANCELLED."""
        return self in (OrderStatus.CANCELLING, OrderStatus.CANCELLED)


S = OrderStatus

ORDER_TERMINAL: frozenset[OrderStatus] = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})

_PIPELINE = (S.PENDING, S.VALIDATING, S.CHARGING, S.RESERVING, S.COMPLETED)

ORDER_EDGES: frozenset[tuple[OrderStatus, OrderStatus]] = frozenset(
    {
        *itertools.pairwise(_PIPELINE),
        (S.VALIDATING, S.FAILED),
        # only the reconciler's recovery of an orphaned row takes this one (schema/004)
        (S.PENDING, S.FAILED),
        (S.CHARGING, S.COMPENSATING),
        (S.RESERVING, S.COMPENSATING),
        (S.COMPENSATING, S.FAILED),
        *((s, S.CANCELLING) for s in S if not s.terminal and s is not S.CANCELLING),
        (S.CANCELLING, S.CANCELLED),
    }
)


def can_transition(from_status: OrderStatus, to_status: OrderStatus) -> bool:
    """Whether ``from_status -> to_status`` is an edge of the order graph."""
    return (from_status, to_status) in ORDER_EDGES


class MessageStatus(StrEnum):
    """Every state a message row can be in (``schema/002_messages.sql``)."""

    INITIATED = "INITIATED"
    STORED = "STORED"
    DISPATCHED = "DISPATCHED"
    DELIVERED = "DELIVERED"
    FALLBACK_EMAIL = "FALLBACK_EMAIL"
    EMAILED = "EMAILED"
    READ = "READ"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        """True for states a message never leaves."""
        return self in MESSAGE_TERMINAL

    @property
    def settled(self) -> bool:
        """True where a message rests once its workflow is done (READ, or terminal)."""
        return self is MessageStatus.READ or self.terminal


M = MessageStatus

MESSAGE_TERMINAL: frozenset[MessageStatus] = frozenset({M.FAILED, M.CANCELLED})

_RECALLABLE = (M.INITIATED, M.STORED, M.DISPATCHED, M.DELIVERED, M.FALLBACK_EMAIL, M.EMAILED)

#: Where a message's delivery has settled: it reached a device, an inbox, or an end.
DELIVERY_SETTLED: frozenset[MessageStatus] = frozenset(
    {M.DELIVERED, M.EMAILED, M.READ, M.FAILED, M.CANCELLED}
)

MESSAGE_EDGES: frozenset[tuple[MessageStatus, MessageStatus]] = frozenset(
    {
        (M.INITIATED, M.STORED),
        (M.STORED, M.DISPATCHED),
        (M.DISPATCHED, M.DELIVERED),
        (M.DELIVERED, M.READ),
        (M.DISPATCHED, M.FALLBACK_EMAIL),
        (M.FALLBACK_EMAIL, M.EMAILED),
        (M.FALLBACK_EMAIL, M.FAILED),
        (M.EMAILED, M.READ),
        # compensation of the read-receipt sync saga
        (M.READ, M.DELIVERED),
        (M.READ, M.EMAILED),
        *((s, M.CANCELLED) for s in _RECALLABLE),
    }
)
