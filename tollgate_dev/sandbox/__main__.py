"""Serve the provider sandbox: ``python -m tollgate_dev.sandbox --host 127.0.0.1 --port 18081``.

The fault RNG seed comes from ``--seed``, else the ``SANDBOX_SEED`` environment variable,
else 0, so a scripted demo with ``fail_rate`` fails the same requests on every run.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import uvicorn
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from tollgate.ops.serving import server_parser
from tollgate_dev.sandbox.app import create_app
from tollgate_dev.sandbox.models import SandboxConfig

# Same default as ``tollgate.settings.DEFAULT_SANDBOX_PORT`` (``sandbox_url``); repeated
# rather than imported so the sandbox starts without the rest of Tollgate's settings.
DEFAULT_PORT = 18081


def _env_seed() -> int:
    raw = os.environ.get("SANDBOX_SEED", "").strip()
    if not raw:
        return 0
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"SANDBOX_SEED must be an integer, got {raw!r}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of the sandbox server."""
    parser = server_parser(
        "python -m tollgate_dev.sandbox",
        "Fake payment, inventory, push and email providers with fault injection.",
        port=DEFAULT_PORT,
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="fault RNG seed (default: $SANDBOX_SEED or 0)"
    )
    parser.add_argument(
        "--card-limit-cents",
        type=int,
        default=SandboxConfig().card_limit_cents,
        help="charges above this are declined with insufficient_funds",
    )
    return parser.parse_args(argv)


def _configure_tracing() -> TracerProvider | None:
    """Export the sandbox's server spans where Tollgate's go (``OTEL_EXPORTER_OTLP_ENDPOINT``,
    which the local stack and docker-compose set); None when it is unset."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    name = os.environ.get("OTEL_SERVICE_NAME") or "tollgate"
    provider = TracerProvider(resource=Resource.create({"service.name": f"{name}-sandbox"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def main(argv: Sequence[str] | None = None) -> None:
    """Run the sandbox under uvicorn until interrupted."""
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else _env_seed()
    config = SandboxConfig(seed=seed, card_limit_cents=args.card_limit_cents)
    provider = _configure_tracing()
    try:
        uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning")
    finally:
        if provider is not None:
            provider.shutdown()


if __name__ == "__main__":
    main()
