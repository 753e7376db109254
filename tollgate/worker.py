"""The worker process: settings, clients, telemetry, and every workflow and activity."""

from __future__ import annotations

import asyncio
import compileall
import logging
import signal
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

import workflows
from activities.email import EmailActivities
from activities.inventory import InventoryActivities
from activities.messages import MessageStoreActivities
from activities.orders import OrderStoreActivities
from activities.payments import PaymentActivities
from activities.push import PushActivities
from activities.reconcile import ReconcileActivities
from tollgate import eventloop, postgres
from tollgate.errors import ConfigError
from tollgate.migrate import apply_migrations
from tollgate.ops.reconcile import ensure_schedule
from tollgate.providers.breaker import Breakers
from tollgate.providers.client import build_http_client
from tollgate.providers.email import EmailProvider
from tollgate.providers.inventory import Inventory
from tollgate.providers.payments import PaymentGateway
from tollgate.providers.push import PushProvider
from tollgate.settings import Settings
from tollgate.telemetry import configure_logging, configure_metrics, configure_tracing
from tollgate.temporal import connect, data_converter, prometheus_runtime
from workflows.message import MessageDeliveryWorkflow
from workflows.order import OrderWorkflow
from workflows.read_receipts import ReadReceiptSyncWorkflow
from workflows.reconciler import ReconcilerWorkflow
from workflows.recovery import OrderRecoveryWorkflow

_log = logging.getLogger("tollgate.worker")

WORKFLOWS: Sequence[type] = (
    OrderWorkflow,
    MessageDeliveryWorkflow,
    ReadReceiptSyncWorkflow,
    OrderRecoveryWorkflow,
    ReconcilerWorkflow,
)


def activities_for(
    pool: asyncpg.Pool, http: httpx.AsyncClient, breakers: Breakers | None = None
) -> list[Any]:
    """Every activity, bound to its clients. Tests build workers from this list too.

    Provider calls go through ``breakers`` (one per provider); None: no circuit breaking.
    """
    store = OrderStoreActivities(pool)
    payments = PaymentActivities(PaymentGateway(http, breakers), store)
    inventory = InventoryActivities(Inventory(http, breakers), store)
    messages = MessageStoreActivities(pool)
    push = PushActivities(pool, PushProvider(http, breakers))
    email = EmailActivities(EmailProvider(http, breakers))
    return [
        store.begin_order,
        store.record_order,
        store.transition_order,
        store.begin_cancellation,
        store.read_order,
        payments.charge,
        payments.refund,
        inventory.validate,
        inventory.reserve,
        inventory.release,
        messages.dispatch_message,
        messages.deliver_message,
        messages.begin_message,
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
    breakers: Breakers | None = None,
) -> Worker:
    """A worker for ``task_queue`` (default: the settings' queue) with slot limits and the
    task queue's activity rate limit applied; provider calls go through ``breakers``
    (default: a new registry from the settings' ``breaker_*`` thresholds)."""
    return Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=list(WORKFLOWS),
        activities=[
            *activities_for(pool, http, breakers if breakers is not None else Breakers(settings)),
            ReconcileActivities(client, pool, task_queue or settings.task_queue).reconcile,
        ],
        max_concurrent_activities=settings.max_concurrent_activities,
        max_concurrent_local_activities=settings.max_concurrent_local_activities,
        max_concurrent_workflow_tasks=settings.max_concurrent_workflow_tasks,
        max_cached_workflows=settings.max_cached_workflows,
        max_concurrent_workflow_task_polls=settings.workflow_task_pollers,
        nonsticky_to_sticky_poll_ratio=settings.workflow_task_nonsticky_ratio,
        max_concurrent_activity_task_polls=settings.activity_task_pollers,
        max_task_queue_activities_per_second=settings.task_queue_activities_per_second,
        workflow_runner=workflow_runner(settings),
    )


def workflow_runner(settings: Settings) -> SandboxedWorkflowRunner:
    """The sandbox, sharing workflow modules between runs unless the settings say not to.

    Re-importing ``workflows.order`` and what it imports for every order cost a tenth of
    the worker's CPU. Shared modules are safe when they hold no state, which
    ``tests/test_layers.py`` checks; every run still gets the sandbox's checks on what
    workflow code may call.
    """
    restrictions = SandboxRestrictions.default
    if not settings.reimport_workflow_modules:
        restrictions = restrictions.with_passthrough_all_modules()
    return SandboxedWorkflowRunner(restrictions=restrictions)


def cache_workflow_bytecode(state_dir: Path) -> None:
    """Compile the workflow package once, where the interpreter will find it.

    With ``reimport_workflow_modules`` the sandbox runs a workflow's module afresh for
    every workflow run it starts (shared modules are imported once and need none of
    this). When Python may not write bytecode (``PYTHONDONTWRITEBYTECODE``, set on the
    machines Tollgate is measured on), that meant compiling ``workflows/order.py`` from
    source for every order: a tenth of the worker's CPU. The bytecode goes to
    ``<state_dir>/pycache`` (``sys.pycache_prefix``), not next to the sources, which may
    be read-only. Best effort: without it the worker is slower, not wrong.
    """
    if not sys.dont_write_bytecode:
        return  # the first import already left bytecode beside the sources
    prefix = state_dir / "pycache"
    try:
        prefix.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _log.warning("no bytecode cache for workflows", extra={"error": str(exc)})
        return
    sys.pycache_prefix = str(prefix)
    if not compileall.compile_dir(Path(workflows.__file__).parent, quiet=2):
        _log.warning("no bytecode cache for workflows", extra={"path": str(prefix)})


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Migrate, connect, poll until ``stop`` is set, then drain and close."""
    converter = data_converter(settings)  # no key, no worker: before touching anything
    if settings.reimport_workflow_modules:
        cache_workflow_bytecode(settings.state_dir)
    applied = await apply_migrations(settings.database_owner_url or settings.database_url)
    if applied:
        _log.info("migrations applied", extra={"migrations": applied})
    # The SDK's own metrics (schedule-to-start latencies, slots, polls) in Prometheus text,
    # when asked for: they come from the runtime the client and worker are built on.
    runtime = (
        prometheus_runtime(settings.worker_metrics_bind_address)
        if settings.worker_metrics_bind_address
        else None
    )
    client = await connect(settings, converter=converter, runtime=runtime)
    if settings.reconcile_every_seconds > 0:
        created = await ensure_schedule(
            client,
            task_queue=settings.task_queue,
            every=timedelta(seconds=settings.reconcile_every_seconds),
        )
        if created:
            _log.info(
                "reconciler schedule created",
                extra={"every_seconds": settings.reconcile_every_seconds},
            )
    # One breaker per provider for the whole worker process.
    breakers = Breakers(settings)
    pool = await postgres.create_pool(settings.database_url, max_size=settings.database_pool_max)
    try:
        async with build_http_client(settings) as http:
            worker = build_worker(client, settings, pool, http, breakers=breakers)
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
    provider = configure_tracing(settings, "worker")
    meters = configure_metrics(settings)

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop)

    try:
        eventloop.run(_main())
    except ConfigError as exc:
        # One line naming the setting: a worker without its key must not start at all.
        _log.error("worker refused to start: %s", exc)
        raise SystemExit(2) from None
    finally:
        provider.shutdown()
        meters.shutdown()
