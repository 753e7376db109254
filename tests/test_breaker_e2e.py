"""The payments breaker end to end: real Temporal, Postgres and sandbox over HTTP.

An outage opens the breaker; while it is open no charge reaches the provider and the
orders wait (Temporal retries them when the breaker half-opens, as the activity's
``next_retry_delay`` asks); when the provider is back every order completes, charged
exactly once.

Run with ``pytest -s`` to see the measured request counts.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, timedelta

import pytest
from temporalio.client import WorkflowExecutionStatus

from tests.conftest import Harness
from tests.waiting import eventually
from tollgate.models import RetrySettings
from tollgate.names import ORDER_STATUS_QUERY
from tollgate.orders.models import OrderProgress
from tollgate.orders.service import OrderService
from tollgate.orders.states import OrderStatus
from tollgate.providers.breaker import Breakers, BreakerState
from tollgate.providers.client import build_http_client
from tollgate.worker import build_worker
from tollgate_dev.sandbox import FaultSpec

pytestmark = pytest.mark.e2e

OPEN_SECONDS = 1.5
ORDERS = 4
#: Enough attempts to outlive the outage; a maximum interval well below the open period,
#: so a wait as long as the open period can only come from ``next_retry_delay``.
RETRY = RetrySettings(
    activity_timeout=timedelta(seconds=5),
    initial_interval=timedelta(milliseconds=50),
    maximum_interval=timedelta(milliseconds=500),
    maximum_attempts=30,
)


async def _sleep_until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))


async def _payments_requests(h: Harness) -> int:
    return (await h.sandbox.request_counts()).get("payments", 0)


async def test_an_open_breaker_keeps_calls_off_the_provider_until_it_recovers(
    h: Harness,
) -> None:
    settings = h.settings.model_copy(
        update={
            "breaker_consecutive_failures": 3,
            "breaker_open_seconds": OPEN_SECONDS,
            "breaker_half_open_probes": 1,
        }
    )
    breakers = Breakers(settings)
    payments = breakers.get("payments")
    queue = f"breaker-{uuid.uuid4().hex[:8]}"
    service = OrderService(h.client, h.pool, queue, inventory=h.inventory)

    await h.sandbox.set_fault("payments", FaultSpec(fail_rate=1.0, fail_status=503))
    baseline = await _payments_requests(h)
    async with (
        build_http_client(settings) as http,
        build_worker(h.client, settings, h.pool, http, task_queue=queue, breakers=breakers),
    ):
        orders = [h.order(retry=RETRY) for _ in range(ORDERS)]
        handles = [await service.create(order) for order in orders]

        # -- the outage opens the breaker; for the open period nothing reaches payments --
        await eventually(
            lambda: payments.state is BreakerState.OPEN,
            within=15,
            every=0.005,
            what="the breaker to open",
        )
        opened_at = time.monotonic()
        await asyncio.sleep(0.2)  # let requests already on the wire land
        at_open = await _payments_requests(h)
        await _sleep_until(opened_at + OPEN_SECONDS - 0.1)
        end_of_open = await _payments_requests(h)

        # -- half-open: one probe gets through, fails, and re-opens it ------------------
        await eventually(
            lambda: (
                time.monotonic() > opened_at + OPEN_SECONDS and payments.state is BreakerState.OPEN
            ),
            within=15,
            every=0.005,
            what="a failed probe to re-open the breaker",
        )
        reopened_at, reopened_wall = time.monotonic(), time.time()
        await asyncio.sleep(0.2)
        after_probe = await _payments_requests(h)

        # -- open again: nothing reaches payments; the orders wait for the half-open ------
        await _sleep_until(reopened_at + OPEN_SECONDS - 0.25)
        end_of_reopen = await _payments_requests(h)
        assert payments.state is BreakerState.OPEN, "still inside the second open period"
        # All at once: read one by one on a loaded machine, the last ones were read after
        # the next half-open, when a failed probe had put their next attempt 1.5 s later.
        descriptions = await asyncio.gather(*(handle.describe() for handle in handles))
        refused: list[tuple[float, float]] = []  # (retry wait, next attempt - half-open)
        for handle, description in zip(handles, descriptions, strict=True):
            assert description.status == WorkflowExecutionStatus.RUNNING
            progress = await handle.query(ORDER_STATUS_QUERY, result_type=OrderProgress)
            assert progress.status == OrderStatus.CHARGING
            (charge,) = description.raw_description.pending_activities
            assert charge.activity_type.name == "charge_payment"
            failure = charge.last_failure.application_failure_info.type
            assert failure in ("ProviderCircuitOpen", "ProviderUnavailable")
            if failure == "ProviderCircuitOpen":
                next_attempt = charge.next_attempt_schedule_time.ToDatetime(UTC).timestamp()
                refused.append(
                    (
                        charge.current_retry_interval.ToTimedelta().total_seconds(),
                        next_attempt - (reopened_wall + OPEN_SECONDS),
                    )
                )

        # -- the provider recovers: a probe closes the breaker, every order completes --
        await h.sandbox.clear_faults("payments")
        results = await asyncio.gather(*(handle.result() for handle in handles))
        after_recovery = await _payments_requests(h)
        recovered_in = time.monotonic() - opened_at

    rows = [
        ("until the breaker opened", at_open - baseline),
        (f"first open period (last {OPEN_SECONDS - 0.3:.2f}s)", end_of_open - at_open),
        ("half-open probe", after_probe - end_of_open),
        (f"second open period (last {OPEN_SECONDS - 0.45:.2f}s)", end_of_reopen - after_probe),
        ("after the fault was cleared", after_recovery - end_of_reopen),
        ("total", after_recovery - baseline),
    ]
    print(
        f"\npayments requests reaching the sandbox ({ORDERS} orders, breaker opens for "
        f"{OPEN_SECONDS}s after 3 failures in a row):\n"
        + "\n".join(f"  {label:<34} {count}" for label, count in rows)
        + "\nrefused charges: Temporal retry wait / next attempt vs half-open (s): "
        + f"{sorted((round(w, 2), round(d, 3)) for w, d in refused)}"
        + f"\nall {ORDERS} orders COMPLETED {recovered_in:.2f}s after the breaker first opened; "
        + f"breaker now {payments.state.label}"
    )

    assert at_open - baseline >= 3, "the breaker opened on the third failure in a row"
    assert end_of_open == at_open, "no request reached payments while the breaker was open"
    assert after_probe - end_of_open == 1, "half-open let exactly one probe through"
    assert end_of_reopen == after_probe, "nothing reached payments after the probe failed"
    assert refused, "orders were refused by the open breaker"
    # Temporal retries a refused charge when the breaker half-opens, not on its own
    # (<= 0.5 s) backoff.
    assert all(abs(lag) < 0.2 for _, lag in refused), refused
    assert any(wait > RETRY.maximum_interval.total_seconds() for wait, _ in refused), refused
    assert breakers.states()["payments"] is BreakerState.CLOSED
    for order, result in zip(orders, results, strict=True):
        assert result.status == OrderStatus.COMPLETED, result
        ledger = await h.sandbox.ledger(order.order_id)
        assert [c.status for c in ledger.charges] == ["captured"]
        assert not ledger.refunds
