"""One trace per lifecycle: where it starts, and how later operations join it.

The span that creates an entity's row (the CLI's command, the API's request, or the
service call of whoever else starts one) is the root of the lifecycle's trace; the
workflow, its activities and their SQL and HTTP spans descend from it through
Temporal's headers. The row keeps that span's W3C ``traceparent`` (``trace_parent``,
schema/009), so an operation that comes later from another process (a cancel, a
recall, a device's receipt, a recovery) runs in :func:`joined`, as a child of it:
its audit rows, its signal and what the workflow does about it stay in the one trace.

Span attributes carry ids and codes only (``tollgate.*`` below); personal data (customer
and recipient ids, addresses, bodies, tokens) never goes into a span.

Nothing here knows Temporal, so the gate and the stores can use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags
from opentelemetry.util.types import AttributeValue

#: The tracer of Tollgate's own spans (commands, service operations).
tracer = trace.get_tracer("tollgate")

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def current_trace_id() -> str | None:
    """Hex id of the active trace, as the audit table and the logs record it."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def current_traceparent() -> str | None:
    """The active span as a W3C ``traceparent`` (what a row records of its creator)."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def parse_traceparent(value: str | None) -> SpanContext | None:
    """The span context a ``traceparent`` names; None for None or anything malformed."""
    match = _TRACEPARENT.fullmatch(value or "")
    if match is None:
        return None
    trace_id, span_id, flags = (int(part, 16) for part in match.groups())
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))


@contextmanager
def joined(
    name: str,
    traceparent: str | None,
    *,
    attributes: Mapping[str, AttributeValue] | None = None,
) -> Iterator[Span]:
    """A span for an operation on an existing lifecycle, in that lifecycle's trace.

    Its parent is the span that created the entity (``traceparent``, from the row); the
    span active here (the command or request that asked for it, in a trace of its own)
    becomes a link, so each side leads to the other. Without a ``traceparent`` (a row
    from before schema/009) the span is an ordinary child of the active one.
    """
    parent = parse_traceparent(traceparent)
    caller = trace.get_current_span().get_span_context()
    if parent is None:
        with tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span
        return
    links = [Link(caller)] if caller.is_valid and caller.trace_id != parent.trace_id else []
    ctx = trace.set_span_in_context(NonRecordingSpan(parent), otel_context.Context())
    with tracer.start_as_current_span(
        name, context=ctx, kind=SpanKind.INTERNAL, attributes=attributes, links=links
    ) as span:
        yield span
