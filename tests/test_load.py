"""The load generator's backpressure: open-loop arrivals, the in-flight bound, refusal at
ingress."""

from __future__ import annotations

from typing import Literal

from tests.conftest import Harness
from tollgate_dev.load import LoadSummary, LoadTarget, percentile, run_load
from tollgate_dev.sandbox import FaultSpec


def test_percentiles_use_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (
        percentile(values, 50) == 50
        and percentile(values, 95) == 95
        and percentile(values, 99) == 99
    )
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0


async def _load(
    h: Harness,
    kind: Literal["orders", "messages"],
    *,
    count: int,
    concurrency: int,
    rate: float | None = None,
    max_wait: float | None = None,
) -> LoadSummary:
    """``load orders`` or ``load messages`` with these limits against the harness's
    worker, printing nothing."""
    return await run_load(
        kind,
        LoadTarget(h.service, h.messages, h.pool),
        count=count,
        concurrency=concurrency,
        rate=rate,
        max_wait=max_wait,
        console=None,
    )


async def test_load_runs_every_order_to_completion_within_the_bounds(h: Harness) -> None:
    in_flight = peak = 0
    real_create = h.service.create

    async def counting_create(order):  # type: ignore[no-untyped-def]
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        handle = await real_create(order)

        class Counted:
            id = handle.id

            async def result(self):  # type: ignore[no-untyped-def]
                nonlocal in_flight
                try:
                    return await handle.result()
                finally:
                    in_flight -= 1

        return Counted()

    # a stand-in that counts: it takes only the order, and gives back a handle-like object
    h.service.create = counting_create  # type: ignore[method-assign, assignment]
    summary = await _load(h, "orders", count=20, concurrency=4, rate=50)
    assert summary.statuses == {"COMPLETED": 20}
    assert summary.started == 20 and summary.refused_at_ingress == 0 and summary.errors == 0
    assert peak <= 4, f"{peak} orders in flight with --concurrency 4"
    p50, p99 = summary.latency_p50_ms, summary.latency_p99_ms
    assert p50 is not None and p99 is not None and p50 <= p99
    assert summary.throughput_per_second > 0


async def test_arrivals_beyond_what_is_in_flight_are_refused_at_ingress_not_timed_out(
    h: Harness,
) -> None:
    # 20 arrivals per second, 2 places in flight, 0.1 s of patience, and charges that
    # take 0.4 s: the arrivals from 0.15 s to 0.35 s find both places taken for longer
    # than they wait, so they are turned away at the door, and those let in are not
    # slowed by the ones behind them.
    await h.sandbox.set_fault("payments", FaultSpec(latency_ms=400))
    summary = await _load(h, "orders", count=12, concurrency=2, rate=20, max_wait=0.1)
    assert summary.refused_at_ingress >= 4
    assert summary.started + summary.refused_at_ingress == 12
    assert summary.errors == 0 and summary.statuses == {"COMPLETED": summary.started}
    assert summary.admission_wait_p95_ms is not None and summary.admission_wait_p95_ms <= 150
    assert summary.seconds < 10


async def test_load_orders_leave_the_finite_stock_alone_and_report_the_outcome_mix(
    h: Harness,
) -> None:
    # Before this, load orders bought WIDGET, GADGET and GIZMO: after ~175 orders the
    # stock was gone and every later order failed and compensated, unnoticed.
    before = await h.sandbox.stock()
    summary = await _load(h, "orders", count=6, concurrency=3)
    assert await h.sandbox.stock() == before
    assert summary.expected_status == "COMPLETED" and summary.reached_expected == 6


async def test_a_message_load_measures_delivery_to_devices_not_the_email_fallback(
    h: Harness,
) -> None:
    summary = await _load(h, "messages", count=4, concurrency=2)
    assert summary.statuses == {"DELIVERED": 4}, summary
    assert summary.reached_expected == 4 and summary.expected_status == "DELIVERED"
    assert summary.latency_p50_ms is not None and summary.latency_p50_ms < 10_000
    still_active = await h.pool.fetchval(
        "SELECT count(*) FROM devices WHERE user_id LIKE 'load-%' AND active"
    )
    assert still_active == 0, "the run's devices are retired once it is done"
