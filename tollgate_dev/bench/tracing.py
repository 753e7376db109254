"""``make bench-tracing``: how many spans one order makes, and what exporting them costs.

Two workers run side by side on the stack's Temporal, Postgres and sandbox, each on its
own task queue: one exports its spans over OTLP/HTTP to a trace receiver this bench
starts, the other exports nothing (it still makes its spans: only the export is off).
The bench process creates the orders the way the API does (``OrderService``), with an
exporter behind a switch that follows the worker. Batches of sequential orders
alternate between the two within each round, the first batch of a round taking turns,
so drift on a shared machine (other processes, a warming cache) falls on both. Latency
is one order's time from ``create`` to its workflow's result.

Spans per order are counted in the receiver, per trace. The sandbox's server spans (one
per provider call) go wherever the stack sends them; they are counted too when that is
the local stack's receiver (``<state_dir>/traces``).

    python -m tollgate_dev.bench.tracing [--rounds 5] [--orders 20] [--warmup 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import asyncpg
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from tollgate import postgres
from tollgate.orders import store as order_store
from tollgate.orders.service import OrderService, build_order
from tollgate.orders.states import OrderStatus
from tollgate.providers.client import build_http_client
from tollgate.providers.inventory import Inventory
from tollgate.settings import Settings
from tollgate.telemetry import configure_tracing
from tollgate.temporal import connect
from tollgate.tracing import parse_traceparent
from tollgate_dev.bench.procs import ProcessClock, load_average
from tollgate_dev.bench.run import BENCH_RETRY
from tollgate_dev.sandbox.models import UNLIMITED_SKU
from tollgate_dev.stack import (
    LocalStack,
    StackError,
    WorkerProcess,
    free_port,
    running_owner_url,
    stack_is_up,
)
from tollgate_dev.stack.traces import TraceReceiverProcess
from tollgate_dev.traces import SpanRecord, TraceStore
from tollgate_dev.traces.switch import switched_export

#: The SDK's default delay between two exports of a batch span processor.
EXPORT_INTERVAL_S = 5.0

Mode = Literal["on", "off"]
MODES: tuple[Mode, Mode] = ("on", "off")


class RoundResult(BaseModel):
    """One round: each mode's batch p50, in the order the batches ran."""

    round: int
    first: Mode
    p50_on_ms: float
    p50_off_ms: float


class TracingReport(BaseModel):
    """What the bench measured."""

    rounds: int
    orders_per_batch: int
    warmup_per_mode: int
    #: Orders that did not end COMPLETED (their latency is left out).
    not_completed: int
    #: Median of every measured order's latency, per mode, and on / off.
    p50_on_ms: float
    p50_off_ms: float
    ratio: float
    #: Median of the rounds' own on / off ratios (each round's batches ran back to back).
    round_ratio_median: float
    per_round: list[RoundResult]
    #: CPU (user + system) of each mode's worker per measured order, idle polling
    #: while the other mode's batches ran included (the same for both).
    worker_cpu_ms_on: float
    worker_cpu_ms_off: float
    #: Spans of one order's trace, over the orders exported: median, least, most (one
    #: SQL span more where validation's insert waited on the service's commit).
    spans_median: float
    spans_min: int
    spans_max: int
    #: The median order's spans by what made them.
    spans_by_kind: dict[str, int]
    sandbox_spans_counted: bool
    cores: int
    load_at_start: float
    load_at_end: float


@dataclass
class _Lane:
    mode: Mode
    service: OrderService
    latencies: list[float]


def span_kind(span: SpanRecord) -> str:
    """What made a span: Temporal, SQL, an HTTP call or its serving, or Tollgate itself."""
    if "db.statement" in span.attributes or "db.query.text" in span.attributes:
        return "sql"
    if "http.method" in span.attributes or "http.request.method" in span.attributes:
        return "http server" if span.kind == "server" else "http client"
    if ":" in span.name:
        return "temporal"
    return "tollgate"


def _p50(values: list[float]) -> float:
    return round(statistics.median(values), 1) if values else 0.0


async def measure(
    settings: Settings,
    *,
    owner_url: str | None,
    work_dir: Path,
    rounds: int = 5,
    per_batch: int = 20,
    warmup: int = 5,
    progress: Callable[[str], None] = lambda _: None,
) -> TracingReport:
    """Run the bench against the stack ``settings`` point at (workers of its own)."""
    load_at_start = load_average()
    run_id = uuid.uuid4().hex[:8]
    receiver = TraceReceiverProcess(
        free_port(), directory=work_dir / "receiver", log_file=work_dir / "receiver.log"
    )
    await receiver.start()
    workers: dict[Mode, WorkerProcess] = {}
    latencies: dict[Mode, list[float]] = {mode: [] for mode in MODES}
    try:
        # This process's spans: made always, exported only while the switch is on. The
        # state dir is an empty one, so no receiver's URL is found in it (see
        # Settings.otlp_endpoint): the switch is this process's only export.
        configure_tracing(
            settings.model_copy(
                update={"otel_exporter_otlp_endpoint": None, "state_dir": work_dir / "bench"}
            ),
            "bench",
        )
        switch = switched_export(receiver.url)
        queues = {mode: f"bench-tracing-{mode}-{run_id}" for mode in MODES}
        for mode in MODES:
            workers[mode] = WorkerProcess(
                _worker_env(settings, owner_url, work_dir, queues[mode], mode, receiver.url),
                log_file=work_dir / f"worker-{mode}.log",
            )
        await asyncio.gather(*(w.start() for w in workers.values()))
        progress(f"workers ready; receiver at {receiver.url}")

        client = await connect(settings)
        pool = await postgres.create_pool(settings.database_url, max_size=4)
        exported: list[str] = []
        not_completed = 0
        try:
            async with build_http_client(settings) as http:
                inventory = Inventory(http)
                lanes = {
                    mode: _Lane(
                        mode,
                        OrderService(client, pool, queues[mode], inventory=inventory),
                        latencies[mode],
                    )
                    for mode in MODES
                }
                # The door remembers SKUs the catalog knew (KnownSkus): ask it once per
                # lane first, so that every measured order makes the same calls.
                for lane in lanes.values():
                    await lane.service.check(
                        build_order(
                            order_id=f"bt-{run_id}-{lane.mode}-door",
                            customer_id="bench-customer",
                            items=[{"sku": UNLIMITED_SKU, "quantity": 1}],
                            amount_cents=100,
                            currency="USD",
                        )
                    )

                async def batch(lane: _Lane, label: str, count: int, keep: bool) -> list[float]:
                    nonlocal not_completed
                    switch.on = lane.mode == "on"
                    took: list[float] = []
                    for n in range(count):
                        order_id = f"bt-{run_id}-{lane.mode}-{label}-{n}"
                        started = time.perf_counter()
                        handle = await lane.service.create(
                            build_order(
                                order_id=order_id,
                                customer_id="bench-customer",
                                items=[{"sku": UNLIMITED_SKU, "quantity": 1}],
                                amount_cents=100 + n,
                                currency="USD",
                                retry=BENCH_RETRY,
                            )
                        )
                        result = await handle.result()
                        elapsed = (time.perf_counter() - started) * 1000
                        if result.status != OrderStatus.COMPLETED:
                            not_completed += 1
                            continue
                        if keep:
                            took.append(elapsed)
                            if lane.mode == "on":
                                exported.append(order_id)
                    switch.on = False
                    return took

                for mode in MODES:
                    await batch(lanes[mode], "warmup", warmup, keep=False)
                clocks = {mode: ProcessClock(workers[mode].pid) for mode in MODES}
                cpu_before = {mode: clocks[mode].seconds() for mode in MODES}
                per_round: list[RoundResult] = []
                for r in range(rounds):
                    order = MODES if r % 2 == 0 else (MODES[1], MODES[0])
                    p50: dict[Mode, float] = {}
                    for mode in order:
                        took = await batch(lanes[mode], f"r{r}", per_batch, keep=True)
                        lanes[mode].latencies += took
                        p50[mode] = _p50(took)
                    per_round.append(
                        RoundResult(
                            round=r + 1, first=order[0], p50_on_ms=p50["on"], p50_off_ms=p50["off"]
                        )
                    )
                    progress(
                        f"round {r + 1}/{rounds}: p50 on {p50['on']:.1f} ms, "
                        f"off {p50['off']:.1f} ms ({order[0]} first)"
                    )
                # The last spans leave in the exporting worker's next batch, 5 s on.
                await asyncio.sleep(EXPORT_INTERVAL_S + 1)
                cpu_ms = {
                    mode: (clocks[mode].seconds() - cpu_before[mode]) * 1000 / (rounds * per_batch)
                    for mode in MODES
                }
            # Stopping a worker flushes its spans; then this process's.
            await asyncio.gather(*(w.stop() for w in workers.values()))
            await asyncio.to_thread(switch.force_flush, 10_000)
            counts, kinds, sandbox_counted = await _count_spans(
                pool, exported, TraceStore(receiver.directory), settings.traces_dir
            )
        finally:
            await pool.close()
    finally:
        await asyncio.gather(*(w.stop() for w in workers.values()))
        await receiver.stop()

    on, off = latencies["on"], latencies["off"]
    p50_on, p50_off = _p50(on), _p50(off)
    return TracingReport(
        rounds=rounds,
        orders_per_batch=per_batch,
        warmup_per_mode=warmup,
        not_completed=not_completed,
        p50_on_ms=p50_on,
        p50_off_ms=p50_off,
        ratio=round(p50_on / p50_off, 3) if p50_off else 0.0,
        round_ratio_median=round(
            statistics.median(r.p50_on_ms / r.p50_off_ms for r in per_round if r.p50_off_ms), 3
        )
        if per_round
        else 0.0,
        per_round=per_round,
        worker_cpu_ms_on=round(cpu_ms["on"], 2),
        worker_cpu_ms_off=round(cpu_ms["off"], 2),
        spans_median=statistics.median(counts) if counts else 0,
        spans_min=min(counts, default=0),
        spans_max=max(counts, default=0),
        spans_by_kind=kinds,
        sandbox_spans_counted=sandbox_counted,
        cores=os.cpu_count() or 1,
        load_at_start=load_at_start,
        load_at_end=load_average(),
    )


def _worker_env(
    settings: Settings,
    owner_url: str | None,
    work_dir: Path,
    task_queue: str,
    mode: Mode,
    receiver_url: str,
) -> dict[str, str]:
    env = {
        "TEMPORAL_ADDRESS": settings.temporal_address,
        "TEMPORAL_NAMESPACE": settings.temporal_namespace,
        "DATABASE_URL": settings.database_url,
        "SANDBOX_URL": settings.sandbox_url,
        "TASK_QUEUE": task_queue,
        "PAYLOAD_ENCRYPTION": settings.payload_encryption,
        # The bench's own: a stack's receiver URL in <state_dir>/traces is not found.
        "STATE_DIR": str(work_dir / f"worker-{mode}"),
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver_url if mode == "on" else "",
        "RECONCILE_EVERY_SECONDS": "0",
        "WORKER_METRICS_BIND_ADDRESS": "",
        "LOG_LEVEL": "INFO",  # the readiness line is logged at INFO
    }
    # The key as this process has it: given, else the file.
    if settings.payload_encryption_key:
        env["PAYLOAD_ENCRYPTION_KEY"] = settings.payload_encryption_key
    else:
        env["PAYLOAD_KEY_FILE"] = str(settings.payload_key_path.absolute())
    if owner_url:
        env["DATABASE_OWNER_URL"] = owner_url
    return env


async def _count_spans(
    pool: asyncpg.Pool, order_ids: list[str], store: TraceStore, stack_traces: Path
) -> tuple[list[int], dict[str, int], bool]:
    """Spans per exported order (the receiver's, plus the sandbox's from the stack's
    receiver when it keeps them), and the kinds of the median order's spans."""
    stack_store = TraceStore(stack_traces) if (stack_traces / "spans").is_dir() else None
    if stack_store is not None and order_ids:
        await _sandbox_spans_arrived(pool, order_ids[-1], stack_store)
    sizes: list[tuple[int, list[SpanRecord]]] = []
    for order_id in order_ids:
        row = await order_store.get_order(pool, order_id)
        parent = parse_traceparent(row.trace_parent if row else None)
        if parent is None:
            continue
        trace_id = format(parent.trace_id, "032x")
        spans = store.load(trace_id)
        if stack_store is not None:
            spans += [s for s in stack_store.load(trace_id) if s.service.endswith("-sandbox")]
        sizes.append((len(spans), spans))
    if not sizes:
        return [], {}, stack_store is not None
    sizes.sort(key=lambda item: item[0])
    median_spans = sizes[len(sizes) // 2][1]
    kinds = Counter(span_kind(s) for s in median_spans)
    return [n for n, _ in sizes], dict(kinds.most_common()), stack_store is not None


async def _sandbox_spans_arrived(pool: asyncpg.Pool, order_id: str, store: TraceStore) -> None:
    """Wait (up to 20 s) until the sandbox's spans of the last order reached the stack's
    receiver: the sandbox sends them in batches, every 5 s."""
    row = await order_store.get_order(pool, order_id)
    parent = parse_traceparent(row.trace_parent if row else None)
    if parent is None:
        return
    trace_id = format(parent.trace_id, "032x")
    seen = -1
    for _ in range(40):
        count = sum(1 for s in store.load(trace_id) if s.service.endswith("-sandbox"))
        if count and count == seen:
            return
        seen = count
        await asyncio.sleep(0.5)


def print_report(report: TracingReport, out: Console) -> None:
    """The rounds, then the summary."""
    table = Table(title="Order latency, exporting on vs off (sequential orders)")
    for column in ("round", "first", "p50 on (ms)", "p50 off (ms)", "on / off"):
        table.add_column(column, justify="right")
    for r in report.per_round:
        ratio = r.p50_on_ms / r.p50_off_ms if r.p50_off_ms else 0.0
        table.add_row(
            str(r.round), r.first, f"{r.p50_on_ms:.1f}", f"{r.p50_off_ms:.1f}", f"{ratio:.3f}"
        )
    table.add_row(
        "all",
        "",
        f"{report.p50_on_ms:.1f}",
        f"{report.p50_off_ms:.1f}",
        f"{report.ratio:.3f}",
        style="bold",
    )
    out.print(table)
    n = report.rounds * report.orders_per_batch
    out.print(
        f"{report.rounds} rounds x {report.orders_per_batch} orders per mode ({n} each, "
        f"after {report.warmup_per_mode} warm-up orders per mode); median of the rounds' "
        f"own ratios {report.round_ratio_median:.3f}; {report.not_completed} not completed; "
        f"{report.cores} cores, load {report.load_at_start} -> {report.load_at_end}"
    )
    cpu_ratio = (
        report.worker_cpu_ms_on / report.worker_cpu_ms_off if report.worker_cpu_ms_off else 0
    )
    out.print(
        f"Worker CPU per order: on {report.worker_cpu_ms_on:.2f} ms, off "
        f"{report.worker_cpu_ms_off:.2f} ms (on / off {cpu_ratio:.3f})"
    )
    sandbox = "" if report.sandbox_spans_counted else " (the sandbox's server spans not counted)"
    kinds = ", ".join(f"{k} {v}" for k, v in report.spans_by_kind.items())
    out.print(
        f"Spans per order: median {report.spans_median:g} (min {report.spans_min}, "
        f"max {report.spans_max}){sandbox}; the median order's: {kinds}"
    )


async def _main(args: argparse.Namespace, say: Console) -> TracingReport:
    settings = Settings()

    def progress(line: str) -> None:
        say.print(line, markup=False, highlight=False)

    options = {"rounds": args.rounds, "per_batch": args.orders, "warmup": args.warmup}
    with tempfile.TemporaryDirectory(prefix="tollgate-bench-tracing-") as tmp:
        work_dir = Path(tmp)
        if await stack_is_up(settings):
            say.print(f"Using the running stack (Temporal at {settings.temporal_address}).")
            return await measure(
                settings,
                owner_url=running_owner_url(settings),
                work_dir=work_dir,
                progress=progress,
                **options,
            )
        say.print(f"Starting the local stack in {settings.state_dir}/ ...")
        stack = LocalStack.from_settings(settings, with_worker=False, with_api=False, headless=True)
        async with stack:
            stack_settings = stack.client_settings(STATE_DIR=str(stack.state_dir))
            return await measure(
                stack_settings,
                owner_url=stack.database_owner_url,
                work_dir=work_dir,
                progress=progress,
                **options,
            )


def main(argv: list[str] | None = None) -> None:
    """Run the tracing bench and print (or, with ``--json``, dump) its report."""
    parser = argparse.ArgumentParser(
        prog="python -m tollgate_dev.bench.tracing",
        description="Spans per order, and the order p50 with span export on and off.",
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of one batch per mode")
    parser.add_argument("--orders", type=int, default=20, help="sequential orders per batch")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured orders per mode")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if min(args.rounds, args.orders) < 1 or args.warmup < 0:
        parser.error("--rounds and --orders must be at least 1, --warmup at least 0")
    say = Console(stderr=True, highlight=False)
    try:
        report = asyncio.run(_main(args, say))
    except StackError as exc:
        say.print(f"error: {exc}", markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print_report(report, Console(highlight=False, width=120))
    if report.not_completed:
        sys.exit(1)


if __name__ == "__main__":
    main()
