"""Connecting to Temporal the same way from the worker, the CLI and the tests."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.service import RPCError, RPCStatusCode

from tollgate.codec import EncryptionCodec, load_key
from tollgate.settings import Settings


def data_converter(settings: Settings) -> DataConverter:
    """The pydantic converter, encrypting payloads when the settings name a key.

    With a key, failure messages and stack traces move into an (encrypted) payload too:
    an error text can quote customer data.
    """
    key = load_key(settings)
    if key is None:
        return pydantic_data_converter
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=EncryptionCodec(key),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


async def connect(settings: Settings) -> Client:
    """A client for ``settings.temporal_address`` with the pydantic converter, tracing,
    and payload encryption when a key is configured (see :mod:`tollgate.codec`)."""
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=data_converter(settings),
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
