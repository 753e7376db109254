"""Settings for every Tollgate process, read from the environment.

The defaults point at the local stack that ``make up`` runs, so ``python starter.py``
in another terminal reaches it with no configuration. Point Tollgate at your own
Temporal and Postgres by exporting ``TEMPORAL_ADDRESS`` and ``DATABASE_URL``.

The ports are deliberately not Temporal's 7233/8233 or Postgres's 5432: a developer
machine often already runs those, and the local stack must not collide with them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SecretT = TypeVar("SecretT")

DEFAULT_TEMPORAL_PORT = 17233
DEFAULT_TEMPORAL_UI_PORT = 18233
DEFAULT_POSTGRES_PORT = 15432
DEFAULT_SANDBOX_PORT = 18081
DEFAULT_API_PORT = 18080

#: What the local stack's trace receiver URL looks like (``<prefix><port>``).
LOCAL_OTLP_PREFIX = "http://127.0.0.1:"

#: Where the local stack keeps its data (Postgres cluster, Temporal's SQLite file, logs).
DEFAULT_STATE_DIR = Path(".tollgate")


class Settings(BaseSettings):
    """Every knob a Tollgate process reads. Environment variable = field name, upper-case."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    temporal_address: str = f"127.0.0.1:{DEFAULT_TEMPORAL_PORT}"
    temporal_namespace: str = "default"
    temporal_ui_url: str = f"http://127.0.0.1:{DEFAULT_TEMPORAL_UI_PORT}"
    task_queue: str = "tollgate-orders"

    database_url: str = f"postgresql://tollgate@127.0.0.1:{DEFAULT_POSTGRES_PORT}/tollgate"
    database_pool_max: int = Field(default=10, ge=1)

    sandbox_url: str = f"http://127.0.0.1:{DEFAULT_SANDBOX_PORT}"
    #: Per-request timeout for provider calls; an activity's own timeout bounds retries.
    provider_timeout_seconds: float = Field(default=5.0, gt=0)

    #: Worker throughput. Slots: how many activities, local activities (the gate's
    #: writes) and workflow tasks one worker runs at once. Cache: how many workflows it
    #: keeps in memory, so the next task of one in flight replays nothing. Pollers: how
    #: many long polls it keeps open per kind of task. The SDK's defaults, but for the
    #: workflow pollers (README, Speed): with the SDK's 5, of which one polls the task
    #: queue, a new order's first workflow task waited 0.5 s on average and up to 2.6 s
    #: at 20 in flight while the worker was busy, against 0.1 s for a bare workflow.
    max_concurrent_activities: int = Field(default=100, ge=1)
    max_concurrent_local_activities: int = Field(default=100, ge=1)
    max_concurrent_workflow_tasks: int = Field(default=100, ge=1)
    max_cached_workflows: int = Field(default=1000, ge=0)
    workflow_task_pollers: int = Field(default=16, ge=2)
    #: The share of the workflow pollers that take new workflows' first tasks (the
    #: task queue: 4 of 16); the rest poll this worker's sticky queue, where the next
    #: task of a workflow it has cached arrives.
    workflow_task_nonsticky_ratio: float = Field(default=0.25, gt=0, le=1)
    activity_task_pollers: int = Field(default=5, ge=1)
    #: The sandbox imports workflow modules once and shares them between runs (its
    #: restrictions on clocks, I/O and randomness still apply in every run). True: a
    #: fresh import per workflow run, the SDK's default, which also catches a module that
    #: does something non-deterministic at import time, for about 10 ms of worker CPU per
    #: lifecycle (README, Speed). tests/test_layers.py keeps the shared modules stateless.
    reimport_workflow_modules: bool = False

    #: OTLP/HTTP endpoint for traces and metrics (e.g. http://127.0.0.1:4318). Unset:
    #: traces go to the local stack's receiver when one runs from ``state_dir`` (see
    #: ``otlp_endpoint``), else nowhere.
    otel_exporter_otlp_endpoint: str | None = None
    otel_service_name: str = "tollgate"
    #: Port of the local stack's OTLP receiver (``make up``). Unset: a free port. Not
    #: used when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set: the stack then sends there.
    traces_receiver_port: int | None = Field(default=None, ge=1, le=65535)
    log_level: str = "INFO"

    state_dir: Path = DEFAULT_STATE_DIR

    # --- resilience: circuit breakers (one per provider per worker process) -----------
    #: Open when this share of the calls in the window failed transiently...
    breaker_failure_rate: float = Field(default=0.5, gt=0, le=1)
    #: ...over the last this many calls...
    breaker_window: int = Field(default=20, ge=1)
    #: ...once at least this many calls were made.
    breaker_min_calls: int = Field(default=10, ge=1)
    #: Also open after this many transient failures in a row.
    breaker_consecutive_failures: int = Field(default=5, ge=1)
    #: How long an open breaker fails fast before letting probes through.
    breaker_open_seconds: float = Field(default=10.0, gt=0)
    #: Probe calls allowed while half-open; all must succeed to close again.
    breaker_half_open_probes: int = Field(default=2, ge=1)

    # --- backpressure ---------------------------------------------------------------------
    #: Activities per second the whole task queue may start (None: unlimited). Protects
    #: providers from a backlog draining at once after an outage.
    task_queue_activities_per_second: float | None = Field(default=None, gt=0)

    #: How often the worker's Temporal Schedule runs the reconciler (0: no schedule).
    reconcile_every_seconds: float = Field(default=300.0, ge=0)

    # --- least privilege ------------------------------------------------------------------
    #: Connection of the schema owner, used only to apply migrations. Unset: DATABASE_URL.
    database_owner_url: str | None = None

    # --- payload encryption ---------------------------------------------------------------
    #: Base64 of a 32-byte key that encrypts workflow payloads in Temporal. Unset: the
    #: key is read from ``payload_key_file``.
    payload_encryption_key: str | None = None
    #: File holding the key. Unset: ``<state_dir>/payload.key`` (see ``payload_key_path``).
    payload_key_file: Path | None = None
    #: ``required`` (default): a process with no key refuses to run rather than send
    #: plaintext to Temporal. ``off`` is the explicit opt-out for deployments that
    #: encrypt elsewhere (or not at all).
    payload_encryption: Literal["required", "off"] = "required"
    #: Comma-separated base64 keys that still decrypt (key rotation): histories written
    #: under an old key keep replaying while new payloads are sealed with the current one.
    payload_old_keys: str | None = None

    # --- codec server (decrypts payloads for the Temporal Web UI) --------------------------
    #: The credential every codec-server request must carry (``Authorization: Bearer``,
    #: or the ``/ui/<token>/`` path the Web UI is pointed at). Unset: read from
    #: ``codec_auth_token_file`` (default ``<state_dir>/codec.token``).
    codec_auth_token: str | None = None
    codec_auth_token_file: Path | None = None
    #: Largest request body the codec server reads; larger ones get 413.
    codec_max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)

    # --- HTTP API (python -m tollgate.api) ---------------------------------------------
    #: Where clients reach the API; the local stack serves it on this URL's port.
    api_url: str = f"http://127.0.0.1:{DEFAULT_API_PORT}"
    #: Each client's token bucket: requests per second, and the burst it may save up.
    api_client_rate: float = Field(default=50.0, gt=0)
    api_client_burst: int = Field(default=100, ge=1)
    #: Creates (row + workflow start) one API process runs at once; more get 429.
    api_max_starts_in_flight: int = Field(default=32, ge=1)
    #: Lifecycles of one kind still under way (orders not finished, messages not yet
    #: delivered or emailed) past which creates of that kind get 429: the backlog the
    #: workers have not worked off, counted in Postgres, so it bounds every API process.
    api_max_open_lifecycles: int = Field(default=500, ge=1)
    #: Longest request body read; larger ones get 413.
    api_max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    #: Longest a create may take (Postgres and Temporal together) before it gets 503
    #: and writes nothing; also bounds ``?wait=charged`` on top of the start.
    api_start_timeout_seconds: float = Field(default=10.0, gt=0)
    api_wait_seconds: float = Field(default=10.0, gt=0)
    #: Retry-After of a 503 (Temporal or Postgres unreachable).
    api_unavailable_retry_after_seconds: int = Field(default=2, ge=1)
    #: How long a looked-up API key is trusted; a revoked key works at most this long.
    api_key_cache_seconds: float = Field(default=10.0, ge=0)
    #: The secret device receipts are signed with (HMAC-SHA256). Unset: read from
    #: ``receipt_webhook_secret_file`` (default ``<state_dir>/webhook.secret``); with
    #: neither the API does not start.
    receipt_webhook_secret: str | None = None
    receipt_webhook_secret_file: Path | None = None
    #: Comma-separated secrets that still verify (rotation), as for payload keys.
    receipt_webhook_old_secrets: str | None = None
    #: How far a receipt's signed timestamp may be from now (replay window).
    receipt_tolerance_seconds: int = Field(default=300, ge=1, le=3600)

    # --- worker metrics -------------------------------------------------------------------
    #: ``host:port`` where the worker serves the Temporal SDK's metrics (schedule-to-start
    #: latencies, slots, polls) in Prometheus text at ``/metrics``. Unset: not served.
    worker_metrics_bind_address: str | None = None

    @property
    def traces_dir(self) -> Path:
        """Where the local stack's OTLP receiver keeps recent traces."""
        return self.state_dir / "traces"

    @property
    def otlp_endpoint(self) -> str | None:
        """Where spans are exported: ``OTEL_EXPORTER_OTLP_ENDPOINT``; else the receiver of
        the local stack running from ``state_dir``, which writes its URL to
        ``<traces_dir>/endpoint`` while it runs (so the CLI in another terminal sends
        its command spans there with no configuration); else None, no export."""
        if self.otel_exporter_otlp_endpoint:
            return self.otel_exporter_otlp_endpoint
        try:
            url = (self.traces_dir / "endpoint").read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        # Only ever a loopback address: a file is no reason to send spans elsewhere.
        return (
            url
            if url.startswith(LOCAL_OTLP_PREFIX) and url[len(LOCAL_OTLP_PREFIX) :].isdigit()
            else None
        )

    @property
    def payload_key_path(self) -> Path:
        """Where the payload key file is: ``PAYLOAD_KEY_FILE``, else in the state dir."""
        return self.payload_key_file or self.state_dir / "payload.key"

    @property
    def codec_token_path(self) -> Path:
        """Where the codec-server credential is: ``CODEC_AUTH_TOKEN_FILE``, else in the
        state dir."""
        return self.codec_auth_token_file or self.state_dir / "codec.token"

    @property
    def webhook_secret_path(self) -> Path:
        """Where the receipt webhook secret is: ``RECEIPT_WEBHOOK_SECRET_FILE``, else in
        the state dir."""
        return self.receipt_webhook_secret_file or self.state_dir / "webhook.secret"


def read_secret(
    value: str | None,
    path: Path,
    *,
    setting: str,
    file_setting: str,
    parse: Callable[[str, str], SecretT],
) -> SecretT | None:
    """A secret from its setting, else from its file when that exists, else None.

    ``parse(text, source)`` checks it and names ``source`` (the setting, or the file
    setting with its path) in its error, never the secret. An empty setting counts as
    unset; an unreadable file is a ``ValueError`` naming it.
    """
    if value:
        return parse(value.strip(), setting)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file_setting} {path} could not be read: {exc}") from None
    return parse(text.strip(), f"{file_setting} {path}")
