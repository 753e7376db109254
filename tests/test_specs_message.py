"""Specifications of message delivery and its read-receipt saga, branch by branch.

The real ``MessageDeliveryWorkflow`` (and its child ``ReadReceiptSyncWorkflow``) run on
the time-skipping server against stand-in activities (:mod:`tests.specs`), so a 30 s
delivery deadline and a 7-day read window pass in milliseconds.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import CancelledError

from activities.email import EmailActivities
from activities.messages import MessageStoreActivities
from activities.push import PushActivities
from tests import specs
from tests.specs import RETRY, Block, Fail, StandIns, devices_of
from tests.waiting import eventually
from tollgate.errors import EmailBounced, ProviderUnavailable
from tollgate.messages.models import DeviceSignal, MessageInput, MessageResult, RecallRequest
from tollgate.messages.states import MessageStatus
from tollgate.names import message_workflow_id, read_sync_workflow_id
from workflows.message import _SIGNALS_PER_RUN, MessageDeliveryWorkflow

# The shared fixtures, under the names the specs ask for.
env, acts = specs.env, specs.acts

M = MessageStatus
#: A handle on the delivery, typed: its signals and query are the workflow's own methods.
Delivery = WorkflowHandle[MessageDeliveryWorkflow, MessageResult]
PHONE, TABLET, LAPTOP = devices_of("bob")

#: The delivery's calls up to and including the push to every device.
DISPATCH = [
    "begin_message",
    "recipient_devices",
    "transition_message:DISPATCHED",
    "push_to_devices:message",
]
#: A device confirmed before the deadline.
DELIVERED = ["record_device_fact:delivered", "transition_message:DELIVERED"]
#: A device confirmed and another read before the push ended, up to the receipts. The
#: delivery writes every fact the signals brought, the read included, before it moves
#: the row; the child then moves it to READ and writes the read again (first writer wins).
READ_BEFORE_RECEIPTS = [
    "record_device_fact:delivered",
    "record_device_fact:read",
    "transition_message:DELIVERED",
    "transition_message:READ",
    "record_device_fact:read",
]
EMAIL_FALLBACK = ["transition_message:FALLBACK_EMAIL", "send_fallback_email"]
PUSH_DOWN = [Fail(ProviderUnavailable)] * RETRY.maximum_attempts


def message() -> MessageInput:
    return MessageInput(
        message_id=f"m-{uuid.uuid4().hex[:12]}",
        sender_id="sam",
        recipient_id="bob",
        recipient_email="bob@example.com",
        body="Lunch next week?",
        deadline=timedelta(seconds=30),
        read_window=timedelta(days=7),
        retry=RETRY,
    )


async def send(acts: StandIns, m: MessageInput) -> Delivery:
    return await acts.client.start_workflow(
        MessageDeliveryWorkflow.run,
        m,
        id=message_workflow_id(m.message_id),
        task_queue=acts.task_queue,
    )


async def send_and_hold_the_push(acts: StandIns, m: MessageInput) -> tuple[Delivery, Block]:
    """Send, and hold the push in flight until the test releases the block returned."""
    pushing = Block()
    acts[PushActivities.push].then(pushing)
    handle = await send(acts, m)
    await pushing.reached()
    return handle, pushing


async def send_and_signal_during_push(
    acts: StandIns, m: MessageInput, *signals: tuple[Any, str]
) -> Delivery:
    """Send, and deliver the device ``signals`` (the workflow's signal method, device id)
    while the push is in flight: they are all in before the workflow looks, so its trail
    is always the same."""
    handle, pushing = await send_and_hold_the_push(acts, m)
    for signal, device_id in signals:
        await handle.signal(signal, DeviceSignal(device_id=device_id))
    pushing.release()
    return handle


async def run_after(handle: WorkflowHandle[Any, Any], first_run: str | None) -> str:
    """The id of the run that continued ``first_run``. Polled: waiting on the first run's
    result would let the server's clock skip, past the new run's deadline."""

    async def next_run() -> str | None:
        run_id = (await handle.describe()).run_id
        return run_id if run_id != first_run else None

    return await eventually(next_run, what=f"run {first_run} continued as new")


async def delivered_to_the_phone_and_read_on_the_tablet(
    acts: StandIns, m: MessageInput
) -> MessageResult:
    """Where ``m`` ended after the phone confirmed it and the tablet read it, both while
    the push was in flight."""
    handle = await send_and_signal_during_push(
        acts,
        m,
        (MessageDeliveryWorkflow.delivered, PHONE.device_id),
        (MessageDeliveryWorkflow.read, TABLET.device_id),
    )
    return await handle.result()


def pushes(acts: StandIns, kind: str) -> list[list[str]]:
    """The devices of each push attempt of one kind."""
    return [
        [d.device_id for d in p.devices] for p in acts[PushActivities.push].calls if p.kind == kind
    ]


async def test_a_message_delivered_in_time_and_read_on_one_device_syncs_receipts_to_the_others(
    acts: StandIns,
) -> None:
    m = message()
    result = await delivered_to_the_phone_and_read_on_the_tablet(acts, m)

    assert acts.trail() == [
        *DISPATCH,
        *READ_BEFORE_RECEIPTS,
        "push_to_devices:read_receipt",
        "record_device_fact:receipt",
    ]
    assert pushes(acts, "read_receipt") == [[PHONE.device_id, LAPTOP.device_id]]
    sync = acts.client.get_workflow_handle(read_sync_workflow_id(m.message_id, 1))
    assert (await sync.describe()).status is WorkflowExecutionStatus.COMPLETED
    assert result.status is M.READ
    assert (result.delivered_on, result.read_on) == (PHONE.device_id, TABLET.device_id)


async def test_no_confirmation_before_the_deadline_sends_exactly_one_email(acts: StandIns) -> None:
    m = message()
    result = await (await send(acts, m)).result()

    assert acts.trail() == [*DISPATCH, *EMAIL_FALLBACK, "transition_message:EMAILED"]
    (email,) = acts[EmailActivities.send].calls
    assert email.idempotency_key == f"message-{m.message_id}:email"
    fallback = acts[MessageStoreActivities.transition_message].calls[-2]
    assert (fallback.reason or "").startswith("no delivery confirmation within")
    assert result.status is M.EMAILED and result.email_id == f"em-{m.message_id}"
    assert result.devices_pushed == sorted(d.device_id for d in (PHONE, TABLET, LAPTOP))


async def test_a_push_that_fails_for_good_falls_back_to_email_without_waiting(
    acts: StandIns,
) -> None:
    acts[PushActivities.push].then(*PUSH_DOWN)

    result = await (await send(acts, message())).result()

    assert acts.trail() == [
        *DISPATCH[:-1],
        *["push_to_devices:message"] * RETRY.maximum_attempts,
        *EMAIL_FALLBACK,
        "transition_message:EMAILED",
    ]
    fallback = acts[MessageStoreActivities.transition_message].calls[-2]
    assert (fallback.reason or "").startswith("push failed: ProviderUnavailable")
    assert result.status is M.EMAILED and result.devices_pushed == []


async def test_a_bounced_fallback_email_fails_the_message(acts: StandIns) -> None:
    acts[EmailActivities.send].then(Fail(EmailBounced))

    result = await (await send(acts, message())).result()

    assert acts.trail() == [*DISPATCH, *EMAIL_FALLBACK, "transition_message:FAILED"]
    assert result.status is M.FAILED and result.email_id is None
    assert (result.failure_reason or "").startswith("EmailBounced")


async def test_a_recall_while_pushing_ends_the_message_cancelled_and_sends_no_email(
    acts: StandIns,
) -> None:
    handle, _ = await send_and_hold_the_push(acts, message())

    await handle.signal(
        MessageDeliveryWorkflow.recall, RecallRequest(reason="wrong chat", requested_by="sam")
    )
    result = await handle.result()

    assert acts.trail() == [*DISPATCH, "recall_message"]
    (recall,) = acts[MessageStoreActivities.recall_message].calls
    assert (recall.reason, recall.requested_by) == ("wrong chat", "sam")
    assert result.status is M.CANCELLED and result.email_id is None


async def test_a_read_whose_receipts_cannot_be_pushed_is_reverted_on_every_side(
    acts: StandIns,
) -> None:
    """The child saga undoes the read: the row goes back to DELIVERED, the reader's read
    mark is cleared, and the reader's device is told to show the message unread."""
    acts[PushActivities.push].when(lambda push: push.kind == "read_receipt", *PUSH_DOWN)
    m = message()
    result = await delivered_to_the_phone_and_read_on_the_tablet(acts, m)

    assert acts.trail() == [
        *DISPATCH,
        *READ_BEFORE_RECEIPTS,
        *["push_to_devices:read_receipt"] * RETRY.maximum_attempts,
        "transition_message:DELIVERED",
        "clear_device_read",
        "push_to_devices:read_revert",
    ]
    (cleared,) = acts[MessageStoreActivities.clear_device_read].calls
    assert cleared.device_id == TABLET.device_id
    assert pushes(acts, "read_revert") == [[TABLET.device_id]]
    assert result.status is M.DELIVERED and result.read_on is None


async def test_an_unread_message_rests_where_it_is_once_the_read_window_closes(
    acts: StandIns,
) -> None:
    handle = await send_and_signal_during_push(
        acts, message(), (MessageDeliveryWorkflow.delivered, PHONE.device_id)
    )
    result = await handle.result()

    assert acts.trail() == [*DISPATCH, *DELIVERED]
    assert result.status is M.DELIVERED and result.read_on is None
    events = (await handle.fetch_history()).events
    waited = events[-1].event_time.ToDatetime() - events[0].event_time.ToDatetime()
    assert waited >= timedelta(days=7), "the workflow waited out the whole read window"


async def test_a_flood_of_bogus_signals_continues_as_new_carrying_the_delivery_along(
    acts: StandIns,
) -> None:
    """Past its share of signals a run hands over to a new one, which still hears the
    real devices, and neither pushes again nor forgets what the first one knew."""
    handle, pushing = await send_and_hold_the_push(acts, message())
    first_run = handle.result_run_id

    bogus = DeviceSignal(device_id="intruder")
    for sent in range(0, _SIGNALS_PER_RUN, 200):  # in batches, so the flood takes ~0.5 s
        batch = min(200, _SIGNALS_PER_RUN - sent)
        await asyncio.gather(
            *(handle.signal(MessageDeliveryWorkflow.delivered, bogus) for _ in range(batch))
        )
    pushing.release()
    second_run = await run_after(handle, first_run)
    await handle.signal(MessageDeliveryWorkflow.delivered, DeviceSignal(device_id=PHONE.device_id))
    result = await handle.result()

    assert (await handle.describe()).run_id == second_run
    assert acts.trail() == [*DISPATCH, *DELIVERED]
    # the new run moved the row from the version the first run left it at
    assert acts.moves(MessageStoreActivities.transition_message)[-1] == (3, "DELIVERED")
    assert result.status is M.DELIVERED and result.delivered_on == PHONE.device_id
    assert result.devices_pushed == sorted(d.device_id for d in (PHONE, TABLET, LAPTOP))
    assert result.ignored_signal_count == _SIGNALS_PER_RUN


async def test_a_temporal_cancel_while_awaiting_delivery_recalls_and_ends_canceled(
    acts: StandIns,
) -> None:
    """Cancel from the Web UI or the CLI of Temporal, after the push and before any device
    confirmed: the message is recalled (recorded CANCELLED first, like a recall), no
    email follows at the deadline, and the execution ends Canceled."""
    handle, pushing = await send_and_hold_the_push(acts, message())
    pushing.release()

    async def awaiting_delivery() -> bool:
        progress = await handle.query(MessageDeliveryWorkflow.status)
        return progress.step == "awaiting delivery"

    await eventually(awaiting_delivery, what="the message awaiting delivery")
    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()

    assert isinstance(failed.value.cause, CancelledError)
    assert (await handle.describe()).status is WorkflowExecutionStatus.CANCELED
    assert acts.trail() == [*DISPATCH, "recall_message"]
    (recall,) = acts[MessageStoreActivities.recall_message].calls
    assert (recall.reason, recall.requested_by) == ("cancelled in Temporal", "temporal")
    assert acts[EmailActivities.send].calls == [], "no email at the deadline"
