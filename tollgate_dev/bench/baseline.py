"""Bare Temporal workflows the benchmark measures Tollgate against, on the same server.

A baseline workflow runs N no-op activities in sequence and nothing else: no Postgres,
no provider, no payload encryption, no tracing, no search attributes. Its latency is
what N activity round trips cost on this server, so a lifecycle's figure divided by
its baseline's says how much Tollgate adds to (or saves on) the plain Temporal cost.

This module is imported by Temporal's workflow sandbox, so it imports nothing but
Temporal and the standard library, and does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.common import RetryPolicy

#: Workflow and activity type names: bench-only, so they can never collide with
#: Tollgate's own on a server that runs both.
BASELINE_WORKFLOW = "BenchBaseline"
NOOP_ACTIVITY = "bench_noop"

#: Activities per baseline: the naive design the guarded one must beat, where every
#: Postgres write is a regular activity of its own.
#: An order ran record, 4 transitions, validate, charge, reserve.
ORDER_ACTIVITIES = 8
#: Only the order's 3 provider calls: what an order would cost with its Postgres
#: writes folded into them.
PROVIDER_CALL_ACTIVITIES = 3
#: The bench's message (2 devices, one confirmation, never read) ran record_message,
#: STORED, recipient_devices, DISPATCHED, push_to_devices, record_device_fact (the
#: confirmation), DELIVERED.
MESSAGE_ACTIVITIES = 7

#: What Tollgate's lifecycles run today (workflows/order.py, workflows/message.py):
#: the provider calls are regular activities, each making the move before it first;
#: the other reads and writes of the gate are local ones. An order: validate (record +
#: VALIDATING first), charge (CHARGING first), reserve (RESERVING first, COMPLETED
#: after). tests/test_round_trips.py checks an order's history has it.
ORDER_STEPS = (3, 0)
#: A message to 2 devices: dispatch_message (record + STORED, recipient's devices,
#: DISPATCHED), push_to_devices, then after the confirmation deliver_message (the
#: delivered fact and DELIVERED).
MESSAGE_STEPS = (1, 2)


@dataclass(frozen=True)
class BaselineInput:
    """How many no-op activities to run, one after another."""

    activities: int


@activity.defn(name=NOOP_ACTIVITY)
async def noop(step: int) -> int:
    """Does nothing: the cost measured is the round trip through the server."""
    return step


@workflow.defn(name=BASELINE_WORKFLOW)
class BaselineWorkflow:
    """``activities`` regular activities in sequence, as a lifecycle's steps are."""

    @workflow.run
    async def run(self, spec: BaselineInput) -> int:
        """Run the activities; returns how many ran."""
        for step in range(spec.activities):
            await workflow.execute_activity(
                noop,
                step,
                start_to_close_timeout=timedelta(seconds=10),
                retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=1)),
            )
        return spec.activities
