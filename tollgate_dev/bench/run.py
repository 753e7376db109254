"""One benchmark run: every scenario at every level, the gate, against one server.

At each in-flight level the scenarios run one after another (orders, the 8- and
3-activity baselines, messages, the 7-activity baseline), so a lifecycle and its
baseline are measured minutes apart at most, on the same server in the same state.
Message workflows linger for their read window after DELIVERED; each message phase
waits for them to end before the next phase starts, and their CPU counts as the
messages' (it is part of a message's cost), while their waiting does not count as
latency.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError

from tollgate import postgres
from tollgate.messages.service import MessageService
from tollgate.names import message_workflow_id, order_workflow_id
from tollgate.ops.reconcile import RECONCILE_SCHEDULE_ID
from tollgate.orders.service import OrderService
from tollgate_dev.bench.baseline import (
    MESSAGE_ACTIVITIES,
    MESSAGE_STEPS,
    ORDER_ACTIVITIES,
    ORDER_STEPS,
    PROVIDER_CALL_ACTIVITIES,
    BaselineInput,
    BaselineWorkflow,
)
from tollgate_dev.bench.baseline_worker import BaselineWorkerProcess, baseline_worker
from tollgate_dev.bench.breakdown import breakdown, first_task_waits
from tollgate_dev.bench.gatebench import measure_gate
from tollgate_dev.bench.loop import Pass, closed_loop, level_of
from tollgate_dev.bench.models import (
    BASELINE_MESSAGE,
    BASELINE_ORDER,
    BASELINE_PROVIDERS,
    MESSAGES,
    ORDERS,
    BenchPlan,
    BenchReport,
    Breakdown,
    Cpu,
    Level,
    Scenario,
    Server,
)
from tollgate_dev.bench.procs import (
    ProcessClock,
    load_average,
    machine,
    machine_busy_seconds,
    server_flags,
)
from tollgate_dev.bench.report import ratios
from tollgate_dev.devices import DevicePlayer, register_recipients, retire_recipients
from tollgate_dev.load import LOAD_RETRY, load_message, load_order, percentile

#: Backoffs as a load run has them: nothing fails here, but if something did, a run
#: should recover in seconds, not minutes.
BENCH_RETRY = LOAD_RETRY
#: Long enough never to fall back to email while the device confirms.
MESSAGE_DEADLINE = timedelta(seconds=30)
#: Short, so a message workflow ends soon after DELIVERED instead of resting for days.
READ_WINDOW = timedelta(milliseconds=250)
#: A message whose delivery has not settled by then counts as an error.
SETTLE_TIMEOUT = 60.0
#: Runs one at a time whose histories are read for the breakdown (the last ones).
BREAKDOWN_SAMPLES = 5

#: The breakdown of a scenario no run was sampled for (a plan without level 1).
_UNSAMPLED = Breakdown.model_validate(dict.fromkeys(Breakdown.model_fields, 0))

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchTarget:
    """What the bench drives: Tollgate's services (a worker serves their task queue)
    and the servers behind them."""

    orders: OrderService
    messages: MessageService
    temporal_address: str
    namespace: str
    database_url: str
    #: The schema owner's connection, to create (and drop) the gate's plain table.
    owner_url: str
    #: Tollgate's worker and the Temporal server, for their CPU time (None: unknown).
    worker_pid: int | None
    server_pid: int | None
    reused_stack: bool
    workers_in_bench_process: bool


@dataclass
class _Scenario:
    key: str
    title: str
    #: (regular, local) activities per run.
    steps: tuple[int, int]
    expected: str
    run: Callable[[str, int], Awaitable[str]]
    worker: ProcessClock
    #: Waits for what a phase left running (message workflows in their read window).
    settle: Callable[[], Awaitable[None]]
    #: The workflow id of the lifecycle a run's business id names.
    workflow_id: Callable[[str], str]
    #: Where its breakdown ends: after this many activities, regular and local (None:
    #: the workflow's end).
    end_after_activity: int | None = None
    levels: dict[str, Level] = field(default_factory=dict)
    breakdown: Breakdown | None = None
    worker_seconds: float = 0.0
    server_seconds: float = 0.0
    machine_seconds: float = 0.0
    ok_runs: int = 0

    def runner(self, tag: str) -> Callable[[int], Awaitable[str]]:
        """Run number ``n`` of the phase ``tag`` (ids are ``bench-<run>-<tag>-<n>``)."""
        return lambda n: self.run(tag, n)

    @staticmethod
    def business_id(run_id: str, tag: str, n: int) -> str:
        """The id a run's lifecycle gets: order id, message id, or workflow id."""
        return f"bench-{run_id}-{tag}-{n}"

    def report(self) -> Scenario:
        runs = max(self.ok_runs, 1)
        return Scenario(
            title=self.title,
            activities=self.steps[0],
            local_activities=self.steps[1],
            expected_status=self.expected,
            levels=self.levels,
            cpu=Cpu(
                runs=self.ok_runs,
                worker_seconds=round(self.worker_seconds, 3),
                server_seconds=round(self.server_seconds, 3),
                machine_seconds=round(self.machine_seconds, 3),
                worker_seconds_per_run=round(self.worker_seconds / runs, 5),
                server_seconds_per_run=round(self.server_seconds / runs, 5),
                machine_seconds_per_run=round(self.machine_seconds / runs, 5),
            ),
            breakdown=self.breakdown or _UNSAMPLED,
        )


async def _nothing() -> None:
    return None


def _same(workflow_id: str) -> str:
    return workflow_id


@asynccontextmanager
async def _baseline_worker(
    target: BenchTarget, client: Client, task_queue: str, log_file: Path | None
) -> AsyncIterator[int | None]:
    """Serve the baselines in this process (``log_file`` None) or in a child; yields the
    serving process's pid."""
    if log_file is None:
        async with baseline_worker(client, task_queue):
            yield os.getpid()
        return
    process = BaselineWorkerProcess(target.temporal_address, target.namespace, task_queue, log_file)
    await process.start()
    try:
        yield process.pid
    finally:
        await process.stop()


@asynccontextmanager
async def reconciler_paused(client: Client, say: Progress) -> AsyncIterator[None]:
    """The reconciler's schedule paused while the bench measures, and its run in flight
    waited out. Each of its runs looks at every row that came to rest since the run
    before, and a bench leaves thousands: a sweep took 10 to 18 s of both the worker and
    the server in the middle of a scenario. A pause an operator made is left as it is;
    the bench undoes only its own."""
    handle = client.get_schedule_handle(RECONCILE_SCHEDULE_ID)
    try:
        described = await handle.describe()
    except RPCError:  # no schedule on this namespace: nothing competes
        yield
        return
    paused_here = not described.schedule.state.paused
    if paused_here:
        await handle.pause(note="paused while make bench measures")
    try:
        deadline = time.monotonic() + 120
        while (await handle.describe()).info.running_actions and time.monotonic() < deadline:
            say("waiting for the reconciler's run in flight to end")
            await asyncio.sleep(2)
        yield
    finally:
        if paused_here:
            await handle.unpause(note="make bench is done")


async def run_bench(
    target: BenchTarget,
    plan: BenchPlan,
    *,
    baseline_worker_log: Path | None = None,
    progress: Progress | None = None,
) -> BenchReport:
    """Measure every scenario at every level of ``plan``, then the gate.

    The baseline worker runs in this process unless ``baseline_worker_log`` names the
    log of a child process to run it in.
    """
    say: Progress = progress or (lambda _line: None)
    run_id = uuid.uuid4().hex[:8]
    started_at = datetime.now().astimezone()
    load_at_start = load_average()
    began = time.perf_counter()
    # Bare: the default converter, no codec, no tracing, as a plain Temporal app has it.
    baseline_client = await Client.connect(target.temporal_address, namespace=target.namespace)
    task_queue = f"bench-{run_id}"
    server = ProcessClock(target.server_pid)
    pool = await postgres.create_pool(target.database_url, max_size=2)
    try:
        async with (
            reconciler_paused(baseline_client, say),
            _baseline_worker(target, baseline_client, task_queue, baseline_worker_log) as pid,
            DevicePlayer(pool, target.messages) as player,
        ):
            recipients = await register_recipients(
                target.messages, f"bench-{run_id}", max(plan.levels)
            )
            try:
                scenarios = _scenarios(
                    target, baseline_client, task_queue, player, recipients, run_id, pid
                )
                await _measure(scenarios, plan, server, baseline_client, run_id, say)
            finally:
                await retire_recipients(target.messages, recipients)
    finally:
        await pool.close()
    say(f"gate: {plan.gate_writers} writers, {plan.gate_orders * plan.gate_rounds} orders x 4")
    gate = await measure_gate(
        target.database_url,
        target.owner_url,
        run_id=run_id,
        writers=plan.gate_writers,
        orders=plan.gate_orders,
        rounds=plan.gate_rounds,
    )
    in_memory, pragmas, dynamic = server_flags(target.server_pid)
    reported = {s.key: s.report() for s in scenarios}
    return BenchReport(
        plan=plan,
        started_at=started_at,
        seconds=round(time.perf_counter() - began, 1),
        machine=machine(load_at_start),
        server=Server(
            temporal_address=target.temporal_address,
            server_pid_found=server.known,
            in_memory=in_memory,
            sqlite_pragmas=pragmas,
            dynamic_config=dynamic,
            reused_stack=target.reused_stack,
            workers_in_bench_process=target.workers_in_bench_process,
        ),
        scenarios=reported,
        gate=gate,
        ratios=ratios(reported, gate),
    )


def _scenarios(
    target: BenchTarget,
    baseline_client: Client,
    task_queue: str,
    player: DevicePlayer,
    recipients: list[str],
    run_id: str,
    baseline_pid: int | None,
) -> list[_Scenario]:
    """The five scenarios, in the order they run at each level."""
    lingering: list[WorkflowHandle[Any, Any]] = []

    async def order(tag: str, n: int) -> str:
        order = load_order(_Scenario.business_id(run_id, tag, n), n, customers="bench")
        return (await (await target.orders.create(order)).result()).status.value

    async def message(tag: str, n: int) -> str:
        message_id = _Scenario.business_id(run_id, tag, n)
        handle, settled = await player.send(
            load_message(
                message_id,
                n,
                recipients[n % len(recipients)],
                sender="bench",
                deadline=MESSAGE_DEADLINE,
                read_window=READ_WINDOW,
            )
        )
        lingering.append(handle)
        try:
            return await asyncio.wait_for(settled, SETTLE_TIMEOUT)
        except BaseException:
            player.forget(message_id)
            raise

    async def messages_ended() -> None:
        handles = list(lingering)
        lingering.clear()
        results = (h.result() for h in handles)
        await asyncio.wait_for(asyncio.gather(*results, return_exceptions=True), SETTLE_TIMEOUT)

    def baseline(activities: int) -> Callable[[str, int], Awaitable[str]]:
        async def run(tag: str, n: int) -> str:
            await baseline_client.execute_workflow(
                BaselineWorkflow.run,
                BaselineInput(activities=activities),
                id=_Scenario.business_id(run_id, tag, n),
                task_queue=task_queue,
            )
            return "COMPLETED"

        return run

    tollgate_worker = ProcessClock(target.worker_pid)
    bare_worker = ProcessClock(baseline_pid)
    return [
        _Scenario(
            ORDERS,
            "Tollgate order (happy path)",
            ORDER_STEPS,
            "COMPLETED",
            order,
            tollgate_worker,
            _nothing,
            order_workflow_id,
        ),
        _Scenario(
            BASELINE_ORDER,
            f"baseline: {ORDER_ACTIVITIES} no-op activities",
            (ORDER_ACTIVITIES, 0),
            "COMPLETED",
            baseline(ORDER_ACTIVITIES),
            bare_worker,
            _nothing,
            _same,
        ),
        _Scenario(
            BASELINE_PROVIDERS,
            f"baseline: {PROVIDER_CALL_ACTIVITIES} (the provider calls)",
            (PROVIDER_CALL_ACTIVITIES, 0),
            "COMPLETED",
            baseline(PROVIDER_CALL_ACTIVITIES),
            bare_worker,
            _nothing,
            _same,
        ),
        _Scenario(
            MESSAGES,
            "Tollgate message to 2 devices",
            MESSAGE_STEPS,
            "DELIVERED",
            message,
            tollgate_worker,
            messages_ended,
            message_workflow_id,
            # the last step records DELIVERED; then the message rests
            end_after_activity=sum(MESSAGE_STEPS),
        ),
        _Scenario(
            BASELINE_MESSAGE,
            f"baseline: {MESSAGE_ACTIVITIES} no-op activities",
            (MESSAGE_ACTIVITIES, 0),
            "COMPLETED",
            baseline(MESSAGE_ACTIVITIES),
            bare_worker,
            _nothing,
            _same,
        ),
    ]


#: Runs of each level whose first workflow task's wait is read, shared out over its
#: passes: from the middle of each, started while every lane was busy.
FIRST_TASK_SAMPLES = 40


async def _with_first_task_waits(
    client: Client, s: _Scenario, run_id: str, level: Level, sizes: list[int]
) -> Level:
    """``level`` with the first-task waits (see :func:`first_task_waits`) of runs from
    the middle of each of its passes (``sizes``: the runs of each)."""
    share = max(1, FIRST_TASK_SAMPLES // len(sizes))
    sampled: list[int] = []
    first = 0
    for size in sizes:
        middle = first + size // 2
        # never one of the pass's first wave, started all at once
        earliest = first + min(level.in_flight, size - 1)
        sampled += range(
            max(earliest, middle - share // 2), min(first + size, middle + share - share // 2)
        )
        first += size
    tag = f"{s.key}-c{level.in_flight}"
    ids = [s.workflow_id(s.business_id(run_id, tag, n)) for n in sampled]
    waits = await first_task_waits(client, ids)
    return level.model_copy(
        update={
            "first_task_wait_p50_ms": percentile(waits, 50),
            "first_task_wait_p95_ms": percentile(waits, 95),
        }
    )


async def _one_pass(
    s: _Scenario, server: ProcessClock, in_flight: int, runs: int, first: int
) -> Pass:
    """One pass of ``s`` at ``in_flight``: runs ``first`` on, then what they left
    running settled; its worker's, the server's and the machine's CPU go to ``s``."""
    worker_before, server_before = s.worker.seconds(), server.seconds()
    machine_before = machine_busy_seconds()
    loop = await closed_loop(
        s.runner(f"{s.key}-c{in_flight}"),
        runs=runs,
        in_flight=in_flight,
        expected=s.expected,
        first=first,
    )
    await s.settle()
    s.worker_seconds += s.worker.seconds() - worker_before
    s.server_seconds += server.seconds() - server_before
    s.machine_seconds += machine_busy_seconds() - machine_before
    return loop


async def _measure(
    scenarios: list[_Scenario],
    plan: BenchPlan,
    server: ProcessClock,
    client: Client,
    run_id: str,
    say: Progress,
) -> None:
    """Warm up, then every level of every scenario, in passes taken in turns (forwards,
    then backwards), recording levels and CPU; after the runs one at a time, read the
    breakdown from the last ones' histories."""
    if plan.warm_up:
        say(f"warming up: {plan.warm_up} of each")
        for s in scenarios:
            await closed_loop(
                s.runner(f"{s.key}-warm"),
                runs=plan.warm_up,
                in_flight=min(10, plan.warm_up),
                expected=s.expected,
            )
            await s.settle()
    for in_flight in plan.levels:
        sizes = plan.passes_at(in_flight)
        passes: dict[str, list[Pass]] = {s.key: [] for s in scenarios}
        first = 0
        for k, size in enumerate(sizes):
            for s in scenarios if k % 2 == 0 else reversed(scenarios):
                passes[s.key].append(await _one_pass(s, server, in_flight, size, first))
            first += size
        for s in scenarios:
            level = level_of(passes[s.key])
            s.ok_runs += level.ok
            level = await _with_first_task_waits(client, s, run_id, level, sizes)
            s.levels[str(in_flight)] = level
            if in_flight == 1:
                last = range(max(0, level.runs - BREAKDOWN_SAMPLES), level.runs)
                tag = f"{s.key}-c1"
                ids = [s.workflow_id(s.business_id(run_id, tag, n)) for n in last]
                s.breakdown = await breakdown(client, ids, end_after_activity=s.end_after_activity)
            say(
                f"{s.title:<38} {in_flight:>3} in flight: {level.ok}/{level.runs} ok, "
                f"{level.throughput_per_s:7.2f}/s (whole loop {level.loop_throughput_per_s:.2f}/s), "
                f"p50 {level.p50_ms:6.1f} ms, p95 {level.p95_ms:6.1f} ms"
            )
