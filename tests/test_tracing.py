"""One trace per lifecycle, as an OTLP receiver sees it.

The spans of the real CLI process, the in-process worker and the in-process sandbox go
over OTLP/HTTP to an in-process receiver (``tests/tracing_support.py``), which keeps
them as the local stack's receiver does. The trace is then read back as a user would:
``starter.py order trace``.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import sys
import uuid
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from temporalio.client import Client

from tests.conftest import PROJECT_ROOT, Harness
from tests.tracing_support import Receiver
from tests.waiting import eventually, order_status
from tollgate.gate import AuditRow
from tollgate.messages import store as message_store
from tollgate.messages.states import MessageStatus
from tollgate.ops.cli import console
from tollgate.orders import store as order_store
from tollgate.orders.states import OrderStatus
from tollgate.settings import Settings
from tollgate.telemetry import configure_logging
from tollgate.tracing import parse_traceparent
from tollgate_dev.commands import order_trace
from tollgate_dev.sandbox import FaultSpec
from tollgate_dev.traces import SpanRecord
from tollgate_dev.traces.waterfall import describe_sql


async def _starter(h: Harness, *args: str, **env: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "starter.py",
        *args,
        cwd=PROJECT_ROOT,
        env={**os.environ, **h.process_env(), "COLUMNS": "220", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _trace_of(row_trace_parent: str | None) -> str:
    parent = parse_traceparent(row_trace_parent)
    assert parent is not None, "the row records where its trace begins"
    return format(parent.trace_id, "032x")


def _one_trace(row_trace_parent: str | None, audit: Sequence[AuditRow[Any]]) -> str:
    """The lifecycle's trace: where its row says it begins, checked to be the trace every
    one of its audit rows (each transition, whoever asked for it) carries."""
    trace_id = _trace_of(row_trace_parent)
    assert {a.trace_id for a in audit} == {trace_id}
    return trace_id


def _chain(span: SpanRecord, spans: Sequence[SpanRecord]) -> list[str]:
    """Names from ``span`` up to its root."""
    by_id = {s.span_id: s for s in spans}
    names = [span.name]
    while span.parent_span_id is not None:
        parent = by_id.get(span.parent_span_id)
        assert parent is not None, f"{span.name}'s parent was not received"
        span = parent
        names.append(span.name)
    return names


def _named(spans: Sequence[SpanRecord], name: str) -> list[SpanRecord]:
    return sorted((s for s in spans if s.name == name), key=lambda s: s.start_ns)


async def _message_is(h: Harness, message_id: str, status: MessageStatus) -> bool:
    return (await h.messages.row(message_id)).status == status


async def _has_deliveries(h: Harness, message_id: str, count: int) -> bool:
    return len(await message_store.deliveries(h.pool, message_id)) == count


def _under(spans: Sequence[SpanRecord], parent: SpanRecord) -> list[SpanRecord]:
    return [s for s in spans if s.parent_span_id == parent.span_id]


def _stop_and_its_handling(
    spans: Sequence[SpanRecord], stop: str, *, started_by: str, workflow: str
) -> tuple[SpanRecord, SpanRecord]:
    """The one span of the ``stop`` request (``order.cancel``, ``message.recall``) and the
    one of the workflow handling its signal, checked to sit in the lifecycle's trace: the
    request under the span that ``started_by`` the lifecycle, the handling under the
    ``workflow``'s run."""
    requested = _named(spans, stop)
    assert len(requested) == 1
    assert requested[0].parent_span_id == _named(spans, started_by)[0].span_id
    signal = stop.split(".")[1]  # the signal is named after the request
    handled = _named(spans, f"HandleSignal:{signal}")
    assert len(handled) == 1
    assert _chain(handled[0], spans)[1] == f"RunWorkflow:{workflow}"
    return requested[0], handled[0]


async def test_an_order_from_the_cli_is_one_trace_from_command_to_sql_and_provider(
    h: Harness, otlp: Receiver
) -> None:
    """The command is the root; under it the workflow, each activity, and under each
    activity its SQL statements and provider calls. The charge failed once: two
    attempts. Audit rows and the provider's ledger point at the same trace."""
    order_id = f"tr-{uuid.uuid4().hex[:10]}"
    await h.sandbox.set_fault("payments", FaultSpec(fail_next=1))
    with otlp.capturing():
        code, out, err = await _starter(
            h,
            *("order", "create", "--customer", "alice", "--item", "WIDGET:1"),
            *("--amount", "12.50", "--order-id", order_id, "--wait", "--json"),
            OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url,
        )
        assert code == 0, err
        assert json.loads(out)["result"]["status"] == "COMPLETED"
        await otlp.flush()

    row = await order_store.get_order(h.pool, order_id)
    assert row is not None
    audit = await order_store.list_transitions(h.pool, order_id)
    assert len(audit) == 5
    trace_id = _one_trace(row.trace_parent, audit)
    spans = otlp.spans(trace_id)

    # one trace for the whole order: nothing about it anywhere else
    assert otlp.store.traces_with("temporalWorkflowID", f"order-{order_id}") == [trace_id]
    assert otlp.store.traces_with("tollgate.order_id", order_id) == [trace_id]

    # the command is the root
    roots = [s for s in spans if s.parent_span_id is None]
    assert [(r.name, r.service) for r in roots] == [("starter.py order create", "tollgate-cli")]
    run = _named(spans, "RunWorkflow:OrderWorkflow")
    assert len(run) == 1 and run[0].end_ns - run[0].start_ns > 1_000_000, "a real duration"
    assert _chain(run[0], spans) == [
        "RunWorkflow:OrderWorkflow",
        "StartWorkflow:OrderWorkflow",
        "order.create",
        "starter.py order create",
    ]

    # each activity under the workflow; under each, the SQL of its moves
    for activity in ("validate_order", "charge_payment", "reserve_inventory"):
        attempts = _named(spans, f"RunActivity:{activity}")
        assert attempts, activity
        assert _chain(attempts[0], spans)[2] == "RunWorkflow:OrderWorkflow"
    validate = _named(spans, "RunActivity:validate_order")[0]
    sql = [str(s.attributes.get("db.statement")) for s in _under(spans, validate)]
    assert any("UPDATE orders" in statement for statement in sql), sql

    # the charge: two attempts, each moving the row, then calling the provider; the
    # first call failed
    charges = _named(spans, "RunActivity:charge_payment")
    assert [c.attributes["tollgate.attempt"] for c in charges] == [1, 2]
    assert [c.status for c in charges] == ["error", "unset"]
    assert charges[0].parent_span_id == charges[1].parent_span_id  # one StartActivity
    first = sorted(_under(spans, charges[0]), key=lambda s: s.start_ns)
    assert "UPDATE orders" in str(first[0].attributes.get("db.statement")), "the move first"
    calls = [[s for s in _under(spans, c) if "http.status_code" in s.attributes] for c in charges]
    assert [[s.attributes.get("http.status_code") for s in c] for c in calls] == [[503], [201]]
    served = [s for s in spans if s.parent_span_id == calls[1][0].span_id]
    assert served and served[0].kind == "server", "the sandbox's span, under the call"

    # the provider recorded the traceparent of the call that charged
    ledger = await h.sandbox.ledger(order_id)
    charged = parse_traceparent(ledger.charges[0].traceparent)
    assert charged is not None
    assert (format(charged.trace_id, "032x"), format(charged.span_id, "016x")) == (
        trace_id,
        calls[1][0].span_id,
    )

    # and the user's view of it
    code, out, err = await _starter(h, "order", "trace", order_id, STATE_DIR=str(otlp.state_dir))
    assert code == 0, err
    assert "starter.py order create" in out and "workflow OrderWorkflow" in out
    assert "activity charge_payment (2 attempts)" in out
    assert "attempt 1" in out and "attempt 2" in out
    assert "POST /payments/charges -> 503" in out and "POST /payments/charges -> 201" in out
    assert "SQL UPDATE orders" in out


async def test_order_trace_prints_a_completed_orders_waterfall(
    h: Harness, otlp: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    order = h.order()
    with otlp.capturing():
        await (await h.service.create(order)).result()
        await otlp.flush()
    monkeypatch.setenv("STATE_DIR", str(otlp.state_dir))
    monkeypatch.setenv("DATABASE_URL", h.settings.database_url)
    monkeypatch.setattr(console, "width", 200)  # one line per span
    with console.capture() as captured:
        await order_trace(order.order_id)
    out = captured.get()
    lines = out.splitlines()
    assert f"order {order.order_id}" in lines[0] and "spans" in lines[0]
    assert "order.create" in out and "workflow OrderWorkflow" in out
    for step in ("validate_order", "charge_payment", "reserve_inventory"):
        assert f"activity {step}" in out
    assert "attempts" not in out and "error" not in out


async def test_a_cancel_joins_the_orders_trace_and_its_audit_row_carries_it(
    h: Harness, otlp: Receiver
) -> None:
    await h.sandbox.set_fault("inventory", FaultSpec(latency_ms=1500))
    order = h.order(items=[{"sku": "WIDGET", "quantity": 1}])
    with otlp.capturing():
        handle = await h.service.create(order)
        await order_status(h.service, order.order_id, OrderStatus.RESERVING)
        await h.service.cancel(order.order_id, reason="changed my mind", requested_by="tests")
        result = await handle.result()
        await otlp.flush()

    assert result.status == OrderStatus.CANCELLED
    row = await h.service.row(order.order_id)
    audit = await order_store.list_transitions(h.pool, order.order_id)
    spans = otlp.spans(_one_trace(row.trace_parent, audit))
    _, handled = _stop_and_its_handling(
        spans, "order.cancel", started_by="order.create", workflow="OrderWorkflow"
    )
    assert any(link.span_id for link in handled.links), "it links to the sender"
    assert _named(spans, "RunActivity:refund_payment"), "the compensation is in the trace"


async def test_a_messages_confirm_and_read_and_its_receipt_saga_sit_in_the_messages_trace(
    h: Harness, otlp: Receiver
) -> None:
    user, (a, _) = await h.devices(2)
    msg = h.message(user)
    with otlp.capturing():
        handle = await h.messages.send(msg)
        await eventually(
            lambda: _has_deliveries(h, msg.message_id, 2), what="pushed to both devices"
        )
        await h.messages.device_says(msg.message_id, a, "delivered")
        await eventually(
            lambda: _message_is(h, msg.message_id, MessageStatus.DELIVERED), what="delivered"
        )
        await h.messages.device_says(msg.message_id, a, "read")
        result = await handle.result()
        await otlp.flush()

    assert result.status == MessageStatus.READ
    row = await h.messages.row(msg.message_id)
    audit = await message_store.list_transitions(h.pool, msg.message_id)
    assert MessageStatus.DELIVERED in {t.to_status for t in audit}
    spans = otlp.spans(_one_trace(row.trace_parent, audit))  # the confirm's and read's rows too
    child = _named(spans, "RunWorkflow:ReadReceiptSyncWorkflow")
    assert len(child) == 1
    assert "RunWorkflow:MessageDeliveryWorkflow" in _chain(child[0], spans)
    sent = _named(spans, "message.send")
    for receipt in ("message.delivered", "message.read"):
        joined = _named(spans, receipt)
        assert len(joined) == 1, f"the device's {receipt} joined the trace"
        assert joined[0].parent_span_id == sent[0].span_id
        signal = _under(spans, joined[0])
        assert [s.name for s in signal] == [f"SignalWorkflow:{receipt.split('.')[1]}"]
    assert not _named(spans, "HandleSignal:read"), "device signals get no workflow span"
    pushes = [s for s in spans if s.name.startswith("RunActivity:push")]
    assert len(pushes) >= 2, "the message's push and the receipts' push"


async def test_a_recall_from_the_cli_joins_the_messages_trace_and_links_to_the_command(
    h: Harness, otlp: Receiver
) -> None:
    """The recall runs in the message's trace (its span, its audit row, the workflow's
    handling of the signal, what the workflow does next); the command that asked for it
    is the root of a trace of its own, and the two are linked."""
    user, _ = await h.devices(2)
    await h.sandbox.set_fault("push", FaultSpec(latency_ms=1500))
    msg = h.message(user)
    with otlp.capturing():
        handle = await h.messages.send(msg)
        await eventually(
            lambda: _message_is(h, msg.message_id, MessageStatus.DISPATCHED), what="dispatched"
        )
        code, out, err = await _starter(
            h,
            *("message", "recall", msg.message_id, "--reason", "wrong chat", "--json"),
            OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url,
        )
        assert code == 0, err
        assert json.loads(out)["signalled"] is True
        result = await handle.result()
        await otlp.flush()

    assert result.status == MessageStatus.CANCELLED
    row = await h.messages.row(msg.message_id)
    audit = await message_store.list_transitions(h.pool, msg.message_id)
    assert audit[-1].to_status == MessageStatus.CANCELLED
    trace_id = _one_trace(row.trace_parent, audit)
    spans = otlp.spans(trace_id)
    recall, handled = _stop_and_its_handling(
        spans, "message.recall", started_by="message.send", workflow="MessageDeliveryWorkflow"
    )
    under = _under(spans, recall)
    assert any("UPDATE messages" in str(s.attributes.get("db.statement")) for s in under)
    sent = [s for s in under if s.name.startswith("SignalWorkflow")]
    assert [s.name for s in sent] == ["SignalWorkflow:recall"]
    assert [link.span_id for link in handled.links] == [sent[0].span_id]

    # the command: a trace of its own, which the recall's span links to
    [command_link] = recall.links
    assert command_link.trace_id != trace_id
    command = otlp.spans(command_link.trace_id)
    roots = [s for s in command if s.parent_span_id is None]
    assert [(r.name, r.span_id) for r in roots] == [
        ("starter.py message recall", command_link.span_id)
    ]


def _span_in_a_coroutine() -> Generator[None, None, None]:
    with trace.get_tracer(__name__).start_as_current_span("run"):
        yield


def test_a_span_closed_by_the_garbage_collector_logs_nothing(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """A workflow's coroutine that no eviction ended (a worker that stopped with the
    workflow cached) is closed by the garbage collector, in another context than the one
    its span was attached in: OpenTelemetry cannot detach it there and logs "Failed to
    detach context" with a traceback. Harmless, but the log of every stopped worker fills
    with them, and on Python 3.11 formatting that traceback parses source code: inside
    another ``ast.parse`` the collector interrupted, that one fails (``SystemError: AST
    constructor recursion depth mismatch``, seen in this suite). That record is dropped;
    any other failure to detach is still logged."""
    closed_elsewhere = _span_in_a_coroutine()
    contextvars.copy_context().run(next, closed_elsewhere)
    closed_elsewhere.close()
    assert not [r for r in caplog.records if r.getMessage() == "Failed to detach context"]

    token = otel_context.attach(otel_context.get_current())
    otel_context.detach(token)
    otel_context.detach(token)  # a real mistake: the token was used already
    assert [r.getMessage() for r in caplog.records] == ["Failed to detach context"]


@pytest.mark.parametrize(
    ("level", "endpoint", "logged"),
    [
        ("INFO", "http://127.0.0.1:4318", False),
        ("DEBUG", "http://127.0.0.1:4318", True),
        ("INFO", None, True),
    ],
)
def test_provider_requests_are_logged_unless_their_spans_say_as_much(
    level: str,
    endpoint: str | None,
    logged: bool,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """httpx logs each request at INFO. Where spans are exported, each request's span
    says as much, so a worker at INFO leaves the line out (half its log volume); one at
    DEBUG keeps it, and so does one that exports no spans."""
    root, httpx_logger = logging.getLogger(), logging.getLogger("httpx")
    saved = (root.handlers[:], root.level, httpx_logger.level)
    settings = Settings(log_level=level, otel_exporter_otlp_endpoint=endpoint, state_dir=tmp_path)
    try:
        configure_logging(settings)
        httpx_logger.info("HTTP Request: GET http://provider/ok")
        httpx_logger.warning("provider answered slowly")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    finally:
        root.handlers[:], _, _ = saved
        root.setLevel(saved[1])
        httpx_logger.setLevel(saved[2])
    messages = [line["message"] for line in lines if line["logger"] == "httpx"]
    expected = ["HTTP Request: GET http://provider/ok"] if logged else []
    assert messages == [*expected, "provider answered slowly"]


@pytest.mark.parametrize(
    ("statement", "label"),
    [
        (
            "WITH writer AS MATERIALIZED (SELECT set_config('tollgate.actor', $1, true)),"
            " inserted AS (INSERT INTO orders (id, status) SELECT $4, $5"
            " WHERE EXISTS (SELECT FROM writer) ON CONFLICT (id) DO NOTHING RETURNING *)"
            " SELECT * FROM inserted UNION ALL SELECT * FROM orders WHERE id = $4",
            "SQL INSERT orders",
        ),
        (
            "WITH writer AS MATERIALIZED (SELECT set_config('tollgate.actor', $1, true))\n"
            "  UPDATE messages SET status = $6 WHERE id = $4 RETURNING version",
            "SQL UPDATE messages",
        ),
        ("SELECT status, version FROM orders WHERE id = $1", "SQL SELECT orders"),
        ("WITH due AS (SELECT id FROM orders) SELECT * FROM due", "SQL SELECT due"),
        (
            "WITH due AS (SELECT id FROM orders FOR UPDATE SKIP LOCKED) SELECT * FROM due",
            "SQL SELECT due",
        ),
    ],
)
def test_a_waterfall_names_a_statement_by_what_it_writes(statement: str, label: str) -> None:
    """The insert-or-match is a SELECT over a CTE that inserts: it shows as the insert."""
    assert describe_sql(statement) == label
