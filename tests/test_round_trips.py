"""What a lifecycle costs in Temporal round trips, read from its recorded history.

Every regular activity is a round trip through the Temporal server (scheduled, picked
up, completed) and every workflow task another; a local activity costs neither, but
each still costs the worker a workflow activation. A happy-path order makes three
activity round trips (its provider calls: validate, charge, reserve), each of which
first moves the row (validate also records the order, and reserve completes it once
the stock is held), in four workflow tasks, and no local activity. It records one
patch marker, since each marker costs the server an event and a search-attribute write.

Validation stays a regular activity although it only reads: as a local activity it
ran inside the workflow task that records the order, so while a slow catalog answered,
neither the ``status`` query nor a cancel reached the workflow (a query or a signal
waits for the workflow task in flight). tests/test_order_e2e.py's cancellation racing
validation caught that. ``make bench`` shows what that saves; this keeps it so.
"""

from __future__ import annotations

import json
from collections import Counter

from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory

from tests.conftest import Harness
from tollgate.names import ORDER_STATUS_ATTR
from workflows._lifecycle import LIFECYCLE_PATCH


def _costs(history: WorkflowHistory) -> tuple[list[str], Counter[EventType.ValueType]]:
    """The activity types scheduled through the server, in order, and the event counts."""
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    return scheduled, Counter(e.event_type for e in history.events)


def _upserts(history: WorkflowHistory) -> list[dict[str, object]]:
    """What each search-attribute upsert of the history set, in order."""
    upserts = [
        e.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES
    ]
    return [{name: json.loads(value.data) for name, value in set_.items()} for set_ in upserts]


async def test_a_completed_order_makes_three_activity_round_trips_in_four_workflow_tasks(
    h: Harness,
) -> None:
    handle = await h.service.create(h.order())
    assert (await handle.result()).status == "COMPLETED"

    history = await handle.fetch_history()
    scheduled, events = _costs(history)

    assert scheduled == ["validate_order", "charge_payment", "reserve_inventory"]
    assert events[EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED] == 4
    # no local activity, and one patch marker: the one that stands for the code's patches
    assert events[EventType.EVENT_TYPE_MARKER_RECORDED] == 1
    # its TemporalChangeVersion, and the status at CHARGING, RESERVING and COMPLETED
    assert _upserts(history) == [
        {"TemporalChangeVersion": [LIFECYCLE_PATCH]},
        {ORDER_STATUS_ATTR.name: "CHARGING"},
        {ORDER_STATUS_ATTR.name: "RESERVING"},
        {ORDER_STATUS_ATTR.name: "COMPLETED"},
    ]
