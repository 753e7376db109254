"""Recent traces as files: one JSON line per span, one file per trace.

The local stack's receiver (:mod:`tollgate_dev.traces.receiver`) appends what the
exporters send; ``starter.py order trace`` reads a trace back. This is not a trace
database: no index beyond the file name, no query language, and only the most recent
``keep`` traces are kept (older files are deleted as new traces arrive). For anything
more, send the spans to Jaeger (docker-compose.yml) or any OTLP backend instead.

Layout of the directory (``<state_dir>/traces`` for the stack)::

    endpoint              the receiver's URL while the stack runs (processes read it)
    spans/<trace id>.jsonl
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: How many traces the stack keeps by default (an order's is about 15 KB).
DEFAULT_KEEP = 2000

AttributeValue = str | bool | int | float | list[Any] | dict[str, Any] | None


class SpanEvent(BaseModel):
    """Something that happened during a span (an exception, say)."""

    model_config = ConfigDict(frozen=True)

    name: str
    time_ns: int
    attributes: dict[str, AttributeValue] = Field(default_factory=dict)


class SpanLink(BaseModel):
    """A span this one points to in another place (another trace, usually)."""

    model_config = ConfigDict(frozen=True)

    trace_id: str
    span_id: str


class SpanRecord(BaseModel):
    """One finished span as the receiver keeps it."""

    model_config = ConfigDict(frozen=True)

    trace_id: str
    span_id: str
    parent_span_id: str | None = None
    name: str
    #: ``internal``, ``server``, ``client``, ``producer``, ``consumer``.
    kind: str = "internal"
    #: The ``service.name`` of the process that made it.
    service: str = ""
    start_ns: int
    end_ns: int
    #: ``unset``, ``ok`` or ``error``.
    status: str = "unset"
    status_message: str = ""
    attributes: dict[str, AttributeValue] = Field(default_factory=dict)
    events: list[SpanEvent] = Field(default_factory=list)
    links: list[SpanLink] = Field(default_factory=list)


def _is_trace_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


class TraceStore:
    """The span files of one directory; keeps the ``keep`` most recent traces."""

    def __init__(self, directory: Path, *, keep: int = DEFAULT_KEEP) -> None:
        self.directory = directory
        self.spans_dir = directory / "spans"
        self.keep = keep
        self._known: set[str] | None = None

    def _trace_file(self, trace_id: str) -> Path:
        if not _is_trace_id(trace_id):
            raise ValueError(f"not a trace id: {trace_id!r}")
        return self.spans_dir / f"{trace_id}.jsonl"

    def add(self, spans: Iterable[SpanRecord]) -> int:
        """Append ``spans`` to their traces' files; prune old traces; how many were added."""
        by_trace: dict[str, list[SpanRecord]] = {}
        for span in spans:
            by_trace.setdefault(span.trace_id, []).append(span)
        if not by_trace:
            return 0
        self.spans_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        known = self._known_traces()
        for trace_id, records in by_trace.items():
            lines = "".join(record.model_dump_json() + "\n" for record in records)
            # O_APPEND: one write per batch, so concurrent writers never interleave lines.
            fd = os.open(self._trace_file(trace_id), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, lines.encode())
            finally:
                os.close(fd)
            known.add(trace_id)
        if len(known) > self.keep * 1.1:
            self.prune()
        return sum(len(r) for r in by_trace.values())

    def _known_traces(self) -> set[str]:
        if self._known is None:
            self._known = set(self.trace_ids())
        return self._known

    def trace_ids(self) -> list[str]:
        """Ids of the traces kept, oldest first (by their last write)."""
        if not self.spans_dir.is_dir():
            return []
        files = [p for p in self.spans_dir.glob("*.jsonl") if _is_trace_id(p.stem)]
        files.sort(key=_mtime)
        return [p.stem for p in files]

    def prune(self) -> None:
        """Delete the oldest traces beyond ``keep``."""
        ids = self.trace_ids()
        for trace_id in ids[: max(0, len(ids) - self.keep)]:
            self._trace_file(trace_id).unlink(missing_ok=True)
        self._known = set(ids[max(0, len(ids) - self.keep) :])

    def load(self, trace_id: str) -> list[SpanRecord]:
        """Every span of a trace, in arrival order; empty when it is not kept."""
        try:
            text = self._trace_file(trace_id).read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [SpanRecord.model_validate_json(line) for line in text.splitlines() if line]

    def traces_with(self, key: str, value: str) -> list[str]:
        """Ids of kept traces with a span whose attribute ``key`` is ``value`` (a scan)."""
        needle = json.dumps({key: value}, separators=(",", ":"))[1:-1]
        found: list[str] = []
        for trace_id in self.trace_ids():
            try:
                text = self._trace_file(trace_id).read_text(encoding="utf-8")
            except FileNotFoundError:
                continue
            if needle in text:
                found.append(trace_id)
        return found


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
