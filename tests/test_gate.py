"""The gate in Postgres: transition trigger, version column, audit, migrations.

These talk to Postgres with plain SQL, the way a person at psql would, to show the
guarantees hold whoever writes, not only when Tollgate's own code does. Whoever includes
the schema owner: the tests marked with the ``writer`` fixture run once as the
application role (``pool``) and once as the owner (``owner_pool``). What only the owner
may even attempt is in ``test_privileges.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import apply_transition
from tests.db import (
    attempt,
    audit_refusal,
    execute_as,
    move,
    new_message,
    new_order,
    order_input,
    path_to,
)
from tollgate import gate
from tollgate.errors import OrderCancelled, VersionConflict
from tollgate.lifecycle import LifecycleStatus
from tollgate.messages import store as message_store
from tollgate.messages.states import MessageStatus
from tollgate.migrate import SCHEMA_DIR, MigrationError, apply_migrations
from tollgate.orders import store as order_store
from tollgate.orders.states import ORDER_EDGES, OrderStatus

S = OrderStatus


async def _new_order(pool: asyncpg.Pool) -> str:
    return await new_order(pool, "g", customer_id="gate-test")


async def _force(pool: asyncpg.Pool, order_id: str, target: OrderStatus) -> None:
    for step in path_to(ORDER_EDGES, S.PENDING, target):
        await pool.execute("UPDATE orders SET status = $2 WHERE id = $1", order_id, step.value)


async def test_python_graph_is_the_sql_graph(pool: asyncpg.Pool) -> None:
    sql_edges = {
        (S(r["from_status"]), S(r["to_status"]))
        for r in await pool.fetch("SELECT from_status, to_status FROM order_transition_edges")
    }
    sql_terminal = {
        S(r["status"]) for r in await pool.fetch("SELECT status FROM order_statuses WHERE terminal")
    }
    sql_states = {S(r["status"]) for r in await pool.fetch("SELECT status FROM order_statuses")}
    assert sql_edges == set(ORDER_EDGES)
    assert sql_terminal == {s for s in S if s.terminal}
    assert sql_states == set(S)


async def test_every_edge_outside_the_graph_is_refused_from_plain_sql(writer: asyncpg.Pool) -> None:
    """All 81 (from, to) pairs: edges apply, every other change of status raises TG001."""
    pool = writer
    refused = applied = 0
    for src, dst in itertools.product(S, S):
        order_id = await _new_order(pool)
        await _force(pool, order_id, src)
        before = await order_store.get_order(pool, order_id)
        assert before is not None and before.status == src
        if src == dst and not src.terminal:
            # not a transition: the row keeps its status, only the version moves
            await pool.execute("UPDATE orders SET status = $2 WHERE id = $1", order_id, dst.value)
            after = await order_store.get_order(pool, order_id)
            assert after is not None and (after.status, after.version) == (src, before.version + 1)
            continue
        if (src, dst) in ORDER_EDGES:
            await pool.execute("UPDATE orders SET status = $2 WHERE id = $1", order_id, dst.value)
            applied += 1
            after = await order_store.get_order(pool, order_id)
            assert after is not None and after.status == dst and after.version == before.version + 1
            continue
        with pytest.raises(asyncpg.PostgresError) as caught:
            await pool.execute("UPDATE orders SET status = $2 WHERE id = $1", order_id, dst.value)
        assert caught.value.sqlstate == gate.ILLEGAL_TRANSITION_SQLSTATE, (src, dst, caught.value)
        assert f"{src.value} -> {dst.value}" in str(caught.value)
        assert order_id in str(caught.value)
        after = await order_store.get_order(pool, order_id)
        assert after == before, "a refused transition must leave the row untouched"
        refused += 1
    assert applied == len(ORDER_EDGES)
    terminal = sum(1 for s in S if s.terminal)
    assert refused == 81 - len(ORDER_EDGES) - (len(S) - terminal)


@pytest.mark.parametrize("state", [S.CANCELLING, S.CANCELLED])
async def test_cancellation_never_returns_to_a_running_state(
    pool: asyncpg.Pool, state: OrderStatus
) -> None:
    order_id = await _new_order(pool)
    await _force(pool, order_id, state)
    for running in (S.PENDING, S.VALIDATING, S.CHARGING, S.RESERVING, S.COMPENSATING, S.COMPLETED):
        with pytest.raises(asyncpg.PostgresError) as caught:
            await pool.execute(
                "UPDATE orders SET status = $2 WHERE id = $1", order_id, running.value
            )
        assert caught.value.sqlstate == gate.ILLEGAL_TRANSITION_SQLSTATE


async def test_version_is_bumped_even_when_the_writer_forgets(pool: asyncpg.Pool) -> None:
    order_id = await _new_order(pool)
    await pool.execute(
        "UPDATE orders SET status = 'VALIDATING', version = 1 WHERE id = $1", order_id
    )
    await pool.execute("UPDATE orders SET failure_reason = 'note' WHERE id = $1", order_id)
    row = await order_store.get_order(pool, order_id)
    assert row is not None and row.version == 3


async def test_immutable_columns_and_initial_state(writer: asyncpg.Pool) -> None:
    pool = writer
    order_id = await _new_order(pool)
    with pytest.raises(asyncpg.PostgresError) as caught:
        await pool.execute("UPDATE orders SET amount_cents = 1 WHERE id = $1", order_id)
    assert caught.value.sqlstate == gate.IMMUTABLE_COLUMN_SQLSTATE
    with pytest.raises(asyncpg.PostgresError) as caught:
        await pool.execute(
            "INSERT INTO orders (id, customer_id, items, amount_cents, currency, workflow_id, status)"
            " VALUES ('x-completed', 'c', '[{\"sku\": \"A\", \"quantity\": 1}]', 1, 'USD', 'order-x', 'COMPLETED')"
        )
    assert caught.value.sqlstate == "TG004"


#: The columns a writer may change; the guard freezes every other column of the table.
MUTABLE = {
    "orders": {"status", "version", "last_transition_id", "failure_reason", "cancel_reason"},
    "messages": {"status", "version", "last_transition_id", "failure_reason"},
}
#: A different value of each column type, as SQL over the column itself.
CHANGED = {
    "text": "coalesce({c}, '') || 'x'",
    "character": "CASE WHEN {c} = 'EUR' THEN 'USD' ELSE 'EUR' END",
    "integer": "{c} + 1",
    "bigint": "{c} + 1",
    "jsonb": '{c} || \'[{{"sku": "OTHER", "quantity": 1}}]\'::jsonb',
    "timestamp with time zone": "{c} - interval '1 day'",
}


@pytest.mark.parametrize("table", sorted(MUTABLE))
async def test_every_column_but_the_mutable_few_is_frozen(writer: asyncpg.Pool, table: str) -> None:
    """The guard's frozen columns are read from the catalog when it is installed
    (schema/008): a column added later without reinstalling it would be writable. So
    try every column the table has now, as whoever writes."""
    if table == "orders":
        entity_id = await _new_order(writer)
    else:
        entity_id = await new_message(writer, "g", party="gate-test", body="frozen")
    columns = await writer.fetch(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = $1",
        table,
    )
    # updated_at is the guard's to set; a writer's value is overwritten, not refused
    frozen = {
        c["column_name"]: c["data_type"]
        for c in columns
        if c["column_name"] not in MUTABLE[table] | {"updated_at"}
    }
    assert {"id", "workflow_id", "created_at"} <= frozen.keys()
    refused = {
        column: await attempt(
            writer,
            f"UPDATE {table} SET {column} = {CHANGED[kind].format(c=column)} WHERE id = $1",
            entity_id,
        )
        for column, kind in frozen.items()
    }
    assert refused == dict.fromkeys(frozen, gate.IMMUTABLE_COLUMN_SQLSTATE)
    # while a mutable one changes
    statement = f"UPDATE {table} SET failure_reason = 'a note' WHERE id = $1"
    assert await attempt(writer, statement, entity_id) == "ok"


#: Per lifecycle: how a test makes a fresh row, reads its audit, and the statuses the row
#: is created in and then moved to twice from psql.
AUDITED: dict[
    str,
    tuple[
        Callable[[asyncpg.Pool], Awaitable[str]],
        Callable[[asyncpg.Pool, str], Awaitable[Sequence[gate.AuditRow[Any]]]],
        tuple[LifecycleStatus, LifecycleStatus, LifecycleStatus],
    ],
] = {
    "orders": (
        _new_order,
        order_store.list_transitions,
        (S.PENDING, S.VALIDATING, S.CANCELLING),
    ),
    "messages": (
        lambda pool: new_message(pool, "mg", party="gate", body="gate test body"),
        message_store.list_transitions,
        (MessageStatus.INITIATED, MessageStatus.STORED, MessageStatus.CANCELLED),
    ),
}


@pytest.mark.parametrize("table", list(AUDITED))
async def test_audit_is_written_by_the_database_and_append_only(
    writer: asyncpg.Pool, owner_pool: asyncpg.Pool, table: str
) -> None:
    """The triggers write the audit of both lifecycles; nobody rewrites it. The
    application role is refused by its privileges before any trigger runs; the owner, who
    has the privileges, by the append-only trigger."""
    new_row, list_transitions, (created, named, anonymous) = AUDITED[table]
    audit_table, key = f"{table[:-1]}_transitions", f"{table[:-1]}_id"
    pool = writer
    refused_with = await audit_refusal(writer, owner_pool, table)
    row_id = await new_row(pool)
    move_to = f"UPDATE {table} SET status = $2 WHERE id = $1"
    await execute_as(pool, "alice-at-psql", move_to, row_id, named.value)
    # a writer that describes nothing is recorded as its database role
    await pool.execute(move_to, row_id, anonymous.value)
    audit = await list_transitions(pool, row_id)
    assert [(a.from_status, a.to_status, a.to_version) for a in audit] == [
        (None, created, 1),
        (created, named, 2),
        (named, anonymous, 3),
    ]
    assert (audit[0].actor, audit[0].reason) == ("test", f"{table[:-1]} created")
    assert audit[1].actor == "alice-at-psql"
    assert audit[2].actor == await pool.fetchval("SELECT session_user")
    for statement in (
        f"UPDATE {audit_table} SET actor = 'someone else' WHERE {key} = $1",
        f"UPDATE {audit_table} SET to_status = '{created}' WHERE {key} = $1",
        f"DELETE FROM {audit_table} WHERE {key} = $1",
    ):
        assert await attempt(pool, statement, row_id) == refused_with, statement
    assert await attempt(pool, f"TRUNCATE {audit_table} CASCADE") == refused_with
    assert await list_transitions(pool, row_id) == audit


async def test_concurrent_writers_on_one_row_lose_no_update(pool: asyncpg.Pool) -> None:
    """20 writers race for the same version: one wins, the rest are told, none is lost."""
    order_id = await _new_order(pool)
    outcomes = await asyncio.gather(
        *(apply_transition(pool, move(order_id, 1, S.VALIDATING)) for _ in range(20)),
        return_exceptions=True,
    )
    wins = [o for o in outcomes if not isinstance(o, BaseException)]
    conflicts = [o for o in outcomes if isinstance(o, VersionConflict)]
    assert len(wins) == 1 and wins[0].version == 2
    assert len(conflicts) == 19
    assert all(c.status == S.VALIDATING and c.version == 2 for c in conflicts)
    audit = await order_store.list_transitions(pool, order_id)
    assert [(a.from_status, a.to_status) for a in audit] == [
        (None, S.PENDING),
        (S.PENDING, S.VALIDATING),
    ]


async def test_increments_by_many_writers_are_all_counted(pool: asyncpg.Pool) -> None:
    """Read-modify-write loops from 10 writers: every one of their 50 updates lands."""
    order_id = await _new_order(pool)

    async def writer(n: int) -> int:
        done = 0
        while done < 5:
            row = await order_store.get_order(pool, order_id)
            assert row is not None
            updated = await pool.fetchval(
                "UPDATE orders SET failure_reason = coalesce(failure_reason, '') || $3"
                " WHERE id = $1 AND version = $2 RETURNING version",
                order_id,
                row.version,
                f"{n},",
            )
            if updated is not None:
                done += 1
        return done

    assert sum(await asyncio.gather(*(writer(n) for n in range(10)))) == 50
    row = await order_store.get_order(pool, order_id)
    assert row is not None and row.version == 51
    assert row.failure_reason is not None and len(row.failure_reason.split(",")) - 1 == 50


async def test_a_recorded_cancellation_wins_over_a_stale_writer(pool: asyncpg.Pool) -> None:
    order_id = await _new_order(pool)
    await apply_transition(pool, move(order_id, 1, S.VALIDATING))
    cancel = await order_store.request_cancellation(pool, order_id, reason="stop", actor="cli:test")
    assert cancel.status == S.CANCELLING and cancel.version == 3
    with pytest.raises(OrderCancelled):
        await apply_transition(pool, move(order_id, 2, S.CHARGING))
    # asking again changes nothing; an ended order is reported, not moved
    again = await order_store.request_cancellation(pool, order_id, reason="again", actor="cli:test")
    assert (again.status, again.version, again.cancel_reason) == (S.CANCELLING, 3, "stop")
    await apply_transition(pool, move(order_id, 3, S.CANCELLED))
    ended = await order_store.request_cancellation(pool, order_id, reason="late", actor="cli:test")
    assert ended.status == S.CANCELLED


async def test_retried_transition_recognises_its_own_committed_write(pool: asyncpg.Pool) -> None:
    order_id = await _new_order(pool)
    req = move(order_id, 1, S.VALIDATING, tid=f"order-{order_id}:v1:VALIDATING")
    first = await apply_transition(pool, req)
    retry = await apply_transition(pool, req)
    assert (first.version, first.already_applied) == (2, False)
    assert (retry.version, retry.already_applied) == (2, True)
    assert len(await order_store.list_transitions(pool, order_id)) == 2  # creation + one transition


async def test_a_retried_transition_cancelled_since_it_applied_is_refused(
    pool: asyncpg.Pool,
) -> None:
    """The stop keeps the row's last transition id, so the retry still finds its own id
    there; the cancellation wins all the same (the step after the move must not run)."""
    order_id = await _new_order(pool)
    req = move(order_id, 1, S.VALIDATING, tid=f"order-{order_id}:v1:VALIDATING")
    await apply_transition(pool, req)
    await order_store.request_cancellation(pool, order_id, reason="stop", actor="cli:test")
    with pytest.raises(OrderCancelled):
        await apply_transition(pool, req)
    # the cancellation's own moves still recognise themselves
    done = move(order_id, 3, S.CANCELLED, tid=f"order-{order_id}:v3:CANCELLED")
    await apply_transition(pool, done)
    assert (await apply_transition(pool, done)).already_applied


async def test_migrations_apply_once_and_refuse_edited_files(
    pool: asyncpg.Pool, owner_url: str, tmp_path: Path
) -> None:
    assert await apply_migrations(owner_url) == []
    edited = tmp_path / "schema"
    shutil.copytree(SCHEMA_DIR, edited)
    first = sorted(edited.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited after the fact\n")
    with pytest.raises(MigrationError, match=first.name):
        await apply_migrations(owner_url, edited)


async def test_an_insert_that_waits_on_anothers_uncommitted_insert_matches_it(
    pool: asyncpg.Pool,
) -> None:
    """The service's insert is still uncommitted when the workflow's first activity
    inserts the same order: the activity waits, then finds the row that committed
    meanwhile (outside the snapshot its own statement started with) and matches it."""
    order = order_input("r")
    workflow_id = f"order-{order.order_id}"
    async with pool.acquire() as service, pool.acquire() as activity:
        committing = service.transaction()
        await committing.start()
        await order_store.insert_order(service, order, workflow_id=workflow_id, actor="service")
        second = asyncio.ensure_future(
            order_store.insert_order(activity, order, workflow_id=workflow_id, actor="activity")
        )
        await asyncio.sleep(0.2)
        assert not second.done(), "the second insert waits for the first to commit"
        await committing.commit()
        found = await asyncio.wait_for(second, timeout=10)
    assert (found.status, found.version, found.customer_id) == (OrderStatus.PENDING, 1, "alice")
    audit = await order_store.list_transitions(pool, order.order_id)
    assert [a.actor for a in audit] == ["service"]


async def test_a_second_insert_matches_an_identical_row_and_refuses_a_different_one(
    pool: asyncpg.Pool,
) -> None:
    """The service and the workflow's first activity both insert the row, whichever is
    second finds it. An order with the same id but another customer or amount is someone
    else's: refused, and the row stays as the first writer left it."""
    first = order_input("m")
    workflow_id = f"order-{first.order_id}"
    async with pool.acquire() as conn:
        inserted = await order_store.insert_order(conn, first, workflow_id=workflow_id, actor="a")
        again = await order_store.insert_order(conn, first, workflow_id=workflow_id, actor="b")
        assert again.version == inserted.version == 1 and again.customer_id == "alice"
        for other in (
            first.model_copy(update={"customer_id": "mallory"}),
            first.model_copy(update={"amount_cents": 1}),
        ):
            with pytest.raises(VersionConflict):
                await order_store.insert_order(conn, other, workflow_id=workflow_id, actor="c")
    row = await order_store.get_order(pool, first.order_id)
    assert row is not None and (row.customer_id, row.amount_cents) == ("alice", 100)
    audit = await order_store.list_transitions(pool, first.order_id)
    assert [(a.from_status, a.to_status, a.actor) for a in audit] == [
        (None, OrderStatus.PENDING, "a")
    ]
