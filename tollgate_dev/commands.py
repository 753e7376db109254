"""The development commands of ``starter.py``: ``load``, ``demo``, and ``order trace`` /
``message trace`` (which read the local stack's trace files).

They drive the sandbox and many lifecycles, which a production deployment has no use
for, so they live with the rest of the development infrastructure and join the CLI
only where this package is installed (``starter.py`` looks for it).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated, Literal

import asyncpg
import httpx
from cyclopts import Parameter
from rich.table import Table
from temporalio.client import Client

from tollgate import access, gate
from tollgate.errors import InputError
from tollgate.ids import require_safe_id
from tollgate.messages.service import MessageService
from tollgate.messages.store import MESSAGES
from tollgate.ops.cli import (
    EXIT_REFUSED,
    JsonFlag,
    Refused,
    app,
    app_pool,
    connected,
    console,
    emit_json,
    message_app,
    order_app,
)
from tollgate.orders.service import OrderService
from tollgate.orders.store import ORDERS
from tollgate.providers.client import build_http_client
from tollgate.providers.inventory import Inventory
from tollgate.settings import Settings
from tollgate_dev.traces import TraceStore, waterfall

if TYPE_CHECKING:
    from tollgate_dev.load import LoadTarget

#: Upper bounds of ``load``: past them a typo would run for hours.
MAX_LOAD_COUNT = 100_000
MAX_LOAD_CONCURRENCY = 1_000
MAX_LOAD_RATE = 10_000.0


@app.command
async def load(
    kind: Literal["orders", "messages"],
    *,
    count: Annotated[int, Parameter(help="How many lifecycles to run.")] = 100,
    concurrency: Annotated[int, Parameter(help="At most this many in flight at once.")] = 10,
    rate: Annotated[
        float | None,
        Parameter(
            help="Lifecycles arrive at this many per second (open loop); default: all at once."
        ),
    ] = None,
    max_wait: Annotated[
        float | None,
        Parameter(help="Refuse an arrival that waits longer than this for a place in flight (s)."),
    ] = None,
    via: Annotated[
        Literal["direct", "api"],
        Parameter(
            help="direct: the services; api: POST to the HTTP API (API_URL), open-loop "
            "at --rate, honouring 429/503 Retry-After up to --max-wait."
        ),
    ] = "direct",
    api_key: Annotated[
        str | None,
        Parameter(
            help="With --via api: the key (default: TOLLGATE_API_KEY, else a new key "
            "for client 'load').",
            show_default=False,
        ),
    ] = None,
    json: JsonFlag = False,
) -> None:
    """Run many orders or messages with backpressure at ingress; print a summary."""
    if not 1 <= count <= MAX_LOAD_COUNT or not 1 <= concurrency <= MAX_LOAD_CONCURRENCY:
        raise InputError(
            f"--count must be 1..{MAX_LOAD_COUNT} and --concurrency 1..{MAX_LOAD_CONCURRENCY}"
        )
    if rate is not None and not 0 < rate <= MAX_LOAD_RATE:
        raise InputError(f"--rate must be positive and at most {MAX_LOAD_RATE:g}")
    if max_wait is not None and not 0 <= max_wait <= 3600:
        raise InputError("--max-wait must be between 0 and 3600 seconds")
    if via == "api":
        await _load_via_api(kind, count, concurrency, rate, max_wait, api_key, json)
        return
    # Imported here, like demo's and the API load's: every other command of the CLI
    # starts about 0.1 s sooner without the stack, sandbox and load modules.
    from tollgate_dev.load import run_load

    settings = Settings()
    # One connection per lifecycle starting at once, one for the device player's watch.
    async with (
        connected(settings, pool_size=concurrency + 1) as (client, pool),
        build_http_client(settings) as http,
    ):
        summary = await run_load(
            kind,
            _load_target(settings, client, pool, http),
            count=count,
            concurrency=concurrency,
            rate=rate,
            max_wait=max_wait,
            console=None if json else console,
        )
    if json:
        emit_json(summary.model_dump(mode="json"))
        return
    table = Table(
        "final status", "count", "share", title=f"load {kind}: {summary.requested} requested"
    )
    for status, n in summary.statuses.items():
        table.add_row(status, str(n), f"{n / summary.requested:.0%}")
    if summary.refused_at_ingress:
        n = summary.refused_at_ingress
        table.add_row("refused at ingress", str(n), f"{n / summary.requested:.0%}")
    console.print(table)
    # Throughput and latency mean little when lifecycles ended elsewhere: say so first.
    missed = summary.requested - summary.reached_expected
    style = "red" if missed else "green"
    console.print(
        f"[{style}]{summary.reached_expected} of {summary.requested} reached "
        f"{summary.expected_status}[/{style}]"
    )

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f} ms"

    console.print(
        f"{summary.seconds:.1f} s, {summary.throughput_per_second} per second; latency "
        f"p50 {ms(summary.latency_p50_ms)}, p95 {ms(summary.latency_p95_ms)}, p99 {ms(summary.latency_p99_ms)}"
        f"; waited at the door p95 {ms(summary.admission_wait_p95_ms)}"
    )


def _load_target(
    settings: Settings, client: Client, pool: asyncpg.Pool, http: httpx.AsyncClient
) -> LoadTarget:
    """The services a load run starts lifecycles with, as the worker's task queue serves
    them, and the pool they share."""
    from tollgate_dev.load import LoadTarget

    return LoadTarget(
        OrderService(client, pool, settings.task_queue, inventory=Inventory(http)),
        MessageService(client, pool, settings.task_queue),
        pool,
    )


async def _load_via_api(
    kind: Literal["orders", "messages"],
    count: int,
    concurrency: int,
    rate: float | None,
    max_wait: float | None,
    api_key: str | None,
    as_json: bool,
) -> None:
    """``load --via api``: see :mod:`tollgate_dev.load_api`."""
    from tollgate_dev.api_client import ApiCaller
    from tollgate_dev.load_api import run_api_load

    if rate is None:
        raise InputError("--via api needs --rate (arrivals are open-loop at that rate)")
    settings = Settings()
    async with connected(settings) as (client, pool), build_http_client(settings) as http:
        key = api_key or os.environ.get("TOLLGATE_API_KEY")
        if not key:
            key = (await access.create_key(pool, "load")).key
        api = ApiCaller(settings.api_url, key)
        try:
            summary = await run_api_load(
                kind,
                api,
                _load_target(settings, client, pool, http),
                count=count,
                rate=rate,
                concurrency=concurrency,
                max_wait=60.0 if max_wait is None else max_wait,
                console=None if as_json else console,
            )
        finally:
            await api.aclose()
    if as_json:
        emit_json(summary.model_dump(mode="json"))
        return
    table = Table("", "", title=f"load {kind} via the API: {count} offered at {rate:g}/s")
    for name, value in summary.model_dump().items():
        if name not in ("kind", "via"):
            table.add_row(name.replace("_", " "), str(value))
    console.print(table)


@app.command
async def demo(*, json: JsonFlag = False) -> None:
    """Run the demo scenarios against a running stack and print their outcomes."""
    from tollgate_dev.demo import print_outcomes, run_demo

    settings = Settings()
    outcomes = await run_demo(settings)
    if json:
        emit_json([o.model_dump(mode="json") for o in outcomes])
    else:
        print_outcomes(outcomes, settings, console)
    if not all(o.ok for o in outcomes):
        raise SystemExit(EXIT_REFUSED)


async def _lifecycle_traces(
    settings: Settings, lifecycle: gate.Lifecycle, entity_id: str
) -> list[str]:
    """The trace ids an entity's audit rows and row name, first seen first: one, for a
    lifecycle created since traces were kept with the row."""
    async with app_pool(settings, max_size=1) as pool:
        row = await gate.get_row(pool, lifecycle, entity_id)
        if row is None:
            raise lifecycle.not_found(entity_id)
        audited = await pool.fetch(
            f"SELECT trace_id FROM {lifecycle.audit_table} WHERE {lifecycle.audit_key} = $1"
            " AND trace_id IS NOT NULL ORDER BY id",
            entity_id,
        )
    ids: list[str] = []
    parent = row["trace_parent"]
    for trace_id in [parent.split("-")[1] if parent else None, *(r["trace_id"] for r in audited)]:
        if trace_id and trace_id not in ids:
            ids.append(trace_id)
    return ids


async def _print_trace(lifecycle: gate.Lifecycle, entity_id: str, as_json: bool) -> None:
    require_safe_id(f"{lifecycle.kind} id", entity_id)
    settings = Settings()
    trace_ids = await _lifecycle_traces(settings, lifecycle, entity_id)
    store = TraceStore(settings.traces_dir)
    traces = {trace_id: store.load(trace_id) for trace_id in trace_ids}
    if as_json:
        emit_json(
            {
                f"{lifecycle.kind}_id": entity_id,
                "traces": {
                    t: [s.model_dump(mode="json") for s in spans] for t, spans in traces.items()
                },
            }
        )
        return
    if not trace_ids:
        raise Refused(f"{lifecycle.kind} {entity_id} has no trace id in its audit rows")
    shown = 0
    for trace_id, spans in traces.items():
        if not spans:
            console.print(
                f"trace {trace_id}: no spans kept in {settings.traces_dir} (was the local "
                "stack's receiver running? it keeps the most recent traces only)",
                markup=False,
            )
            continue
        console.print(waterfall(spans, title=f"{lifecycle.kind} {entity_id}"))
        shown += 1
    if not shown:
        raise SystemExit(EXIT_REFUSED)


@order_app.command(name="trace")
async def order_trace(order_id: str, *, json: JsonFlag = False) -> None:
    """Print the order's trace as a waterfall: every span from the command that created it
    to each SQL statement and provider call, with durations, status and retried attempts
    (from the local stack's trace receiver)."""
    await _print_trace(ORDERS, order_id, json)


@message_app.command(name="trace")
async def message_trace(message_id: str, *, json: JsonFlag = False) -> None:
    """Print the message's trace as a waterfall (see ``order trace``)."""
    await _print_trace(MESSAGES, message_id, json)
