"""The API's metrics, served in Prometheus text at ``GET /metrics``.

One metrics API for all of Tollgate: OpenTelemetry's. The gate's and the breakers'
instruments are OTel instruments already, and an OTLP exporter sends them where
``OTEL_EXPORTER_OTLP_ENDPOINT`` points; the API adds its instruments to the same kind of
``MeterProvider`` and reads them out through ``opentelemetry-exporter-prometheus`` (a
metric reader writing into a ``prometheus_client`` registry), so nothing is counted
twice through two libraries. Each app gets its own provider and registry, so several
apps in one process (tests) do not mix their counts.

Names as Prometheus shows them:

* ``tollgate_api_requests_total{route, method, status}``
* ``tollgate_api_request_duration_seconds{route, method}`` (histogram)
* ``tollgate_api_refusals_total{reason}``: ``unauthenticated``, ``rate_limited``,
  ``overloaded`` (starts in flight), ``backlog`` (lifecycles under way), ``body_too_large``, ``bad_signature``, ``signature_expired``,
  ``unavailable``
* ``tollgate_api_starts_in_flight`` (gauge)
* ``tollgate_api_receipts_total{outcome}``, ``unknown_device`` among them
"""

from __future__ import annotations

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest

#: Latency buckets (s): the default OTel ones start at 5 ms and are too coarse below.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

PROMETHEUS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ApiMetrics:
    """The API's instruments, and the text ``/metrics`` serves."""

    def __init__(self, service_name: str = "tollgate-api") -> None:
        self.registry = CollectorRegistry()
        self._reader = PrometheusMetricReader(registry=self.registry)
        self.provider = MeterProvider(
            resource=Resource.create({"service.name": service_name}),
            metric_readers=[self._reader],
            views=[
                View(
                    instrument_name="tollgate.api.request.duration",
                    aggregation=ExplicitBucketHistogramAggregation(_LATENCY_BUCKETS),
                )
            ],
        )
        meter = self.provider.get_meter("tollgate.api")
        self.requests = meter.create_counter(
            "tollgate.api.requests", description="Requests answered, by route, method, status"
        )
        self.duration = meter.create_histogram(
            "tollgate.api.request.duration", unit="s", description="Time to answer a request"
        )
        self.refusals = meter.create_counter(
            "tollgate.api.refusals", description="Requests refused at the door, by reason"
        )
        self.starts_in_flight = meter.create_up_down_counter(
            "tollgate.api.starts.in_flight", description="Creates (row + workflow start) running"
        )
        self.starts_in_flight.add(0)  # shown as 0 from the start, not only once used
        self.receipts = meter.create_counter(
            "tollgate.api.receipts", description="Device receipts, by outcome"
        )

    def exposition(self) -> bytes:
        """Everything measured so far, in Prometheus text."""
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        """Stop the provider (its reader leaves the registry with it)."""
        self.provider.shutdown()
