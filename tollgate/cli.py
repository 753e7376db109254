"""``python starter.py``: the command line users drive Tollgate from.

Every command takes ``--json`` for scripts. Bad input gets one line on stderr naming
the problem and exit status 2; a refusal (cancel a finished order, unknown order) gets
one line and exit status 1. Nothing is written for rejected input.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import asyncpg
from cyclopts import App, CycloptsError, Parameter
from rich.console import Console
from rich.table import Table
from temporalio.client import WorkflowFailureError
from temporalio.service import RPCError

from tollgate import db
from tollgate.errors import InputError, OrderNotFound, TollgateError
from tollgate.models import OrderResult
from tollgate.service import OrderReport, OrderService, build_order, parse_amount, parse_item
from tollgate.settings import Settings
from tollgate.temporal import connect

EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2

app = App(name="starter.py", help="Drive Tollgate's order lifecycles.", version_flags=[])
order_app = App(name="order", help="Create, cancel and inspect orders.")
app.command(order_app)

_out = Console(highlight=False)
_err = Console(stderr=True, highlight=False)

JsonFlag = Annotated[bool, Parameter(name="--json", negative=(), help="Print JSON for scripts.")]
WaitFlag = Annotated[bool, Parameter(negative=(), help="Wait for the order to finish.")]


class Refused(Exception):
    """The request was understood and refused; exit status 1."""


def _emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


@asynccontextmanager
async def _service(settings: Settings) -> AsyncIterator[OrderService]:
    try:
        pool = await db.create_pool(settings.database_url, max_size=2)
    except (OSError, asyncpg.PostgresError) as exc:
        raise Refused(
            f"cannot reach Postgres at DATABASE_URL ({type(exc).__name__}: {exc}); "
            "is the local stack up (make up)?"
        ) from None
    try:
        try:
            client = await connect(settings)
        except RuntimeError as exc:
            raise Refused(
                f"cannot reach Temporal at {settings.temporal_address} ({exc}); "
                "is the local stack up (make up)?"
            ) from None
        yield OrderService(client, pool, settings.task_queue)
    finally:
        await pool.close()


def _result_dict(result: OrderResult) -> dict[str, Any]:
    return result.model_dump(mode="json")


async def _wait(service: OrderService, order_id: str) -> OrderResult | str:
    try:
        return await service.handle(order_id).result()
    except WorkflowFailureError as exc:
        # Cancelled from Temporal, terminated, or failed: Postgres has the row's truth.
        row = await service.row(order_id)
        return f"workflow ended without a result ({exc.cause}); the order is {row.status}"


@order_app.command
async def create(
    *,
    customer: str,
    item: Annotated[list[str], Parameter(name="--item", help="SKU:QTY, repeatable.")],
    amount: Annotated[str, Parameter(help="Total in major units, e.g. 12.34.")],
    currency: str = "USD",
    order_id: str | None = None,
    wait: WaitFlag = False,
    json: JsonFlag = False,
) -> None:
    """Create an order and start its checkout."""
    order = build_order(
        order_id=order_id or f"ord-{uuid.uuid4().hex[:12]}",
        customer_id=customer,
        items=[parse_item(i) for i in item],
        amount_cents=parse_amount(amount),
        currency=currency.upper(),
    )
    settings = Settings()
    async with _service(settings) as service:
        handle = await service.create(order)
        out: dict[str, Any] = {"order_id": order.order_id, "workflow_id": handle.id}
        if wait:
            result = await _wait(service, order.order_id)
            out["result"] = _result_dict(result) if isinstance(result, OrderResult) else result
    if json:
        _emit_json(out)
        return
    _out.print(f"order {order.order_id} started as workflow {handle.id}")
    _out.print(
        f"Web UI: {settings.temporal_ui_url}/namespaces/{settings.temporal_namespace}/workflows/{handle.id}"
    )
    if "result" in out:
        _print_result(out["result"])


def _print_result(result: dict[str, Any] | str) -> None:
    if isinstance(result, str):
        _out.print(result)
        return
    line = f"final status: [bold]{result['status']}[/bold] (version {result['version']})"
    if result.get("failure_reason"):
        line += f" - {result['failure_reason']}"
    if result.get("compensations"):
        line += f"; compensations: {', '.join(result['compensations'])}"
    _out.print(line)


@order_app.command
async def cancel(
    order_id: str,
    *,
    reason: str = "cancelled by request",
    wait: WaitFlag = False,
    json: JsonFlag = False,
) -> None:
    """Cancel an order: record it in Postgres, then tell the workflow to compensate."""
    settings = Settings()
    async with _service(settings) as service:
        outcome = await service.cancel(order_id, reason=reason, requested_by=getpass.getuser())
        out: dict[str, Any] = outcome.model_dump(mode="json")
        if outcome.recorded and wait and outcome.signalled:
            result = await _wait(service, order_id)
            out["result"] = _result_dict(result) if isinstance(result, OrderResult) else result
    if json:
        _emit_json(out)
    else:
        _out.print(outcome.message)
        if "result" in out:
            _print_result(out["result"])
    if not outcome.recorded:
        raise SystemExit(EXIT_REFUSED)


@order_app.command
async def status(order_id: str, *, json: JsonFlag = False) -> None:
    """Show an order: Postgres status and version, audited transitions, workflow status."""
    settings = Settings()
    async with _service(settings) as service:
        report = await service.report(order_id)
    if json:
        _emit_json(report.model_dump(mode="json"))
    else:
        _print_report(report)


def _print_report(report: OrderReport) -> None:
    o = report.order
    _out.print(
        f"order [bold]{o.id}[/bold]: [bold]{o.status}[/bold] (version {o.version}), "
        f"{o.amount_cents / 100:.2f} {o.currency} for {o.customer_id}"
    )
    _out.print("items: " + ", ".join(f"{i.sku} x{i.quantity}" for i in o.items))
    if o.failure_reason:
        _out.print(f"failure: {o.failure_reason}")
    if o.cancel_reason:
        _out.print(f"cancel reason: {o.cancel_reason}")
    wf = report.workflow_status or "not found"
    if report.workflow_progress:
        wf += f", step {report.workflow_progress.step}"
    _out.print(f"workflow {report.workflow_id}: {wf}")
    table = Table("at", "from", "to", "version", "actor", "reason")
    for t in report.transitions:
        table.add_row(
            t.at.astimezone().strftime("%H:%M:%S.%f")[:-3],
            t.from_status or "-",
            t.to_status,
            f"{t.from_version or '-'} -> {t.to_version}",
            t.actor,
            t.reason or "",
        )
    _out.print(table)


@app.command
async def demo(*, json: JsonFlag = False) -> None:
    """Run the demo scenarios against a running stack and print their outcomes."""
    from tollgate.demo import print_outcomes, run_demo

    settings = Settings()
    outcomes = await run_demo(settings)
    if json:
        _emit_json([o.model_dump(mode="json") for o in outcomes])
    else:
        print_outcomes(outcomes, settings, _out)
    if not all(o.ok for o in outcomes):
        raise SystemExit(EXIT_REFUSED)


def _fail(message: str, code: int) -> None:
    _err.print(f"error: {message}", markup=False, soft_wrap=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run one command, turning every expected failure into one line."""
    args = sys.argv[1:] if argv is None else argv
    try:
        result = app(args, exit_on_error=False, print_error=False)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    except CycloptsError as exc:
        _fail(" ".join(str(exc).split()), EXIT_BAD_INPUT)
    except InputError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    except (OrderNotFound, Refused) as exc:
        _fail(str(exc), EXIT_REFUSED)
    except TollgateError as exc:
        _fail(f"{type(exc).__name__}: {exc}", EXIT_REFUSED)
    except RPCError as exc:
        _fail(f"Temporal refused the request: {exc.message}", EXIT_REFUSED)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
