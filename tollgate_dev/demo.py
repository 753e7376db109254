"""The demo scenarios: each order's expected end, checked against Postgres and the ledger.

Run by ``python starter.py demo`` against a running stack, and by ``make demo`` after it
brings one up. The scenarios script provider faults through the sandbox's admin API,
so they run one after another (faults are per provider, not per order).
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.table import Table

from tollgate import access, postgres
from tollgate.api.signatures import load_webhook_secrets
from tollgate.messages.service import MessageService
from tollgate.names import ORDER_STATUS_QUERY
from tollgate.orders.models import OrderInput, OrderProgress, OrderResult
from tollgate.orders.service import OrderService, build_order
from tollgate.orders.states import OrderStatus
from tollgate.providers.client import build_http_client
from tollgate.providers.inventory import Inventory
from tollgate.settings import Settings
from tollgate.temporal import connect
from tollgate_dev.api_client import ApiCaller
from tollgate_dev.demo_messages import (
    API_MESSAGE_SCENARIO,
    DEMO_RETRY,
    MESSAGE_SCENARIOS,
    MessageRun,
    MessageScenario,
    run_api_message_scenario,
    run_message_scenario,
)
from tollgate_dev.sandbox import FaultSpec, Ledger, SandboxAdmin
from tollgate_dev.stack import LocalStack, StackError, stack_is_up


class LedgerCounts(BaseModel):
    """What the sandbox ledger holds for one order."""

    model_config = ConfigDict(frozen=True)

    charged: int
    captured: int
    refunded: int
    reserved: int
    released: int

    @classmethod
    def of(cls, ledger: Ledger) -> LedgerCounts:
        return cls(
            charged=len(ledger.charges),
            captured=sum(1 for c in ledger.charges if c.status == "captured"),
            refunded=len(ledger.refunds),
            reserved=len(ledger.reservations),
            released=len(ledger.releases),
        )

    def money(self) -> str:
        """Charges as a person reads them: ``1 captured``, ``1 refunded``, ``none``."""
        parts = [f"{self.captured} captured"] if self.captured else []
        if self.refunded:
            parts.append(f"{self.refunded} refunded")
        return ", ".join(parts) or "none"

    def stock(self) -> str:
        """Reservations: ``1 held``, ``1 released``, ``none``."""
        held = self.reserved - self.released
        parts = [f"{held} held"] if held else []
        if self.released:
            parts.append(f"{self.released} released")
        return ", ".join(parts) or "none"

    def describe(self) -> str:
        return f"charges: {self.money()}; stock: {self.stock()}"


class DemoOutcome(BaseModel):
    """One scenario's result and whether it matched what was expected."""

    model_config = ConfigDict(frozen=True)

    scenario: str
    entity_id: str
    status: str
    expected_status: str
    effects: str
    expected_effects: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.status == self.expected_status and self.effects == self.expected_effects


@dataclass(frozen=True)
class Scenario:
    name: str
    customer: str
    items: list[tuple[str, int]]
    amount_cents: int
    expected_status: OrderStatus
    expected_ledger: LedgerCounts
    #: Runs after the order starts and before its result is awaited (faults, cancels).
    drive: Callable[[DemoContext, str], Awaitable[None]] | None = None
    #: Runs before the order starts (set faults, declines).
    prepare: Callable[[SandboxAdmin], Awaitable[None]] | None = None


@dataclass(frozen=True)
class DemoContext:
    service: OrderService
    sandbox: SandboxAdmin


async def _decline_mallory(sandbox: SandboxAdmin) -> None:
    await sandbox.decline_customer("mallory")


async def _flaky_gateway(sandbox: SandboxAdmin) -> None:
    # "after": the gateway charges, then the answer is lost. The retries reuse the
    # idempotency key and get the original charge back instead of charging again.
    await sandbox.set_fault("payments", FaultSpec(fail_next=3, fail_status=503, fail_phase="after"))


async def _slow_inventory(sandbox: SandboxAdmin) -> None:
    # The reservation lands at once but its answer takes seconds: an outcome the
    # workflow cannot know when the cancellation arrives.
    await sandbox.set_fault("inventory", FaultSpec(latency_ms=3000, latency_phase="after"))


async def _cancel_while_reserving(ctx: DemoContext, order_id: str) -> None:
    handle = ctx.service.handle(order_id)
    for _ in range(400):
        progress = await handle.query(ORDER_STATUS_QUERY, result_type=OrderProgress)
        if progress.step == "reserving":
            break
        await asyncio.sleep(0.05)
    else:
        raise RuntimeError(f"{order_id} never reached the reserving step")
    await asyncio.sleep(0.3)  # let the reservation request reach the provider
    await ctx.service.cancel(order_id, reason="customer changed their mind", requested_by="demo")


def _counts(
    charged: int, captured: int, refunded: int, reserved: int, released: int
) -> LedgerCounts:
    return LedgerCounts(
        charged=charged, captured=captured, refunded=refunded, reserved=reserved, released=released
    )


#: The order scenarios, a row each: what is ordered, how the order must end and what the
#: ledger must then hold (charged, captured, refunded, reserved, released), and the
#: faults or actions that make it end so. A table, so that rows compare at a glance.
# fmt: off
SCENARIOS: tuple[Scenario, ...] = (
    Scenario("happy path",                    "alice",   [("WIDGET", 2)],  1998, OrderStatus.COMPLETED, _counts(1, 1, 0, 1, 0)),
    Scenario("declined card",                 "mallory", [("WIDGET", 1)],   999, OrderStatus.FAILED,    _counts(0, 0, 0, 0, 0), prepare=_decline_mallory),
    Scenario("out of stock",                  "bob",     [("SOLDOUT", 1)], 4999, OrderStatus.FAILED,    _counts(1, 0, 1, 0, 0)),
    Scenario("cancel while reserving (slow)", "carol",   [("GADGET", 1)],  2500, OrderStatus.CANCELLED, _counts(1, 0, 1, 1, 1), prepare=_slow_inventory, drive=_cancel_while_reserving),
    Scenario("gateway fails 3x, recovers",    "dave",    [("GIZMO", 3)],   7497, OrderStatus.COMPLETED, _counts(1, 1, 0, 1, 0), prepare=_flaky_gateway),
)
# fmt: on


async def run_scenario(ctx: DemoContext, scenario: Scenario, run_id: str) -> DemoOutcome:
    """Start one scenario's order, drive it, and compare its end with the expectation."""
    order: OrderInput = build_order(
        order_id=f"demo-{run_id}-{scenario.customer}",
        customer_id=scenario.customer,
        items=[{"sku": s, "quantity": q} for s, q in scenario.items],
        amount_cents=scenario.amount_cents,
        currency="USD",
        retry=DEMO_RETRY,
    )
    await ctx.sandbox.clear_faults()
    if scenario.prepare:
        await scenario.prepare(ctx.sandbox)
    try:
        handle = await ctx.service.create(order)
        if scenario.drive:
            await scenario.drive(ctx, order.order_id)
        result: OrderResult = await handle.result()
    finally:
        await ctx.sandbox.clear_faults()
    row = await ctx.service.row(order.order_id)
    ledger = LedgerCounts.of(await ctx.sandbox.ledger(order.order_id))
    detail = row.failure_reason or row.cancel_reason or ""
    if result.compensations:
        detail = f"{detail} [{', '.join(result.compensations)}]".strip()
    return DemoOutcome(
        scenario=scenario.name,
        entity_id=order.order_id,
        expected_status=scenario.expected_status.value,
        status=row.status.value,
        expected_effects=scenario.expected_ledger.describe(),
        effects=ledger.describe(),
        detail=detail,
    )


#: The API order: charged before the answer (``?wait=charged``), sent twice.
API_ORDER = Scenario(
    "via the HTTP API, sent twice",
    "erin",
    [("WIDGET", 1)],
    1250,
    OrderStatus.COMPLETED,
    _counts(1, 1, 0, 1, 0),
)


async def run_api_order(
    api: ApiCaller, ctx: DemoContext, scenario: Scenario = API_ORDER
) -> DemoOutcome:
    """Create an order over HTTP waiting for its charge, send the same request again
    (a storefront whose connection dropped), and compare its end as for the others."""
    body = {
        "customer_id": scenario.customer,
        "items": [{"sku": s, "quantity": q} for s, q in scenario.items],
        "amount_cents": scenario.amount_cents,
    }
    key = uuid.uuid4().hex
    await ctx.sandbox.clear_faults()
    first = await api.request(
        "POST", "/v1/orders?wait=charged", body=body, headers=api.auth_headers(key)
    )
    first.raise_for_status()
    again = await api.request("POST", "/v1/orders", body=body, headers=api.auth_headers(key))
    again.raise_for_status()
    order_id: str = first.json()["id"]
    result = await ctx.service.handle(order_id).result()
    row = await ctx.service.row(order_id)
    ledger = LedgerCounts.of(await ctx.sandbox.ledger(order_id))
    detail = f"answered {first.json()['status']} at once; the retry: same order" + (
        "" if again.json()["id"] == order_id else f" NO: {again.json()['id']}"
    )
    if result.status is not row.status:
        detail += f"; workflow says {result.status}"
    return DemoOutcome(
        scenario=scenario.name,
        entity_id=order_id,
        expected_status=scenario.expected_status.value,
        status=row.status.value,
        expected_effects=scenario.expected_ledger.describe(),
        effects=ledger.describe(),
        detail=detail,
    )


def _message_outcome(scenario: MessageScenario, ran: MessageRun) -> DemoOutcome:
    """A message scenario's row: how it ended against how it should have."""
    message_id, status, effects, detail = ran
    # Without pinned effects (timing decides how many devices were pushed), whatever was
    # pushed is right, as long as nothing was emailed or pushed twice.
    expected = scenario.expected or effects.model_copy(update={"emails": 0, "duplicate_pushes": 0})
    return DemoOutcome(
        scenario=scenario.name,
        entity_id=message_id,
        status=status.value,
        expected_status=scenario.expected_status.value,
        effects=effects.describe(),
        expected_effects=expected.describe(),
        detail=detail,
    )


async def run_demo(settings: Settings) -> list[DemoOutcome]:
    """Run every order and message scenario against the stack the settings point at."""
    client = await connect(settings)
    pool = await postgres.create_pool(settings.database_url, max_size=4)
    run_id = uuid.uuid4().hex[:6]
    outcomes: list[DemoOutcome] = []
    try:
        async with (
            SandboxAdmin(settings.sandbox_url) as sandbox,
            build_http_client(settings) as http,
        ):
            orders = OrderService(client, pool, settings.task_queue, inventory=Inventory(http))
            ctx = DemoContext(orders, sandbox)
            outcomes += [await run_scenario(ctx, s, run_id) for s in SCENARIOS]
            # The same system through its HTTP front door: a key for the demo's client,
            # and the stack's webhook secret to sign receipts with.
            key = (await access.create_key(pool, "demo")).key
            secrets = load_webhook_secrets(settings)
            secret = secrets[0] if secrets else None
            async with aclosing(ApiCaller(settings.api_url, key, webhook_secret=secret)) as api:
                outcomes.append(await run_api_order(api, ctx))
            messages = MessageService(client, pool, settings.task_queue)
            for n, scenario in enumerate(MESSAGE_SCENARIOS):
                ran = await run_message_scenario(messages, sandbox, scenario, run_id, n)
                outcomes.append(_message_outcome(scenario, ran))
            async with aclosing(ApiCaller(settings.api_url, key, webhook_secret=secret)) as api:
                message_id, status, effects, detail = await run_api_message_scenario(
                    api, messages, sandbox, run_id
                )
            if "(want" in detail:  # a receipt not applied exactly once fails the row
                detail += "; " + effects.describe()
                effects = effects.model_copy(update={"duplicate_pushes": -1})
            ran = (message_id, status, effects, detail)
            outcomes.append(_message_outcome(API_MESSAGE_SCENARIO, ran))
    finally:
        await pool.close()
    return outcomes


def print_outcomes(outcomes: list[DemoOutcome], settings: Settings, console: Console) -> None:
    """The table ``make demo`` ends with, and where to look next."""
    table = Table(title="Tollgate demo")
    table.add_column("scenario")
    # ids are what a reader copies into `order status` / `message status`: never cut them
    table.add_column(
        "id", no_wrap=True, min_width=max((len(o.entity_id) for o in outcomes), default=2)
    )
    table.add_column("status")
    table.add_column("effects (sandbox ledger)")
    table.add_column("ok")
    for o in outcomes:
        status = (
            o.status if o.status == o.expected_status else f"{o.status} (want {o.expected_status})"
        )
        effects = (
            o.effects
            if o.effects == o.expected_effects
            else f"{o.effects} (want {o.expected_effects})"
        )
        table.add_row(o.scenario, o.entity_id, status, effects, "yes" if o.ok else "[red]NO[/red]")
    console.print(table)
    console.print(
        f"Web UI: {settings.temporal_ui_url}/namespaces/{settings.temporal_namespace}/workflows"
    )
    console.print(
        "Inspect one: python starter.py order status <id>  |  python starter.py message status <id>"
    )


async def _main(console: Console) -> bool:
    settings = Settings()
    if await stack_is_up(settings):
        console.print(f"Using the running stack (Temporal at {settings.temporal_address}).")
        outcomes = await run_demo(settings)
        print_outcomes(outcomes, settings, console)
        return all(o.ok for o in outcomes)

    console.print(f"Starting the local stack in {settings.state_dir}/ ...")
    async with LocalStack.from_settings(settings) as stack:
        settings = stack.client_settings()
        outcomes = await run_demo(settings)
        print_outcomes(outcomes, settings, console)
    console.print(
        "The stack has stopped; its state is kept in "
        f"{settings.state_dir}/. Run `make up` to browse these workflows in the Web UI."
    )
    return all(o.ok for o in outcomes)


def main() -> None:
    """``make demo``: run the scenarios, on the running stack or on one started here."""
    # Piped output (CI logs) gets a fixed width so the table is not squeezed to 80 columns.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 110)
    try:
        ok = asyncio.run(_main(console))
    except StackError as exc:
        console.print(f"error: {exc}", markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    if not ok:
        console.print("[red]Some outcomes differ from what was expected.[/red]")
        sys.exit(1)


if __name__ == "__main__":
    main()
