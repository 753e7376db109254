"""Where a lifecycle's time goes, from its workflow history's event times.

The server stamps every event, so a history says how long each activity ran, how long
it waited to be picked up, and how long the workflow tasks between them took. The sum
of those next to the total shows whether a lifecycle is slow because its steps are
slow (Postgres, HTTP) or because it takes many round trips through the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client

from tollgate_dev.bench.models import Breakdown

_E = EventType


def _at(event: HistoryEvent) -> datetime:
    return event.event_time.ToDatetime()


def _ms(seconds: float) -> float:
    return seconds * 1000


def _is_local_activity(event: HistoryEvent) -> bool:
    return event.marker_recorded_event_attributes.marker_name == "core_local_activity"


def _one(events: Sequence[HistoryEvent], end_after_activity: int | None) -> tuple[float, ...]:
    """(total, in activities, activity queue, workflow tasks) in ms, up to the end."""
    start = _at(events[0])
    scheduled: dict[int, datetime] = {}
    started: dict[int, datetime] = {}
    in_activities = queued = tasks = 0.0
    task_scheduled: datetime | None = None
    done = 0
    end = _at(events[-1])
    for event in events:
        kind = event.event_type
        if kind == _E.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled[event.event_id] = _at(event)
        elif kind == _E.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            attrs = event.activity_task_started_event_attributes
            started[attrs.scheduled_event_id] = _at(event)
            queued += (_at(event) - scheduled[attrs.scheduled_event_id]).total_seconds()
        elif kind == _E.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            attrs_done = event.activity_task_completed_event_attributes
            in_activities += (_at(event) - started[attrs_done.scheduled_event_id]).total_seconds()
            done += 1
            if done == end_after_activity:
                end = _at(event)
                break
        elif kind == _E.EVENT_TYPE_MARKER_RECORDED and _is_local_activity(event):
            # A local activity ran inside the workflow task this marker closes: its
            # time is in "workflow tasks".
            done += 1
            if done == end_after_activity:
                end = _at(event)
                break
        elif kind == _E.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
            task_scheduled = _at(event)
        elif kind == _E.EVENT_TYPE_WORKFLOW_TASK_COMPLETED and task_scheduled is not None:
            tasks += (_at(event) - task_scheduled).total_seconds()
            task_scheduled = None
    total = (end - start).total_seconds()
    return _ms(total), _ms(in_activities), _ms(queued), _ms(tasks)


async def breakdown(
    client: Client, workflow_ids: Sequence[str], *, end_after_activity: int | None
) -> Breakdown:
    """The mean breakdown of these (finished) workflows' first runs.

    ``end_after_activity``: stop at the completion of that many activities, regular or
    local (a message is delivered there, and then rests for its read window); None:
    the whole run.
    """
    sums = [0.0, 0.0, 0.0, 0.0]
    for workflow_id in workflow_ids:
        history = await client.get_workflow_handle(workflow_id).fetch_history()
        for at, value in enumerate(_one(history.events, end_after_activity)):
            sums[at] += value
    n = max(len(workflow_ids), 1)
    total, in_activities, queued, tasks = (round(v / n, 1) for v in sums)
    return Breakdown(
        samples=len(workflow_ids),
        total_ms=total,
        in_activities_ms=in_activities,
        activity_queue_ms=queued,
        workflow_tasks_ms=tasks,
        other_ms=round(total - in_activities - queued - tasks, 1),
    )


def _first_task_wait(events: Sequence[HistoryEvent]) -> float | None:
    """Milliseconds the run's first workflow task waited to be picked up."""
    scheduled: datetime | None = None
    for event in events:
        if event.event_type == _E.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
            scheduled = _at(event)
        elif event.event_type == _E.EVENT_TYPE_WORKFLOW_TASK_STARTED and scheduled is not None:
            return _ms((_at(event) - scheduled).total_seconds())
    return None


async def first_task_waits(client: Client, workflow_ids: Sequence[str]) -> list[float]:
    """How long each workflow's first task waited on the task queue for a poller, in ms.

    A new workflow's first task is on the task queue, which only some of a worker's
    pollers poll; every later task goes to the sticky queue of the worker that has the
    workflow cached. Too few task-queue pollers on a busy worker show here first: new
    lifecycles queue while the ones in flight do not (README, Speed).
    """
    waits = []
    for workflow_id in workflow_ids:
        history = await client.get_workflow_handle(workflow_id).fetch_history()
        wait = _first_task_wait(history.events)
        if wait is not None:
            waits.append(round(wait, 1))
    return waits
