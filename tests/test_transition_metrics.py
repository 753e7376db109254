"""Transition latency and outcomes are metrics, so rejections show up on a dashboard."""

from __future__ import annotations

from collections import Counter

import asyncpg
import pytest
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from tests.conftest import apply_transition
from tests.db import move, new_order
from tollgate.errors import IllegalTransition, OrderCancelled, VersionConflict
from tollgate.orders import store as order_store
from tollgate.orders.states import OrderStatus

S = OrderStatus


@pytest.fixture(scope="module")
def reader() -> InMemoryMetricReader:
    reader = InMemoryMetricReader()
    # The process-wide provider; nothing else in the suite installs one.
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return reader


def _outcomes(reader: InMemoryMetricReader, order_statuses: set[str]) -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data is not None else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != "tollgate.transition.outcomes":
                    continue
                for point in metric.data.data_points:
                    attrs = dict(point.attributes or {})
                    if attrs.get("to_status") in order_statuses:
                        assert isinstance(point, NumberDataPoint), point  # a counter's point
                        counts[(str(attrs["to_status"]), str(attrs["outcome"]))] = int(point.value)
    return counts


async def test_each_outcome_is_counted(reader: InMemoryMetricReader, pool: asyncpg.Pool) -> None:
    before = _outcomes(reader, {"VALIDATING", "COMPLETED", "CHARGING"})
    oid = await new_order(pool, "mt", customer_id="m", amount_cents=1)
    applied = move(oid, 1, S.VALIDATING, tid="fixed")
    await apply_transition(pool, applied)
    await apply_transition(pool, applied)  # a retry of a committed write
    with pytest.raises(VersionConflict):
        await apply_transition(pool, move(oid, 1, S.VALIDATING))
    with pytest.raises(IllegalTransition):
        await apply_transition(pool, move(oid, 2, S.COMPLETED))
    await order_store.request_cancellation(pool, oid, reason="stop", actor="test")
    with pytest.raises(OrderCancelled):
        await apply_transition(pool, move(oid, 2, S.CHARGING))

    after = _outcomes(reader, {"VALIDATING", "COMPLETED", "CHARGING"})
    delta = after - before
    assert delta == Counter(
        {
            ("VALIDATING", "applied"): 1,
            ("VALIDATING", "already_applied"): 1,
            ("VALIDATING", "conflict"): 1,
            ("COMPLETED", "illegal"): 1,
            ("CHARGING", "stopped"): 1,
        }
    )
