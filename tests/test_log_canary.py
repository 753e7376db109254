"""No personal data in logs or free-text columns, on the happy paths and the failing ones.

Hostile testing found a customer id and an email address in the worker's log (provider
error text, logged by the SDK's activity-failure warning) and the address in
``messages.failure_reason``. Here a real ``python worker.py`` process logs at DEBUG into
a file while orders and messages run with a canary in every personal field (customer,
sender, recipient, address, body, push token), through declines, bounces and an
unregistered token, whose provider answers quote what they were sent. Afterwards the
canaries appear in no line of the log and in no free-text column.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

from tests.canaries import canaries, run_lifecycles, script_failures
from tests.conftest import Harness
from tollgate.messages.service import MessageService
from tollgate.orders.service import OrderService
from tollgate_dev.stack import WorkerProcess

#: Text columns Tollgate (not the user) fills: failure notes, audit notes, findings.
FREE_TEXT = {
    "orders": ("failure_reason",),
    "messages": ("failure_reason",),
    "order_transitions": ("reason", "actor", "transition_id"),
    "message_transitions": ("reason", "actor", "transition_id"),
    "devices": ("removed_reason",),
    "reconciliation_findings": ("detail",),
}


def _json_or_none(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def test_canaries_in_personal_fields_reach_no_log_line_and_no_free_text_column(
    h: Harness, tmp_path: Path
) -> None:
    canary = canaries()
    queue = f"canary-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "worker.log"
    worker = WorkerProcess(
        h.process_env(queue, RECONCILE_EVERY_SECONDS="0", LOG_LEVEL="DEBUG"), log_file=log
    )
    orders = OrderService(h.client, h.pool, queue, inventory=h.inventory)
    messages = MessageService(h.client, h.pool, queue)
    await script_failures(h, canary)
    await worker.start()
    try:
        await run_lifecycles(h, canary, orders, messages)
    finally:
        await worker.stop()

    text = log.read_text()
    assert "order transition" in text, "the worker did log, at DEBUG"
    assert "Completing activity as failed" in text, "the failure paths logged too"
    # Every line about a lifecycle says which entity and which trace, the SDK's too.
    about = [e for e in map(_json_or_none, text.splitlines()) if e and "workflow_id" in e]
    assert any(e["message"].startswith("Completing activity as failed") for e in about)
    for entry in about:
        assert entry.get("entity_id") and entry.get("entity") in ("order", "message"), entry
        assert re.fullmatch(r"[0-9a-f]{32}", entry.get("trace_id", "")), entry
    for field, value in canary.items():
        assert value not in text, f"the {field} canary is in the worker's log"
        for table, columns in FREE_TEXT.items():
            for column in columns:
                found = await h.pool.fetchval(
                    f"SELECT count(*) FROM {table} WHERE strpos({column}, $1) > 0", value
                )
                assert found == 0, f"the {field} canary is in {table}.{column}"
