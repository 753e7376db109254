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
from datetime import timedelta
from pathlib import Path
from typing import Any

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
    tag = uuid.uuid4().hex[:8]
    canary = {
        "customer": f"CANARYcust{tag}",
        "sender": f"CANARYsndr{tag}",
        "recipient": f"CANARYrcpt{tag}",
        "email": f"canarymail{tag}@example.com",
        "body": f"CANARY body {tag}",
        "token": f"CANARYtoken{tag}",
    }
    queue = f"canary-{tag}"
    log = tmp_path / "worker.log"
    worker = WorkerProcess(
        h.process_env(queue, RECONCILE_EVERY_SECONDS="0", LOG_LEVEL="DEBUG"), log_file=log
    )
    orders = OrderService(h.client, h.pool, queue, inventory=h.inventory)
    messages = MessageService(h.client, h.pool, queue)
    await h.sandbox.decline_customer(canary["customer"] + "d")
    await h.sandbox.bounce_address(canary["email"])
    await h.sandbox.unregister_token(canary["token"] + "-gone")
    await worker.start()
    try:
        happy = h.order(customer_id=canary["customer"])
        declined = h.order(customer_id=canary["customer"] + "d")
        for order in (happy, declined):
            await (await orders.create(order)).result()

        await messages.register_device(
            device_id=f"cd-{tag}-0",
            user_id=canary["recipient"],
            push_token=canary["token"],
            platform="ios",
        )
        await messages.register_device(
            device_id=f"cd-{tag}-1",
            user_id=canary["recipient"],
            push_token=canary["token"] + "-gone",
            platform="android",
        )
        message = h.message(
            canary["recipient"],
            sender_id=canary["sender"],
            recipient_email=canary["email"],
            body=canary["body"],
            deadline=timedelta(milliseconds=500),
            read_window=timedelta(milliseconds=500),
        )
        handle = await messages.send(message)
        result = await handle.result()
    finally:
        await worker.stop()

    assert result.failure_reason is not None and "EmailBounced" in result.failure_reason
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
