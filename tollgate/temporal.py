"""Connecting to Temporal the same way from the worker, the CLI and the tests."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.service import RPCError, RPCStatusCode

from tollgate.codec import EncryptionCodec, load_key, load_old_keys
from tollgate.errors import ConfigError
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
        key = load_key(settings)
        old_keys = load_old_keys(settings)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if key is None:
        if settings.payload_encryption == "off":
            return pydantic_data_converter
        raise ConfigError(
            "no payload key: set PAYLOAD_ENCRYPTION_KEY, or PAYLOAD_KEY_FILE to the key file "
            f"(looked for {settings.payload_key_path}; the local stack writes "
            "<STATE_DIR>/payload.key), or PAYLOAD_ENCRYPTION=off to send payloads in clear"
        )
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=EncryptionCodec(key, old_keys=old_keys),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


async def connect(settings: Settings, *, converter: DataConverter | None = None) -> Client:
    """A client for ``settings.temporal_address`` with the pydantic converter, tracing,
    and payload encryption (see :func:`data_converter`; pass ``converter`` when it was
    built already, to fail on a missing key before anything else is touched)."""
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=converter or data_converter(settings),
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
