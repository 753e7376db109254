"""OpenTelemetry tracing and structured JSON logs.

Traces: one per lifecycle (:mod:`tollgate.tracing`). Temporal's ``OpenTelemetryPlugin``
(:mod:`tollgate.temporal`) opens spans for the workflow and each activity, the asyncpg
instrumentation one per SQL statement, the httpx one per provider call (built in
:func:`tollgate.providers.client.build_http_client`). They are exported over OTLP/HTTP
to ``Settings.otlp_endpoint``: ``OTEL_EXPORTER_OTLP_ENDPOINT``, else the receiver of a
local stack running from the state directory (Jaeger and the OTel collector accept the
same protocol). Logs: one JSON object per line carrying the trace id of the active span
and the entity the line is about, so a log line and its trace are one search apart.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, cast

from opentelemetry import metrics, trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.starlette import StarletteInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.util.http import parse_excluded_urls
from starlette.applications import Starlette
from temporalio.contrib.opentelemetry import ReplaySafeTracerProvider, create_tracer_provider

from tollgate.names import entity_of
from tollgate.settings import Settings

# Attributes every LogRecord has; anything else was passed with ``extra=`` and is ours.
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, trace id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            entry["trace_id"] = format(ctx.trace_id, "032x")
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        _add_entity(entry, record)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _add_entity(entry: dict[str, Any], record: logging.LogRecord) -> None:
    """The entity a line is about, from the workflow the SDK's loggers name.

    Temporal's workflow and activity loggers put the workflow's info on each record; the
    entity id is read from its workflow id (``order-<id>``), so every line of a
    lifecycle, the SDK's own included, carries it. A line with no current span (the
    SDK's warning about a failed attempt is logged after the attempt's span ended)
    takes the trace id the worker last saw for that workflow.
    """
    info = getattr(record, "temporal_activity", None) or getattr(record, "temporal_workflow", None)
    workflow_id = info.get("workflow_id") if isinstance(info, dict) else None
    if not isinstance(workflow_id, str):
        return
    entry.setdefault("workflow_id", workflow_id)
    entity = entity_of(workflow_id)
    if entity is not None:
        kind, entity_id = entity
        entry.setdefault("entity", kind)
        entry.setdefault("entity_id", entity_id)
    if "trace_id" not in entry and workflow_id in _LAST_TRACE:
        entry["trace_id"] = _LAST_TRACE[workflow_id]


#: The trace id each workflow's activities last ran in, for log lines written outside
#: any span (bounded: oldest entries go first).
_LAST_TRACE: dict[str, str] = {}
_LAST_TRACE_MAX = 10_000


def remember_trace(workflow_id: str, trace_id: str) -> None:
    """Note the trace a workflow's activity runs in (see :func:`_add_entity`)."""
    _LAST_TRACE.pop(workflow_id, None)
    _LAST_TRACE[workflow_id] = trace_id
    while len(_LAST_TRACE) > _LAST_TRACE_MAX:
        del _LAST_TRACE[next(iter(_LAST_TRACE))]


#: What the SDK logs (at DEBUG) when an activity task arrives: before any interceptor has
#: read the task's trace header, so outside the activity's span and trace.
ACTIVITY_STARTING = "Starting activity"


def _logged_in_its_span(record: logging.LogRecord) -> bool:
    """False for the SDK's own "Starting activity" line, which no span covers yet: the
    activity interceptor (:mod:`tollgate.temporal`) logs the same line again inside the
    activity's span, where it carries the trace id like every other line."""
    return not (
        record.name == "temporalio.activity"
        and isinstance(record.msg, str)
        and record.msg.startswith(ACTIVITY_STARTING)
        and not trace.get_current_span().get_span_context().is_valid
    )


def configure_logging(settings: Settings) -> None:
    """Send every log record to stderr as JSON."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_logged_in_its_span)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # httpx logs every request at INFO. Where spans are exported, each provider call has
    # its span, with method, URL and status, and below DEBUG the line would only repeat
    # it: about half of a worker's log volume, and a JSON line formatted per call.
    spans = settings.otlp_endpoint is not None
    quiet = spans and root.getEffectiveLevel() > logging.DEBUG
    logging.getLogger("httpx").setLevel(logging.WARNING if quiet else logging.NOTSET)


def configure_metrics(settings: Settings) -> MeterProvider:
    """Install the global meter provider (breaker states, ...); export over OTLP if set."""
    readers = []
    if settings.otel_exporter_otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/metrics"
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint)))
    provider = MeterProvider(
        resource=Resource.create({"service.name": settings.otel_service_name}),
        metric_readers=readers,
    )
    metrics.set_meter_provider(provider)
    return provider


def _not_a_collected_coroutine(record: logging.LogRecord) -> bool:
    """False for OpenTelemetry's "Failed to detach context" when the span was being
    closed by ``GeneratorExit``: a coroutine (a workflow's, cached by a worker that
    stopped) closed by the garbage collector, in another context than the one its span
    was attached in. That context is being discarded: nothing is lost. Dropping the
    record before any handler formats it matters on Python 3.11, where formatting its
    traceback parses source code, which breaks an ``ast.parse`` the collector interrupted
    (``SystemError: AST constructor recursion depth mismatch``). Temporal's
    sdk-python#441 is the same report for its older interceptor."""
    error = record.exc_info[1] if record.exc_info else None
    return not (
        record.msg == "Failed to detach context"
        and isinstance(error, ValueError)
        and isinstance(error.__context__, GeneratorExit)
    )


def _quiet_collected_coroutines() -> None:
    logger = logging.getLogger("opentelemetry.context")
    if _not_a_collected_coroutine not in logger.filters:
        logger.addFilter(_not_a_collected_coroutine)


def configure_tracing(
    settings: Settings, component: str, *, export_timeout: float | None = None
) -> ReplaySafeTracerProvider:
    """Install the global tracer provider of a Tollgate process named ``component``
    (``worker``, ``cli``, ``api``: the spans' ``service.name`` is
    ``<OTEL_SERVICE_NAME>-<component>``), export to ``settings.otlp_endpoint`` if there
    is one, and trace every asyncpg statement.

    The provider is Temporal's replay-safe one: inside a workflow its span ids come from
    the workflow's deterministic random source and nothing is exported while history
    replays, so a workflow's spans keep their ids however often a worker replays it.
    ``export_timeout`` bounds how long an export may take (a CLI exits after one).

    OpenTelemetry keeps the first global provider of a process; a second call returns
    that one (tests configure once per session). Either way, OpenTelemetry's error about
    a collected workflow coroutine is silenced (see :func:`_not_a_collected_coroutine`).
    """
    _quiet_collected_coroutines()
    existing = trace.get_tracer_provider()
    if isinstance(existing, ReplaySafeTracerProvider):
        return existing
    provider = create_tracer_provider(
        resource=Resource.create({"service.name": f"{settings.otel_service_name}-{component}"})
    )
    endpoint = settings.otlp_endpoint
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(
            endpoint=endpoint.rstrip("/") + "/v1/traces", timeout=export_timeout
        )
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    # Statements only (the default): their parameters (customer ids, addresses, bodies)
    # stay out of the spans.
    instrumentor = AsyncPGInstrumentor(capture_parameters=False)  # type: ignore[no-untyped-call]
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()
    return provider


def instrument_app(app: Starlette, *, untraced: str = "") -> None:
    """A server span per request of ``app`` (OpenTelemetry's Starlette instrumentation),
    named by its route template and the child of the caller's ``traceparent``.

    Without the ASGI middleware's child spans for each ``receive`` and ``send`` message:
    three spans per request that time nothing a waterfall needs. No header or body is
    recorded (the instrumentation records none unless told to); the URL is, so paths
    that carry personal data are listed in ``untraced`` (comma-separated regular
    expressions searched in the URL) and get no span at all.
    """
    StarletteInstrumentor.instrument_app(app)
    for middleware in app.user_middleware:
        if cast(object, middleware.cls) is OpenTelemetryMiddleware:
            middleware.kwargs["exclude_spans"] = ["receive", "send"]
            if untraced:
                middleware.kwargs["excluded_urls"] = parse_excluded_urls(untraced)
