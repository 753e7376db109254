"""Tollgate's own processes in the local stack: the provider sandbox and the worker."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from pathlib import Path

from tollgate_dev.stack._process import (
    PROJECT_ROOT,
    ManagedProcess,
    PythonServer,
    StackError,
    _python_env,
    _temp_log,
    logger,
)

#: Line the worker logs once it polls its task queue.
WORKER_READY_LINE = "worker ready"


class SandboxProcess(PythonServer):
    """The provider sandbox (``python -m tollgate_dev.sandbox``) on ``127.0.0.1:port``.

    Ready once ``GET /health`` answers 200.
    """

    name = "sandbox"
    module = "tollgate_dev.sandbox"


class WorkerProcess(ManagedProcess):
    """``python worker.py`` in ``cwd`` with ``env`` added to the environment.

    Ready once the process logs :data:`WORKER_READY_LINE` (the worker logs it after
    connecting to Temporal and Postgres) and is still alive. Stopped with SIGTERM, which
    the worker handles by shutting down gracefully.
    """

    name = "worker"
    stop_timeout = 20.0

    def __init__(
        self,
        env: Mapping[str, str],
        cwd: Path = PROJECT_ROOT,
        *,
        log_file: Path | None = None,
        start_timeout: float = 60.0,
        ready_line: str = WORKER_READY_LINE,
    ) -> None:
        self.env = dict(env)
        self.cwd = cwd
        self.ready_line = ready_line
        super().__init__(log_file or _temp_log(self.name), start_timeout=start_timeout)

    def command(self) -> list[str]:
        """The command line that starts the worker."""
        return [sys.executable, "worker.py"]

    async def start(self) -> None:
        """Start the worker and wait until it reports being ready."""
        if not (self.cwd / "worker.py").is_file():
            raise StackError(f"no worker.py in {self.cwd}")
        await self._spawn(self.command(), env=_python_env(self.env), cwd=self.cwd)
        await self._started(self._wait_ready())
        logger.info("worker ready (pid %s)", self.pid)

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        # Scan this run's output incrementally (the log file keeps earlier runs, and a
        # chatty startup could push the line out of a fixed-size tail).
        position = self._log_offset
        pending = b""
        needle = self.ready_line.encode()
        while True:
            self._check_alive()
            chunk, position = _read_from(self.log_file, position)
            pending += chunk
            if needle in pending:
                self._check_alive()
                return
            pending = pending[-len(needle) :]
            if loop.time() > deadline:
                raise self._failure(
                    f"did not log {self.ready_line!r} within {self.start_timeout:.0f} s"
                )
            await asyncio.sleep(0.1)


def _read_from(path: Path, position: int) -> tuple[bytes, int]:
    """Bytes of ``path`` from ``position`` on, and the position after them."""
    try:
        with path.open("rb") as fh:
            fh.seek(position)
            data = fh.read()
    except OSError:
        return b"", position
    return data, position + len(data)
