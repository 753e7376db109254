"""A scheduled reconcile run looks at rows in flight and at rows that came to rest
since about the run before; rows at rest for longer are not described again."""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from tests.conftest import Harness
from tollgate.ops.reconcile import ReconcileInput, reconcile, scheduled_input
from tollgate.orders.states import OrderStatus

S = OrderStatus
EVERY = timedelta(minutes=5)


async def _owner_sets(owner_url: str, order_id: str, sql: str) -> None:
    """A change by the schema owner past the trigger (a manual "fix" at psql)."""
    conn = await asyncpg.connect(owner_url)
    try:
        async with conn.transaction():
            await conn.execute("ALTER TABLE orders DISABLE TRIGGER orders_guard")
            await conn.execute(f"UPDATE orders SET {sql} WHERE id = $1", order_id)
            await conn.execute("ALTER TABLE orders ENABLE TRIGGER orders_guard")
    finally:
        await conn.close()


async def test_a_scheduled_run_skips_rows_at_rest_since_before_its_window(
    h: Harness, owner_url: str
) -> None:
    recent, old = h.order(), h.order()
    for order in (recent, old):
        assert (await (await h.service.create(order)).result()).status == S.COMPLETED
        # Both rows now disagree with their workflows, which returned COMPLETED.
        await _owner_sets(owner_url, order.order_id, "status = 'FAILED'")
    await _owner_sets(owner_url, old.order_id, "updated_at = now() - interval '2 hours'")
    window = scheduled_input(EVERY).model_copy(update={"grace": timedelta(0), "repair": False})
    assert window.at_rest_lookback is not None and window.at_rest_lookback < timedelta(hours=1)

    scheduled = await reconcile(h.client, h.pool, task_queue=h.task_queue, options=window)
    by_hand = await reconcile(
        h.client, h.pool, task_queue=h.task_queue, options=ReconcileInput(grace=timedelta(0))
    )

    def found(report_ids: set[str]) -> set[str]:
        return report_ids & {recent.order_id, old.order_id}

    assert found({f.entity_id for f in scheduled.findings}) == {recent.order_id}
    assert found({f.entity_id for f in by_hand.findings}) == {recent.order_id, old.order_id}


async def test_a_scheduled_run_still_finds_a_row_stuck_in_flight_for_hours(
    h: Harness, owner_url: str
) -> None:
    order = h.order()
    handle = await h.service.create(order)
    assert (await handle.result()).status == S.COMPLETED
    # As if the workflow had died hours ago with the row half-way.
    await _owner_sets(
        owner_url, order.order_id, "status = 'CHARGING', updated_at = now() - interval '3 hours'"
    )
    window = scheduled_input(EVERY).model_copy(update={"grace": timedelta(0), "repair": False})

    report = await reconcile(h.client, h.pool, task_queue=h.task_queue, options=window)

    mine = [f for f in report.findings if f.entity_id == order.order_id]
    assert [f.finding for f in mine] == ["orphaned"]
