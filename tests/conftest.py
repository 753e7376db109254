"""Real parts for the tests: Postgres, the Temporal dev server, the provider sandbox.

One of each per test session (starting them is the slow part); a fresh task queue and
fresh order ids per test keep tests apart. Set ``TOLLGATE_TEST_DATABASE_URL`` to run
against your own Postgres instead of a throw-away embedded one, and
``TOLLGATE_TEST_DATABASE_OWNER_URL`` to the schema owner's connection to the same
database; with only one of the two, it serves as both (``test_privileges.py`` then skips).

Like production, the suite connects as the application role (``database_url``); the
migrations, and tests that show what the owner can and cannot do, use ``owner_url``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import uvicorn
from starlette.types import ASGIApp
from temporalio.client import Client, WorkflowHandle

from tests.tracing_support import Receiver, install
from tests.waiting import order_step
from tollgate import gate, postgres
from tollgate.codec import encode_key, new_key
from tollgate.messages.models import MessageInput
from tollgate.messages.service import MessageService
from tollgate.migrate import apply_migrations
from tollgate.models import RetrySettings
from tollgate.orders import store as order_store
from tollgate.orders.models import OrderInput, OrderResult, TransitionInput
from tollgate.orders.service import OrderService, build_order
from tollgate.providers.client import build_http_client
from tollgate.providers.inventory import Inventory
from tollgate.settings import Settings
from tollgate.telemetry import configure_tracing
from tollgate.temporal import connect
from tollgate.worker import build_worker
from tollgate_dev.recipients import message_to, register_phones
from tollgate_dev.sandbox import FaultSpec, SandboxAdmin, create_app
from tollgate_dev.stack import LocalPostgres, TemporalDevServer, free_port
from tollgate_dev.traces import TraceStore, create_receiver_app

#: Backoffs for tests: fast enough that a few retries take well under a second.
FAST_RETRY = RetrySettings(
    activity_timeout=timedelta(seconds=5),
    initial_interval=timedelta(milliseconds=50),
    maximum_interval=timedelta(milliseconds=200),
    maximum_attempts=5,
)


@pytest.fixture(scope="session")
async def _databases(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[str, str]]:
    """(application URL, owner URL) of a migrated database: embedded, or the one given."""
    app = os.environ.get("TOLLGATE_TEST_DATABASE_URL")
    owner = os.environ.get("TOLLGATE_TEST_DATABASE_OWNER_URL")
    if app or owner:
        app, owner = app or owner, owner or app
        assert app is not None and owner is not None
        await apply_migrations(owner)
        yield app, owner
        return
    server = LocalPostgres(tmp_path_factory.mktemp("pg") / "data", free_port(), durable=False)
    await server.start()
    try:
        await apply_migrations(server.owner_url)
        yield server.url, server.owner_url
    finally:
        await server.stop()


@pytest.fixture(scope="session")
def database_url(_databases: tuple[str, str]) -> str:
    """The migrated database, as the application role (what the worker and CLI use)."""
    return _databases[0]


@pytest.fixture(scope="session")
def owner_url(_databases: tuple[str, str]) -> str:
    """The same database as the schema owner (migrations; a person at psql may be it)."""
    return _databases[1]


@pytest.fixture(scope="session")
async def owner_pool(owner_url: str) -> AsyncIterator[asyncpg.Pool]:
    """Connections as the schema owner, for tests that show the gate holds for it too."""
    pool = await postgres.create_pool(owner_url, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture(params=["app", "owner"])
def writer(
    request: pytest.FixtureRequest, pool: asyncpg.Pool, owner_pool: asyncpg.Pool
) -> asyncpg.Pool:
    """The application role's pool, then the schema owner's: a test taking ``writer``
    runs once as each, to show the gate holds whoever writes."""
    return pool if request.param == "app" else owner_pool


@pytest.fixture(scope="session")
async def temporal_address(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A Temporal dev server (headless) with Tollgate's search attributes registered."""
    log = tmp_path_factory.mktemp("temporal") / "temporal.log"
    server = TemporalDevServer(free_port(), None, log_file=log)
    await server.start()
    try:
        yield server.address
    finally:
        await server.stop()


@asynccontextmanager
async def serve_in_process(app: ASGIApp, *, startup_timeout: float = 10.0) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a real socket of this process; yields its base URL.

    The socket is bound here and handed to uvicorn, so no other process can take the
    port between choosing it and listening on it. The server shares the test's event
    loop: whatever the test awaits, the server keeps answering meanwhile.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        # A client that keeps a connection across tests must not send on one the server
        # is closing at that moment (uvicorn closes idle ones after 5 s by default).
        uvicorn.Config(
            app, log_level="warning", lifespan="off", access_log=False, timeout_keep_alive=600
        )
    )
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if serving.done():
                serving.result()  # the server's own error, when it raised one
                raise AssertionError("server exited during startup")
            assert time.monotonic() < deadline, "server did not start"
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=10)


@pytest.fixture(scope="session")
async def sandbox_url() -> AsyncIterator[str]:
    """The provider sandbox, served over a real socket from this process."""
    async with serve_in_process(create_app()) as url:
        yield url


@pytest.fixture(scope="session")
def settings(database_url: str, temporal_address: str, sandbox_url: str) -> Settings:
    return Settings(
        temporal_address=temporal_address,
        database_url=database_url,
        sandbox_url=sandbox_url,
        provider_timeout_seconds=2.0,
        # outages in tests last seconds; an open breaker should not outlast them by much
        breaker_open_seconds=1.0,
        # payloads are encrypted, as in every deployment (a client without a key refuses)
        payload_encryption_key=encode_key(new_key()),
    )


@pytest.fixture(scope="session")
async def client(settings: Settings) -> Client:
    # A real tracer provider, as the worker process installs, so trace ids reach the audit.
    configure_tracing(settings, "tests")
    return await connect(settings)


@pytest.fixture(scope="session")
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await postgres.create_pool(settings.database_url, max_size=10)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def sandbox(sandbox_url: str) -> AsyncIterator[SandboxAdmin]:
    """Admin access to the sandbox; faults are cleared before and after each test."""
    async with SandboxAdmin(sandbox_url) as admin:
        await admin.clear_faults()
        try:
            yield admin
        finally:
            await admin.clear_faults()


@pytest.fixture(scope="session")
async def otlp(client: Client, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Receiver]:
    """An OTLP/HTTP receiver in this process, keeping traces as the stack's does (in
    ``<state_dir>/traces``); the session's spans reach it only while a test captures."""
    state_dir = tmp_path_factory.mktemp("state")
    store = TraceStore(state_dir / "traces")
    bodies: list[bytes] = []
    async with serve_in_process(create_receiver_app(store, on_export=bodies.append)) as url:
        receiver = install(url, store, state_dir)
        receiver.bodies = bodies
        yield receiver


@dataclass
class Harness:
    """A running worker on its own task queue, and the service to drive orders with."""

    task_queue: str
    service: OrderService
    client: Client
    pool: asyncpg.Pool
    sandbox: SandboxAdmin
    settings: Settings
    messages: MessageService
    inventory: Inventory

    def process_env(self, task_queue: str | None = None, **extra: str) -> dict[str, str]:
        """The environment a Tollgate process (the CLI, a worker) needs to join this
        harness: its Temporal, database, sandbox and payload key, on ``task_queue`` (the
        harness's own unless given), plus ``extra``.

        A worker started with it does not create the reconciler's schedule: that has one
        fixed id per Temporal server, which the session's tests share, and the test of the
        schedule needs it not to exist yet (pass ``RECONCILE_EVERY_SECONDS`` to differ)."""
        return {
            "TEMPORAL_ADDRESS": self.settings.temporal_address,
            "DATABASE_URL": self.settings.database_url,
            "SANDBOX_URL": self.settings.sandbox_url,
            "TASK_QUEUE": task_queue or self.task_queue,
            "PAYLOAD_ENCRYPTION_KEY": self.settings.payload_encryption_key or "",
            "RECONCILE_EVERY_SECONDS": "0",
            **extra,
        }

    def order(self, **overrides: object) -> OrderInput:
        """A valid order with a fresh id; keyword arguments override fields."""
        fields: dict[str, object] = {
            "order_id": f"t-{uuid.uuid4().hex[:12]}",
            "customer_id": "alice",
            "items": [{"sku": "WIDGET", "quantity": 1}],
            "amount_cents": 1250,
            "currency": "USD",
            "retry": FAST_RETRY,
        }
        fields.update(overrides)
        return build_order(**fields)

    def message(self, recipient: str, **overrides: object) -> MessageInput:
        """A valid message to ``recipient`` with a fresh id and short timings."""
        fields: dict[str, object] = {
            "message_id": f"m-{uuid.uuid4().hex[:12]}",
            "sender_id": "sam",
            "body": "See you at noon?",
            "deadline": timedelta(seconds=5),
            "read_window": timedelta(seconds=5),
            "push_heartbeat_timeout": timedelta(seconds=2),
            "retry": FAST_RETRY,
        }
        fields.update(overrides)
        return message_to(recipient, **fields)

    async def charging(self, order: OrderInput) -> WorkflowHandle[Any, OrderResult]:
        """Start ``order``; return its handle once its workflow is charging, so past the
        validation (which asks inventory too): an inventory fault set then reaches only
        the reservation. The charge is held half a second meanwhile, or on an idle
        machine the order could be past charging before a poll saw it there."""
        await self.sandbox.set_fault("payments", FaultSpec(latency_ms=500))
        handle = await self.service.create(order)
        await order_step(self.service, order.order_id, "charging")
        await self.sandbox.clear_faults("payments")  # later payment calls go at full speed
        return handle

    async def devices(self, count: int, *, user: str | None = None) -> tuple[str, list[str]]:
        """Register ``count`` devices of a fresh user; returns (user id, device ids)."""
        user = user or f"u-{uuid.uuid4().hex[:8]}"
        return user, await register_phones(self.messages, user, count)


@pytest.fixture
async def h(
    client: Client, settings: Settings, pool: asyncpg.Pool, sandbox: SandboxAdmin
) -> AsyncIterator[Harness]:
    task_queue = f"test-{uuid.uuid4().hex[:8]}"
    async with build_http_client(settings) as http:
        async with build_worker(client, settings, pool, http, task_queue=task_queue):
            inventory = Inventory(http)
            yield Harness(
                task_queue,
                OrderService(client, pool, task_queue, inventory=inventory),
                client,
                pool,
                sandbox,
                settings,
                MessageService(client, pool, task_queue),
                inventory,
            )


PROJECT_ROOT = Path(__file__).resolve().parent.parent


async def apply_transition(pool: asyncpg.Pool, req: TransitionInput) -> gate.Moved:
    """Move an order through the gate as the ``transition_order`` activity does: its
    input in, the gate's answer (version, already applied) out. For tests of the gate."""
    return await gate.transition(
        pool,
        order_store.ORDERS,
        gate.Move(
            req.order_id, req.expected_version, req.to_status, req.transition_id, req.failure_reason
        ),
        gate.Writer(req.actor, None, req.reason),
    )
