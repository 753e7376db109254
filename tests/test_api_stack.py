"""The API and the worker's Temporal metrics in the local stack (``make up``): real
processes, a real order over HTTP, the SDK's schedule-to-start latencies on the
worker's Prometheus endpoint, and the API restarted after it is killed."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import httpx
import pytest

from tests.waiting import eventually
from tollgate import access, postgres
from tollgate_dev.stack import LocalStack, free_port

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(240)
async def test_the_stack_serves_the_api_and_the_workers_temporal_metrics(tmp_path: Path) -> None:
    stack = LocalStack(
        tmp_path / "state",
        temporal_port=free_port(),
        ui_port=None,
        postgres_port=free_port(),
        sandbox_port=free_port(),
        temporal_db_file=False,
        durable=False,
        api_port=free_port(),
        worker_metrics_port=free_port(),
    )
    async with stack:
        assert stack.api is not None and stack.api.running
        secret = stack.webhook_secret_file
        assert secret.stat().st_mode & 0o777 == 0o600
        pool = await postgres.create_pool(stack.database_url, max_size=2)
        try:
            key = (await access.create_key(pool, "storefront")).key
        finally:
            await pool.close()
        async with httpx.AsyncClient(base_url=stack.api.url, timeout=30) as http:
            ready = await http.get("/readyz")
            assert ready.status_code == 200, ready.text
            created = await http.post(
                "/v1/orders?wait=charged",
                json={
                    "customer_id": "alice",
                    "items": [{"sku": "WIDGET", "quantity": 1}],
                    "amount_cents": 999,
                },
                headers={"Authorization": f"Bearer {key}", "Idempotency-Key": uuid.uuid4().hex},
            )
            assert created.status_code == 202, created.text
            assert created.json()["status"] in ("RESERVING", "COMPLETED")

            metrics_url = f"http://127.0.0.1:{stack.worker_metrics_port}/metrics"

            async def sdk_metrics() -> bool:
                text = (await http.get(metrics_url)).text
                return all(
                    name in text
                    for name in (
                        "temporal_workflow_task_schedule_to_start_latency",
                        "temporal_activity_schedule_to_start_latency",
                    )
                )

            await eventually(sdk_metrics, within=30)

            # Killed, it comes back on the same port (supervised like the worker).
            assert stack.api_supervisor is not None
            pid = stack.api.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            supervisor = stack.api_supervisor
            await eventually(lambda: supervisor.restarts == 1, within=60)

            async def healthy() -> bool:
                try:
                    return (await http.get("/healthz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await eventually(healthy, within=30)
            assert stack.api.pid != pid
    assert not any(part.running for part in stack.components)
