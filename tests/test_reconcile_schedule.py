"""The worker keeps the reconciler's schedule in step with its code, and leaves an
operator's pause alone."""

from __future__ import annotations

from datetime import timedelta

from temporalio.client import (
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleIntervalSpec,
    ScheduleSpec,
)

from tests.conftest import Harness
from tollgate.names import RECONCILER_WORKFLOW
from tollgate.ops.reconcile import (
    RECONCILE_SCHEDULE_ID,
    ReconcileInput,
    ensure_schedule,
    scheduled_input,
)
from tollgate_dev.bench.run import reconciler_paused


async def test_an_older_schedule_gets_todays_input_and_interval_and_keeps_its_pause(
    h: Harness,
) -> None:
    # As an older worker left it: every run looks at the whole day, every hour.
    await h.client.create_schedule(
        RECONCILE_SCHEDULE_ID,
        Schedule(
            action=ScheduleActionStartWorkflow(
                RECONCILER_WORKFLOW,
                ReconcileInput(),
                id=f"{RECONCILE_SCHEDULE_ID}-run",
                task_queue=h.task_queue,
            ),
            spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(hours=1))]),
        ),
    )
    schedule = h.client.get_schedule_handle(RECONCILE_SCHEDULE_ID)
    try:
        await schedule.pause(note="operator: reconciler off during the migration")

        created = await ensure_schedule(
            h.client, task_queue=h.task_queue, every=timedelta(minutes=5)
        )

        assert not created
        described = (await schedule.describe()).schedule
        assert described.state.paused, "a worker start must not resume a paused reconciler"
        assert described.spec.intervals[0].every == timedelta(minutes=5)
        action = described.action
        assert isinstance(action, ScheduleActionStartWorkflow)
        (payload,) = action.args
        sent = await h.client.data_converter.decode([payload], [ReconcileInput])
        assert sent == [scheduled_input(timedelta(minutes=5))]
    finally:
        await schedule.delete()


async def test_the_bench_pauses_the_reconciler_while_it_measures_and_keeps_an_operators_pause(
    h: Harness,
) -> None:
    await ensure_schedule(h.client, task_queue=h.task_queue, every=timedelta(minutes=5))
    schedule = h.client.get_schedule_handle(RECONCILE_SCHEDULE_ID)
    try:
        async with reconciler_paused(h.client, lambda _line: None):
            assert (await schedule.describe()).schedule.state.paused
        assert not (await schedule.describe()).schedule.state.paused, "resumed afterwards"

        await schedule.pause(note="operator: reconciler off during the migration")
        async with reconciler_paused(h.client, lambda _line: None):
            pass
        assert (await schedule.describe()).schedule.state.paused, "the operator's pause stays"
    finally:
        await schedule.delete()
