"""``python starter.py``: the command line users drive Tollgate from.

Every command takes ``--json`` for scripts. Bad input gets one line on stderr naming
the problem and exit status 2; a refusal (cancel a finished order, unknown order) gets
one line and exit status 1. Nothing is written for rejected input.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import sys
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, NoReturn, TypeVar

import asyncpg
from cyclopts import App, CycloptsError, Parameter
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from temporalio.client import Client, WorkflowFailureError
from temporalio.service import RPCError

from tollgate import access, gate, postgres
from tollgate.errors import ConfigError, InputError, NotFound, NotRunning, TollgateError
from tollgate.ids import require_safe_id
from tollgate.messages.service import MessageReport, MessageService, build_message, parse_duration
from tollgate.messages.states import DELIVERY_SETTLED, MessageStatus
from tollgate.orders.models import OrderResult
from tollgate.orders.service import OrderReport, OrderService, build_order, parse_amount, parse_item
from tollgate.orders.states import OrderStatus
from tollgate.providers.client import build_http_client
from tollgate.providers.inventory import Inventory
from tollgate.settings import Settings
from tollgate.telemetry import configure_tracing
from tollgate.temporal import connect, data_converter
from tollgate.tracing import tracer

EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2

app = App(
    name="starter.py", help="Drive Tollgate's order and message lifecycles.", version_flags=[]
)
order_app = App(name="order", help="Create, cancel and inspect orders.")
message_app = App(name="message", help="Send, recall and inspect messages; act as a device.")
device_app = App(name="device", help="Register the devices messages are pushed to.")
apikey_app = App(name="apikey", help="Create and revoke the keys HTTP API clients call with.")
app.command(order_app)
app.command(message_app)
app.command(device_app)
app.command(apikey_app)

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

JsonFlag = Annotated[bool, Parameter(name="--json", negative=(), help="Print JSON for scripts.")]
WaitFlag = Annotated[bool, Parameter(negative=(), help="Wait for the order to finish.")]


ModelT = TypeVar("ModelT", bound=BaseModel)


class Refused(Exception):
    """The request was understood and refused; exit status 1."""


def emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _show(value: ModelT, as_json: bool, render: Callable[[ModelT], None]) -> None:
    """``value`` as JSON for scripts (``--json``), else as ``render`` prints it for people."""
    if as_json:
        emit_json(value.model_dump(mode="json"))
    else:
        render(value)


def _say(line: str) -> None:
    """One line of plain text: data, some of it typed by users, never markup."""
    console.print(line, markup=False)


@asynccontextmanager
async def app_pool(settings: Settings, *, max_size: int = 2) -> AsyncIterator[asyncpg.Pool]:
    """A small pool as the application role, closed on the way out; refused in one line
    when Postgres cannot be reached."""
    try:
        pool = await postgres.create_pool(settings.database_url, max_size=max_size)
    except (OSError, asyncpg.PostgresError) as exc:
        raise Refused(
            f"cannot reach Postgres at DATABASE_URL ({type(exc).__name__}: {exc}); "
            "is the local stack up (make up)?"
        ) from None
    try:
        yield pool
    finally:
        await pool.close()


@asynccontextmanager
async def connected(
    settings: Settings, *, pool_size: int = 2
) -> AsyncIterator[tuple[Client, asyncpg.Pool]]:
    """A Temporal client and a pool of ``pool_size`` connections (a start holds one until
    Temporal answers: a command running many at once needs as many)."""
    # The payload key first: a process that would send plaintext must not connect at all.
    converter = data_converter(settings)
    async with app_pool(settings, max_size=pool_size) as pool:
        try:
            client = await connect(settings, converter=converter)
        except RuntimeError as exc:
            raise Refused(
                f"cannot reach Temporal at {settings.temporal_address} ({exc}); "
                "is the local stack up (make up)?"
            ) from None
        yield client, pool


@asynccontextmanager
async def _service(settings: Settings) -> AsyncIterator[OrderService]:
    async with connected(settings) as (client, pool), build_http_client(settings) as http:
        yield OrderService(client, pool, settings.task_queue, inventory=Inventory(http))


@asynccontextmanager
async def _messages(settings: Settings) -> AsyncIterator[MessageService]:
    async with connected(settings) as (client, pool):
        yield MessageService(client, pool, settings.task_queue)


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
        emit_json(out)
        return
    console.print(f"order {order.order_id} started as workflow {handle.id}", markup=False)
    console.print(
        f"Web UI: {settings.temporal_ui_url}/namespaces/{settings.temporal_namespace}/workflows/{handle.id}"
    )
    if "result" in out:
        _print_result(out["result"])


def _print_result(result: dict[str, Any] | str) -> None:
    if isinstance(result, str):
        console.print(result, markup=False)
        return
    line = f"final status: [bold]{result['status']}[/bold] (version {result['version']})"
    if result.get("failure_reason"):
        line += f" - {escape(result['failure_reason'])}"
    if result.get("compensations"):
        line += f"; compensations: {', '.join(result['compensations'])}"
    console.print(line)


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
        emit_json(out)
    else:
        console.print(outcome.message, markup=False)
        if "result" in out:
            _print_result(out["result"])
    if not outcome.recorded:
        raise SystemExit(EXIT_REFUSED)


@order_app.command
async def status(order_id: str, *, json: JsonFlag = False) -> None:
    """Show an order: Postgres status and version, audited transitions, workflow status."""
    async with _service(Settings()) as service:
        report = await service.report(order_id)
    _show(report, json, _print_report)


def _transitions_table(
    transitions: Sequence[gate.AuditRow[OrderStatus] | gate.AuditRow[MessageStatus]],
) -> Table:
    """The audit trail as a table: when, from, to, versions, who, why."""
    table = Table("at", "from", "to", "version", "actor", "reason")
    for t in transitions:
        table.add_row(
            t.at.astimezone().strftime("%H:%M:%S.%f")[:-3],
            t.from_status or "-",
            t.to_status,
            f"{t.from_version or '-'} -> {t.to_version}",
            Text(t.actor),
            Text(t.reason or ""),
        )
    return table


def _print_workflow(report: OrderReport | MessageReport) -> None:
    """The lifecycle's workflow: its status as Temporal has it, and the step it is at."""
    wf = report.workflow_status or "not found"
    if report.workflow_progress:
        wf += f", step {report.workflow_progress.step}"
    _say(f"workflow {report.workflow_id}: {wf}")


def _print_report(report: OrderReport) -> None:
    # Everything but the styling is data, some of it typed by users: escaped, never markup.
    o = report.order
    console.print(
        f"order [bold]{escape(o.id)}[/bold]: [bold]{o.status}[/bold] (version {o.version}), "
        f"{o.amount_cents / 100:.2f} {o.currency} for {escape(o.customer_id)}"
    )
    console.print("items: " + ", ".join(f"{i.sku} x{i.quantity}" for i in o.items), markup=False)
    if o.failure_reason:
        console.print(f"failure: {o.failure_reason}", markup=False)
    if o.cancel_reason:
        console.print(f"cancel reason: {o.cancel_reason}", markup=False)
    _print_workflow(report)
    console.print(_transitions_table(report.transitions))


@device_app.command
async def register(
    *,
    user: str,
    token: str,
    platform: Literal["ios", "android", "web"] = "ios",
    device_id: str | None = None,
    json: JsonFlag = False,
) -> None:
    """Register a device of USER with its push TOKEN."""
    async with _messages(Settings()) as service:
        row = await service.register_device(
            device_id=device_id or f"dev-{uuid.uuid4().hex[:10]}",
            user_id=user,
            push_token=token,
            platform=platform,
        )
    _show(row, json, lambda r: _say(f"device {r.id} registered for {r.user_id} ({r.platform})"))


@device_app.command
async def remove(device_id: str, *, json: JsonFlag = False) -> None:
    """Stop pushing to DEVICE_ID (it frees a place under the per-user device limit)."""
    async with _messages(Settings()) as service:
        row = await service.remove_device(device_id)
    _show(row, json, lambda r: _say(f"device {r.id} of {r.user_id} removed"))


@message_app.command
async def send(
    *,
    sender: str,
    recipient: str,
    body: str,
    deadline: Annotated[
        str, Parameter(help="No delivery confirmation by then: email. e.g. 30s")
    ] = "30s",
    email: Annotated[
        str | None, Parameter(help="Fallback address (default RECIPIENT@example.com).")
    ] = None,
    message_id: str | None = None,
    wait: Annotated[
        bool, Parameter(negative=(), help="Wait until delivered (or --until), up to --timeout.")
    ] = False,
    until: Annotated[
        MessageStatus | None,
        Parameter(help="With --wait: the status to wait for (default: delivered or emailed)."),
    ] = None,
    wait_timeout: Annotated[
        str, Parameter(name="--timeout", help="With --wait: give up after this long.")
    ] = "60s",
    json: JsonFlag = False,
) -> None:
    """Send a message: store it, push it to the recipient's devices, fall back to email."""
    message = build_message(
        message_id=message_id or f"msg-{uuid.uuid4().hex[:12]}",
        sender_id=sender,
        recipient_id=recipient,
        recipient_email=email or f"{recipient}@example.com",
        body=body,
        deadline=parse_duration(deadline),
    )
    wait_for = parse_duration(wait_timeout)
    targets = frozenset({until}) if until is not None else DELIVERY_SETTLED
    settings = Settings()
    reached = True
    async with _messages(settings) as service:
        handle = await service.send(message)
        out: dict[str, Any] = {"message_id": message.message_id, "workflow_id": handle.id}
        if wait:
            try:
                async with asyncio.timeout(wait_for.total_seconds()):
                    row = await service.wait_until(message.message_id, targets)
            except TimeoutError:
                row = await service.row(message.message_id)
            reached = row.status in targets
            out["status"] = row.status.value
            out["version"] = row.version
            out["reached"] = reached
    if json:
        emit_json(out)
    else:
        console.print(f"message {message.message_id} sent as workflow {handle.id}", markup=False)
        if wait:
            console.print(
                f"status: [bold]{out['status']}[/bold] (version {out['version']})"
                + ("" if reached else f"; not {'/'.join(sorted(targets))} within {wait_timeout}")
            )
    if not reached:
        raise SystemExit(EXIT_REFUSED)


async def _device_says(
    message_id: str, device: str, what: Literal["delivered", "read"], as_json: bool
) -> None:
    settings = Settings()
    async with _messages(settings) as service:
        await service.device_says(message_id, device, what)
    if as_json:
        emit_json({"message_id": message_id, "device_id": device, "signal": what})
    else:
        console.print(f"{what} from {device} sent to message {message_id}", markup=False)


@message_app.command
async def confirm(message_id: str, *, device: str, json: JsonFlag = False) -> None:
    """As DEVICE (or its push provider): the message was delivered to it."""
    await _device_says(message_id, device, "delivered", json)


@message_app.command(name="read")
async def read_(message_id: str, *, device: str, json: JsonFlag = False) -> None:
    """As DEVICE: the message was read on it."""
    await _device_says(message_id, device, "read", json)


@message_app.command
async def recall(
    message_id: str, *, reason: str = "recalled by sender", json: JsonFlag = False
) -> None:
    """Recall a message: record CANCELLED in Postgres, then stop its workflow."""
    async with _messages(Settings()) as service:
        outcome = await service.recall(message_id, reason=reason, requested_by=getpass.getuser())
    _show(outcome, json, lambda o: _say(o.message))
    if not outcome.recalled:
        raise SystemExit(EXIT_REFUSED)


@message_app.command(name="status")
async def message_status(message_id: str, *, json: JsonFlag = False) -> None:
    """Show a message: status, version, per-device delivery and read receipts, transitions."""
    async with _messages(Settings()) as service:
        report = await service.report(message_id)
    _show(report, json, _print_message_report)


def _when(value: object) -> str:
    return value.astimezone().strftime("%H:%M:%S") if hasattr(value, "astimezone") else "-"


def _print_message_report(report: MessageReport) -> None:
    m = report.message
    console.print(
        f"message [bold]{escape(m.id)}[/bold]: [bold]{m.status}[/bold] (version {m.version}), "
        f"{escape(m.sender_id)} -> {escape(m.recipient_id)}, deadline {m.deadline_ms / 1000:g}s"
    )
    if m.failure_reason:
        console.print(f"reason: {m.failure_reason}", markup=False)
    _print_workflow(report)
    devices = Table("device", "pushed", "delivered", "read", "receipt")
    for d in report.deliveries:
        devices.add_row(
            Text(d.device_id),
            _when(d.pushed_at),
            _when(d.delivered_at),
            _when(d.read_at),
            _when(d.receipt_at),
        )
    console.print(devices)
    console.print(_transitions_table(report.transitions))


@app.command
async def reconcile(
    *,
    repair: Annotated[bool, Parameter(help="Start recovery runs for orphaned orders.")] = False,
    repair_missing: Annotated[
        bool,
        Parameter(
            negative=(),
            help="Recover orders whose workflow Temporal does not know, with or without "
            "--repair (only if you are sure this is the right namespace and cluster).",
        ),
    ] = False,
    grace: Annotated[str, Parameter(help="Ignore rows changed more recently than this.")] = "30s",
    lookback: Annotated[str, Parameter(help="Ignore rows changed longer ago than this.")] = "1d",
    json: JsonFlag = False,
) -> None:
    """Compare Postgres with Temporal; report (and with --repair, fix) drift."""
    from tollgate.ops.reconcile import ReconcileInput
    from tollgate.ops.reconcile import reconcile as run_reconcile

    options = ReconcileInput(
        repair=repair,
        repair_missing=repair_missing,
        grace=parse_duration(grace),
        lookback=parse_duration(lookback),
    )
    settings = Settings()
    async with connected(settings) as (client, pool):
        report = await run_reconcile(client, pool, task_queue=settings.task_queue, options=options)
    if json:
        emit_json(report.model_dump(mode="json"))
        return
    console.print(
        f"checked {report.orders_checked} orders and {report.messages_checked} messages: "
        f"{len(report.findings)} finding(s) (run {report.run_id})"
    )
    if report.findings:
        table = Table("kind", "id", "finding", "row", "workflow", "detail", "repair")
        for f in report.findings:
            table.add_row(
                f.entity_kind,
                Text(f.entity_id),
                f.finding,
                f.row_status,
                f.workflow_status or "-",
                Text(f.detail),
                Text(f.repair_workflow_id or "-"),
            )
        console.print(table)


@apikey_app.command(name="create")
async def apikey_create(*, client: str, json: JsonFlag = False) -> None:
    """Create an API key for CLIENT (created on its first key). The key is printed once:
    only its hash is stored."""
    require_safe_id("client", client)
    async with app_pool(Settings()) as pool:
        created = await access.create_key(pool, client)
    if json:
        emit_json({"client": created.client_id, "key_id": created.key_id, "key": created.key})
        return
    console.print(f"API key {created.key_id} for client {created.client_id}:", markup=False)
    console.print(created.key, markup=False)
    console.print("It is shown only this once; Tollgate keeps only its hash.")


@apikey_app.command(name="revoke")
async def apikey_revoke(key_id: str, *, json: JsonFlag = False) -> None:
    """Revoke the key KEY_ID (the part after ``tg_``): it stops working at once here, and
    within API_KEY_CACHE_SECONDS in a running API."""
    async with app_pool(Settings()) as pool:
        row = await access.revoke_key(pool, key_id)
    _show(row, json, lambda r: _say(f"API key {r.id} of client {r.client_id} revoked"))


@apikey_app.command(name="list")
async def apikey_list(*, client: str | None = None, json: JsonFlag = False) -> None:
    """List API keys (ids, never secrets), of one CLIENT or all."""
    if client is not None:
        require_safe_id("client", client)
    async with app_pool(Settings()) as pool:
        rows = await access.list_keys(pool, client)
    if json:
        emit_json([r.model_dump(mode="json") for r in rows])
        return
    table = Table("key id", "client", "created", "revoked")
    for r in rows:
        table.add_row(
            r.id,
            Text(r.client_id),
            r.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            r.revoked_at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if r.revoked_at else "-",
        )
    console.print(table)


@app.command(name="search-token")
async def search_token_(value: str, *, json: JsonFlag = False) -> None:
    """The CustomerId / RecipientId search-attribute value for VALUE (hashed when payloads are encrypted)."""
    from tollgate.codec import search_token

    settings = Settings()
    converter = data_converter(settings)
    try:
        client = await connect(settings, converter=converter)
    except RuntimeError as exc:
        raise Refused(f"cannot reach Temporal at {settings.temporal_address} ({exc})") from None
    token = search_token(client, value)
    if json:
        emit_json({"value": value, "search_token": token})
    else:
        console.print(token, markup=False)


def _fail(message: str, code: int) -> None:
    err_console.print(f"error: {message}", markup=False, soft_wrap=True)
    sys.exit(code)


def _command_of(args: Sequence[str]) -> str:
    """The command path in ``args`` (``order create``), never an argument's value."""
    words: list[str] = []
    node = app
    for token in args:
        try:
            node = node[token]
        except (KeyError, ValueError):
            break
        words.append(token)
    return " ".join(words)


def _run(args: Sequence[str]) -> None:
    """Parse and run one command inside its span: the root of the trace of whatever it
    starts (an order's, a message's), exported where ``Settings.otlp_endpoint`` says."""
    provider = configure_tracing(Settings(), "cli", export_timeout=_EXPORT_SECONDS)
    command = _command_of(args)
    try:
        with tracer.start_as_current_span(
            f"starter.py {command}".strip(), attributes={"tollgate.command": command}
        ):
            result = app(args, exit_on_error=False, print_error=False)
            if asyncio.iscoroutine(result):
                asyncio.run(result)
    finally:
        # A command is short: send its spans before the process ends.
        provider.force_flush(int(_EXPORT_SECONDS * 1000))


#: How long the CLI may spend sending its spans (the receiver is local, or absent).
_EXPORT_SECONDS = 2.0


def main(argv: list[str] | None = None) -> None:
    """Entry point: run one command, turning every expected failure into one line."""
    args = sys.argv[1:] if argv is None else argv
    try:
        _run(args)
    except CycloptsError as exc:
        _fail(" ".join(str(exc).split()), EXIT_BAD_INPUT)
    except (InputError, ConfigError) as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    except ValidationError as exc:
        # A setting from the environment that does not parse (Settings() is built per
        # command); name the variable, not its value.
        first = exc.errors()[0]
        name = ".".join(str(p) for p in first["loc"]).upper()
        _fail(f"setting {name}: {first['msg']}", EXIT_BAD_INPUT)
    except (NotFound, NotRunning, Refused) as exc:
        _fail(str(exc), EXIT_REFUSED)
    except TollgateError as exc:
        _fail(f"{type(exc).__name__}: {exc}", EXIT_REFUSED)
    except RPCError as exc:
        _fail(f"Temporal refused the request: {exc.message}", EXIT_REFUSED)
    except KeyboardInterrupt:
        _fail("interrupted", 130)


def run_as_program() -> NoReturn:
    """:func:`main` for a process of its own (``python starter.py``): once the command's
    output and spans are out, end the process without the interpreter's teardown.

    The Temporal SDK's native threads can race that teardown and abort a process whose
    work is done ("Fatal Python error: PyGILState_Release", exit -6; seen under parallel
    load in the CLI tests, and known upstream as temporalio/sdk-python#300). A script
    would read that as a crash of a command that succeeded.
    """
    code = 0
    try:
        main()
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:  # as the interpreter does: the message to stderr, status 1
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # the reader went away (a closed pipe): nothing more to tell it
            pass
    os._exit(code)
