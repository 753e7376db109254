"""Message delivery: store, push to every device, wait for delivery, fall back to email.

INITIATED -> STORED -> DISPATCHED -> DELIVERED -> READ, with DISPATCHED -> FALLBACK_EMAIL
when no device confirms delivery before the deadline (or no push got through), then
EMAILED or FAILED. A read on any device starts the read-receipt sync saga
(:mod:`workflows.read_receipts`) as a child. The sender's recall ends it CANCELLED.

Devices speak through signals (``delivered``, ``read``). They may arrive early (before
the push), twice, or for a device the message never went to; each is recorded once, in
arrival order, and none moves the state backwards: a confirmation after the email went
out is kept as a per-device fact, not a transition.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError

from workflows._lifecycle import Frame, LifecycleWorkflow, describe, is_cancellation
from workflows._push import fan_out

with workflow.unsafe.imports_passed_through():
    from activities.email import EmailActivities
    from activities.messages import MessageStoreActivities
    from tollgate.errors import MessageRecalled
    from tollgate.messages.models import (
        DeliverInput,
        DeliveryCarryOver,
        Device,
        DeviceFactInput,
        DeviceSignal,
        DevicesInput,
        EmailInput,
        MessageInput,
        MessageProgress,
        MessageResult,
        MessageSnapshot,
        PushInput,
        ReadSyncInput,
        RecallMessageInput,
        RecallRequest,
        TransitionInput,
    )
    from tollgate.messages.states import MessageStatus
    from tollgate.names import (
        MESSAGE_DELIVERED_SIGNAL,
        MESSAGE_READ_SIGNAL,
        MESSAGE_RECALL_SIGNAL,
        MESSAGE_STATUS_ATTR,
        MESSAGE_STATUS_QUERY,
        MESSAGE_WORKFLOW,
        read_sync_workflow_id,
        step_key,
    )
    from workflows.read_receipts import ReadReceiptSyncWorkflow

M = MessageStatus


class Step(StrEnum):
    """What the delivery is doing, as the ``status`` query reports it."""

    STARTING = "starting"
    DISPATCHING = "dispatching"
    PUSHING = "pushing"
    AWAITING_DELIVERY = "awaiting delivery"
    EMAILING = "emailing"
    AWAITING_READ = "awaiting read"
    SYNCING = "syncing read receipts"
    READ = "read"
    SYNC_ABANDONED = "read sync abandoned"
    RECALLING = "recalling"
    RECALLED = "recalled"
    FAILED = "failed"
    DONE = "done"


#: Distinct signals kept while the recipient's devices are not known yet. Generous, so
#: that a flood of bogus signals in the first moments cannot crowd out a real device
#: (Tollgate's own front doors send only what a caller asked for, one per request);
#: bounded, so that the workflow's memory is.
_MAX_BUFFERED_SIGNALS = 1_000
#: Signals set aside that the result names (the rest are only counted).
_IGNORED_SAMPLE = 10
#: Read-receipt syncs a message may start; after that a read is recorded, not synced.
_MAX_READ_SYNCS = 5
#: Device signals one run takes before it continues as new. Temporal refuses signals
#: past a per-run limit (10,000 on the dev server): a flood of bogus ones must not make
#: the message deaf to its real devices.
_SIGNALS_PER_RUN = 2_000


class _ContinueAsNew(Exception):
    """Raised at a wait point when this run has taken enough signals."""

    def __init__(
        self,
        phase: Literal["awaiting_delivery", "awaiting_read"],
        *,
        deadline_at: datetime | None = None,
        window_ends: datetime | None = None,
    ) -> None:
        super().__init__(phase)
        self.phase, self.deadline_at, self.window_ends = phase, deadline_at, window_ends


#: What the lifecycle frame knows of a delivery.
DELIVERY: Frame[MessageStatus, RecallRequest] = Frame(
    initial=M.INITIATED,
    status_attr=MESSAGE_STATUS_ATTR,
    stopped_error=MessageRecalled.__name__,
    stopped_status=M.CANCELLED,
    transition=MessageStoreActivities.transition_message,
    transition_input=lambda message_id, **move: TransitionInput(message_id=message_id, **move),
    stop_from_postgres=RecallRequest(reason="recall recorded in Postgres", requested_by="postgres"),
    stop_from_temporal=RecallRequest(reason="cancelled in Temporal", requested_by="temporal"),
)


@workflow.defn(name=MESSAGE_WORKFLOW)
class MessageDeliveryWorkflow(LifecycleWorkflow[MessageStatus, RecallRequest]):
    """One message's delivery, from INITIATED to READ, EMAILED, FAILED or CANCELLED."""

    @workflow.init
    def __init__(self, message: MessageInput) -> None:
        self._msg = message
        super().__init__(DELIVERY, message.message_id, message.retry, step=Step.STARTING)
        #: The recipient's devices when the message was dispatched; None until then.
        self._devices: dict[str, Device] | None = None
        self._pushed: dict[str, str] = {}
        self._removed: list[str] = []
        #: Signals in arrival order (a dict: ordered, and a duplicate is found at once).
        self._signals: dict[tuple[str, str], None] = {}
        self._confirmed: list[str] = []
        self._reads: list[str] = []
        #: A sample of the signals set aside (unknown device, or over the buffer), and
        #: how many there were in all.
        self._ignored: list[str] = []
        self._ignored_count = 0
        #: Read-receipt syncs started; bounded, since each failed one may be retried.
        self._read_syncs = 0
        #: Device signals received by this run (Temporal caps signals per run).
        self._signals_this_run = 0
        #: Set when this run took its share of signals and hands over to a new one.
        self._continued: _ContinueAsNew | None = None
        self._facts_recorded: set[tuple[str, str]] = set()
        self._delivered_on: str | None = None
        self._read_on: str | None = None
        self._email_id: str | None = None

    # --- the process ---------------------------------------------------------------

    @workflow.run
    async def run(self, message: MessageInput) -> MessageResult:
        """Deliver the message; on recall, record CANCELLED. Returns where it ended."""
        carried = message.carry_over
        local_store = self.patch_store()
        if carried is not None:
            self._restore(carried)
        elif not local_store:
            self._recorded(
                await self.activity(
                    MessageStoreActivities.record_message, message, retry=self._until_done_retry
                )
            )
        elif not self._moves_in_steps:
            # Record the message (unless the service did) and move it to STORED.
            self._recorded(await self.store(MessageStoreActivities.begin_message, message))
        # else the dispatch records it, with the moves before the push, in one activity

        async def business() -> None:
            try:
                await (self._deliver() if carried is None else self._resume(carried))
            except _ContinueAsNew as full:
                self._continued = full

        return await self.run_lifecycle(business, self._finish)

    async def _finish(self) -> MessageResult:
        """Continue as new, or record a recall; write what devices said; report."""
        if self._continued is not None and self._stop is None:
            await self._flush_facts()
            await workflow.wait_condition(workflow.all_handlers_finished)
            if self._stop is None:
                workflow.continue_as_new(
                    self._msg.model_copy(update={"carry_over": self._carry_over(self._continued)})
                )
            # else: a recall came in while this run wound down; it ends here, below
        if self._stop is not None:
            await self._record_recall(self._stop)
        await self._flush_facts()
        return self._result()

    def on_step_failure(self, err: ActivityError | ChildWorkflowError | ApplicationError) -> None:
        """No saga to undo here: a step that fails for good is a bug, so the workflow
        task fails and Temporal retries it after the fix is deployed."""
        raise err

    async def _deliver(self) -> None:
        dispatched = await self._dispatch()
        if dispatched is None:
            return  # recalled before the delivery began
        devices, deadline_at = dispatched
        push_failure = await self._push_message(devices)
        if self._pushed and push_failure is None:
            await self._await_delivery(deadline_at)
        await self._settle_delivery(push_failure)

    async def _dispatch(self) -> tuple[list[Device], datetime] | None:
        """Record the message, find the recipient's devices, move it to DISPATCHED: the
        devices and the delivery deadline, or None when the row was found recalled."""
        m = self._msg
        self._step = Step.DISPATCHING
        if self._moves_in_steps:
            dispatched = await self.store(MessageStoreActivities.dispatch_message, m)
            if not self._recorded(dispatched):
                return None
            devices = dispatched.devices
        else:
            if self._status is not M.STORED:
                await self.move(M.STORED)
            found = await self.store(
                MessageStoreActivities.recipient_devices, DevicesInput(user_id=m.recipient_id)
            )
            devices = found.devices
        self._devices = {d.device_id: d for d in devices}
        self._sort_signals()
        deadline_at = workflow.now() + m.deadline
        if not self._moves_in_steps:
            await self.move(M.DISPATCHED)
        return devices, deadline_at

    def _recorded(self, row: MessageSnapshot) -> bool:
        """Take where the message's first write left its row; False if it found it recalled."""
        self.set_status(row.status, row.version)
        if row.status is M.CANCELLED:
            self.note_stopped_in_postgres()
            return False
        return True

    async def _resume(self, carried: DeliveryCarryOver) -> None:
        """Pick the lifecycle up where the previous run continued as new."""
        if carried.phase == "awaiting_delivery":
            assert carried.deadline_at is not None
            await self._await_delivery(carried.deadline_at)
            await self._settle_delivery(None)
        else:
            assert carried.window_ends is not None
            await self._await_reads(carried.window_ends)

    async def _await_delivery(self, deadline_at: datetime) -> None:
        """Wait for a device to confirm, until ``deadline_at``."""
        self._step = Step.AWAITING_DELIVERY
        remaining = deadline_at - workflow.now()
        if not self._confirmed and remaining > timedelta(0):
            try:
                await workflow.wait_condition(
                    lambda: bool(self._confirmed) or self._run_is_full(), timeout=remaining
                )
            except TimeoutError:
                return
            if not self._confirmed:
                raise _ContinueAsNew("awaiting_delivery", deadline_at=deadline_at)

    async def _settle_delivery(self, push_failure: str | None) -> None:
        """DELIVERED if a device confirmed, else the email fallback; then wait for reads."""
        m = self._msg
        if self._confirmed:
            self._delivered_on = self._confirmed[0]
            reason = f"confirmed by device {self._delivered_on}"
            if self._moves_in_steps:
                # The facts the signals brought and the move, in one local activity.
                facts = self._unrecorded_facts()
                moved = await self.store(
                    MessageStoreActivities.deliver_message,
                    DeliverInput(facts=facts, move=self.next_move(M.DELIVERED, reason=reason)),
                )
                self._facts_were_recorded(facts)
                self.set_status(M.DELIVERED, moved.version)
            else:
                await self._flush_facts()
                await self.move(M.DELIVERED, reason=reason)
        else:
            if push_failure is not None:
                reason = f"push failed: {push_failure}"
            elif not self._pushed:
                reason = "no device could receive a push"
            else:
                reason = f"no delivery confirmation within {m.deadline}"
            if not await self._fall_back_to_email(reason):
                return
        await self._await_reads(workflow.now() + m.read_window)

    async def _push_message(self, devices: list[Device]) -> str | None:
        """Fan the message out; returns why it failed for good, or None."""
        self._step = Step.PUSHING
        if not devices:
            return None
        try:
            result = await fan_out(
                PushInput(
                    message_id=self._msg.message_id,
                    devices=devices,
                    kind="message",
                    payload={"sender": self._msg.sender_id, "preview": self._msg.body[:80]},
                    idempotency_prefix=step_key(self._id, "push"),
                ),
                per_device=self._msg.retry.activity_timeout,
                heartbeat=self._msg.push_heartbeat_timeout,
                retry=self._step_retry,
            )
        except ActivityError as err:
            if self.found_stopped(err) or is_cancellation(err):
                raise
            return describe(err)
        self._pushed, self._removed = result.pushed, result.removed
        return None

    async def _fall_back_to_email(self, reason: str) -> bool:
        """FALLBACK_EMAIL, then EMAILED (True) or FAILED (False)."""
        await self.move(M.FALLBACK_EMAIL, reason=reason)
        self._step = Step.EMAILING
        m = self._msg
        try:
            email = await self.activity(
                EmailActivities.send,
                EmailInput(
                    message_id=m.message_id,
                    to=m.recipient_email,
                    subject=f"New message from {m.sender_id}",
                    body=m.body,
                    idempotency_key=step_key(self._id, "email"),
                ),
            )
        except ActivityError as err:
            if is_cancellation(err):
                raise
            self._failure_reason = describe(err)
            await self.move(M.FAILED, failure_reason=self._failure_reason)
            self._step = Step.FAILED
            return False
        self._email_id = email.email_id
        await self.move(M.EMAILED, reason=f"email {email.email_id}")
        return True

    async def _await_reads(self, window_ends: datetime) -> None:
        """Wait (until ``window_ends``) for a read; sync it to the other devices."""
        self._step = Step.AWAITING_READ
        while True:
            remaining = window_ends - workflow.now()
            if remaining <= timedelta(0):
                return
            if self._read_syncs >= _MAX_READ_SYNCS:
                # Every sync failed for good: stop spawning children (each is a workflow
                # and a push); the message rests where the last revert left it.
                workflow.logger.warning(
                    "read receipts could not be synced; giving up",
                    extra={"message_id": self._msg.message_id, "attempts": self._read_syncs},
                )
                self._step = Step.SYNC_ABANDONED
                return
            try:
                await workflow.wait_condition(
                    lambda: self._next_reader() is not None or self._run_is_full(),
                    timeout=remaining,
                )
            except TimeoutError:
                return
            reader = self._next_reader()
            if reader is None:
                raise _ContinueAsNew("awaiting_read", window_ends=window_ends)
            self._read_syncs += 1
            self._step = Step.SYNCING
            devices = self._devices or {}
            result = await workflow.execute_child_workflow(
                ReadReceiptSyncWorkflow.run,
                ReadSyncInput(
                    message_id=self._msg.message_id,
                    reader_device_id=reader,
                    reader_device=devices.get(reader),
                    other_devices=[
                        d
                        for d_id, d in devices.items()
                        if d_id != reader and d_id not in self._removed
                    ],
                    expected_version=self._version,
                    revert_to=self._status,
                    retry=self._msg.retry,
                ),
                id=read_sync_workflow_id(self._msg.message_id, self._read_syncs),
            )
            self.set_status(result.status, result.version)
            if result.synced:
                self._read_on = reader
                self._facts_recorded.add((reader, "read"))
                self._facts_recorded.update((d, "receipt") for d in result.receipts_pushed)
                self._step = Step.READ
                return
            # The reader's device was told to show it unread; a new read starts over.
            self._reads.remove(reader)
            self._facts_recorded.discard((reader, "read"))
            self._step = Step.AWAITING_READ

    async def _record_recall(self, request: RecallRequest) -> None:
        self._step = Step.RECALLING
        state = await self.store(
            MessageStoreActivities.recall_message,
            RecallMessageInput(
                message_id=self._msg.message_id,
                reason=request.reason,
                requested_by=request.requested_by,
            ),
            retry=self._until_done_retry,
        )
        self.set_status(state.status, state.version)
        self._step = Step.RECALLED if state.status is M.CANCELLED else Step.DONE

    async def _flush_facts(self) -> None:
        """Write the per-device delivered/read facts signals brought in so far."""
        for fact in self._unrecorded_facts():
            await self.store(
                MessageStoreActivities.record_device_fact, fact, retry=self._until_done_retry
            )
            self._facts_were_recorded([fact])

    def _unrecorded_facts(self) -> list[DeviceFactInput]:
        """The per-device delivered/read facts signals brought that are not written yet."""
        facts: tuple[tuple[Literal["delivered", "read"], list[str]], ...] = (
            ("delivered", self._confirmed),
            ("read", self._reads),
        )
        unrecorded = []
        for fact, devices in facts:
            new = [d for d in devices if (d, fact) not in self._facts_recorded]
            if new:
                unrecorded.append(
                    DeviceFactInput(message_id=self._msg.message_id, device_ids=new, fact=fact)
                )
        return unrecorded

    def _facts_were_recorded(self, facts: list[DeviceFactInput]) -> None:
        self._facts_recorded.update((d, f.fact) for f in facts for d in f.device_ids)

    # --- signals and queries -------------------------------------------------------

    @workflow.signal(name=MESSAGE_DELIVERED_SIGNAL)
    def delivered(self, signal: DeviceSignal) -> None:
        """A device confirms it received the push."""
        self._take_signal("delivered", signal.device_id)

    @workflow.signal(name=MESSAGE_READ_SIGNAL)
    def read(self, signal: DeviceSignal) -> None:
        """A device reports the message was read on it (which implies delivered)."""
        self._take_signal("read", signal.device_id)

    @workflow.signal(name=MESSAGE_RECALL_SIGNAL)
    def recall(self, request: RecallRequest) -> None:
        """The sender recalls the message: stop whatever runs, end CANCELLED."""
        if self._status.settled:
            self.note_stop(request)  # read or ended: nothing to interrupt
        else:
            self.interrupt(request)

    @workflow.query(name=MESSAGE_STATUS_QUERY)
    def status(self) -> MessageProgress:
        """Status and version as this workflow last saw them, and per-device progress."""
        return MessageProgress(
            message_id=self._msg.message_id,
            status=self._status,
            version=self._version,
            step=self._step,
            devices_pushed=sorted(self._pushed),
            confirmed_devices=list(self._confirmed),
            read_devices=list(self._reads),
        )

    # --- helpers -------------------------------------------------------------------

    def _take_signal(self, kind: Literal["delivered", "read"], device: str) -> None:
        """Buffer a device's signal until dispatch, or apply it; keep state bounded.

        Whatever a caller sends, the workflow's memory and its result stay small: a
        repeated signal is dropped, at most ``_MAX_BUFFERED_SIGNALS`` distinct ones wait
        for dispatch (a recipient has at most 10 devices), and signals for devices that
        are not the recipient's are only counted.
        """
        self._signals_this_run += 1
        entry = (kind, device)
        if self._devices is None:
            if entry in self._signals:
                return
            if len(self._signals) >= _MAX_BUFFERED_SIGNALS:
                self._note_ignored(f"{kind}:{device} (buffer full)")
                return
        self._signals[entry] = None
        self._sort_signals()

    def _sort_signals(self) -> None:
        """Move signals into confirmed/read lists once the devices are known.

        Until dispatch the device list is unknown, so signals wait in arrival order.
        Afterwards each is applied once: duplicates are dropped, unknown devices are
        counted (with a few kept as a sample in ``ignored_signals``), and a read also
        counts as a delivery.
        """
        if self._devices is None:
            return
        pending, self._signals = self._signals, {}
        for kind, device in pending:
            if device not in self._devices:
                self._note_ignored(f"{kind}:{device} (not a device of {self._msg.recipient_id})")
                continue
            if device not in self._confirmed:
                self._confirmed.append(device)
            if kind == "read" and device not in self._reads:
                self._reads.append(device)

    def _run_is_full(self) -> bool:
        """Time to continue as new: many signals in this run, or a long history."""
        return (
            self._signals_this_run >= _SIGNALS_PER_RUN
            or workflow.info().is_continue_as_new_suggested()
        )

    def _carry_over(self, at: _ContinueAsNew) -> DeliveryCarryOver:
        return DeliveryCarryOver(
            phase=at.phase,
            status=self._status,
            version=self._version,
            devices=list((self._devices or {}).values()),
            pushed=dict(self._pushed),
            removed=list(self._removed),
            confirmed=list(self._confirmed),
            reads=list(self._reads),
            facts_recorded=sorted(f"{d}|{f}" for d, f in self._facts_recorded),
            delivered_on=self._delivered_on,
            email_id=self._email_id,
            ignored_signals=list(self._ignored),
            ignored_signal_count=self._ignored_count,
            read_syncs=self._read_syncs,
            deadline_at=at.deadline_at,
            window_ends=at.window_ends,
        )

    def _restore(self, carried: DeliveryCarryOver) -> None:
        self.set_status(carried.status, carried.version)
        self._devices = {d.device_id: d for d in carried.devices}
        self._pushed, self._removed = dict(carried.pushed), list(carried.removed)
        self._confirmed, self._reads = list(carried.confirmed), list(carried.reads)
        self._facts_recorded = {
            (d, f) for d, _, f in (item.partition("|") for item in carried.facts_recorded)
        }
        self._delivered_on, self._email_id = carried.delivered_on, carried.email_id
        self._ignored, self._ignored_count = (
            list(carried.ignored_signals),
            carried.ignored_signal_count,
        )
        self._read_syncs = carried.read_syncs
        # Signals that arrived for this run before its first task ran are sorted now.
        self._sort_signals()

    def _note_ignored(self, what: str) -> None:
        self._ignored_count += 1
        if len(self._ignored) < _IGNORED_SAMPLE:
            self._ignored.append(what)

    def _next_reader(self) -> str | None:
        return self._reads[0] if self._reads else None

    def _result(self) -> MessageResult:
        return MessageResult(
            message_id=self._msg.message_id,
            status=self._status,
            version=self._version,
            devices_pushed=sorted(self._pushed),
            devices_removed=list(self._removed),
            delivered_on=self._delivered_on,
            read_on=self._read_on,
            email_id=self._email_id,
            failure_reason=self._failure_reason,
            ignored_signals=list(self._ignored),
            ignored_signal_count=self._ignored_count,
        )
