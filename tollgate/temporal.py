"""Connecting to Temporal the same way from the worker, the CLI and the tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg
import temporalio.worker
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateHandle,
    WorkflowUpdateStage,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.contrib.opentelemetry import TracingInterceptor, TracingWorkflowInboundInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import RPCError, RPCStatusCode

from tollgate.codec import codec_from_settings
from tollgate.errors import AlreadyExists, ConfigError
from tollgate.gate import Lifecycle, get_row
from tollgate.names import MESSAGE_DELIVERED_SIGNAL, MESSAGE_READ_SIGNAL
from tollgate.postgres import Connection
from tollgate.settings import Settings


def data_converter(settings: Settings) -> DataConverter:
    """The pydantic converter, encrypting payloads with the settings' key.

    Fails closed: with no key, ``ConfigError`` naming the settings, unless
    ``PAYLOAD_ENCRYPTION=off`` says plaintext is intended. A process run from another
    directory, or with a typo in ``PAYLOAD_KEY_FILE``, must not quietly send customer
    data to Temporal in clear. With a key, failure messages and stack traces move into
    an (encrypted) payload too: an error text can quote customer data.
    """
    try:
        codec = codec_from_settings(settings)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if codec is None:
        if settings.payload_encryption == "off":
            return pydantic_data_converter
        raise ConfigError(
            "no payload key: set PAYLOAD_ENCRYPTION_KEY, or PAYLOAD_KEY_FILE to the key file "
            f"(looked for {settings.payload_key_path}; the local stack writes "
            "<STATE_DIR>/payload.key), or PAYLOAD_ENCRYPTION=off to send payloads in clear"
        )
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


#: Signals a device (or its push provider) sends, one per receipt: they can come in
#: floods, and a workflow-side span costs milliseconds inside the sandbox. Traced on the
#: caller's side only; a stop (cancel, recall) is traced in the workflow as well.
UNTRACED_SIGNALS = frozenset({MESSAGE_DELIVERED_SIGNAL, MESSAGE_READ_SIGNAL})


class _WorkflowTracing(TracingWorkflowInboundInterceptor):
    async def handle_signal(self, input: temporalio.worker.HandleSignalInput) -> None:
        if input.signal in UNTRACED_SIGNALS:
            await self.next.handle_signal(input)
        else:
            await super().handle_signal(input)


class Tracing(TracingInterceptor):
    """Temporal's OpenTelemetry interceptor, without a workflow span per device signal.

    Measured: 3,000 device signals in 4 s made a message workflow fail 7 of its
    workflow tasks on the deadlock detector with a span per signal, none without; a
    flood of 10,000 could stall it on a loaded worker.
    """

    def workflow_interceptor_class(
        self, input: temporalio.worker.WorkflowInterceptorClassInput
    ) -> type[TracingWorkflowInboundInterceptor]:
        super().workflow_interceptor_class(input)  # registers the span extern function
        return _WorkflowTracing


async def connect(
    settings: Settings,
    *,
    converter: DataConverter | None = None,
    runtime: Runtime | None = None,
    lazy: bool = False,
) -> Client:
    """A client for ``settings.temporal_address`` with the pydantic converter, tracing,
    and payload encryption (see :func:`data_converter`; pass ``converter`` when it was
    built already, to fail on a missing key before anything else is touched). A
    ``runtime`` carries the SDK's telemetry (see :func:`prometheus_runtime`). A ``lazy``
    client connects on its first call, so a server that starts while Temporal is down
    can still answer (and say it is not ready)."""
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=converter or data_converter(settings),
        interceptors=[Tracing()],
        runtime=runtime,
        lazy=lazy,
    )


def prometheus_runtime(bind_address: str) -> Runtime:
    """An SDK runtime that serves Temporal's own metrics (workflow and activity
    schedule-to-start latency, task slots, polls, ...) in Prometheus text on
    ``http://<bind_address>/metrics``. Clients and workers built on it report there."""
    return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=bind_address)))


ProgressT = TypeVar("ProgressT")
ResultT = TypeVar("ResultT")


async def start_lifecycle(
    client: Client,
    pool: asyncpg.Pool,
    lifecycle: Lifecycle,
    entity_id: str,
    *,
    insert: Callable[[Connection], Awaitable[object]],
    workflow: str,
    arg: object,
    workflow_id: str,
    task_queue: str,
    result_type: type[ResultT],
    search_attributes: Sequence[SearchAttributePair[str]],
    summary: str,
) -> WorkflowHandle[Any, ResultT]:
    """Insert an entity's first row and start its workflow: both, or neither.

    The insert and the start share one database transaction: if Temporal refuses the
    start (the id already has a lifecycle) or cannot be reached, the insert rolls back.
    If the commit itself fails after the start, the workflow's first activity inserts
    the identical row, so the entity is still recorded. An id names one lifecycle
    forever, even after it ended.
    """
    kind = lifecycle.kind
    async with pool.acquire() as conn, conn.transaction():
        existing = await get_row(conn, lifecycle, entity_id)
        if existing is not None:
            raise AlreadyExists(f"{kind} {entity_id} already exists ({existing['status']})")
        await insert(conn)
        try:
            return await client.start_workflow(
                workflow,
                arg,
                result_type=result_type,
                id=workflow_id,
                task_queue=task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                search_attributes=TypedSearchAttributes(search_attributes),
                static_summary=summary,
            )
        except WorkflowAlreadyStartedError:
            raise AlreadyExists(
                f"{kind} {entity_id} already has a lifecycle ({workflow_id}); "
                f"{kind} ids cannot be reused"
            ) from None


async def start_lifecycle_with_update(
    client: Client,
    pool: asyncpg.Pool,
    lifecycle: Lifecycle,
    entity_id: str,
    *,
    insert: Callable[[Connection], Awaitable[object]],
    workflow: str,
    arg: object,
    workflow_id: str,
    task_queue: str,
    result_type: type[Any],
    search_attributes: Sequence[SearchAttributePair[str]],
    summary: str,
    update: str,
    update_result_type: type[ResultT],
) -> WorkflowUpdateHandle[ResultT]:
    """:func:`start_lifecycle` with an update sent in the same request (update-with-start).

    Both or neither, as there: the row is committed only once Temporal has started the
    workflow and its first workflow task has accepted ``update``. Await the returned
    handle's ``result()`` for the update's answer, outside any transaction: the
    workflow's first activity waits for this row to be committed.

    Holding the transaction until acceptance is the price of one round trip: with no
    worker polling, the call waits, so callers bound it. If they give up (or the commit
    fails) after Temporal started the workflow, the workflow's first activity inserts
    the identical row, as with :func:`start_lifecycle`.
    """
    kind = lifecycle.kind
    async with pool.acquire() as conn, conn.transaction():
        existing = await get_row(conn, lifecycle, entity_id)
        if existing is not None:
            raise AlreadyExists(f"{kind} {entity_id} already exists ({existing['status']})")
        await insert(conn)
        operation: WithStartWorkflowOperation[Any, Any] = WithStartWorkflowOperation(
            workflow,
            arg,
            id=workflow_id,
            task_queue=task_queue,
            result_type=result_type,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=TypedSearchAttributes(search_attributes),
            static_summary=summary,
        )
        try:
            handle: WorkflowUpdateHandle[ResultT] = await client.start_update_with_start_workflow(
                update,
                start_workflow_operation=operation,
                wait_for_stage=WorkflowUpdateStage.ACCEPTED,
                result_type=update_result_type,
            )
        except WorkflowAlreadyStartedError:
            raise AlreadyExists(
                f"{kind} {entity_id} already has a lifecycle ({workflow_id}); "
                f"{kind} ids cannot be reused"
            ) from None
        return handle


async def signal_if_running(handle: WorkflowHandle[Any, Any], signal: str, arg: object) -> bool:
    """Send ``signal``; False when Temporal does not know the workflow (long gone)."""
    try:
        await handle.signal(signal, arg)
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        return False
    return True


async def inspect_workflow(
    handle: WorkflowHandle[Any, Any], query: str, progress_type: type[ProgressT]
) -> tuple[str | None, ProgressT | None]:
    """The workflow's execution status, and its live progress while it runs.

    ``(None, None)`` when Temporal does not know the workflow (never started, or its
    history was removed after the retention period).
    """
    try:
        description = await handle.describe()
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        return None, None
    status = description.status.name if description.status is not None else None
    progress = None
    if description.status == WorkflowExecutionStatus.RUNNING:
        progress = await handle.query(query, result_type=progress_type)
    return status, progress
