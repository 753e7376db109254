"""Message delivery end to end: real Temporal, real Postgres, push and email over HTTP.

Each test checks the workflow's result, the message row and its audit trail, the
per-device facts in Postgres, and the sandbox ledger (what was actually pushed/emailed).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.service import RPCError

from tests.conftest import Harness
from tests.recording import maybe_record
from tests.waiting import eventually
from tollgate.messages import store as message_store
from tollgate.messages.models import DeviceSignal, MessageProgress
from tollgate.messages.service import MessageService
from tollgate.messages.states import MessageStatus
from tollgate.names import MESSAGE_DELIVERED_SIGNAL, MESSAGE_READ_SIGNAL, MESSAGE_STATUS_QUERY
from tollgate_dev.sandbox import FaultSpec, Ledger
from tollgate_dev.stack import WorkerProcess

M = MessageStatus
DISPATCH = [(None, M.INITIATED), (M.INITIATED, M.STORED), (M.STORED, M.DISPATCHED)]


async def _audit(h: Harness, message_id: str) -> list[tuple[MessageStatus | None, MessageStatus]]:
    return [
        (a.from_status, a.to_status)
        for a in await message_store.list_transitions(h.pool, message_id)
    ]


async def _wait_for(h: Harness, message_id: str, predicate: Any, what: str) -> MessageProgress:
    handle = h.messages.handle(message_id)

    async def progress() -> MessageProgress | None:
        now = await handle.query(MESSAGE_STATUS_QUERY, result_type=MessageProgress)
        return now if predicate(now) else None

    return await eventually(progress, what=f"{message_id} {what}")


async def _wait_pushed(h: Harness, message_id: str, devices: list[str]) -> None:
    await _wait_for(
        h, message_id, lambda p: p.devices_pushed == sorted(devices), "pushed to all devices"
    )


def _pushes(ledger: Ledger, kind: str) -> Counter[str]:
    return Counter(p.token for p in ledger.pushes if p.kind == kind)


async def test_read_on_one_device_syncs_receipts_to_the_others(h: Harness) -> None:
    user, (a, b, c) = await h.devices(3)
    msg = h.message(user)
    handle = await h.messages.send(msg)
    await _wait_pushed(h, msg.message_id, [a, b, c])
    await h.messages.device_says(msg.message_id, a, "delivered")
    await _wait_for(h, msg.message_id, lambda p: p.status == M.DELIVERED, "delivered")
    await h.messages.device_says(msg.message_id, a, "read")
    result = await handle.result()

    assert result.status == M.READ and result.delivered_on == a and result.read_on == a
    assert result.devices_pushed == sorted([a, b, c])
    assert await _audit(h, msg.message_id) == [
        *DISPATCH,
        (M.DISPATCHED, M.DELIVERED),
        (M.DELIVERED, M.READ),
    ]
    facts = {d.device_id: d for d in await message_store.deliveries(h.pool, msg.message_id)}
    assert all(facts[d].pushed_at for d in (a, b, c))
    assert facts[a].delivered_at and facts[a].read_at
    assert facts[b].receipt_at and facts[c].receipt_at and not facts[b].read_at

    ledger = await h.sandbox.ledger(message_id=msg.message_id)
    assert _pushes(ledger, "message") == {
        f"tok-{user}-0": 1,
        f"tok-{user}-1": 1,
        f"tok-{user}-2": 1,
    }
    assert _pushes(ledger, "read_receipt") == {f"tok-{user}-1": 1, f"tok-{user}-2": 1}
    assert ledger.emails == []
    await maybe_record(handle, h.settings, "message_read")


async def test_no_confirmation_before_the_deadline_falls_back_to_one_email(h: Harness) -> None:
    user, _devices = await h.devices(2)
    msg = h.message(
        user, deadline=timedelta(milliseconds=800), read_window=timedelta(milliseconds=500)
    )
    # the email provider fails twice after sending: retries must not send a second email
    await h.sandbox.set_fault("email", FaultSpec(fail_next=2, fail_phase="after"))
    result = await (await h.messages.send(msg)).result()

    assert result.status == M.EMAILED and result.email_id
    assert await _audit(h, msg.message_id) == [
        *DISPATCH,
        (M.DISPATCHED, M.FALLBACK_EMAIL),
        (M.FALLBACK_EMAIL, M.EMAILED),
    ]
    audit = await message_store.list_transitions(h.pool, msg.message_id)
    assert audit[3].reason and "no delivery confirmation" in audit[3].reason
    ledger = await h.sandbox.ledger(message_id=msg.message_id)
    assert [(e.to, e.email_id) for e in ledger.emails] == [(msg.recipient_email, result.email_id)]
    assert sum(_pushes(ledger, "message").values()) == 2


async def test_push_provider_down_for_a_while_then_back_delivers_without_duplicates(
    h: Harness,
) -> None:
    user, devices = await h.devices(3)
    before = (await h.sandbox.request_counts())["push"]
    await h.sandbox.set_fault("push", FaultSpec(fail_next=3, fail_status=503, fail_phase="after"))
    msg = h.message(user)
    handle = await h.messages.send(msg)
    await _wait_pushed(h, msg.message_id, devices)
    await h.messages.device_says(msg.message_id, devices[1], "delivered")
    await _wait_for(h, msg.message_id, lambda p: p.status == M.DELIVERED, "delivered")

    ledger = await h.sandbox.ledger(message_id=msg.message_id)
    assert _pushes(ledger, "message") == {f"tok-{user}-{n}": 1 for n in range(3)}
    assert (await h.sandbox.request_counts())["push"] - before == 6  # 3 failed + 3 devices
    result = await handle.result()
    assert result.status == M.DELIVERED and result.delivered_on == devices[1]


async def test_recall_before_delivery_cancels(h: Harness) -> None:
    user, _devices = await h.devices(2)
    await h.sandbox.set_fault("push", FaultSpec(latency_ms=600))
    msg = h.message(user)
    handle = await h.messages.send(msg)
    await _wait_for(h, msg.message_id, lambda p: p.step == "pushing", "pushing")
    outcome = await h.messages.recall(
        msg.message_id, reason="sent to the wrong person", requested_by="sam"
    )
    assert outcome.recalled and outcome.signalled
    result = await handle.result()
    assert result.status == M.CANCELLED
    row = await h.messages.row(msg.message_id)
    assert row.status == M.CANCELLED and row.failure_reason == "recalled: sent to the wrong person"
    audit = await message_store.list_transitions(h.pool, msg.message_id)
    assert [(a.from_status, a.to_status) for a in audit] == [*DISPATCH, (M.DISPATCHED, M.CANCELLED)]
    assert audit[-1].actor == "cli:sam"
    ledger = await h.sandbox.ledger(message_id=msg.message_id)
    assert ledger.emails == []


async def test_recall_of_a_read_message_is_refused(h: Harness) -> None:
    user, (a,) = await h.devices(1)
    msg = h.message(user)
    handle = await h.messages.send(msg)
    await _wait_pushed(h, msg.message_id, [a])
    await h.messages.device_says(msg.message_id, a, "read")
    assert (await handle.result()).status == M.READ
    outcome = await h.messages.recall(msg.message_id, reason="too late", requested_by="sam")
    assert not outcome.recalled and outcome.status == M.READ
    assert (await h.messages.row(msg.message_id)).status == M.READ


async def test_unregistered_token_removes_the_device_and_is_not_retried(h: Harness) -> None:
    user, (a, b) = await h.devices(2)
    await h.sandbox.unregister_token(f"tok-{user}-0")
    before = (await h.sandbox.request_counts())["push"]
    msg = h.message(user)
    handle = await h.messages.send(msg)
    await _wait_pushed(h, msg.message_id, [b])
    await h.messages.device_says(msg.message_id, b, "delivered")
    result = await handle.result()
    assert result.status == M.DELIVERED and result.devices_removed == [a]
    assert (await h.sandbox.request_counts())["push"] - before == 2
    device = await message_store.get_device(h.pool, a)
    assert not device.active and device.removed_reason == "push token unregistered"
    assert [d.id for d in await message_store.active_devices(h.pool, user)] == [b]


async def test_recipient_without_devices_is_emailed(h: Harness) -> None:
    msg = h.message("nobody-has-devices", read_window=timedelta(milliseconds=300))
    result = await (await h.messages.send(msg)).result()
    assert result.status == M.EMAILED
    audit = await message_store.list_transitions(h.pool, msg.message_id)
    assert audit[3].reason == "no device could receive a push"


async def test_bounced_email_fails_the_message(h: Harness) -> None:
    msg = h.message("bouncer", recipient_email="bouncer@invalid.example")
    await h.sandbox.bounce_address("bouncer@invalid.example")
    result = await (await h.messages.send(msg)).result()
    assert result.status == M.FAILED
    assert result.failure_reason and result.failure_reason.startswith("EmailBounced")
    assert await _audit(h, msg.message_id) == [
        *DISPATCH,
        (M.DISPATCHED, M.FALLBACK_EMAIL),
        (M.FALLBACK_EMAIL, M.FAILED),
    ]


async def test_early_duplicate_and_unknown_signals_never_move_state_backwards(h: Harness) -> None:
    user, (a, b) = await h.devices(2)
    await h.sandbox.set_fault("push", FaultSpec(latency_ms=300))
    msg = h.message(user)
    handle = await h.messages.send(msg)
    # before the push has even happened: a stranger, then device a twice
    await h.messages.device_says(msg.message_id, "someone-elses-phone", "delivered")
    await h.messages.device_says(msg.message_id, a, "delivered")
    await h.messages.device_says(msg.message_id, a, "delivered")
    await _wait_for(h, msg.message_id, lambda p: p.status == M.DELIVERED, "delivered")
    await h.messages.device_says(msg.message_id, b, "read")
    await h.messages.device_says(msg.message_id, b, "read")
    await h.messages.device_says(msg.message_id, a, "delivered")  # late and repeated
    result = await handle.result()

    assert result.status == M.READ and result.delivered_on == a and result.read_on == b
    assert result.ignored_signals == [f"delivered:someone-elses-phone (not a device of {user})"]
    assert await _audit(h, msg.message_id) == [
        *DISPATCH,
        (M.DISPATCHED, M.DELIVERED),
        (M.DELIVERED, M.READ),
    ]
    facts = {d.device_id: d for d in await message_store.deliveries(h.pool, msg.message_id)}
    assert facts[a].delivered_at and facts[b].delivered_at and facts[b].read_at


async def test_concurrent_reads_on_two_devices_make_one_read_transition(h: Harness) -> None:
    user, (a, b, c) = await h.devices(3)
    msg = h.message(user)
    handle = await h.messages.send(msg)
    await _wait_pushed(h, msg.message_id, [a, b, c])
    await asyncio.gather(
        h.messages.device_says(msg.message_id, a, "read"),
        h.messages.device_says(msg.message_id, b, "read"),
    )
    result = await handle.result()
    assert result.status == M.READ and result.read_on in (a, b)
    audit = await _audit(h, msg.message_id)
    assert audit.count((M.DELIVERED, M.READ)) == 1 and len(audit) == 5
    facts = {d.device_id: d for d in await message_store.deliveries(h.pool, msg.message_id)}
    assert facts[a].read_at and facts[b].read_at and not facts[c].read_at


async def test_read_sync_that_fails_for_good_reverts_the_read_everywhere(h: Harness) -> None:
    user, (a, b) = await h.devices(2)
    msg = h.message(user, read_window=timedelta(seconds=3))
    handle = await h.messages.send(msg)
    await _wait_pushed(h, msg.message_id, [a, b])
    await h.messages.device_says(msg.message_id, a, "delivered")
    await _wait_for(h, msg.message_id, lambda p: p.status == M.DELIVERED, "delivered")
    # the receipt to b fails on every attempt (5 in the test retry policy); the revert to a succeeds
    await h.sandbox.set_fault("push", FaultSpec(fail_next=5, fail_status=503))
    await h.messages.device_says(msg.message_id, a, "read")
    result = await handle.result()

    assert result.status == M.DELIVERED and result.read_on is None
    assert await _audit(h, msg.message_id) == [
        *DISPATCH,
        (M.DISPATCHED, M.DELIVERED),
        (M.DELIVERED, M.READ),
        (M.READ, M.DELIVERED),
    ]
    facts = {d.device_id: d for d in await message_store.deliveries(h.pool, msg.message_id)}
    assert facts[a].read_at is None and facts[b].receipt_at is None
    ledger = await h.sandbox.ledger(message_id=msg.message_id)
    assert _pushes(ledger, "read_receipt") == {}
    assert _pushes(ledger, "read_revert") == {f"tok-{user}-0": 1}


async def test_duplicate_send_is_refused(h: Harness) -> None:
    from tollgate.errors import InputError

    msg = h.message("dup", read_window=timedelta(milliseconds=200))
    handle = await h.messages.send(msg)
    with pytest.raises(InputError, match="already exists"):
        await h.messages.send(msg)
    await handle.result()


SIGNALS = int(os.environ.get("TOLLGATE_BOGUS_SIGNALS", "10000"))
FLOOD_CONCURRENCY = int(os.environ.get("TOLLGATE_FLOOD_CONCURRENCY", "32"))
#: Signals sent before the flood waits for the workflow to have taken them: half of what
#: a run takes before it continues as new, so that however far the worker lags on a
#: loaded machine no run comes near Temporal's 10,000 signals per run. Sent blindly, all
#: 10,000 could land in the first run before its worker looked, and the real device's
#: signal after them would be refused.
FLOOD_ROUND = 1_000


@pytest.mark.timeout(360)  # about 65 s alone on 2 cores; far more on a loaded machine
async def test_ten_thousand_bogus_signals_leave_the_workflow_healthy_and_its_result_small(
    h: Harness, tmp_path: Path
) -> None:
    """A buggy or hostile device client cannot grow a message workflow's memory or result.

    The worker is its own process, as in production: flooding it from this process
    would otherwise starve its workflow thread of the GIL, which says nothing about
    the workflow.
    """
    queue = f"flood-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(
        h.process_env(queue, RECONCILE_EVERY_SECONDS="0"), log_file=tmp_path / "worker.log"
    )
    messages = MessageService(h.client, h.pool, queue)
    user, devices = await h.devices(1)
    msg = h.message(user, deadline=timedelta(seconds=60), read_window=timedelta(seconds=60))
    await worker.start()
    try:
        handle = await messages.send(msg)
        gate = asyncio.Semaphore(FLOOD_CONCURRENCY)

        async def bogus(n: int) -> None:
            signal = MESSAGE_DELIVERED_SIGNAL if n % 2 else MESSAGE_READ_SIGNAL
            async with gate:
                await handle.signal(signal, DeviceSignal(device_id=f"bogus-{n}"))

        async def answered() -> MessageProgress | None:
            try:
                now: MessageProgress = await handle.query(
                    MESSAGE_STATUS_QUERY, result_type=MessageProgress
                )
            except RPCError:  # a query waits for the worker to digest the flood; may time out
                return None
            return now

        started = time.monotonic()
        for first in range(0, SIGNALS, FLOOD_ROUND):
            await asyncio.gather(
                *(bogus(n) for n in range(first, min(first + FLOOD_ROUND, SIGNALS)))
            )
            # answered once the worker has taken the signals sent so far
            progress = await eventually(answered, within=180, what="the flooded workflow answering")
        print(f"{SIGNALS} signals in {time.monotonic() - started:.1f} s")
        assert progress.confirmed_devices == [] and progress.read_devices == []

        await messages.device_says(msg.message_id, devices[0], "read")
        result = await asyncio.wait_for(handle.result(), timeout=180)
        latest = await h.client.get_workflow_handle(handle.id).describe()
    finally:
        await worker.stop()
    # Temporal takes at most 10,000 signals per run: the lifecycle continued as new
    # (state carried over) so that the real device's read was still accepted.
    assert latest.run_id != handle.result_run_id
    assert result.status == MessageStatus.READ and result.read_on == devices[0]
    assert result.ignored_signal_count == SIGNALS
    assert len(result.ignored_signals) == 10
    assert len(result.model_dump_json()) < 4096, "the result stays small"
