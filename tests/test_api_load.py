"""``load --via api``: open-loop arrivals through the HTTP API, refusals waited out."""

from __future__ import annotations

from typing import Literal

import pytest

from tests.api_support import ServedApi, serve_api
from tests.conftest import Harness
from tollgate_dev.api_client import ApiCaller
from tollgate_dev.load import LoadTarget
from tollgate_dev.load_api import ApiLoadSummary, run_api_load

pytestmark = pytest.mark.e2e


async def _load(
    h: Harness,
    api: ServedApi,
    kind: Literal["orders", "messages"],
    *,
    count: int,
    rate: float,
    concurrency: int,
) -> ApiLoadSummary:
    """``load <kind> --via api`` against the served API, waiting up to 30 s a request."""
    caller = ApiCaller(api.url, api.key)
    try:
        return await run_api_load(
            kind,
            caller,
            LoadTarget(h.service, h.messages, h.pool),
            count=count,
            rate=rate,
            concurrency=concurrency,
            max_wait=30.0,
        )
    finally:
        await caller.aclose()


async def test_a_load_over_the_clients_rate_is_refused_then_admitted_after_retry_after(
    h: Harness,
) -> None:
    # The catalogue's finite SKUs are sold out: a load run buys only the unlimited one,
    # so it measures checkout, never compensation after the stock ran out.
    stock = await h.sandbox.stock()
    finite = {sku: n for sku, n in stock.items() if sku in ("WIDGET", "GADGET", "GIZMO")}
    for sku in finite:
        await h.sandbox.set_stock(sku, 0)
    async with serve_api(h, api_client_rate=3.0, api_client_burst=2) as api:
        try:
            summary = await _load(h, api, "orders", count=6, rate=50.0, concurrency=10)
        finally:
            for sku, quantity in finite.items():
                await h.sandbox.set_stock(sku, quantity)
    assert summary.admitted == 6 and summary.gave_up == 0, summary
    assert summary.refused_429 >= 3, summary
    assert summary.refusals_by_type.get("rate-limited") == summary.refused_429
    assert summary.server_errors_5xx == 0
    assert summary.statuses == {"COMPLETED": 6}, summary
    # Refused requests waited Retry-After (at least 1 s) before they got in.
    assert summary.admission_p95_ms is not None and summary.admission_p95_ms >= 1000
    assert summary.answers_by_status["202"] == 6
    assert summary.offered_rate_per_second == 50.0
    assert summary.answers_503 == summary.other_errors == 0
    assert 0 < summary.finished_per_second <= summary.admitted_per_second
    assert summary.admission_p50_ms is not None and summary.admission_p99_ms is not None
    assert summary.admission_p50_ms <= summary.admission_p95_ms <= summary.admission_p99_ms
    # The admitted request alone is quick: the waiting was for the bucket, not the API.
    assert summary.admitted_request_p50_ms is not None and summary.admitted_request_p95_ms
    assert summary.admitted_request_p95_ms < summary.admission_p95_ms
    assert summary.lifecycle_p50_ms is not None and summary.lifecycle_p95_ms is not None
    assert summary.lifecycle_p50_ms >= summary.admission_p50_ms


async def test_messages_through_the_api_reach_devices_that_confirm_them(h: Harness) -> None:
    """A message load measures delivery to devices, not the email fallback."""
    async with serve_api(h) as api:
        summary = await _load(h, api, "messages", count=4, rate=20.0, concurrency=4)
    assert summary.admitted == 4 and summary.server_errors_5xx == 0, summary
    assert summary.statuses == {"DELIVERED": 4}, summary
    ledger = await h.sandbox.ledger()
    assert not [e for e in ledger.emails if "api-load-" in e.to], "no message fell back"
