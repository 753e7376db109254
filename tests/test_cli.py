"""``python starter.py`` as a user runs it: a real process against the real stack."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from dataclasses import dataclass

import pytest
from temporalio.service import RPCError, RPCStatusCode

from tests.conftest import PROJECT_ROOT, Harness
from tests.waiting import eventually, order_status, order_step
from tollgate.messages import store as message_store
from tollgate.messages.models import MessageProgress
from tollgate.messages.states import MessageStatus
from tollgate.names import MESSAGE_STATUS_QUERY
from tollgate.orders import store as order_store
from tollgate.orders.states import OrderStatus


@dataclass
class Run:
    code: int
    out: str
    err: str


async def run_starter(h: Harness, *args: str, env: dict[str, str] | None = None) -> Run:
    """Run the CLI without blocking the event loop the in-process worker lives on, in the
    environment that joins it to the harness (plus ``env``)."""
    full_env = {**os.environ, **h.process_env(), **(env or {})}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "starter.py",
        *args,
        cwd=PROJECT_ROOT,
        env=full_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def _one_clear_line(run: Run, *needles: str) -> None:
    lines = run.err.strip().splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith("error: "), run.err
    assert "Traceback" not in run.err + run.out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _create(*overrides: str) -> list[str]:
    """``order create`` with valid flags, each replaceable by ``overrides`` (flag, value...)."""
    flags = {"--customer": "c", "--item": "WIDGET:1", "--amount": "5"}
    pairs = list(overrides)
    for flag, value in zip(pairs[::2], pairs[1::2], strict=True):
        flags[flag] = value
    return ["order", "create", *(part for pair in flags.items() for part in pair)]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["order", "frobnicate"], "frobnicate"),
        (["order", "create", "--customer", "c", "--item", "WIDGET", "--amount", "5"], "SKU:QTY"),
        (
            ["order", "create", "--customer", "c", "--item", "WIDGET:1", "--amount", "-5"],
            "positive",
        ),
        (
            ["order", "create", "--customer", "c", "--item", "WIDGET:1", "--amount", "1.234"],
            "decimal",
        ),
        (
            ["order", "create", "--customer", "c", "--item", "WIDGET:1", "--amount", "ten"],
            "not a number",
        ),
        (["order", "create", "--customer", "c", "--item", "WIDGET:0", "--amount", "5"], "quantity"),
        (
            [
                "order",
                "create",
                "--customer",
                "c",
                "--item",
                "WIDGET:1",
                "--amount",
                "5",
                "--currency",
                "DOLLARS",
            ],
            "currency",
        ),
        (["order", "create", "--customer", "c", "--amount", "5"], "--item"),
        # found by hostile testing: each once ended in a traceback or a half-written order
        (_create("--amount", "1e30"), "not a number"),
        (_create("--amount", "100000000000000000"), "over the limit"),
        (_create("--amount", "100000.01"), "over the limit"),
        (_create("--item", "WIDGET:²"), "SKU:QTY"),
        (_create("--customer", "[/x]"), "customer_id: not a valid id"),
        (_create("--customer", "sam\r\nBcc: attacker@example.com"), "customer_id"),
        (_create("--currency", "JPY"), "currency JPY is not supported"),
        (_create("--item", "NO-SUCH-SKU:1"), "unknown SKU NO-SUCH-SKU"),
    ],
)
async def test_bad_input_gets_one_line_exit_2_and_writes_nothing(
    h: Harness, args: list[str], needle: str
) -> None:
    order_id = f"cli-{uuid.uuid4().hex[:10]}"
    run = await run_starter(h, *args, *(["--order-id", order_id] if "create" in args else []))
    assert run.code == 2, run
    _one_clear_line(run, needle)
    assert await order_store.get_order(h.pool, order_id) is None
    with pytest.raises(RPCError) as caught:
        await h.service.handle(order_id).describe()
    assert caught.value.status == RPCStatusCode.NOT_FOUND, "no workflow was started either"


async def test_an_order_id_holding_the_derived_id_separator_is_refused(h: Harness) -> None:
    """Order 'x:recovery' would have become workflow 'order-x:recovery', the recovery id of x."""
    run = await run_starter(h, *_create(), "--order-id", "x:recovery")
    assert run.code == 2, run
    _one_clear_line(run, "order_id: not a valid id")
    assert await order_store.get_order(h.pool, "x:recovery") is None


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["message", "confirm", "m-1", "--device", "d" * 65], {}, "device_id"),
        (
            ["message", "send", "--sender", "s", "--recipient", "r", "--body", "hi",
             "--deadline", "9999999999d"],
            {},
            "longer than",
        ),
        (["reconcile", "--grace", "9999999999d"], {}, "longer than"),
        (["order", "status", "x"], {"PAYLOAD_ENCRYPTION_KEY": "not-a-key"}, "PAYLOAD_ENCRYPTION_KEY"),
        (
            ["order", "status", "x"],
            {"PAYLOAD_ENCRYPTION_KEY": "", "PAYLOAD_KEY_FILE": "/nonexistent/payload.key"},
            "no payload key",
        ),
        (["order", "status", "x"], {"PROVIDER_TIMEOUT_SECONDS": "soon"}, "PROVIDER_TIMEOUT_SECONDS"),
        (["load", "orders", "--count", "1000000000"], {}, "--count"),
    ],
)  # fmt: skip
async def test_more_bad_input_gets_one_line_exit_2(
    h: Harness, args: list[str], env: dict[str, str], needle: str
) -> None:
    counts = await _row_counts(h)
    run = await run_starter(h, *args, env=env)
    assert run.code == 2, run
    _one_clear_line(run, needle)
    assert await _row_counts(h) == counts


async def test_a_cancel_with_a_bad_reason_writes_nothing_and_the_order_goes_on(
    h: Harness,
) -> None:
    """Once, a 600-character reason left the row CANCELLING and the workflow uninformed."""
    from tollgate_dev.sandbox import FaultSpec

    await h.sandbox.set_fault("payments", FaultSpec(latency_ms=1500, latency_phase="after"))
    order = h.order()
    handle = await h.service.create(order)
    await order_status(h.service, order.order_id, OrderStatus.CHARGING)
    for reason in ("x" * 600, "line one\nline two", "bell \x07"):
        run = await run_starter(h, "order", "cancel", order.order_id, "--reason", reason)
        assert run.code == 2, run
        _one_clear_line(run, "reason")
        row = await h.service.row(order.order_id)
        assert not row.status.cancelling and row.cancel_reason is None
    await h.sandbox.clear_faults()
    result = await handle.result()
    assert result.status == OrderStatus.COMPLETED and result.cancel_reason is None
    audit = await order_store.list_transitions(h.pool, order.order_id)
    assert OrderStatus.CANCELLING not in [a.to_status for a in audit]


async def test_a_recall_with_a_bad_reason_writes_nothing(h: Harness) -> None:
    user, _devices = await h.devices(1)
    msg = h.message(user)
    await h.messages.send(msg)
    run = await run_starter(h, "message", "recall", msg.message_id, "--reason", "y" * 501)
    assert run.code == 2, run
    _one_clear_line(run, "reason")
    audit = await message_store.list_transitions(h.pool, msg.message_id)
    assert MessageStatus.CANCELLED not in [a.to_status for a in audit]


async def test_user_text_is_printed_as_text_not_as_terminal_markup(h: Harness) -> None:
    order = h.order()
    handle = await h.service.create(order)
    reason = "[bold red]refund me[/bold red] [/x]"
    outcome = await h.service.cancel(order.order_id, reason=reason, requested_by="test")
    assert outcome.recorded, outcome
    await handle.result()
    status = await run_starter(h, "order", "status", order.order_id)
    assert status.code == 0, status
    assert "Traceback" not in status.err
    assert f"cancel reason: {reason}" in status.out, status.out


async def test_send_wait_returns_on_delivery_not_after_the_read_window(h: Harness) -> None:
    user = f"cli-u-{uuid.uuid4().hex[:8]}"
    message_id = f"cli-m-{uuid.uuid4().hex[:10]}"
    # no devices: the 1 s deadline falls back to email; the read window is the default 7 d
    run = await run_starter(
        h,
        *("message", "send", "--sender", "sam", "--recipient", user, "--body", "hi"),
        *("--deadline", "1s", "--message-id", message_id, "--wait", "--json"),
    )
    assert run.code == 0, run
    out = json.loads(run.out)
    assert out["status"] == "EMAILED" and out["reached"] is True
    status = (await h.messages.handle(message_id).describe()).status
    assert status is not None and status.name == "RUNNING"

    other = f"cli-m-{uuid.uuid4().hex[:10]}"
    waited = await run_starter(
        h,
        *("message", "send", "--sender", "sam", "--recipient", user, "--body", "hi"),
        *("--deadline", "1s", "--message-id", other, "--wait", "--until", "READ"),
        *("--timeout", "3s", "--json"),
    )
    assert waited.code == 1, waited
    assert json.loads(waited.out)["reached"] is False


async def test_a_user_past_the_device_limit_is_refused_until_one_is_removed(h: Harness) -> None:
    user, devices = await h.devices(10)
    eleventh = await _register(h, user, f"tok-{user}-eleven", "--device-id", f"{user}-d10")
    assert eleventh.code == 1, eleventh
    _one_clear_line(eleventh, "already has 10 active devices")
    removed = await run_starter(h, "device", "remove", devices[0], "--json")
    assert removed.code == 0, removed
    assert json.loads(removed.out)["active"] is False
    again = await _register(h, user, f"tok-{user}-eleven", "--device-id", f"{user}-d10")
    assert again.code == 0, again


ROW_TABLES = ("orders", "messages", "devices", "order_transitions", "message_transitions")


async def _row_counts(h: Harness) -> tuple[int, ...]:
    """How many rows each table holds: bad input must not change any of them."""
    return tuple([await h.pool.fetchval(f"SELECT count(*) FROM {t}") for t in ROW_TABLES])


@pytest.mark.parametrize("command", ["status", "cancel"])
async def test_unknown_order_is_refused_with_exit_1(h: Harness, command: str) -> None:
    run = await run_starter(h, "order", command, "no-such-order")
    assert run.code == 1, run
    _one_clear_line(run, "no-such-order", "does not exist")


async def test_unreachable_postgres_is_one_line_not_a_traceback(h: Harness) -> None:
    run = await run_starter(
        h, "order", "status", "x", env={"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    )
    assert run.code == 1, run
    _one_clear_line(run, "cannot reach Postgres")


async def test_create_wait_status_and_refused_cancel_for_scripts(h: Harness) -> None:
    order_id = f"cli-{uuid.uuid4().hex[:10]}"
    run = await run_starter(
        h,
        *("order", "create", "--customer", "carol", "--item", "widget:2", "--item", "GADGET:1"),
        *("--amount", "44.50", "--order-id", order_id, "--wait", "--json"),
    )
    assert run.code == 0, run
    created = json.loads(run.out)
    assert created["order_id"] == order_id and created["workflow_id"] == f"order-{order_id}"
    assert created["result"]["status"] == "COMPLETED"
    row = await order_store.get_order(h.pool, order_id)
    assert row is not None and row.amount_cents == 4450
    assert [(i.sku, i.quantity) for i in row.items] == [("WIDGET", 2), ("GADGET", 1)]

    status = await run_starter(h, "order", "status", order_id, "--json")
    assert status.code == 0, status
    report = json.loads(status.out)
    assert report["order"]["status"] == "COMPLETED" and report["order"]["version"] == 5
    assert [t["to_status"] for t in report["transitions"]] == [
        "PENDING",
        "VALIDATING",
        "CHARGING",
        "RESERVING",
        "COMPLETED",
    ]
    assert report["workflow_status"] == "COMPLETED"

    human = await run_starter(h, "order", "status", order_id)
    assert human.code == 0 and "COMPLETED" in human.out and "RESERVING" in human.out

    again = await run_starter(
        h,
        *("order", "create", "--customer", "carol", "--item", "WIDGET:1"),
        "--amount",
        "1",
        "--order-id",
        order_id,
    )
    assert again.code == 2
    _one_clear_line(again, "already exists")

    cancel = await run_starter(h, "order", "cancel", order_id, "--json")
    assert cancel.code == 1, cancel
    assert json.loads(cancel.out)["recorded"] is False
    assert (await order_store.get_order(h.pool, order_id)) == row


async def test_cancel_from_the_cli_ends_cancelled(h: Harness) -> None:
    from tollgate_dev.sandbox import FaultSpec

    # The charge is captured but its answer lost until the test says otherwise: the order
    # stays CHARGING however long the two CLI processes take to start on a loaded machine
    # (a fixed count of lost answers once gave it 7 s, then 31 s, and how long is enough
    # depends on the load). The faults end once the workflow is undoing the charge, so
    # the refund goes through at its next attempt.
    await h.sandbox.set_fault("payments", FaultSpec(fail_next=1_000, fail_phase="after"))
    order_id = f"cli-{uuid.uuid4().hex[:10]}"
    run = await run_starter(
        h,
        "order",
        "create",
        "--customer",
        "dan",
        "--item",
        "GIZMO:1",
        "--amount",
        "3",
        "--order-id",
        order_id,
    )
    assert run.code == 0, run
    await order_status(h.service, order_id, OrderStatus.CHARGING)
    cancelling = asyncio.create_task(
        run_starter(h, "order", "cancel", order_id, "--reason", "wrong size", "--wait", "--json")
    )
    await order_step(h.service, order_id, "compensating")
    await h.sandbox.clear_faults()
    cancel = await cancelling
    assert cancel.code == 0, cancel
    outcome = json.loads(cancel.out)
    assert outcome["recorded"] and outcome["signalled"]
    assert outcome["result"]["status"] == "CANCELLED"
    assert outcome["result"]["compensations"] == ["refund:refunded"]
    row = await order_store.get_order(h.pool, order_id)
    assert row is not None and (row.status, row.cancel_reason) == (
        OrderStatus.CANCELLED,
        "wrong size",
    )


# --- devices and messages ---------------------------------------------------------


async def _register(h: Harness, user: str, token: str, *extra: str) -> Run:
    return await run_starter(h, "device", "register", "--user", user, "--token", token, *extra)


async def test_device_register_for_scripts_and_a_token_is_never_registered_twice(
    h: Harness,
) -> None:
    user = f"cli-u-{uuid.uuid4().hex[:8]}"
    token = f"tok-{uuid.uuid4().hex}"
    run = await _register(h, user, token, "--platform", "android", "--json")
    assert run.code == 0, run
    device = json.loads(run.out)
    assert device["user_id"] == user and device["platform"] == "android" and device["active"]
    row = await message_store.get_device(h.pool, device["id"])
    assert (row.user_id, row.push_token) == (user, token)

    second_id = f"cli-d-{uuid.uuid4().hex[:8]}"
    again = await _register(h, "someone-else", token, "--device-id", second_id, "--json")
    assert again.code == 2, again
    _one_clear_line(again, "already registered", device["id"])
    assert again.out == ""
    assert await h.pool.fetchval("SELECT count(*) FROM devices WHERE push_token = $1", token) == 1
    assert await h.pool.fetchval("SELECT count(*) FROM devices WHERE id = $1", second_id) == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--sender", "sam", "--recipient", "rita"], "--body"),
        (["--sender", "sam", "--recipient", "rita", "--body", "hi", "--deadline", "soon"], "soon"),
        (
            ["--sender", "sam", "--recipient", "rita", "--body", "hi", "--deadline", "0s"],
            "positive",
        ),
        (
            ["--sender", "sam", "--recipient", "rita", "--body", "hi", "--email", "not-an-address"],
            "recipient_email",
        ),
        (["--sender", "sam", "--recipient", "rita", "--body", ""], "body"),
        # below the database's millisecond resolution, and beyond a day
        (
            ["--sender", "sam", "--recipient", "rita", "--body", "hi", "--deadline", "0.5ms"],
            "deadline",
        ),
        (
            ["--sender", "sam", "--recipient", "rita", "--body", "hi", "--deadline", "25d"],
            "deadline",
        ),
    ],
)
async def test_bad_message_input_gets_one_line_exit_2_and_writes_nothing(
    h: Harness, args: list[str], needle: str
) -> None:
    message_id = f"cli-m-{uuid.uuid4().hex[:10]}"
    run = await run_starter(h, "message", "send", *args, "--message-id", message_id)
    assert run.code == 2, run
    _one_clear_line(run, needle)
    assert await message_store.get_message(h.pool, message_id) is None
    with pytest.raises(RPCError) as caught:
        await h.messages.handle(message_id).describe()
    assert caught.value.status == RPCStatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "args",
    [
        ["status", "no-such-message"],
        ["confirm", "no-such-message", "--device", "d"],
        ["read", "no-such-message", "--device", "d"],
        ["recall", "no-such-message"],
    ],
)
async def test_unknown_message_is_refused_with_exit_1(h: Harness, args: list[str]) -> None:
    run = await run_starter(h, "message", *args)
    assert run.code == 1, run
    _one_clear_line(run, "no-such-message", "does not exist")
    assert await message_store.get_message(h.pool, "no-such-message") is None


async def test_send_confirm_read_status_and_refused_recall_from_the_cli(h: Harness) -> None:
    user = f"cli-u-{uuid.uuid4().hex[:8]}"
    devices = []
    for n in range(2):
        reg = await _register(h, user, f"tok-{user}-{n}", "--json")
        assert reg.code == 0, reg
        devices.append(json.loads(reg.out)["id"])
    d0, d1 = devices
    message_id = f"cli-m-{uuid.uuid4().hex[:10]}"

    sent = await run_starter(
        h,
        *("message", "send", "--sender", "sam", "--recipient", user, "--body", "hi"),
        *("--deadline", "20s", "--message-id", message_id, "--json"),
    )
    assert sent.code == 0, sent
    assert json.loads(sent.out) == {
        "message_id": message_id,
        "workflow_id": f"message-{message_id}",
    }

    async def pushed_to_both() -> bool:
        facts = await message_store.deliveries(h.pool, message_id)
        return [f.device_id for f in facts if f.pushed_at] == sorted(devices)

    await eventually(pushed_to_both, what="pushed to both devices")
    confirm = await run_starter(h, "message", "confirm", message_id, "--device", d0)
    assert confirm.code == 0, confirm
    read = await run_starter(h, "message", "read", message_id, "--device", d0)
    assert read.code == 0, read

    async def read_and_synced() -> bool:
        row = await message_store.get_message(h.pool, message_id)
        facts = {f.device_id: f for f in await message_store.deliveries(h.pool, message_id)}
        return row is not None and row.status == MessageStatus.READ and bool(facts[d1].receipt_at)

    await eventually(read_and_synced, what="read with the receipt on the other device")

    status = await run_starter(h, "message", "status", message_id, "--json")
    assert status.code == 0, status
    report = json.loads(status.out)
    assert report["message"]["status"] == "READ"
    assert report["message"]["recipient_id"] == user
    assert report["message"]["deadline_ms"] == 20_000
    facts = {d["device_id"]: d for d in report["deliveries"]}
    assert sorted(facts) == sorted(devices)
    assert all(facts[d]["pushed_at"] for d in devices)
    assert facts[d0]["delivered_at"] and facts[d0]["read_at"]
    assert facts[d1]["receipt_at"]
    assert facts[d1]["delivered_at"] is None and facts[d1]["read_at"] is None
    assert [t["to_status"] for t in report["transitions"]] == [
        "INITIATED",
        "STORED",
        "DISPATCHED",
        "DELIVERED",
        "READ",
    ]

    human = await run_starter(h, "message", "status", message_id)
    assert human.code == 0, human
    assert "READ" in human.out and d0 in human.out and d1 in human.out

    before = await message_store.get_message(h.pool, message_id)
    recall = await run_starter(h, "message", "recall", message_id)
    assert recall.code == 1, recall
    assert "cannot be recalled" in recall.out and "READ" in recall.out
    assert "Traceback" not in recall.out + recall.err
    assert await message_store.get_message(h.pool, message_id) == before

    # the lifecycle ended at READ: a late device signal is refused, not "bad input"
    await h.messages.handle(message_id).result()
    late = await run_starter(h, "message", "confirm", message_id, "--device", devices[1])
    assert late.code == 1, late
    _one_clear_line(late, "no longer running", "READ")


async def test_recall_from_the_cli_while_the_push_is_in_flight(h: Harness) -> None:
    from tollgate_dev.sandbox import FaultSpec

    user, _devices = await h.devices(2)
    await h.sandbox.set_fault("push", FaultSpec(latency_ms=1500))
    message_id = f"cli-m-{uuid.uuid4().hex[:10]}"
    sent = await run_starter(
        h,
        *("message", "send", "--sender", "sam", "--recipient", user, "--body", "oops"),
        *("--deadline", "20s", "--message-id", message_id),
    )
    assert sent.code == 0, sent
    handle = h.messages.handle(message_id)

    async def pushing() -> bool:
        progress: MessageProgress = await handle.query(
            MESSAGE_STATUS_QUERY, result_type=MessageProgress
        )
        return progress.step == "pushing"

    await eventually(pushing, what="pushing")
    recall = await run_starter(
        h, "message", "recall", message_id, "--reason", "wrong chat", "--json"
    )
    assert recall.code == 0, recall
    outcome = json.loads(recall.out)
    assert outcome["recalled"] and outcome["status"] == "CANCELLED"
    row = await message_store.get_message(h.pool, message_id)
    assert row is not None and row.status == MessageStatus.CANCELLED
    assert row.failure_reason == "recalled: wrong chat"
    result = await asyncio.wait_for(handle.result(), timeout=30)
    assert result.status == MessageStatus.CANCELLED
    audit = await message_store.list_transitions(h.pool, message_id)
    assert [a.to_status for a in audit] == [
        MessageStatus.INITIATED,
        MessageStatus.STORED,
        MessageStatus.DISPATCHED,
        MessageStatus.CANCELLED,
    ]
    assert (await h.sandbox.ledger(message_id=message_id)).emails == []
