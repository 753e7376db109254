"""Postgres access for orders: the gate every state change passes.

Every status change is ``UPDATE ... WHERE id = $1 AND version = $2``. When that touches
no row, the row is re-read and the caller learns why: its own earlier attempt already
committed (same transition id), a cancellation was recorded, or some other writer moved
first. The trigger in ``schema/001_orders.sql`` refuses illegal edges whatever we send.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from opentelemetry import metrics
from pydantic import BaseModel, ConfigDict

from tollgate.errors import (
    IllegalTransition,
    MessageNotFound,
    MessageRecalled,
    NotFound,
    OrderCancelled,
    OrderNotFound,
    VersionConflict,
)
from tollgate.ids import NOTE_MAX, one_line
from tollgate.models import (
    BeginCancelResult,
    OrderInput,
    OrderItem,
    RecordOrderResult,
    TransitionInput,
    TransitionResult,
)
from tollgate.states import OrderStatus

#: SQLSTATE raised by the transition trigger for an edge not in the graph.
ILLEGAL_TRANSITION_SQLSTATE = "TG001"
IMMUTABLE_COLUMN_SQLSTATE = "TG002"
AUDIT_APPEND_ONLY_SQLSTATE = "TG003"

_CANCEL_ATTEMPTS = 20
#: Bound of the audit's actor column.
ACTOR_MAX = 300

#: Anything that runs a statement: a connection, a pooled connection, or the pool.
Connection = asyncpg.Connection | PoolConnectionProxy
Executor = asyncpg.Connection | PoolConnectionProxy | asyncpg.Pool


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


class AuditRow(BaseModel):
    """One row of ``order_transitions``."""

    model_config = ConfigDict(frozen=True)

    from_status: OrderStatus | None
    to_status: OrderStatus
    from_version: int | None
    to_version: int
    transition_id: str | None
    actor: str
    trace_id: str | None
    reason: str | None
    at: datetime


async def create_pool(dsn: str, *, max_size: int = 10) -> asyncpg.Pool:
    """A connection pool; jsonb columns come back as Python objects."""

    async def _init(conn: asyncpg.Connection) -> None:
        await conn.set_type_codec(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, init=_init)
    assert pool is not None
    return pool


async def describe_writer(
    conn: Connection, *, actor: str, trace_id: str | None, reason: str | None
) -> None:
    """Tell the audit trigger who writes and why (transaction-local settings).

    Both are made one printable line and cut to the audit columns' bounds
    (schema/005_safe_input.sql): a reason built from an error can be long or odd.
    """
    await conn.execute(
        "SELECT set_config('tollgate.actor', $1, true), set_config('tollgate.trace_id', $2, true),"
        " set_config('tollgate.reason', $3, true)",
        one_line(actor, limit=ACTOR_MAX),
        trace_id or "",
        one_line(reason, limit=NOTE_MAX) if reason else "",
    )


def _row(record: asyncpg.Record | None) -> OrderRow | None:
    return None if record is None else OrderRow.model_validate(dict(record))


async def get_order(conn: Executor, order_id: str) -> OrderRow | None:
    """The order row, or None."""
    return _row(await conn.fetchrow("SELECT * FROM orders WHERE id = $1", order_id))


async def insert_order(
    conn: Connection,
    order: OrderInput,
    *,
    workflow_id: str,
    actor: str,
    trace_id: str | None = None,
) -> RecordOrderResult:
    """Insert the PENDING row, or recognise an identical one already there.

    The CLI inserts before starting the workflow and the workflow's first activity
    inserts again: whichever comes second finds the row and checks it is the same order.
    """
    async with conn.transaction():
        await describe_writer(conn, actor=actor, trace_id=trace_id, reason="order created")
        await conn.execute(
            """
            INSERT INTO orders (id, customer_id, items, amount_cents, currency, workflow_id)
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT (id) DO NOTHING
            """,
            order.order_id,
            order.customer_id,
            [i.model_dump() for i in order.items],
            order.amount_cents,
            order.currency,
            workflow_id,
        )
        row = await get_order(conn, order.order_id)
    assert row is not None
    same = (
        row.customer_id == order.customer_id
        and row.items == order.items
        and row.amount_cents == order.amount_cents
        and row.currency == order.currency
        and row.workflow_id == workflow_id
    )
    if not same:
        raise VersionConflict(order.order_id, 1, row.status, row.version)
    return RecordOrderResult(status=row.status, version=row.version)


@dataclass(frozen=True)
class Lifecycle:
    """A table guarded by the transition trigger, and how to read a lost race on it."""

    table: str
    kind: str
    #: Statuses that mean "a person stopped this entity": a writer that finds one yields.
    stopped: frozenset[str]
    stopped_error: type[VersionConflict]
    not_found: type[NotFound]


ORDERS = Lifecycle(
    "orders", "order", frozenset({"CANCELLING", "CANCELLED"}), OrderCancelled, OrderNotFound
)
MESSAGES = Lifecycle(
    "messages", "message", frozenset({"CANCELLED"}), MessageRecalled, MessageNotFound
)


_meter = metrics.get_meter("tollgate.db")
_TRANSITION_SECONDS = _meter.create_histogram(
    "tollgate.transition.duration",
    unit="s",
    description="Time to apply one version-checked transition (write, or read back on a miss)",
)
_TRANSITION_OUTCOMES = _meter.create_counter(
    "tollgate.transition.outcomes",
    description="Transitions by outcome: applied, already_applied, illegal, conflict, stopped",
)


async def transition_row(
    pool: asyncpg.Pool,
    lifecycle: Lifecycle,
    *,
    entity_id: str,
    expected_version: int,
    to_status: str,
    transition_id: str,
    actor: str,
    reason: str | None = None,
    failure_reason: str | None = None,
    trace_id: str | None = None,
) -> TransitionResult:
    """Move a row to ``to_status`` if it is still at ``expected_version``.

    Zero rows updated means the row moved: our own earlier attempt (same transition id,
    success), a person stopping it (``lifecycle.stopped_error``), or another writer
    (``VersionConflict``). The trigger's refusal becomes ``IllegalTransition``. Latency
    and outcome go to the ``tollgate.transition.*`` metrics.
    """
    started = time.perf_counter()
    outcome = "error"
    try:
        result = await _transition_row(
            pool,
            lifecycle,
            entity_id=entity_id,
            expected_version=expected_version,
            to_status=to_status,
            transition_id=transition_id,
            actor=actor,
            reason=reason,
            failure_reason=failure_reason,
            trace_id=trace_id,
        )
        outcome = "already_applied" if result.already_applied else "applied"
        return result
    except IllegalTransition:
        outcome = "illegal"
        raise
    except lifecycle.stopped_error:
        outcome = "stopped"
        raise
    except VersionConflict:
        outcome = "conflict"
        raise
    finally:
        attributes = {"entity": lifecycle.kind, "to_status": to_status, "outcome": outcome}
        _TRANSITION_SECONDS.record(time.perf_counter() - started, attributes)
        _TRANSITION_OUTCOMES.add(1, attributes)


async def _transition_row(
    pool: asyncpg.Pool,
    lifecycle: Lifecycle,
    *,
    entity_id: str,
    expected_version: int,
    to_status: str,
    transition_id: str,
    actor: str,
    reason: str | None = None,
    failure_reason: str | None = None,
    trace_id: str | None = None,
) -> TransitionResult:
    async with pool.acquire() as conn, conn.transaction():
        await describe_writer(conn, actor=actor, trace_id=trace_id, reason=reason or failure_reason)
        try:
            version = await conn.fetchval(
                f"""
                UPDATE {lifecycle.table}
                   SET status = $3, last_transition_id = $4,
                       failure_reason = coalesce($5, failure_reason)
                 WHERE id = $1 AND version = $2
                RETURNING version
                """,
                entity_id,
                expected_version,
                to_status,
                transition_id,
                one_line(failure_reason, limit=NOTE_MAX) if failure_reason else None,
            )
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == ILLEGAL_TRANSITION_SQLSTATE:
                raise IllegalTransition(entity_id, str(exc)) from exc
            raise
        if version is not None:
            return TransitionResult(version=version)
        current = await conn.fetchrow(
            f"SELECT status, version, last_transition_id FROM {lifecycle.table} WHERE id = $1",
            entity_id,
        )
    if current is None:
        raise lifecycle.not_found(entity_id)
    if current["last_transition_id"] == transition_id:
        # An earlier attempt of this activity committed and its reply was lost.
        return TransitionResult(version=current["version"], already_applied=True)
    error = lifecycle.stopped_error if current["status"] in lifecycle.stopped else VersionConflict
    raise error(
        entity_id, expected_version, current["status"], current["version"], kind=lifecycle.kind
    )


async def apply_transition(
    pool: asyncpg.Pool, req: TransitionInput, *, trace_id: str | None = None
) -> TransitionResult:
    """Move an order along one edge; see :func:`transition_row`."""
    return await transition_row(
        pool,
        ORDERS,
        entity_id=req.order_id,
        expected_version=req.expected_version,
        to_status=req.to_status.value,
        transition_id=req.transition_id,
        actor=req.actor,
        reason=req.reason,
        failure_reason=req.failure_reason,
        trace_id=trace_id,
    )


async def request_cancellation(
    pool: asyncpg.Pool,
    order_id: str,
    *,
    reason: str,
    actor: str,
    transition_id: str | None = None,
    trace_id: str | None = None,
) -> BeginCancelResult:
    """Record a cancellation (move to CANCELLING) unless the order is past it.

    Returns where the row stands: CANCELLING (recorded now or earlier) or a terminal
    state, in which case nothing was written and the caller reports the refusal.
    Concurrent writers are handled by re-reading and trying again on a version miss.
    """
    for _ in range(_CANCEL_ATTEMPTS):
        row = await get_order(pool, order_id)
        if row is None:
            raise OrderNotFound(order_id)
        if row.status.cancelling or row.status.terminal:
            return BeginCancelResult(
                status=row.status, version=row.version, cancel_reason=row.cancel_reason
            )
        try:
            async with pool.acquire() as conn, conn.transaction():
                await describe_writer(conn, actor=actor, trace_id=trace_id, reason=reason)
                version = await conn.fetchval(
                    """
                    UPDATE orders SET status = 'CANCELLING', cancel_reason = $3,
                           last_transition_id = coalesce($4, last_transition_id)
                     WHERE id = $1 AND version = $2
                    RETURNING version
                    """,
                    order_id,
                    row.version,
                    reason,
                    transition_id,
                )
        except asyncpg.PostgresError as exc:
            if exc.sqlstate != ILLEGAL_TRANSITION_SQLSTATE:
                raise
            continue  # it reached a terminal state under us: re-read and report that
        if version is not None:
            return BeginCancelResult(
                status=OrderStatus.CANCELLING, version=version, cancel_reason=reason
            )
    raise VersionConflict(order_id, -1, "unknown", -1)


async def list_transitions(conn: Executor, order_id: str) -> list[AuditRow]:
    """The audited transitions of an order, oldest first."""
    rows = await conn.fetch(
        """
        SELECT from_status, to_status, from_version, to_version, transition_id, actor,
               trace_id, reason, at
          FROM order_transitions WHERE order_id = $1 ORDER BY id
        """,
        order_id,
    )
    return [AuditRow.model_validate(dict(r)) for r in rows]


def jsonable(row: BaseModel) -> dict[str, Any]:
    """A row as plain JSON types, for ``--json`` output."""
    return row.model_dump(mode="json")
