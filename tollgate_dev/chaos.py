"""The chaos suite: a mixed load of orders and messages while things break, then a proof.

``make chaos`` (``python -m tollgate_dev.chaos``) starts its own stack in a temporary
directory (Postgres, a Temporal dev server on a file database, the provider sandbox and
two workers, all real processes), runs orders and messages, and injects faults one at a
time and then all together:

* ``worker-kill``: SIGKILL a worker every few seconds and start a new one;
* ``temporal-restart``: kill the Temporal dev server and start it on the same file;
* ``postgres-restart``: restart Postgres under the workers' feet;
* ``outage``: the payment and push providers answer 503 to everything for a window;
* ``5xx``: 30% of all provider calls fail;
* ``latency``: provider answers slower than the workers' HTTP timeout.

When the load is done and every lifecycle has settled, it checks the invariants and
prints them as a table; any violation names the entity and fails the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.table import Table
from temporalio.client import Client, WorkflowExecutionStatus

from tollgate.codec import ensure_key_file
from tollgate.errors import AlreadyExists, InputError
from tollgate.gate import AuditRow
from tollgate.messages import store as message_store
from tollgate.messages.service import MessageService
from tollgate.messages.states import MESSAGE_EDGES, MessageStatus
from tollgate.migrate import apply_migrations
from tollgate.models import RetrySettings
from tollgate.names import message_workflow_id, order_workflow_id
from tollgate.ops.reconcile import ReconcileInput, reconcile
from tollgate.orders import store as order_store
from tollgate.orders.service import OrderService, build_order
from tollgate.orders.states import ORDER_EDGES, OrderStatus
from tollgate.postgres import create_pool
from tollgate.providers.client import build_http_client
from tollgate.providers.inventory import Inventory
from tollgate.settings import Settings
from tollgate.temporal import connect
from tollgate_dev.recipients import message_to, register_phones
from tollgate_dev.sandbox import FaultSpec, SandboxAdmin
from tollgate_dev.stack import (
    LocalPostgres,
    SandboxProcess,
    TemporalDevServer,
    WorkerProcess,
    free_port,
)

FAULTS = ("worker-kill", "temporal-restart", "postgres-restart", "outage", "5xx", "latency")

#: Short timings: chaos needs many retries to fit in a minute, not realistic backoffs.
CHAOS_RETRY = RetrySettings(
    activity_timeout=timedelta(seconds=4),
    initial_interval=timedelta(milliseconds=200),
    maximum_interval=timedelta(seconds=2),
    maximum_attempts=60,
)
PROVIDER_TIMEOUT = 1.0
#: Seconds between reconciler runs during the load.
RECONCILE_EVERY = 3.0
TASK_QUEUE = "chaos"

#: The status of either lifecycle: the invariants both keep are checked by one method.
Status = TypeVar("Status", OrderStatus, MessageStatus)


@dataclass(frozen=True)
class ChaosConfig:
    """How much load and which faults."""

    duration: float = 60.0
    orders: int = 40
    messages: int = 30
    faults: tuple[str, ...] = FAULTS
    workers: int = 2
    seed: int = 0
    settle_timeout: float = 240.0


class Check(BaseModel):
    """One invariant: how many entities it looked at, and what broke it."""

    model_config = ConfigDict(frozen=True)

    name: str
    checked: int
    violations: list[str]


class ChaosReport(BaseModel):
    """The run, as the table prints it and ``--json`` emits it."""

    model_config = ConfigDict(frozen=True)

    seconds: float
    faults_injected: dict[str, int]
    #: Reconciler runs (with repair on) during the load, and the recoveries they started.
    reconciler_runs: int = 0
    reconciler_repairs: int = 0
    orders: int
    messages: int
    order_statuses: dict[str, int]
    message_statuses: dict[str, int]
    checks: list[Check]

    @property
    def violations(self) -> int:
        return sum(len(c.violations) for c in self.checks)


@dataclass
class _Stack:
    root: Path
    postgres: LocalPostgres
    temporal: TemporalDevServer
    sandbox: SandboxProcess
    workers: list[WorkerProcess] = field(default_factory=list)
    spawned: int = 0

    def env(self) -> dict[str, str]:
        return {
            "TEMPORAL_ADDRESS": self.temporal.address,
            "DATABASE_URL": self.postgres.url,
            "DATABASE_OWNER_URL": self.postgres.owner_url,
            "SANDBOX_URL": self.sandbox.url,
            "TASK_QUEUE": TASK_QUEUE,
            "PROVIDER_TIMEOUT_SECONDS": str(PROVIDER_TIMEOUT),
            "RECONCILE_EVERY_SECONDS": "0",
            "PAYLOAD_KEY_FILE": str(self.key_file),
        }

    @property
    def key_file(self) -> Path:
        return self.root / "payload.key"

    async def add_worker(self) -> None:
        self.spawned += 1
        worker = WorkerProcess(self.env(), log_file=self.root / f"worker-{self.spawned}.log")
        await worker.start()
        self.workers.append(worker)


async def _retrying(what: Callable[[], Awaitable[Any]], *, seconds: float = 90.0) -> Any:
    """Call ``what`` until it succeeds: the driver itself must ride out the faults."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await what()
        except InputError:
            raise
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


class _Driver:
    """Starts lifecycles and plays the customers' and devices' part."""

    def __init__(
        self, client: Client, pool: asyncpg.Pool, rng: random.Random, inventory: Inventory
    ) -> None:
        self.orders = OrderService(client, pool, TASK_QUEUE, inventory=inventory)
        self.messages = MessageService(client, pool, TASK_QUEUE)
        self.rng = rng
        self.order_ids: list[str] = []
        self.message_ids: list[str] = []
        self.run_id = uuid.uuid4().hex[:6]

    async def order(self, n: int) -> None:
        roll = self.rng.random()
        order = build_order(
            order_id=f"chaos-{self.run_id}-o{n}",
            customer_id=f"chaos-customer-{n % 7}",
            items=[{"sku": "SOLDOUT" if roll < 0.15 else "WIDGET", "quantity": 1}],
            amount_cents=500 + n,
            retry=CHAOS_RETRY,
        )
        await self._start(lambda: self.orders.create(order))
        self.order_ids.append(order.order_id)
        if roll > 0.85:  # some customers change their mind mid-checkout
            await asyncio.sleep(self.rng.uniform(0.0, 1.5))
            with contextlib.suppress(Exception):
                await _retrying(
                    lambda: self.orders.cancel(
                        order.order_id, reason="chaos: changed mind", requested_by="chaos"
                    ),
                    seconds=30,
                )

    async def message(self, n: int, recipient: str, devices: list[str]) -> None:
        roll = self.rng.random()
        message = message_to(
            recipient,
            message_id=f"chaos-{self.run_id}-m{n}",
            sender_id="chaos-sender",
            body=f"chaos message {n}",
            deadline=timedelta(seconds=4),
            read_window=timedelta(seconds=3),
            push_heartbeat_timeout=timedelta(seconds=2),
            retry=CHAOS_RETRY,
        )
        await self._start(lambda: self.messages.send(message))
        self.message_ids.append(message.message_id)
        if roll < 0.25:
            return  # nobody confirms: the deadline sends the email
        await asyncio.sleep(self.rng.uniform(0.5, 2.0))
        with contextlib.suppress(Exception):
            await _retrying(
                lambda: self.messages.device_says(message.message_id, devices[0], "delivered"),
                seconds=10,
            )
            if roll > 0.5:
                await _retrying(
                    lambda: self.messages.device_says(message.message_id, devices[1], "read"),
                    seconds=10,
                )

    async def _start(self, start: Callable[[], Awaitable[Any]]) -> None:
        with contextlib.suppress(AlreadyExists):
            # An earlier attempt got through before its answer was lost: the row was
            # committed ("already exists"), or the workflow started and the commit failed
            # ("already has a lifecycle"; its first activity records the row).
            await _retrying(start)


async def _inject(
    stack: _Stack,
    sandbox: SandboxAdmin,
    faults: tuple[str, ...],
    window: float,
    counts: Counter[str],
) -> None:
    """Inject each fault for ``window`` seconds; several at once when given together."""
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def kill_workers() -> None:
        while not stop.is_set():
            await asyncio.sleep(2.5)
            victim = stack.workers.pop(0)
            victim.kill()
            counts["worker-kill"] += 1
            await _retrying(stack.add_worker)

    if "worker-kill" in faults:
        tasks.append(asyncio.create_task(kill_workers()))
    if "temporal-restart" in faults:
        stack.temporal.kill()
        counts["temporal-restart"] += 1
        await asyncio.sleep(1.0)
        await stack.temporal.start()
    if "postgres-restart" in faults:
        await stack.postgres.restart()
        counts["postgres-restart"] += 1
    if "outage" in faults:
        for provider in ("payments", "push"):
            await sandbox.set_fault(provider, FaultSpec(fail_rate=1.0, fail_status=503))
        counts["outage"] += 1
    if "5xx" in faults:
        for provider in ("payments", "inventory", "push", "email"):
            await sandbox.set_fault(
                provider, FaultSpec(fail_rate=0.3, fail_status=500, fail_phase="after")
            )
        counts["5xx"] += 1
    if "latency" in faults:
        for provider in ("payments", "inventory", "push", "email"):
            await sandbox.set_fault(provider, FaultSpec(latency_ms=int(PROVIDER_TIMEOUT * 1500)))
        counts["latency"] += 1
    await asyncio.sleep(window)
    stop.set()
    for task in tasks:
        await task
    await sandbox.clear_faults()


async def _settle(client: Client, workflow_ids: list[str], within: float) -> list[str]:
    """Wait until no workflow runs; return the ids still running at the deadline."""
    deadline = time.monotonic() + within
    pending = list(workflow_ids)
    while pending and time.monotonic() < deadline:
        still = []
        for wid in pending:
            try:
                status = (await client.get_workflow_handle(wid).describe()).status
            except Exception:
                still.append(wid)
                continue
            if status == WorkflowExecutionStatus.RUNNING:
                still.append(wid)
        pending = still
        if pending:
            await asyncio.sleep(1.0)
    return pending


@dataclass
class _Lifecycles:
    """What orders and messages are checked for alike, gathered one entity at a time:
    how many rest in each status, whether its row agrees with its workflow's result, and
    whether every move in its audit is an edge of its graph. (That every one ended is
    gathered here too, in ``settled``.)"""

    client: Client
    settled: list[str]
    agree: list[str] = field(default_factory=list)
    edges: list[str] = field(default_factory=list)
    #: Per kind (``order``, ``message``), how many rows rest in each status.
    statuses: dict[str, Counter[str]] = field(
        default_factory=lambda: {"order": Counter(), "message": Counter()}
    )

    async def check(
        self,
        kind: str,
        entity_id: str,
        status: Status,
        workflow_id: str,
        audit: Sequence[AuditRow[Status]],
        graph: Collection[tuple[Status, Status]],
    ) -> None:
        self.statuses[kind][status.value] += 1
        result = await _result(self.client, workflow_id)
        if result is not None and result != status.value:
            self.agree.append(f"{kind} {entity_id}: workflow {result}, row {status}")
        for a in audit:
            if a.from_status is not None and (a.from_status, a.to_status) not in graph:
                self.edges.append(f"{kind} {entity_id}: {a.from_status} -> {a.to_status}")


async def _checks(
    client: Client, pool: asyncpg.Pool, sandbox: SandboxAdmin, driver: _Driver, unsettled: list[str]
) -> tuple[list[Check], Counter[str], Counter[str]]:
    lifecycles = _Lifecycles(client, settled=[f"{w}: still running" for w in unsettled])
    settled = lifecycles.settled
    one_charge: list[str] = []
    refunded: list[str] = []
    released: list[str] = []
    undone: list[str] = []
    one_email: list[str] = []
    no_double_push: list[str] = []

    for order_id in driver.order_ids:
        row = await order_store.get_order(pool, order_id)
        if row is None:
            settled.append(f"order {order_id}: no row")
            continue
        if not row.status.terminal:
            settled.append(f"order {order_id}: row is {row.status}")
        moves = await order_store.list_transitions(pool, order_id)
        await lifecycles.check(
            "order", order_id, row.status, order_workflow_id(order_id), moves, ORDER_EDGES
        )
        ledger = await sandbox.ledger(order_id)
        if len(ledger.charges) > 1:
            one_charge.append(f"order {order_id}: {len(ledger.charges)} charges")
        if row.status is not OrderStatus.COMPLETED:
            if any(c.status == "captured" for c in ledger.charges):
                refunded.append(f"order {order_id} ({row.status}): charge not refunded")
            if any(r.status == "reserved" for r in ledger.reservations):
                released.append(f"order {order_id} ({row.status}): reservation not released")
        else:
            if ledger.refunds or any(c.status == "refunded" for c in ledger.charges):
                undone.append(f"order {order_id} (COMPLETED): its charge was refunded")
            if ledger.releases or any(r.status == "released" for r in ledger.reservations):
                undone.append(f"order {order_id} (COMPLETED): its reservation was released")

    for message_id in driver.message_ids:
        msg = await message_store.get_message(pool, message_id)
        if msg is None:
            settled.append(f"message {message_id}: no row")
            continue
        audit = await message_store.list_transitions(pool, message_id)
        await lifecycles.check(
            "message", message_id, msg.status, message_workflow_id(message_id), audit, MESSAGE_EDGES
        )
        ledger = await sandbox.ledger(message_id=message_id)
        fell_back = any(a.to_status is MessageStatus.FALLBACK_EMAIL for a in audit)
        emailed = any(a.to_status is MessageStatus.EMAILED for a in audit)
        if (
            (emailed and len(ledger.emails) != 1)
            or (not fell_back and ledger.emails)
            or len(ledger.emails) > 1
        ):
            one_email.append(f"message {message_id}: {len(ledger.emails)} emails ({msg.status})")
        pushes = Counter(p.token for p in ledger.pushes if p.kind == "message")
        for token, n in pushes.items():
            if n > 1:
                no_double_push.append(
                    f"message {message_id}: device token {token} pushed {n} times"
                )

    n_orders, n_messages = len(driver.order_ids), len(driver.message_ids)
    checks = [
        Check(
            name="every lifecycle ended (orders terminal, workflows closed)",
            checked=n_orders + n_messages,
            violations=settled,
        ),
        Check(
            name="Postgres status == workflow result",
            checked=n_orders + n_messages,
            violations=lifecycles.agree,
        ),
        Check(name="at most one charge per order", checked=n_orders, violations=one_charge),
        Check(
            name="every charge of a non-completed order refunded",
            checked=n_orders,
            violations=refunded,
        ),
        Check(
            name="every reservation of a non-completed order released",
            checked=n_orders,
            violations=released,
        ),
        Check(
            name="nothing of a COMPLETED order refunded or released",
            checked=n_orders,
            violations=undone,
        ),
        Check(
            name="exactly one email per fallback message, none otherwise",
            checked=n_messages,
            violations=one_email,
        ),
        Check(name="no device pushed twice", checked=n_messages, violations=no_double_push),
        Check(
            name="every audited transition is an edge",
            checked=n_orders + n_messages,
            violations=lifecycles.edges,
        ),
    ]
    return checks, lifecycles.statuses["order"], lifecycles.statuses["message"]


async def _result(client: Client, workflow_id: str) -> str | None:
    handle = client.get_workflow_handle(workflow_id)
    try:
        description = await handle.describe()
        if description.status != WorkflowExecutionStatus.COMPLETED:
            return None
        result = await handle.result()
    except Exception:
        return None
    status = result.get("status") if isinstance(result, dict) else getattr(result, "status", None)
    return str(status) if status is not None else None


async def run_chaos(config: ChaosConfig, root: Path) -> ChaosReport:
    """Bring up a throw-away stack in ``root``, run load under faults, check invariants."""
    unknown = set(config.faults) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown fault(s) {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    began = time.monotonic()
    rng = random.Random(config.seed)
    postgres = LocalPostgres(root / "pgdata", free_port(), durable=False)
    temporal = TemporalDevServer(
        free_port(), None, db_filename=root / "temporal.db", log_file=root / "temporal.log"
    )
    sandbox_proc = SandboxProcess(free_port(), log_file=root / "sandbox.log")
    stack = _Stack(root, postgres, temporal, sandbox_proc)
    counts: Counter[str] = Counter()
    reconciler: Counter[str] = Counter()
    try:
        ensure_key_file(stack.key_file)
        await postgres.start()
        await apply_migrations(postgres.owner_url)
        await temporal.start()
        await sandbox_proc.start()
        for _ in range(config.workers):
            await stack.add_worker()

        settings = Settings(
            temporal_address=temporal.address,
            database_url=postgres.url,
            sandbox_url=sandbox_proc.url,
            payload_key_file=stack.key_file,
        )
        client = await connect(settings)
        pool = await create_pool(postgres.url, max_size=10)
        try:
            async with (
                SandboxAdmin(sandbox_proc.url) as sandbox,
                build_http_client(settings) as http,
            ):
                driver = _Driver(client, pool, rng, Inventory(http))
                recipients = []
                for r in range(5):
                    user = f"chaos-{driver.run_id}-user{r}"
                    recipients.append((user, await register_phones(driver.messages, user, 2)))

                total = config.orders + config.messages
                kinds = ["order"] * config.orders + ["message"] * config.messages
                rng.shuffle(kinds)
                spacing = config.duration * 0.8 / max(1, total)

                async def generate() -> None:
                    lifecycles = []
                    for n, kind in enumerate(kinds):
                        if kind == "order":
                            lifecycles.append(asyncio.create_task(driver.order(n)))
                        else:
                            user, ids = recipients[n % len(recipients)]
                            lifecycles.append(asyncio.create_task(driver.message(n, user, ids)))
                        await asyncio.sleep(spacing)
                    await asyncio.gather(*lifecycles)

                async def faults() -> None:
                    singles = [f for f in FAULTS if f in config.faults]
                    window = config.duration / (len(singles) + 2)
                    for fault in singles:
                        await _inject(stack, sandbox, (fault,), window, counts)
                    await _inject(stack, sandbox, tuple(singles), window, counts)

                async def reconcile_now_and_then() -> None:
                    # The reconciler runs with repair on throughout, as the worker's
                    # schedule would: it must never take a lifecycle that finishes while
                    # it looks for orphaned (the check above proves it did not).
                    options = ReconcileInput(
                        repair=True, grace=timedelta(seconds=2), lookback=timedelta(hours=1)
                    )
                    while True:
                        await asyncio.sleep(RECONCILE_EVERY)
                        try:
                            report = await reconcile(
                                client, pool, task_queue=TASK_QUEUE, options=options
                            )
                        except Exception:
                            continue  # Temporal or Postgres is down: the next run looks
                        reconciler["runs"] += 1
                        reconciler["repairs"] += sum(
                            1 for f in report.findings if f.repair_workflow_id
                        )

                reconciling = asyncio.create_task(reconcile_now_and_then())
                try:
                    await asyncio.gather(generate(), faults())
                finally:
                    reconciling.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reconciling
                await sandbox.clear_faults()
                while len(stack.workers) < config.workers:
                    await _retrying(stack.add_worker)
                unsettled = await _settle(
                    client,
                    [order_workflow_id(o) for o in driver.order_ids]
                    + [message_workflow_id(m) for m in driver.message_ids],
                    config.settle_timeout,
                )
                checks, order_statuses, message_statuses = await _checks(
                    client, pool, sandbox, driver, unsettled
                )
        finally:
            await pool.close()
        return ChaosReport(
            seconds=round(time.monotonic() - began, 1),
            faults_injected=dict(counts),
            reconciler_runs=reconciler["runs"],
            reconciler_repairs=reconciler["repairs"],
            orders=len(driver.order_ids),
            messages=len(driver.message_ids),
            order_statuses=dict(sorted(order_statuses.items())),
            message_statuses=dict(sorted(message_statuses.items())),
            checks=checks,
        )
    finally:
        for worker in stack.workers:
            worker.kill()
        for part in (sandbox_proc, temporal, postgres):
            with contextlib.suppress(Exception):
                await part.stop()


def print_report(report: ChaosReport, console: Console) -> None:
    """The table ``make chaos`` ends with."""
    faults = ", ".join(f"{k} x{v}" for k, v in sorted(report.faults_injected.items())) or "none"
    console.print(f"faults injected: {faults}")
    console.print(
        f"reconciler: {report.reconciler_runs} runs with repair on, "
        f"{report.reconciler_repairs} recoveries started"
    )
    console.print(
        f"entities: {report.orders} orders {report.order_statuses}, "
        f"{report.messages} messages {report.message_statuses}; {report.seconds} s"
    )
    table = Table("invariant", "checked", "violations", title="Tollgate chaos")
    for check in report.checks:
        colour = "green" if not check.violations else "red"
        table.add_row(
            check.name, str(check.checked), f"[{colour}]{len(check.violations)}[/{colour}]"
        )
    console.print(table)
    for check in report.checks:
        for violation in check.violations:
            console.print(f"[red]VIOLATION[/red] {check.name}: {violation}")


def main(argv: list[str] | None = None) -> None:
    """``python -m tollgate_dev.chaos``: the long chaos run (``make chaos``)."""
    parser = argparse.ArgumentParser(
        prog="python -m tollgate_dev.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load and faults")
    parser.add_argument("--orders", type=int, default=40)
    parser.add_argument("--messages", type=int, default=30)
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)}"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    config = ChaosConfig(
        duration=args.duration,
        orders=args.orders,
        messages=args.messages,
        faults=tuple(f for f in args.faults.split(",") if f),
        seed=args.seed,
    )
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    with tempfile.TemporaryDirectory(prefix="tollgate-chaos-") as root:
        try:
            report = asyncio.run(run_chaos(config, Path(root)))
        except ValueError as exc:
            console.print(f"error: {exc}", markup=False)
            sys.exit(2)
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print_report(report, console)
    sys.exit(1 if report.violations else 0)


if __name__ == "__main__":
    main()
