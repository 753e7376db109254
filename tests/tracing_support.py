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

from tollgate_dev.traces import SpanRecord, TraceStore
from tollgate_dev.traces.switch import SwitchedExport, switched_export


@dataclass
class Receiver:
    """The receiver's URL and store, the bodies it got, and the capture switch."""

    url: str
    store: TraceStore
    state_dir: Path
    switch: SwitchedExport
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
    return Receiver(url, store, state_dir, switched_export(url, schedule_delay_millis=200))
