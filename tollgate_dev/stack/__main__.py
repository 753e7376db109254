"""``python -m tollgate_dev.stack up``: run the local stack in the foreground until Ctrl-C.

Ports come from the same environment variables every Tollgate process reads
(``TEMPORAL_ADDRESS``, ``TEMPORAL_UI_URL``, ``DATABASE_URL``, ``SANDBOX_URL``), so
``python starter.py`` in another terminal finds the stack with no configuration. When
``DATABASE_URL`` is set, that database is used and no Postgres is started. State and
logs go to ``STATE_DIR`` (default ``.tollgate/``). The worker is restarted whenever it
exits; each exit and restart shows on the console as it happens.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from tollgate.settings import Settings
from tollgate_dev.stack._process import StackError
from tollgate_dev.stack.local import LocalStack


def _relative(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _summary(stack: LocalStack) -> Table:
    """What runs where, for the terminal."""
    table = Table(title="Tollgate local stack", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("Temporal gRPC", stack.temporal_address)
    table.add_row("Temporal Web UI", stack.ui_url or "(headless)")
    if stack.codec is not None:
        # Never the token itself: terminals get scrolled back, shared and recorded.
        table.add_row("Codec server", f"{stack.codec.url} (decrypts payloads for the Web UI)")
        given = bool(os.environ.get("CODEC_AUTH_TOKEN"))
        token = "CODEC_AUTH_TOKEN" if given else _relative(stack.codec_token_file)
        table.add_row(
            "Codec token",
            f"{token} (the Web UI has it; for the CLI: --codec-auth 'Bearer <token>')",
        )
    # Every child reads the environment's key first, as Settings does.
    from_env = bool(os.environ.get("PAYLOAD_ENCRYPTION_KEY"))
    key = "PAYLOAD_ENCRYPTION_KEY" if from_env else _relative(stack.payload_key_file)
    table.add_row("Payload key", key)
    database = stack.database_url
    table.add_row("Postgres", database if stack.postgres else f"{database} (external)")
    table.add_row("Provider sandbox", stack.sandbox_url)
    if stack.traces is not None:
        table.add_row(
            "Traces",
            f"{stack.traces.url} (OTLP/HTTP; kept in {_relative(stack.traces.directory)}; "
            "starter.py order trace ID)",
        )
    elif stack.otlp_endpoint:
        table.add_row("Traces", f"{stack.otlp_endpoint} (OTEL_EXPORTER_OTLP_ENDPOINT)")
    table.add_row("Worker", _worker_status(stack))
    if stack.worker_metrics_port is not None:
        table.add_row(
            "Worker metrics", f"http://127.0.0.1:{stack.worker_metrics_port}/metrics (Temporal SDK)"
        )
    if stack.api is not None:
        table.add_row(
            "HTTP API",
            f"{stack.api.url}/v1 (OpenAPI: /v1/openapi.json; keys: starter.py apikey create)",
        )
        given = bool(os.environ.get("RECEIPT_WEBHOOK_SECRET"))
        secret = "RECEIPT_WEBHOOK_SECRET" if given else _relative(stack.webhook_secret_file)
        table.add_row("Receipt secret", f"{secret} (signs POST /v1/receipts)")
    table.add_row("Logs", _relative(stack.log_dir))
    return table


def _worker_status(stack: LocalStack) -> str:
    """The worker's pid and how often it was restarted, for the terminal."""
    worker_pid = stack.worker.pid if stack.worker is not None else None
    if worker_pid is None or stack.supervisor is None:
        return "(not started)"
    restarts = stack.supervisor.restarts
    return f"pid {worker_pid}, restarted if it exits (restarts so far: {restarts})"


async def _up(stack: LocalStack, console: Console) -> int:
    """Start the stack, show the summary, wait for SIGINT/SIGTERM, stop the stack."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    signals_seen = 0

    def on_signal(sig: signal.Signals) -> None:
        # First signal: stop cleanly (also interrupts a start in progress). Second one:
        # cancel the clean stop, which makes LocalStack kill whatever is left.
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            console.print(f"{sig.name}: stopping the stack (again to force)...")
        else:
            console.print(f"{sig.name}: killing what is left")
        main_task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        async with stack:
            console.print(_summary(stack))
            console.print("Ctrl-C to stop.")
            await asyncio.Event().wait()
    except asyncio.CancelledError:
        if signals_seen == 0:
            raise
        restarts = stack.supervisor.restarts if stack.supervisor is not None else 0
        if restarts:
            times = "once" if restarts == 1 else f"{restarts} times"
            console.print(f"stopped (the worker was restarted {times}).")
        else:
            console.print("stopped.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m tollgate_dev.stack", description="Run Tollgate's local stack."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="run the stack in the foreground until Ctrl-C")
    up.add_argument(
        "--state-dir", type=Path, help="data and logs (default: STATE_DIR or .tollgate)"
    )
    up.add_argument("--no-worker", action="store_true", help="do not start the worker")
    up.add_argument("--headless", action="store_true", help="no Temporal Web UI")
    up.add_argument("--no-api", action="store_true", help="do not start the HTTP API")
    args = parser.parse_args(argv)

    console = Console()
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    # httpx logs every request at INFO, which would report each /health poll.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        stack = LocalStack.from_settings(
            Settings(),
            with_worker=not args.no_worker,
            state_dir=args.state_dir,
            headless=args.headless,
            with_api=not args.no_api,
        )
        return asyncio.run(_up(stack, console))
    except StackError as exc:
        # soft_wrap: one logical line, whatever the terminal width.
        console.print(Text("error: ", style="bold red") + Text(str(exc)), soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
