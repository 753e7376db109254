"""``python -m tollgate.api``: serve the HTTP API under uvicorn.

Settings come from the environment like every Tollgate process. It refuses to start,
naming the setting, without the payload key (it starts workflows) or the webhook
secret (it verifies receipts), and when the schema is not up to date (the worker
applies migrations; the API, as the application role, only checks). Temporal may be
down at start: the client connects on first use and ``/readyz`` says so meanwhile.
It binds 127.0.0.1 unless told otherwise, and its access log is its own (route
template, status, duration, client), never uvicorn's, which would print query strings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from urllib.parse import urlsplit

import uvicorn

from tollgate import eventloop, postgres
from tollgate.api.app import ApiDeps, create_app
from tollgate.api.metrics import ApiMetrics
from tollgate.api.signatures import load_webhook_secrets
from tollgate.errors import ConfigError
from tollgate.messages.service import MessageService
from tollgate.migrate import MigrationError, apply_migrations
from tollgate.ops.serving import server_parser
from tollgate.orders.service import OrderService
from tollgate.providers.client import build_http_client
from tollgate.providers.inventory import Inventory
from tollgate.settings import DEFAULT_API_PORT, Settings
from tollgate.telemetry import configure_logging, configure_tracing
from tollgate.temporal import connect, data_converter

_log = logging.getLogger("tollgate.api")


def webhook_secrets_or_refuse(settings: Settings) -> list[str]:
    """The webhook secrets; ``ConfigError`` naming the settings when there is none."""
    try:
        secrets = load_webhook_secrets(settings)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not secrets:
        raise ConfigError(
            "no receipt webhook secret: set RECEIPT_WEBHOOK_SECRET, or "
            f"RECEIPT_WEBHOOK_SECRET_FILE to an existing file (looked for "
            f"{settings.webhook_secret_path}); the API does not run without one"
        )
    return secrets


async def serve(settings: Settings, host: str, port: int) -> None:
    """Check, connect, serve until interrupted, close."""
    converter = data_converter(settings)
    secrets = webhook_secrets_or_refuse(settings)
    try:
        pending = await apply_migrations(settings.database_url)
    except MigrationError as exc:
        raise ConfigError(f"the schema is not up to date ({exc}); start the worker first") from None
    assert not pending  # the application role cannot apply anything; it only checks
    client = await connect(settings, converter=converter, lazy=True)
    pool = await postgres.create_pool(settings.database_url, max_size=settings.database_pool_max)
    metrics = ApiMetrics(settings.otel_service_name + "-api")
    try:
        async with build_http_client(settings) as http:
            deps = ApiDeps(
                settings=settings,
                pool=pool,
                client=client,
                orders=OrderService(client, pool, settings.task_queue, inventory=Inventory(http)),
                messages=MessageService(client, pool, settings.task_queue),
                webhook_secrets=secrets,
                metrics=metrics,
            )
            config = uvicorn.Config(
                create_app(deps),
                host=host,
                port=port,
                access_log=False,
                log_config=None,
                lifespan="off",
            )
            server = uvicorn.Server(config)
            _log.info("api ready", extra={"host": host, "port": port})
            await server.serve()
    finally:
        metrics.shutdown()
        await pool.close()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m tollgate.api``."""
    settings = Settings()
    default_port = urlsplit(settings.api_url).port or DEFAULT_API_PORT
    parser = server_parser(
        "python -m tollgate.api", "Serve Tollgate's HTTP API.", port=default_port
    )
    args = parser.parse_args(argv)
    configure_logging(settings)
    provider = configure_tracing(settings, "api")
    try:
        eventloop.run(serve(settings, args.host, args.port))
    except ConfigError as exc:
        _log.error("api refused to start: %s", exc)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        pass
    finally:
        provider.shutdown()
