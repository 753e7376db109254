"""The message state graph, mirrored from ``schema/002_messages.sql``.

SQL holds the authoritative copy (the trigger reads it); ``tests/test_message_gate.py``
proves the two are the same graph.
"""

from __future__ import annotations

import itertools

from tollgate.lifecycle import LifecycleStatus


class MessageStatus(LifecycleStatus):
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
    def settled(self) -> bool:
        """True where a message rests once its workflow is done (READ, or terminal)."""
        return self is MessageStatus.READ or self.terminal


M = MessageStatus

#: The states a message never leaves.
MESSAGE_TERMINAL = M.declare_terminal(M.FAILED, M.CANCELLED)

_RECALLABLE = (M.INITIATED, M.STORED, M.DISPATCHED, M.DELIVERED, M.FALLBACK_EMAIL, M.EMAILED)

#: Where a message's delivery has settled: it reached a device, an inbox, or an end.
DELIVERY_SETTLED: frozenset[MessageStatus] = frozenset(
    {M.DELIVERED, M.EMAILED, M.READ, M.FAILED, M.CANCELLED}
)

#: Delivered to a device, then read.
_PIPELINE = (M.INITIATED, M.STORED, M.DISPATCHED, M.DELIVERED, M.READ)
#: No device confirmed in time: emailed, then read (or the email failed).
_FALLBACK = (M.DISPATCHED, M.FALLBACK_EMAIL, M.EMAILED, M.READ)

MESSAGE_EDGES: frozenset[tuple[MessageStatus, MessageStatus]] = frozenset(
    {
        *itertools.pairwise(_PIPELINE),
        *itertools.pairwise(_FALLBACK),
        (M.FALLBACK_EMAIL, M.FAILED),
        # compensation of the read-receipt sync saga: back to where the read came from
        (M.READ, M.DELIVERED),
        (M.READ, M.EMAILED),
        *((s, M.CANCELLED) for s in _RECALLABLE),
    }
)
