"""Read-receipt sync saga: a read on one device becomes a read everywhere, or nowhere.

1. Mark the message READ in Postgres (the cloud state) and record the reader's read.
2. Push a read receipt to every other device of the recipient.
If step 2 fails for good, compensate: revert the row to where it was (DELIVERED or
EMAILED), clear the reader's read mark, and tell the reader's device to show the message
unread again, so no device shows a read state the cloud does not hold.
"""

from __future__ import annotations

from typing import Literal

from temporalio import workflow
from temporalio.exceptions import ActivityError

from workflows._lifecycle import describe, error_type, step_retry, until_done_retry, until_undone
from workflows._push import fan_out

with workflow.unsafe.imports_passed_through():
    from activities.messages import MessageStoreActivities
    from activities.push import PushActivities
    from tollgate.errors import MessageRecalled
    from tollgate.messages.models import (
        ClearReadInput,
        DeviceFactInput,
        PushInput,
        ReadSyncInput,
        ReadSyncResult,
        TransitionInput,
    )
    from tollgate.messages.states import MessageStatus
    from tollgate.names import READ_SYNC_WORKFLOW, step_key, transition_id


@workflow.defn(name=READ_SYNC_WORKFLOW)
class ReadReceiptSyncWorkflow:
    """Child of ``MessageDeliveryWorkflow``; one per read that needs syncing."""

    @workflow.run
    async def run(self, inp: ReadSyncInput) -> ReadSyncResult:
        r = inp.retry
        step = step_retry(r)
        until_done = until_done_retry(r)
        parent = workflow.info().parent
        owner = parent.workflow_id if parent else workflow.info().workflow_id
        timeout = r.activity_timeout

        async def move(to: MessageStatus, version: int, reason: str) -> int:
            result = await workflow.execute_activity_method(
                MessageStoreActivities.transition_message,
                TransitionInput(
                    message_id=inp.message_id,
                    expected_version=version,
                    to_status=to,
                    transition_id=transition_id(owner, version, to.value),
                    actor=f"workflow:{workflow.info().workflow_id}",
                    reason=reason,
                ),
                start_to_close_timeout=timeout,
                retry_policy=until_done,
            )
            return result.version

        async def record(device_ids: list[str], fact: Literal["read", "receipt"]) -> None:
            await workflow.execute_activity_method(
                MessageStoreActivities.record_device_fact,
                DeviceFactInput(message_id=inp.message_id, device_ids=device_ids, fact=fact),
                start_to_close_timeout=timeout,
                retry_policy=until_done,
            )

        # 1. the cloud state first: a receipt must never run ahead of it
        version = await move(
            MessageStatus.READ, inp.expected_version, f"read on {inp.reader_device_id}"
        )
        await record([inp.reader_device_id], "read")

        # 2. receipts to the other devices
        try:
            pushed = await fan_out(
                PushInput(
                    message_id=inp.message_id,
                    devices=inp.other_devices,
                    kind="read_receipt",
                    payload={"read_on": inp.reader_device_id},
                    idempotency_prefix=step_key(owner, "receipt", inp.reader_device_id),
                ),
                per_device=timeout,
                heartbeat=timeout,
                retry=step,
            )
        except ActivityError as err:
            if error_type(err) == MessageRecalled.__name__:
                raise
            reason = describe(err)
        else:
            if pushed.pushed:
                await record(sorted(pushed.pushed), "receipt")
            return ReadSyncResult(
                synced=True,
                status=MessageStatus.READ,
                version=version,
                receipts_pushed=sorted(pushed.pushed),
            )

        # compensation: revert the read mark everywhere it was made
        version = await move(inp.revert_to, version, f"read receipts could not be synced: {reason}")
        await until_undone(
            MessageStoreActivities.clear_device_read,
            ClearReadInput(message_id=inp.message_id, device_id=inp.reader_device_id),
            settings=r,
            what="clear-read",
        )
        if inp.reader_device is not None:
            await until_undone(
                PushActivities.push,
                PushInput(
                    message_id=inp.message_id,
                    devices=[inp.reader_device],
                    kind="read_revert",
                    payload={"reason": "read state could not be synced"},
                    # one revert per sync attempt: the device may be read and reverted again
                    idempotency_prefix=step_key(workflow.info().workflow_id, "read-revert"),
                ),
                settings=r,
                what="read-revert",
            )
        return ReadSyncResult(
            synced=False, status=inp.revert_to, version=version, failure_reason=reason
        )
