"""An in-process OTLP receiver for tests, and a switch on what reaches it.

The test process has one global tracer provider (conftest's ``client`` fixture installs
it, as the worker process does); spans go to the receiver only while a test captures,
through the real OTLP/HTTP exporter, so what the receiver decodes is what a collector
would get.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from tollgate_dev.traces import SpanRecord, TraceStore


class _Switched(SpanProcessor):
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


@dataclass
class Receiver:
    """The receiver's URL and store, the bodies it got, and the capture switch."""

    url: str
    store: TraceStore
    state_dir: Path
    switch: _Switched
    bodies: list[bytes] = field(default_factory=list)

    @contextmanager
    def capturing(self) -> Iterator[None]:
        """Export the spans that end in the block (and only those)."""
        self.switch.on = True
        try:
            yield
        finally:
            self.switch.on = False

    async def flush(self) -> None:
        """Send what was captured. In a thread: the exporter waits for the receiver,
        which answers on this event loop."""
        await asyncio.to_thread(self.switch.force_flush, 10_000)

    def spans(self, trace_id: str) -> list[SpanRecord]:
        return self.store.load(trace_id)


def install(url: str, store: TraceStore, state_dir: Path) -> Receiver:
    """Add an exporter to the receiver at ``url`` to the global provider (switched off)."""
    exporter = OTLPSpanExporter(endpoint=f"{url}/v1/traces", timeout=10)
    switch = _Switched(BatchSpanProcessor(exporter, schedule_delay_millis=200))
    provider = trace.get_tracer_provider()
    provider.add_span_processor(switch)  # type: ignore[attr-defined]
    return Receiver(url, store, state_dir, switch)
