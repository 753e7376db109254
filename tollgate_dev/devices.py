"""Recipients with devices, and their phone played for the bench and load runs: it
confirms delivery once a push landed.

One task watches every message in flight with one query per poll: the row's status,
and the first device the push activity recorded as pushed (``message_deliveries``).
For a newly pushed message it sends that device's ``delivered`` signal through
:meth:`MessageService.device_says`, as the phone (or its push provider) would; once the
row rests (DELIVERED, or an end such as EMAILED) the waiter gets the status.

Polling costs a query per interval while messages are in flight, and adds half the
interval on average to the measured latency twice (push seen, row seen). The interval
grows with the messages watched (:func:`poll_interval`). One at a time it is 5 ms, as
it always was: about 6% of a message's p50 of some 85 ms. With many in flight each
message takes longer anyway (about 60-70 ms more per message in flight on 2 cores),
while a query every 5 ms over 20 messages took about 13% of a core from the machine
the bench measures (Postgres and the bench process together), a cost the bare
baselines do not pay.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
from temporalio.client import WorkflowHandle

from tollgate.messages.models import MessageInput, MessageResult
from tollgate.messages.service import MessageService
from tollgate.messages.states import DELIVERY_SETTLED, MessageStatus
from tollgate_dev._context import StartStop

#: The poll interval one at a time, and the longest one.
POLL_SECONDS = 0.005
MAX_POLL_SECONDS = 0.025


def poll_interval(watched: int) -> float:
    """How long to wait between polls while ``watched`` messages are in flight: 1 ms
    per message, within :data:`POLL_SECONDS` and :data:`MAX_POLL_SECONDS`. The delay it
    adds to a message's latency (the interval, on average) is about 2% of it or less
    from 5 in flight up."""
    return min(MAX_POLL_SECONDS, max(POLL_SECONDS, watched / 1000))


#: Each recipient's devices: a message pushes to both, and the first pushed confirms.
DEVICES = ("phone", "tablet")

_log = logging.getLogger(__name__)

_WATCH = """
SELECT m.id, m.status,
       (SELECT d.device_id FROM message_deliveries d
         WHERE d.message_id = m.id AND d.pushed_at IS NOT NULL
         ORDER BY d.pushed_at, d.device_id LIMIT 1) AS pushed_device
  FROM messages m
 WHERE m.id = ANY($1::text[])
"""


class DevicePlayer(StartStop):
    """Confirms delivery of watched messages; use as ``async with``."""

    def __init__(self, pool: asyncpg.Pool, messages: MessageService) -> None:
        self._pool = pool
        self._messages = messages
        self._waiting: dict[str, asyncio.Future[str]] = {}
        self._confirmed: set[str] = set()
        self._signals: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start watching (``async with`` does)."""
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        """Stop watching, let the delivery signals in flight finish, cancel the waiters."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._signals, return_exceptions=True)
        for waiter in self._waiting.values():
            waiter.cancel()

    def settled(self, message_id: str) -> asyncio.Future[str]:
        """A future of the status ``message_id`` rests in once delivery is settled.

        Call it before the message is sent: the watch then never misses its push.
        """
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting[message_id] = waiter
        self._wake.set()
        return waiter

    async def send(
        self, message: MessageInput
    ) -> tuple[WorkflowHandle[Any, MessageResult], asyncio.Future[str]]:
        """Send ``message``, watched from before the send so its push is never missed:
        its workflow, and the future of the status its delivery settles in."""
        settled = self.settled(message.message_id)
        try:
            handle = await self._messages.send(message)
        except BaseException:
            self.forget(message.message_id)
            raise
        return handle, settled

    def forget(self, message_id: str) -> None:
        """Stop watching ``message_id`` (its send failed, or its waiter gave up)."""
        waiter = self._waiting.pop(message_id, None)
        if waiter is not None:
            waiter.cancel()
        self._confirmed.discard(message_id)

    async def _watch(self) -> None:
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            ids = list(self._waiting)
            try:
                rows = await self._pool.fetch(_WATCH, ids)
            except (OSError, asyncpg.PostgresError) as exc:
                for waiter in self._waiting.values():
                    if not waiter.done():
                        waiter.set_exception(exc)
                self._waiting.clear()
                continue
            for row in rows:
                message_id, status = row["id"], MessageStatus(row["status"])
                if status in DELIVERY_SETTLED:
                    waiter = self._waiting.pop(message_id)
                    self._confirmed.discard(message_id)
                    if not waiter.done():
                        waiter.set_result(status.value)
                elif row["pushed_device"] is not None and message_id not in self._confirmed:
                    self._confirmed.add(message_id)
                    task = asyncio.create_task(self._confirm(message_id, row["pushed_device"]))
                    self._signals.add(task)
                    task.add_done_callback(self._signals.discard)
            await asyncio.sleep(poll_interval(len(ids)))

    async def _confirm(self, message_id: str, device_id: str) -> None:
        try:
            await self._messages.device_says(message_id, device_id, "delivered")
        except Exception:  # the message then falls back to email: its outcome shows it
            _log.exception("could not confirm delivery of %s", message_id)


async def register_recipients(messages: MessageService, prefix: str, count: int) -> list[str]:
    """``count`` recipients with a phone and a tablet each (ids start with ``prefix``)."""
    users = [f"{prefix}-r{k}" for k in range(count)]
    for user in users:
        for device in DEVICES:
            await messages.register_device(
                device_id=f"{user}-{device}",
                user_id=user,
                push_token=f"tok-{user}-{device}",
                platform="ios",
            )
    return users


async def retire_recipients(messages: MessageService, users: list[str]) -> None:
    """Deactivate their devices: nothing should push to them again (and a user's device
    cap stays free for the next run)."""
    for user in users:
        for device in DEVICES:
            await messages.remove_device(f"{user}-{device}")
