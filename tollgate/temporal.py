"""Connecting to Temporal the same way from the worker, the CLI and the tests."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter

from tollgate.settings import Settings


async def connect(settings: Settings) -> Client:
    """A client with the pydantic converter and tracing, for ``settings.temporal_address``."""
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
        interceptors=[TracingInterceptor()],
    )
