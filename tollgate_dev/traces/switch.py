"""A span exporter that can be switched on and off while a process runs.

A tracer provider keeps its processors for life; to compare a lifecycle with and without
exporting in one process (the tracing bench), or to capture only one test's spans, the
exporter sits behind a switch: spans that end while it is off are dropped.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from temporalio.contrib.opentelemetry import ReplaySafeTracerProvider


class SwitchedExport(SpanProcessor):
    """Hands finished spans to ``inner`` only while ``on``."""

    def __init__(self, inner: SpanProcessor) -> None:
        self.inner = inner
        self.on = False

    def on_end(self, span: ReadableSpan) -> None:
        if self.on:
            self.inner.on_end(span)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def switched_export(url: str, *, schedule_delay_millis: float = 5000) -> SwitchedExport:
    """Add an OTLP/HTTP export to ``url`` (a receiver's base URL) to the global tracer
    provider, switched off. The provider is the one ``configure_tracing`` installs."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, ReplaySafeTracerProvider):
        raise TypeError(f"configure_tracing has not run ({type(provider).__name__})")
    exporter = OTLPSpanExporter(endpoint=f"{url}/v1/traces", timeout=10)
    switch = SwitchedExport(
        BatchSpanProcessor(exporter, schedule_delay_millis=schedule_delay_millis)
    )
    provider.add_span_processor(switch)
    return switch
