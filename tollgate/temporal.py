"""Connecting to Temporal the same way from the worker, the CLI and the tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

import temporalio.worker
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.client import (
    Client,
)
from temporalio.contrib.opentelemetry import OpenTelemetryInterceptor, OpenTelemetryPlugin
from temporalio.contrib.pydantic import PydanticPayloadConverter
from temporalio.converter import (
    CompositePayloadConverter,
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    PayloadConverter,
)
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from tollgate.codec import codec_from_settings
from tollgate.errors import ConfigError
from tollgate.names import MESSAGE_DELIVERED_SIGNAL, MESSAGE_READ_SIGNAL, entity_of
from tollgate.settings import Settings
from tollgate.telemetry import ACTIVITY_STARTING, remember_trace
from tollgate.tracing import current_trace_id

#: The SDK's pydantic payload converters, built once for the process.
_PYDANTIC_CONVERTERS = tuple(PydanticPayloadConverter().converters.values())


class SharedPydanticPayloadConverter(CompositePayloadConverter):
    """The SDK's pydantic payload converter, sharing one set of component converters,
    and so one cache of pydantic ``TypeAdapter``s, across the process.

    The SDK makes a payload converter from its class again for every workflow activation
    and every workflow it runs. The SDK's pydantic converter starts each with an empty
    adapter cache, so an order's workflow tasks built the adapters of ``OrderInput``,
    ``TransitionInput`` and the rest over and over: on a bare workflow shaped like an
    order (5 local and 2 regular activities), that cost more than the payloads' whole
    encoding, about 8 ms of worker CPU per run. Same wire format: JSON, as before.
    """

    def __init__(self) -> None:
        super().__init__(*_PYDANTIC_CONVERTERS)


#: Plain payloads in pydantic's JSON, as ``temporalio.contrib.pydantic`` writes them.
PLAIN_CONVERTER = DataConverter(payload_converter_class=SharedPydanticPayloadConverter)


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
            return PLAIN_CONVERTER
        raise ConfigError(
            "no payload key: set PAYLOAD_ENCRYPTION_KEY, or PAYLOAD_KEY_FILE to the key file "
            f"(looked for {settings.payload_key_path}; the local stack writes "
            "<STATE_DIR>/payload.key), or PAYLOAD_ENCRYPTION=off to send payloads in clear"
        )
    return dataclasses.replace(
        PLAIN_CONVERTER,
        payload_codec=codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


#: Signals a device (or its push provider) sends, one per receipt: they can come in
#: floods, and a workflow-side span costs time inside the sandbox. They get no span of
#: their own in the workflow (the sender's span, in the lifecycle's trace, stands for
#: them); what their handlers start (a read's receipt sync) still runs in the trace.
UNTRACED_SIGNALS = frozenset({MESSAGE_DELIVERED_SIGNAL, MESSAGE_READ_SIGNAL})

#: The header Temporal's OpenTelemetry interceptors carry the W3C context in (the same
#: in every SDK).
_TRACE_HEADER = "_tracer-data"


def _sender_of(headers: Mapping[str, Payload]) -> SpanContext | None:
    """The span that sent a signal, from the trace header it carries."""
    payload = headers.get(_TRACE_HEADER)
    if payload is None:
        return None
    carrier = PayloadConverter.default.from_payloads([payload])[0]
    if not isinstance(carrier, dict):
        return None
    ctx = TraceContextTextMapPropagator().extract(carrier)
    sender = trace.get_current_span(ctx).get_span_context()
    return sender if sender.is_valid else None


@contextmanager
def _attached(ctx: Context) -> Iterator[None]:
    """``ctx`` as the current context for the block.

    A handler of an evicted workflow is closed wherever garbage collection runs it, in
    another ``contextvars`` context, where the token cannot be reset: that is not an
    error worth a log line, so it is ignored (as the SDK's own helper does).
    """
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        with suppress(ValueError):
            token.var.reset(token)


class _RunContext(temporalio.worker.WorkflowInboundInterceptor):
    """Notes the context the workflow runs in (inside its run span) for its owner."""

    def __init__(self, next: temporalio.worker.WorkflowInboundInterceptor) -> None:
        super().__init__(next)
        self.context: Context | None = None

    async def execute_workflow(self, input: temporalio.worker.ExecuteWorkflowInput) -> Any:
        self.context = otel_context.get_current()
        return await super().execute_workflow(input)


class _ActivityFacts(temporalio.worker.ActivityInboundInterceptor):
    """Adds what a waterfall needs to the SDK's activity span: the attempt, whether the
    activity is local, and the entity (ids only)."""

    async def execute_activity(self, input: temporalio.worker.ExecuteActivityInput) -> Any:
        info = activity.info()
        span = trace.get_current_span()
        attributes: dict[str, str | int | bool] = {
            "tollgate.attempt": info.attempt,
            "tollgate.local": info.is_local,
        }
        entity = entity_of(info.workflow_id or "")
        if entity is not None:
            attributes[f"tollgate.{entity[0]}_id"] = entity[1]
        span.set_attributes(attributes)
        trace_id = current_trace_id()
        if info.workflow_id and trace_id:
            remember_trace(info.workflow_id, trace_id)
        # The SDK said this before the span began, with no trace id; the log keeps this one.
        activity.logger.debug(ACTIVITY_STARTING)
        return await super().execute_activity(input)


class _LifecycleInterceptor(OpenTelemetryInterceptor):
    """The SDK's OpenTelemetry interceptor, with workflow spans of real duration, plus:

    * every signal handler runs in the workflow's own context, so what it starts (the
      read-receipt saga a ``read`` starts) is part of the lifecycle's trace whoever sent
      the signal, and a stop (cancel, recall) gets a span under the workflow's run span
      that links to the sender's span;
    * device signals (:data:`UNTRACED_SIGNALS`) get no span: measured with the older
      interceptor, 3,000 of them in 4 s made a message workflow fail 7 workflow tasks
      on the deadlock detector with a span per signal, none without;
    * each activity span says its attempt (a retried charge is two spans).
    """

    def __init__(self) -> None:
        super().__init__(add_temporal_spans=True)

    def intercept_activity(
        self, next: temporalio.worker.ActivityInboundInterceptor
    ) -> temporalio.worker.ActivityInboundInterceptor:
        return super().intercept_activity(_ActivityFacts(next))

    # The SDK's return type names its private class; this one is a subclass of it.
    def workflow_interceptor_class(  # type: ignore[override]
        self, input: temporalio.worker.WorkflowInterceptorClassInput
    ) -> type[temporalio.worker.WorkflowInboundInterceptor]:
        traced = super().workflow_interceptor_class(input)

        class LifecycleWorkflowTracing(traced):  # type: ignore[misc,valid-type]
            def __init__(self, next: temporalio.worker.WorkflowInboundInterceptor) -> None:
                self._run = _RunContext(next)
                super().__init__(self._run)

            async def handle_signal(self, input: temporalio.worker.HandleSignalInput) -> None:
                run = self._run.context
                if run is None:  # a signal before the run began: the sender's context
                    await super().handle_signal(input)
                    return
                with _attached(run):
                    if input.signal in UNTRACED_SIGNALS:
                        await self._run.handle_signal(input)
                        return
                    sender = _sender_of(input.headers)
                    info = workflow.info()
                    with trace.get_tracer(__name__).start_as_current_span(
                        f"HandleSignal:{input.signal}",
                        kind=SpanKind.SERVER,
                        attributes={
                            "temporalWorkflowID": info.workflow_id,
                            "temporalRunID": info.run_id,
                        },
                        links=[Link(sender)] if sender is not None else None,
                    ):
                        await self._run.handle_signal(input)

        return LifecycleWorkflowTracing


class LifecycleTracing(OpenTelemetryPlugin):
    """Temporal's ``OpenTelemetryPlugin`` with :class:`_LifecycleInterceptor`.

    Chosen over the older ``TracingInterceptor``, whose workflow spans all end the
    moment they start: here the workflow's run span lasts as long as the run, and span
    ids inside a workflow are deterministic, so a replay on another worker re-creates
    the same spans rather than new ones. The price: a workflow's run span is exported
    when the run ends (an order's in a second; a message's at the end of its read
    window), and the plugin is marked experimental in the SDK. Registered on the
    client, it applies to the workers built on that client too.
    """

    def __init__(self) -> None:
        super().__init__(add_temporal_spans=True)
        self.interceptors = [_LifecycleInterceptor()]


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
        plugins=[LifecycleTracing()],
        runtime=runtime,
        lazy=lazy,
    )


def prometheus_runtime(bind_address: str) -> Runtime:
    """An SDK runtime that serves Temporal's own metrics (workflow and activity
    schedule-to-start latency, task slots, polls, ...) in Prometheus text on
    ``http://<bind_address>/metrics``. Clients and workers built on it report there."""
    return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=bind_address)))
