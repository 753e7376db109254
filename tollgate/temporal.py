"""Connecting to Temporal the same way from the worker, the CLI and the tests."""

from __future__ import annotations

from typing import Any, TypeVar

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode

from tollgate.settings import Settings


async def connect(settings: Settings) -> Client:
    """A client with the pydantic converter and tracing, for ``settings.temporal_address``."""
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
        interceptors=[TracingInterceptor()],
    )


ProgressT = TypeVar("ProgressT")


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
