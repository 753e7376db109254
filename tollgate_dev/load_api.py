"""``starter.py load orders|messages --via api``: load through the HTTP API, honouring
its refusals.

Arrivals are open-loop: request ``n`` is offered at ``n / rate`` seconds whatever
happened to the ones before, so an overloaded system sees the load it would see from
real callers, not one that politely slows down. Each request is sent with its own
Idempotency-Key; a 429 or 503 is waited out (``Retry-After``) and the same request sent
again, until ``max_wait`` seconds after its arrival, time spent waiting for one of this
process's ``--concurrency`` slots included (the generator's own limit, not the
system's); then it is given up.

Reported: what was offered and admitted, every refusal (by problem type), 5xx answers,
the admission latency (request offered to 202, retries included) and, through Temporal,
how each admitted lifecycle ended and how long that took.

Messages go to recipients registered for the run with two devices each, and a
:class:`~tollgate_dev.devices.DevicePlayer` confirms each push as a phone would, as in
the direct load: the run measures delivery, not the email fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from typing import Literal

from pydantic import BaseModel, ConfigDict
from rich.console import Console

from tollgate_dev.api_client import ApiCaller, ApiGaveUp
from tollgate_dev.load import (
    LOAD_MESSAGE_DEADLINE,
    LOAD_READ_WINDOW,
    LoadTarget,
    percentile,
    recipients_for,
)
from tollgate_dev.sandbox.models import UNLIMITED_SKU


class ApiLoadSummary(BaseModel):
    """What a ``--via api`` run did, as ``--json`` prints it."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["orders", "messages"]
    via: Literal["api"] = "api"
    requested: int
    offered_rate_per_second: float
    admitted: int
    #: Requests still refused when their max wait ran out.
    gave_up: int
    #: 429 answers (each is waited out and retried), by reason.
    refused_429: int
    refusals_by_type: dict[str, int]
    #: 5xx answers: 503s (waited out and retried) and any other server error.
    answers_503: int
    server_errors_5xx: int
    other_errors: int
    answers_by_status: dict[str, int]
    statuses: dict[str, int]
    seconds: float
    admitted_per_second: float
    finished_per_second: float
    admission_p50_ms: float | None
    admission_p95_ms: float | None
    admission_p99_ms: float | None
    #: The admitted request alone (its last attempt): what the API took to say 202.
    admitted_request_p50_ms: float | None
    admitted_request_p95_ms: float | None
    lifecycle_p50_ms: float | None
    lifecycle_p95_ms: float | None


def _consumed(settled: asyncio.Future[str]) -> None:
    """Take a watch's outcome (the workflow's result reports it): an error the player
    met is then not reported again as never retrieved."""
    if not settled.cancelled():
        settled.exception()


async def run_api_load(
    kind: Literal["orders", "messages"],
    api: ApiCaller,
    target: LoadTarget,
    *,
    count: int,
    rate: float,
    concurrency: int,
    max_wait: float,
    console: Console | None = None,
) -> ApiLoadSummary:
    """Offer ``count`` creates at ``rate`` per second through the API; wait for each
    admitted lifecycle to end."""
    run_id = uuid.uuid4().hex[:8]
    recipients: list[str] = []
    player = target.device_player()
    in_flight = asyncio.Semaphore(concurrency)
    admission: list[float] = []
    last_attempt: list[float] = []
    lifecycle: list[float] = []
    statuses: Counter[str] = Counter()
    gave_up = other = 0
    began = time.monotonic()

    async def one(n: int) -> None:
        nonlocal gave_up, other
        await asyncio.sleep(max(0.0, began + n / rate - time.monotonic()))
        offered = time.monotonic()
        async with in_flight:
            # --max-wait counts from the arrival: time queued here for a slot included.
            left = max_wait - (time.monotonic() - offered)
            try:
                if left <= 0:
                    raise ApiGaveUp("no place in flight before --max-wait")
                if kind == "orders":
                    response = await api.create_order(
                        {
                            "customer_id": f"load-customer-{n % 50}",
                            "items": [{"sku": UNLIMITED_SKU, "quantity": 1}],
                            "amount_cents": 100 + n % 900,
                        },
                        deadline=left,
                    )
                else:
                    recipient = recipients[n % len(recipients)]
                    response = await api.send_message(
                        {
                            "sender_id": "load",
                            "recipient_id": recipient,
                            "recipient_email": f"{recipient}@example.com",
                            "body": f"load message {run_id} {n}",
                            "deadline_seconds": int(LOAD_MESSAGE_DEADLINE.total_seconds()),
                            "read_window_seconds": int(LOAD_READ_WINDOW.total_seconds()),
                        },
                        deadline=left,
                    )
            except ApiGaveUp:
                gave_up += 1
                return
        if response.status_code != 202:
            other += 1
            statuses[f"answer:{response.status_code}"] += 1
            return
        admission.append((time.monotonic() - offered) * 1000)
        last_attempt.append(response.elapsed.total_seconds() * 1000)
        entity_id = response.json()["id"]
        if kind == "messages":
            # Watched once the API named it: the push it waits for is a row, not an
            # event. What the delivery settled in is read from the workflow below.
            player.settled(entity_id).add_done_callback(_consumed)
        try:
            if kind == "orders":
                status = (await target.orders.handle(entity_id).result()).status.value
            else:
                status = (await target.messages.handle(entity_id).result()).status.value
        except Exception as exc:  # a lifecycle that failed is counted, not fatal
            statuses[f"error:{type(exc).__name__}"] += 1
            return
        lifecycle.append((time.monotonic() - offered) * 1000)
        statuses[status] += 1

    if console is not None:
        console.print(f"load {kind} via the API: {count} at {rate:g}/s", highlight=False)
    async with contextlib.AsyncExitStack() as stack:
        if kind == "messages":
            recipients = await recipients_for(
                stack, target.messages, player, f"api-load-{run_id}", count
            )
        await asyncio.gather(*(one(n) for n in range(count)))
    seconds = time.monotonic() - began
    answers = api.answers
    return ApiLoadSummary(
        kind=kind,
        requested=count,
        offered_rate_per_second=rate,
        admitted=len(admission),
        gave_up=gave_up,
        refused_429=answers[429],
        refusals_by_type=dict(sorted(api.refusals.items())),
        answers_503=answers[503],
        server_errors_5xx=sum(n for s, n in answers.items() if s >= 500),
        other_errors=other,
        answers_by_status={str(s): n for s, n in sorted(answers.items())},
        statuses=dict(sorted(statuses.items())),
        seconds=round(seconds, 3),
        admitted_per_second=round(len(admission) / seconds, 2) if seconds else 0.0,
        finished_per_second=round(len(lifecycle) / seconds, 2) if seconds else 0.0,
        admission_p50_ms=percentile(admission, 50),
        admission_p95_ms=percentile(admission, 95),
        admission_p99_ms=percentile(admission, 99),
        admitted_request_p50_ms=percentile(last_attempt, 50),
        admitted_request_p95_ms=percentile(last_attempt, 95),
        lifecycle_p50_ms=percentile(lifecycle, 50),
        lifecycle_p95_ms=percentile(lifecycle, 95),
    )
