"""Helpers for the tests that write to Postgres directly, the way a person at psql would.

Fresh order and message rows, the shortest legal path through a lifecycle graph, a
write that names its actor, and what a statement is refused with. ``test_gate.py``,
``test_message_gate.py``, ``test_privileges.py`` and ``test_transition_metrics.py`` show
the same guarantees for both lifecycles and every role, so they build their rows alike.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Iterable
from typing import TypeVar

import asyncpg

from tollgate import gate
from tollgate.messages import store as message_store
from tollgate.orders import store as order_store
from tollgate.orders.models import OrderInput, TransitionInput
from tollgate.orders.states import OrderStatus
from tollgate_dev.recipients import message_to

#: SQLSTATE insufficient_privilege: a role's privileges refused the statement before any
#: trigger ran.
INSUFFICIENT_PRIVILEGE = "42501"

#: A lifecycle status (a StrEnum).
State = TypeVar("State", bound=str)


async def acts_as_owner(pool: asyncpg.Pool, table: str) -> bool:
    """Whether ``pool``'s role has the owner's rights on ``table`` (owner, superuser...).

    False for the application role, except when the tests were given a single external
    database URL, which then serves as both.
    """
    return bool(
        await pool.fetchval(
            "SELECT pg_has_role(session_user, relowner, 'USAGE') FROM pg_class"
            " WHERE oid = $1::text::regclass",
            table,
        )
    )


async def audit_refusal(writer: asyncpg.Pool, owner_pool: asyncpg.Pool, table: str) -> str:
    """The SQLSTATE ``writer`` gets for rewriting an audit table of ``table``'s lifecycle.

    The application role is refused by its privileges before any trigger runs; the owner,
    who has the privileges, by the append-only trigger.
    """
    if writer is owner_pool:
        assert await acts_as_owner(owner_pool, table)
    if await acts_as_owner(writer, table):
        return gate.AUDIT_APPEND_ONLY_SQLSTATE
    return INSUFFICIENT_PRIVILEGE


async def attempt(pool: asyncpg.Pool, statement: str, *args: object) -> str:
    """Run ``statement`` in a transaction that is rolled back; its SQLSTATE, or "ok".

    Rolled back either way, so a statement that should have been refused and was not
    fails its test without damaging the shared database.
    """
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute(statement, *args)
        except asyncpg.PostgresError as exc:
            return str(exc.sqlstate)
        finally:
            await tx.rollback()
    return "ok"


async def execute_as(pool: asyncpg.Pool, actor: str, statement: str, *args: object) -> None:
    """Run ``statement`` in a transaction that names its actor, as a careful person at
    psql does (``tollgate.actor``, which the audit trigger records)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT set_config('tollgate.actor', $1, true)", actor)
        await conn.execute(statement, *args)


def path_to(edges: Iterable[tuple[State, State]], start: State, target: State) -> list[State]:
    """Shortest legal path from ``start`` to ``target`` (breadth-first over ``edges``),
    without ``start`` itself: the statuses to set one after another."""
    ordered = sorted(edges)  # the same path whatever order the set iterates in
    previous: dict[State, State | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for a, b in ordered:
            if a == node and b not in previous:
                previous[b] = node
                queue.append(b)
    path: list[State] = []
    step: State | None = target
    while step is not None:
        path.append(step)
        step = previous[step]
    return path[::-1][1:]


def order_input(prefix: str, *, customer_id: str = "alice", amount_cents: int = 100) -> OrderInput:
    """A fresh order of one WIDGET, id ``<prefix>-<random>``."""
    return OrderInput(
        order_id=f"{prefix}-{uuid.uuid4().hex[:12]}",
        customer_id=customer_id,
        items=[{"sku": "WIDGET", "quantity": 1}],
        amount_cents=amount_cents,
    )


async def new_order(
    pool: asyncpg.Pool,
    prefix: str,
    *,
    customer_id: str,
    actor: str = "test",
    amount_cents: int = 100,
) -> str:
    """Insert a fresh PENDING order the way the CLI does; its id, ``<prefix>-<random>``."""
    order = order_input(prefix, customer_id=customer_id, amount_cents=amount_cents)
    async with pool.acquire() as conn:
        await order_store.insert_order(
            conn, order, workflow_id=f"order-{order.order_id}", actor=actor
        )
    return order.order_id


async def new_message(
    pool: asyncpg.Pool, prefix: str, *, party: str, body: str, actor: str = "test"
) -> str:
    """Insert a fresh INITIATED message the way the CLI does, from ``<party>-sender`` to
    ``<party>-recipient``; its id, ``<prefix>-<random>``."""
    message_id = f"{prefix}-{uuid.uuid4().hex[:12]}"
    message = message_to(
        f"{party}-recipient", message_id=message_id, sender_id=f"{party}-sender", body=body
    )
    async with pool.acquire() as conn:
        await message_store.insert_message(
            conn, message, workflow_id=f"message-{message_id}", actor=actor
        )
    return message_id


def move(
    order_id: str, version: int, to: OrderStatus, tid: str | None = None, *, actor: str = "test"
) -> TransitionInput:
    """What the ``transition_order`` activity is given: move ``order_id`` from
    ``version`` to ``to``; a fresh transition id unless ``tid`` is given."""
    return TransitionInput(
        order_id=order_id,
        expected_version=version,
        to_status=to,
        transition_id=tid or f"{actor}:{uuid.uuid4().hex}",
        actor=actor,
    )
