"""Serving the HTTP API for a test: real uvicorn on a socket, over the test's harness.

``async with serve_api(h) as api`` runs the API in this process on a free port, with
the harness's services (its worker's task queue), and gives an ``httpx`` client for it.
A fresh client name and key per call keep tests apart.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
from temporalio.client import Client

from tests.conftest import Harness, serve_in_process
from tollgate import access
from tollgate.api.app import Api, ApiDeps, create_app
from tollgate.api.metrics import ApiMetrics
from tollgate.api.signatures import SIGNATURE_HEADER, sign
from tollgate.messages.service import MessageService
from tollgate.orders.service import OrderService
from tollgate.settings import Settings

#: The webhook secret the tests' API verifies receipts with.
WEBHOOK_SECRET = "test-webhook-secret-" + "0123456789abcdef" * 2


@dataclass
class ServedApi:
    """A running API: its base URL, an HTTP client, its dependencies, a key."""

    url: str
    http: httpx.AsyncClient
    deps: ApiDeps
    client_id: str
    key: str
    app: Any

    @property
    def api(self) -> Api:
        """The handlers' object (its limits and slots)."""
        found: Api = self.app.state.api
        return found

    def auth(self, key: str | None = None) -> dict[str, str]:
        """The Authorization header for ``key`` (default: this API's test client)."""
        return {"Authorization": f"Bearer {key or self.key}"}

    async def new_client(self) -> tuple[str, str]:
        """Another client and its key."""
        name = f"c-{uuid.uuid4().hex[:10]}"
        created = await access.create_key(self.deps.pool, name)
        return name, created.key

    async def post_receipt(
        self, receipt: dict[str, Any], *, at: float | None = None, secret: str = WEBHOOK_SECRET
    ) -> httpx.Response:
        """Send a receipt signed with ``secret`` at time ``at`` (default now)."""
        body = json.dumps(receipt).encode()
        timestamp = int(time.time() if at is None else at)
        return await self.http.post(
            "/v1/receipts",
            content=body,
            headers={
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(secret, body, timestamp),
            },
        )


@asynccontextmanager
async def serve_api(
    h: Harness,
    *,
    temporal: Client | None = None,
    pool: asyncpg.Pool | None = None,
    **overrides: Any,
) -> AsyncIterator[ServedApi]:
    """The API for ``h``'s worker, with settings ``overrides``; ``temporal`` and ``pool``
    replace the harness's connections (an unreachable server, say)."""
    settings: Settings = h.settings.model_copy(
        update={"task_queue": h.task_queue, "receipt_webhook_secret": WEBHOOK_SECRET, **overrides}
    )
    metrics = ApiMetrics()
    client = temporal or h.client
    db = pool or h.pool
    deps = ApiDeps(
        settings=settings,
        pool=db,
        client=client,
        orders=OrderService(client, db, h.task_queue, inventory=h.inventory),
        messages=MessageService(client, db, h.task_queue),
        webhook_secrets=[WEBHOOK_SECRET],
        metrics=metrics,
    )
    app = create_app(deps)
    client_id = f"c-{uuid.uuid4().hex[:10]}"
    key = (await access.create_key(h.pool, client_id)).key  # the real pool: it may be down
    try:
        async with serve_in_process(app) as url:
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                yield ServedApi(url, http, deps, client_id, key, app)
    finally:
        metrics.shutdown()
