"""The message state graph, mirrored from ``schema/002_messages.sql``.

SQL holds the authoritative copy (the trigger reads it); ``tests/test_message_gate.py``
proves the two are the same graph.
"""

from __future__ import annotations

from enum import StrEnum


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
