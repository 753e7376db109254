"""The worker process: settings, clients, telemetry, and every workflow and activity."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from typing import Any

import asyncpg
import httpx
from temporalio.client import Client
from temporalio.worker import Worker

from activities.email import EmailActivities
from activities.inventory import InventoryActivities
from activities.messages import MessageStoreActivities
from activities.orders import OrderStoreActivities
from activities.payments import PaymentActivities
from activities.push import PushActivities
from tollgate import db
from tollgate.migrate import apply_migrations
from tollgate.providers import build_http_client
from tollgate.settings import Settings
from tollgate.telemetry import configure_logging, configure_tracing
from tollgate.temporal import connect
from workflows.message import MessageDeliveryWorkflow
from workflows.order import OrderWorkflow
from workflows.read_receipts import ReadReceiptSyncWorkflow

_log = logging.getLogger("tollgate.worker")

WORKFLOWS: Sequence[type] = (OrderWorkflow, MessageDeliveryWorkflow, ReadReceiptSyncWorkflow)


def activities_for(pool: asyncpg.Pool, http: httpx.AsyncClient) -> list[Any]:
    """Every activity, bound to its clients. Tests build workers from this list too."""
    store = OrderStoreActivities(pool)
    payments = PaymentActivities(http)
    inventory = InventoryActivities(http)
    messages = MessageStoreActivities(pool)
    push = PushActivities(pool, http)
    email = EmailActivities(http)
    return [
        store.record_order,
        store.transition_order,
        store.begin_cancellation,
        payments.charge,
        payments.refund,
        inventory.validate,
        inventory.reserve,
        inventory.release,
        messages.record_message,
        messages.transition_message,
        messages.recall_message,
        messages.recipient_devices,
        messages.record_device_fact,
        messages.clear_device_read,
        push.push,
        email.send,
    ]


def build_worker(
    client: Client,
    settings: Settings,
    pool: asyncpg.Pool,
    http: httpx.AsyncClient,
    *,
    task_queue: str | None = None,
) -> Worker:
    """A worker for ``task_queue`` (default: the settings' queue) with slot limits applied."""
    return Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=list(WORKFLOWS),
        activities=activities_for(pool, http),
        max_concurrent_activities=settings.max_concurrent_activities,
        max_concurrent_workflow_tasks=settings.max_concurrent_workflow_tasks,
    )


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Migrate, connect, poll until ``stop`` is set, then drain and close."""
    applied = await apply_migrations(settings.database_url)
    if applied:
        _log.info("migrations applied", extra={"migrations": applied})
    client = await connect(settings)
    pool = await db.create_pool(settings.database_url, max_size=settings.database_pool_max)
    try:
        async with build_http_client(settings) as http:
            worker = build_worker(client, settings, pool, http)
            async with worker:
                _log.info(
                    "worker ready",
                    extra={
                        "task_queue": settings.task_queue,
                        "temporal": settings.temporal_address,
                    },
                )
                await stop.wait()
                _log.info("worker stopping")
    finally:
        await pool.close()


def main() -> None:
    """Entry point of ``python worker.py``."""
    settings = Settings()
    configure_logging(settings)
    provider = configure_tracing(settings)

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop)

    try:
        asyncio.run(_main())
    finally:
        provider.shutdown()
