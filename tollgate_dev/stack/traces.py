"""The trace receiver (``python -m tollgate_dev.traces``) as a child of the local stack.

It listens for OTLP/HTTP on a free port (or ``TRACES_RECEIVER_PORT``) and keeps the
recent traces under ``<state_dir>/traces``. While it runs, the stack writes its URL to
``<state_dir>/traces/endpoint``: the stack's own processes get it as
``OTEL_EXPORTER_OTLP_ENDPOINT``, and a ``starter.py`` in another terminal finds it there
(``Settings.otlp_endpoint``), so a command's span joins the trace it starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Unpack

from tollgate.settings import LOCAL_OTLP_PREFIX
from tollgate_dev.stack._process import PythonServer, ServerOptions


class TraceReceiverProcess(PythonServer):
    """The receiver on ``127.0.0.1:port``, keeping traces in ``directory``."""

    name = "traces"
    module = "tollgate_dev.traces"

    def __init__(
        self,
        port: int,
        *,
        directory: Path,
        **options: Unpack[ServerOptions],
    ) -> None:
        self.directory = directory.absolute()
        super().__init__(port, **options)

    @property
    def endpoint_file(self) -> Path:
        """Where the receiver's URL is published while it runs."""
        return self.directory / "endpoint"

    def _options(self) -> list[str]:
        return ["--dir", str(self.directory)]

    async def start(self) -> None:
        """Start the receiver, then publish its URL."""
        await super().start()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        temp = self.endpoint_file.with_name(f".endpoint.{os.getpid()}")
        temp.write_text(f"{LOCAL_OTLP_PREFIX}{self.port}\n", encoding="ascii")
        temp.replace(self.endpoint_file)

    async def stop(self) -> None:
        """Withdraw the URL first (no process should send to a dead port), then stop."""
        self.endpoint_file.unlink(missing_ok=True)
        await super().stop()
