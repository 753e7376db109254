"""``python starter.py`` as a user runs it: a real process against the real stack."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from dataclasses import dataclass

import pytest

from tests.conftest import PROJECT_ROOT, Harness
from tollgate import db
from tollgate.states import OrderStatus


@dataclass
class Run:
    code: int
    out: str
    err: str


async def _starter(h: Harness, *args: str, env: dict[str, str] | None = None) -> Run:
    """Run the CLI without blocking the event loop the in-process worker lives on."""
    full_env = {
        **os.environ,
        "TEMPORAL_ADDRESS": h.settings.temporal_address,
        "DATABASE_URL": h.settings.database_url,
        "SANDBOX_URL": h.settings.sandbox_url,
        "TASK_QUEUE": h.task_queue,
        **(env or {}),
    }
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
    ],
)
async def test_bad_input_gets_one_line_exit_2_and_writes_nothing(
    h: Harness, args: list[str], needle: str
) -> None:
    order_id = f"cli-{uuid.uuid4().hex[:10]}"
    run = await _starter(h, *args, *(["--order-id", order_id] if "create" in args else []))
    assert run.code == 2, run
    _one_clear_line(run, needle)
    assert await db.get_order(h.pool, order_id) is None


@pytest.mark.parametrize("command", ["status", "cancel"])
async def test_unknown_order_is_refused_with_exit_1(h: Harness, command: str) -> None:
    run = await _starter(h, "order", command, "no-such-order")
    assert run.code == 1, run
    _one_clear_line(run, "no-such-order", "does not exist")


async def test_unreachable_postgres_is_one_line_not_a_traceback(h: Harness) -> None:
    run = await _starter(
        h, "order", "status", "x", env={"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    )
    assert run.code == 1, run
    _one_clear_line(run, "cannot reach Postgres")


async def test_create_wait_status_and_refused_cancel_for_scripts(h: Harness) -> None:
    order_id = f"cli-{uuid.uuid4().hex[:10]}"
    run = await _starter(
        h,
        *("order", "create", "--customer", "carol", "--item", "widget:2", "--item", "GADGET:1"),
        *("--amount", "44.50", "--order-id", order_id, "--wait", "--json"),
    )
    assert run.code == 0, run
    created = json.loads(run.out)
    assert created["order_id"] == order_id and created["workflow_id"] == f"order-{order_id}"
    assert created["result"]["status"] == "COMPLETED"
    row = await db.get_order(h.pool, order_id)
    assert row is not None and row.amount_cents == 4450
    assert [(i.sku, i.quantity) for i in row.items] == [("WIDGET", 2), ("GADGET", 1)]

    status = await _starter(h, "order", "status", order_id, "--json")
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

    human = await _starter(h, "order", "status", order_id)
    assert human.code == 0 and "COMPLETED" in human.out and "RESERVING" in human.out

    again = await _starter(
        h,
        *("order", "create", "--customer", "carol", "--item", "WIDGET:1"),
        "--amount",
        "1",
        "--order-id",
        order_id,
    )
    assert again.code == 2
    _one_clear_line(again, "already exists")

    cancel = await _starter(h, "order", "cancel", order_id, "--json")
    assert cancel.code == 1, cancel
    assert json.loads(cancel.out)["recorded"] is False
    assert (await db.get_order(h.pool, order_id)) == row


async def test_cancel_from_the_cli_ends_cancelled(h: Harness) -> None:
    from tollgate.sandbox import FaultSpec

    await h.sandbox.set_fault("payments", FaultSpec(latency_ms=1500, latency_phase="after"))
    order_id = f"cli-{uuid.uuid4().hex[:10]}"
    run = await _starter(
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
    for _ in range(100):
        row = await db.get_order(h.pool, order_id)
        if row is not None and row.status == OrderStatus.CHARGING:
            break
        await asyncio.sleep(0.05)
    cancel = await _starter(
        h, "order", "cancel", order_id, "--reason", "wrong size", "--wait", "--json"
    )
    assert cancel.code == 0, cancel
    outcome = json.loads(cancel.out)
    assert outcome["recorded"] and outcome["signalled"]
    assert outcome["result"]["status"] == "CANCELLED"
    assert outcome["result"]["compensations"] == ["refund:refunded"]
    row = await db.get_order(h.pool, order_id)
    assert row is not None and (row.status, row.cancel_reason) == (
        OrderStatus.CANCELLED,
        "wrong size",
    )
