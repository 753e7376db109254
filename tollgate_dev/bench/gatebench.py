"""The gate's own throughput: version-checked transitions through the trigger and audit,
against the same transaction on a plain copy of the table, in the same Postgres.

Both sides run :func:`tollgate.gate.transition` itself, as the activities do, over many
orders and their 4 forward moves (PENDING -> VALIDATING -> CHARGING -> RESERVING ->
COMPLETED), with several writers at once. The plain side is a copy of ``orders`` (same
columns, defaults, CHECKs and indexes; orders has no foreign key of its own) with no trigger, so no
version bump and no audit row: the difference between the two is what the guard and
the audit cost. The copy lives in its own schema, owned by the schema owner, and is
dropped afterwards. Rounds alternate the two tables, so drift hits both alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from collections.abc import Sequence

import asyncpg

from tollgate import gate, postgres
from tollgate.names import order_workflow_id, transition_id
from tollgate.orders.states import OrderStatus
from tollgate.orders.store import ORDERS
from tollgate_dev.bench.models import Gate
from tollgate_dev.sandbox.models import UNLIMITED_SKU

#: The forward path of an order: the 4 transitions each order makes.
PATH = (
    OrderStatus.VALIDATING,
    OrderStatus.CHARGING,
    OrderStatus.RESERVING,
    OrderStatus.COMPLETED,
)
_SCHEMA = "tollgate_bench"
_WRITER = gate.Writer("bench:gate", None, "gate benchmark")


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


async def measure_gate(
    database_url: str, owner_url: str, *, run_id: str, writers: int, orders: int, rounds: int
) -> Gate:
    """Transitions per second with and without the trigger and audit."""
    pool = await postgres.create_pool(database_url, max_size=writers)
    owner = await asyncpg.connect(owner_url)
    table = f"{_SCHEMA}.plain_orders_{run_id}"
    try:
        await _create_plain_copy(owner, table, app_role=await pool.fetchval("SELECT session_user"))
        plain = dataclasses.replace(ORDERS, table=table)
        guarded_rounds: list[float] = []
        plain_rounds: list[float] = []
        for round_no in range(rounds):
            ids = [f"bench-{run_id}-g{round_no}-{n}" for n in range(orders)]
            await _insert_pending(pool, ids)
            await owner.execute(f"INSERT INTO {table} SELECT * FROM orders WHERE id = ANY($1)", ids)
            # Which side goes first alternates too: a burst of load from elsewhere on a
            # shared machine then lands on either side as often.
            sides = [(ORDERS, guarded_rounds), (plain, plain_rounds)]
            for lifecycle, seconds in sides if round_no % 2 == 0 else reversed(sides):
                seconds.append(await _drive(pool, lifecycle, ids, writers))
        prefix = f"bench-{run_id}-s-"
        ids = [f"{prefix}{n}" for n in range(orders)]
        await _insert_pending(pool, ids)
        await owner.execute(f"INSERT INTO {table} SELECT * FROM orders WHERE id = ANY($1)", ids)
        guarded_us, plain_us = await _server_cost(pool, table, prefix, len(ids))
    finally:
        await owner.execute(f"DROP TABLE IF EXISTS {table}")
        try:
            await owner.execute(f"DROP SCHEMA IF EXISTS {_SCHEMA}")
        except asyncpg.DependentObjectsStillExistError:
            pass  # another bench run's copy is still in it; that run drops the schema
        await owner.close()
        await pool.close()
    per_round = orders * len(PATH)
    # Each round measured both sides back to back, so its own ratio is what it says of
    # the overhead. The figures are the median round's (by that ratio, the lower middle
    # for an even count): its two rates and its overhead agree, and one noisy round
    # moves none of them.
    rounds_measured = list(zip(guarded_rounds, plain_rounds, strict=True))
    overheads = [(guarded / plain - 1) * 100 for guarded, plain in rounds_measured]
    middle = statistics.median_low(overheads)
    guarded_s, plain_s = rounds_measured[overheads.index(middle)]
    return Gate(
        writers=writers,
        orders=orders * rounds,
        rounds=rounds,
        transitions=per_round * rounds,
        round_overheads_pct=[round(pct, 1) for pct in overheads],
        guarded_transitions_per_s=round(per_round / guarded_s, 1),
        plain_transitions_per_s=round(per_round / plain_s, 1),
        overhead_pct=round(middle, 1),
        guarded_server_us=round(guarded_us, 1),
        plain_server_us=round(plain_us, 1),
    )


async def _create_plain_copy(owner: asyncpg.Connection, table: str, *, app_role: str) -> None:
    """``orders`` without its triggers, writable by the application role as orders is."""
    await owner.execute(f"CREATE SCHEMA IF NOT EXISTS {_SCHEMA}")
    await owner.execute(
        f"CREATE TABLE {table} (LIKE orders INCLUDING DEFAULTS INCLUDING CONSTRAINTS"
        " INCLUDING INDEXES)"
    )
    await owner.execute(f"GRANT USAGE ON SCHEMA {_SCHEMA} TO {_quoted(app_role)}")
    await owner.execute(f"GRANT SELECT, UPDATE ON {table} TO {_quoted(app_role)}")


async def _insert_pending(pool: asyncpg.Pool, ids: Sequence[str]) -> None:
    """PENDING orders as the service inserts them (through the insert trigger and audit)."""
    async with pool.acquire() as conn, conn.transaction():
        await gate.describe_writer(conn, _WRITER)
        await conn.execute(
            """
            INSERT INTO orders (id, customer_id, items, amount_cents, currency, workflow_id)
            SELECT id, 'bench-gate', $3::jsonb, 100, 'USD', workflow_id
              FROM unnest($1::text[], $2::text[]) AS t(id, workflow_id)
            """,
            list(ids),
            [order_workflow_id(i) for i in ids],
            [{"sku": UNLIMITED_SKU, "quantity": 1}],
        )


async def _drive(
    pool: asyncpg.Pool, lifecycle: gate.Lifecycle, ids: Sequence[str], writers: int
) -> float:
    """Seconds for ``writers`` concurrent writers to move every order along :data:`PATH`."""
    queue = iter(ids)  # shared: each order is taken by exactly one writer

    async def writer() -> None:
        for order_id in queue:
            workflow_id = order_workflow_id(order_id)
            version = 1
            for status in PATH:
                move = gate.Move(
                    order_id, version, status, transition_id(workflow_id, version, status)
                )
                version = (await gate.transition(pool, lifecycle, move, _WRITER)).version

    began = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    return time.perf_counter() - began


#: One connection moves ``count`` rows one statement each, inside the server: what a
#: transition costs Postgres itself, without the client, the network or the commit.
_SERVER_LOOP = """
DO $loop$
DECLARE
    began timestamptz := clock_timestamp();
BEGIN
    FOR n IN 0..{count} - 1 LOOP
        PERFORM set_config('tollgate.actor', 'bench:gate', true),
                set_config('tollgate.reason', '', true);
        UPDATE {table} SET status = '{status}', last_transition_id = '{prefix}' || n || ':{version}'
         WHERE id = '{prefix}' || n AND version = {version};
    END LOOP;
    PERFORM set_config('tollgate_bench.us_per_row',
                       (extract(epoch FROM clock_timestamp() - began) * 1e6 / {count})::text, true);
END
$loop$
"""


async def _server_cost(
    pool: asyncpg.Pool, plain_table: str, prefix: str, count: int
) -> tuple[float, float]:
    """Median server microseconds per single-row transition: guarded, plain.

    The same rows move along :data:`PATH` in both tables, alternating, so the two sides
    share the machine's moment. (The plain copy's version never moves: no trigger.)
    """
    guarded: list[float] = []
    plain: list[float] = []
    async with pool.acquire() as conn:
        for version, status in enumerate(PATH, start=1):
            for table, expected, into in (
                (ORDERS.table, version, guarded),
                (plain_table, 1, plain),
            ):
                loop = _SERVER_LOOP.format(
                    count=count, table=table, status=status.value, prefix=prefix, version=expected
                )
                async with conn.transaction():
                    await conn.execute(loop)
                    into.append(
                        float(
                            await conn.fetchval(
                                "SELECT current_setting('tollgate_bench.us_per_row')"
                            )
                        )
                    )
    return statistics.median(guarded), statistics.median(plain)
