"""An OTLP/HTTP receiver for the local stack: what Jaeger's collector does, for one
machine and without Docker.

Exporters POST protobuf-encoded ``ExportTraceServiceRequest`` bodies to ``/v1/traces``
(``application/x-protobuf``, optionally gzip-compressed); the spans are decoded with
``opentelemetry-proto`` and appended to a :class:`~tollgate_dev.traces.store.TraceStore`.
Metrics and logs sent to the same endpoint (the worker sends its metrics wherever
``OTEL_EXPORTER_OTLP_ENDPOINT`` points) are accepted and dropped: the stack serves
metrics in Prometheus text instead. OTLP/JSON is not supported (415): the exporters
Tollgate uses speak protobuf.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Callable, Iterable

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tollgate_dev.traces.store import AttributeValue, SpanEvent, SpanLink, SpanRecord, TraceStore

_log = logging.getLogger("tollgate_dev.traces")

_PROTOBUF = "application/x-protobuf"
#: Bodies past this are refused (an exporter's batch is a few hundred KB at most).
MAX_BODY_BYTES = 16 * 1024 * 1024

_KINDS = {
    Span.SPAN_KIND_INTERNAL: "internal",
    Span.SPAN_KIND_SERVER: "server",
    Span.SPAN_KIND_CLIENT: "client",
    Span.SPAN_KIND_PRODUCER: "producer",
    Span.SPAN_KIND_CONSUMER: "consumer",
}
_STATUSES = {
    Status.STATUS_CODE_UNSET: "unset",
    Status.STATUS_CODE_OK: "ok",
    Status.STATUS_CODE_ERROR: "error",
}


def _value(value: AnyValue) -> AttributeValue:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    if kind is None:
        return None
    plain: AttributeValue = getattr(value, kind)
    return plain


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, AttributeValue]:
    return {kv.key: _value(kv.value) for kv in pairs}


def decode(request: ExportTraceServiceRequest) -> list[SpanRecord]:
    """The spans of one export request, as records."""
    records: list[SpanRecord] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service = str(resource.get("service.name") or "")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                records.append(
                    SpanRecord(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        name=span.name,
                        kind=_KINDS.get(span.kind, "internal"),
                        service=service,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        status=_STATUSES.get(span.status.code, "unset"),
                        status_message=span.status.message,
                        attributes=_attributes(span.attributes),
                        events=[
                            SpanEvent(
                                name=e.name,
                                time_ns=e.time_unix_nano,
                                attributes=_attributes(e.attributes),
                            )
                            for e in span.events
                        ],
                        links=[
                            SpanLink(trace_id=link.trace_id.hex(), span_id=link.span_id.hex())
                            for link in span.links
                        ],
                    )
                )
    return records


async def _body(request: Request) -> bytes | Response:
    """The request's protobuf bytes, decompressed; or the answer that refuses it."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != _PROTOBUF:
        return JSONResponse({"error": f"only {_PROTOBUF} is accepted"}, 415)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        return JSONResponse({"error": "body too large"}, 413)
    raw = await request.body()
    encoding = request.headers.get("content-encoding", "").strip().lower()
    try:
        if encoding == "gzip":
            raw = gzip.decompress(raw)
        elif encoding == "deflate":
            raw = zlib.decompress(raw)
        elif encoding not in ("", "identity"):
            return JSONResponse({"error": f"unsupported content-encoding {encoding}"}, 415)
    except (OSError, zlib.error, EOFError):
        return JSONResponse({"error": "body does not decompress"}, 400)
    if len(raw) > MAX_BODY_BYTES:
        return JSONResponse({"error": "body too large"}, 413)
    return raw


def create_receiver_app(
    store: TraceStore, *, on_export: Callable[[bytes], None] | None = None
) -> Starlette:
    """The receiver's app over ``store``. ``on_export`` sees each trace request's bytes
    (decompressed) before they are decoded: tests read exactly what was sent."""

    async def traces(request: Request) -> Response:
        body = await _body(request)
        if isinstance(body, Response):
            return body
        if on_export is not None:
            on_export(body)
        message = ExportTraceServiceRequest()
        try:
            message.ParseFromString(body)
        except DecodeError:
            return JSONResponse({"error": "not an ExportTraceServiceRequest"}, 400)
        store.add(decode(message))
        return Response(ExportTraceServiceResponse().SerializeToString(), media_type=_PROTOBUF)

    async def dropped_metrics(request: Request) -> Response:
        body = await _body(request)
        if isinstance(body, Response):
            return body
        return Response(ExportMetricsServiceResponse().SerializeToString(), media_type=_PROTOBUF)

    async def dropped_logs(request: Request) -> Response:
        body = await _body(request)
        if isinstance(body, Response):
            return body
        return Response(ExportLogsServiceResponse().SerializeToString(), media_type=_PROTOBUF)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v1/traces", traces, methods=["POST"]),
            Route("/v1/metrics", dropped_metrics, methods=["POST"]),
            Route("/v1/logs", dropped_logs, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ]
    )
