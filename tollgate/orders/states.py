"""The order state graph, mirrored from ``schema/001_orders.sql`` (and 004's edge).

SQL holds the authoritative copy (the trigger reads it); this module lets workflow and
CLI code reason about states without a round trip. ``tests/test_gate.py`` proves the
two are the same graph, so an edge is always added in SQL first and here second.
"""

from __future__ import annotations

import itertools

from tollgate.lifecycle import LifecycleStatus


class OrderStatus(LifecycleStatus):
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
    def cancelling(self) -> bool:
        """True once a cancellation is recorded: the order can only end CANCELLED."""
        return self in (OrderStatus.CANCELLING, OrderStatus.CANCELLED)


S = OrderStatus

#: The states an order never leaves.
ORDER_TERMINAL = S.declare_terminal(S.COMPLETED, S.FAILED, S.CANCELLED)

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
