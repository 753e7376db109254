"""``starter.py load``: drive many lifecycles, with backpressure at ingress.

Arrivals and admission are apart, as with real traffic:

* with ``--rate``, lifecycles *arrive* at that many per second whatever happens to the
  ones before them (open loop: a slow system does not slow the offered load down);
  without it, all arrive at once (a closed loop over ``--concurrency``);
* an arrival is *admitted* once fewer than ``--concurrency`` lifecycles are in flight;
* an arrival that waits longer than ``--max-wait`` for admission is refused at ingress
  (counted, never started): past saturation, work is refused at the door instead of
  queueing into timeouts deep inside, and what is admitted keeps its latency.

The summary gives the outcome mix (final statuses, and how many reached the end a load
run expects), throughput, the latency of admitted lifecycles from their start, and how
long arrivals waited at the door.

Orders buy the sandbox's unlimited SKU: a finite one runs out after a few hundred
orders, and every order after that fails and compensates, which would quietly turn a
load run into a measurement of the unhappy path. Messages go to recipients registered
for the run, each with a phone and a tablet; the phone (played by
:class:`tollgate_dev.devices.DevicePlayer`) confirms delivery once pushed, so a load run
measures send to DELIVERED, not the email fallback. Their read window is 1 s, after
which each workflow ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import asyncpg
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tollgate.messages.models import MessageInput
from tollgate.messages.service import MessageService
from tollgate.models import RetrySettings
from tollgate.orders.models import OrderInput
from tollgate.orders.service import OrderService, build_order
from tollgate_dev.devices import DevicePlayer, register_recipients, retire_recipients
from tollgate_dev.recipients import message_to
from tollgate_dev.sandbox.models import UNLIMITED_SKU

#: Where a load lifecycle should end: an order completes; a message is delivered (its
#: devices confirm well before its 10 s deadline would fall back to email).
EXPECTED_END: dict[str, str] = {"orders": "COMPLETED", "messages": "DELIVERED"}

#: Recipients a message load spreads over (each holds two devices).
_RECIPIENTS = 20

#: Backoffs of a load run: nothing should fail, but if something does, a lifecycle
#: recovers in seconds, not minutes.
LOAD_RETRY = RetrySettings(
    initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=2)
)


@dataclass(frozen=True)
class LoadTarget:
    """What a load run drives: the services it starts lifecycles with, and the pool in
    which its device player watches for pushes."""

    orders: OrderService
    messages: MessageService
    pool: asyncpg.Pool

    def device_player(self) -> DevicePlayer:
        """A player that confirms this target's pushes, as the recipients' phones would."""
        return DevicePlayer(self.pool, self.messages)


#: A load message's deadline: its devices confirm well before it would fall back to email.
LOAD_MESSAGE_DEADLINE = timedelta(seconds=10)
#: A load message's read window, after which its workflow ends.
LOAD_READ_WINDOW = timedelta(seconds=1)


class LoadSummary(BaseModel):
    """What a load run did, as ``--json`` prints it."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["orders", "messages"]
    requested: int
    started: int
    refused_at_ingress: int
    errors: int
    statuses: dict[str, int]
    #: The status a healthy run ends every lifecycle in, and how many got there: fewer
    #: than ``started`` means the run measured something else too (failures, errors).
    expected_status: str
    reached_expected: int
    seconds: float
    throughput_per_second: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    #: How long admitted arrivals waited for a place in flight (95th percentile).
    admission_wait_p95_ms: float | None


def load_order(order_id: str, n: int, *, customers: str) -> OrderInput:
    """Order number ``n`` of a load run: one of the unlimited SKU, from one of 50
    customers (``<customers>-customer-<k>``), for 1.00 to 9.99."""
    return build_order(
        order_id=order_id,
        customer_id=f"{customers}-customer-{n % 50}",
        items=[{"sku": UNLIMITED_SKU, "quantity": 1}],
        amount_cents=100 + n % 900,
        retry=LOAD_RETRY,
    )


def load_message(
    message_id: str,
    n: int,
    recipient: str,
    *,
    sender: str = "load",
    deadline: timedelta = LOAD_MESSAGE_DEADLINE,
    read_window: timedelta = LOAD_READ_WINDOW,
) -> MessageInput:
    """Message number ``n`` of a load run (or of another run that measures delivery),
    from ``sender`` to ``recipient``, whose devices confirm well before ``deadline``."""
    return message_to(
        recipient,
        message_id=message_id,
        sender_id=sender,
        body=f"{sender} message {n}",
        deadline=deadline,
        read_window=read_window,
        retry=LOAD_RETRY,
    )


async def recipients_for(
    stack: contextlib.AsyncExitStack,
    messages: MessageService,
    player: DevicePlayer,
    prefix: str,
    count: int,
) -> list[str]:
    """Recipients for a message load of ``count``, two devices each, whose pushes
    ``player`` confirms; retired, and the player stopped, when ``stack`` closes."""
    recipients = await register_recipients(messages, prefix, min(_RECIPIENTS, count))
    stack.push_async_callback(retire_recipients, messages, recipients)
    await stack.enter_async_context(player)
    return recipients


def percentile(values: list[float], p: float) -> float | None:
    """The ``p``-th percentile (nearest rank) of ``values``; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(p / 100 * len(ordered))))
    return ordered[rank - 1]


async def run_load(
    kind: Literal["orders", "messages"],
    target: LoadTarget,
    *,
    count: int,
    concurrency: int,
    rate: float | None,
    max_wait: float | None,
    console: Console | None = None,
) -> LoadSummary:
    """Start ``count`` lifecycles under the two limits and wait for every one to end
    (a message: until its delivery is settled)."""
    run_id = uuid.uuid4().hex[:8]
    in_flight = asyncio.Semaphore(concurrency)
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    waits: list[float] = []
    refused = errors = 0
    recipients: list[str] = []
    player = target.device_player()

    async def admitted() -> bool:
        """A place in flight, or False once the arrival waited ``max_wait`` for one."""
        if max_wait is None or not in_flight.locked():
            await in_flight.acquire()
            return True
        try:
            await asyncio.wait_for(in_flight.acquire(), timeout=max_wait)
        except TimeoutError:
            return False
        return True

    async def one(n: int) -> None:
        nonlocal refused, errors
        if rate is not None:
            await asyncio.sleep(max(0.0, began + n / rate - time.monotonic()))
        arrived = time.monotonic()
        if not await admitted():
            refused += 1
            return
        started = time.monotonic()
        waits.append((started - arrived) * 1000)
        try:
            if kind == "orders":
                order = load_order(f"load-{run_id}-{n}", n, customers="load")
                status = (await (await target.orders.create(order)).result()).status.value
            else:
                message = load_message(f"load-{run_id}-{n}", n, recipients[n % len(recipients)])
                _, settled = await player.send(message)
                status = await settled
        except Exception as exc:  # a failed start or lifecycle is counted, not fatal
            errors += 1
            statuses[f"error:{type(exc).__name__}"] += 1
            return
        finally:
            in_flight.release()
        latencies.append((time.monotonic() - started) * 1000)
        statuses[status] += 1

    async with contextlib.AsyncExitStack() as stack:
        if kind == "messages":
            recipients = await recipients_for(
                stack, target.messages, player, f"load-{run_id}", count
            )
        began = time.monotonic()
        with Progress(
            TextColumn(f"load {kind}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=console is None,
            transient=True,
        ) as progress:
            bar = progress.add_task(kind, total=count)

            async def tracked(n: int) -> None:
                await one(n)
                progress.advance(bar)

            await asyncio.gather(*(tracked(n) for n in range(count)))
    seconds = time.monotonic() - began
    finished = sum(statuses.values()) - errors
    return LoadSummary(
        kind=kind,
        requested=count,
        started=count - refused,
        refused_at_ingress=refused,
        errors=errors,
        statuses=dict(sorted(statuses.items())),
        expected_status=EXPECTED_END[kind],
        reached_expected=statuses[EXPECTED_END[kind]],
        seconds=round(seconds, 3),
        throughput_per_second=round(finished / seconds, 2) if seconds > 0 else 0.0,
        latency_p50_ms=percentile(latencies, 50),
        latency_p95_ms=percentile(latencies, 95),
        latency_p99_ms=percentile(latencies, 99),
        admission_wait_p95_ms=percentile(waits, 95),
    )
