"""The codec server (``python -m tollgate.codec_server``) as a child of the local stack.

It decrypts payloads for the Temporal Web UI, which the dev server is told about with
``--ui-codec-endpoint``. It reads the same key file as the stack's worker.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tollgate.codec import ensure_key_file
from tollgate.stack._process import LOCALHOST, ManagedProcess, StackError, logger
from tollgate.stack.services import PROJECT_ROOT, _python_env, _temp_log


class CodecServerProcess(ManagedProcess):
    """The codec server on ``127.0.0.1:port``, with the key in ``key_file``.

    Browsers may call it from ``ui_origins`` (the Web UI). ``env`` is added to the
    environment; ``PAYLOAD_KEY_FILE`` is set to ``key_file``, and an explicit
    ``PAYLOAD_ENCRYPTION_KEY`` in the environment still wins, as for every Tollgate
    process. Ready once ``GET /health`` answers 200.
    """

    name = "codec"
    stop_timeout = 10.0

    def __init__(
        self,
        port: int,
        *,
        key_file: Path,
        ui_origins: Sequence[str],
        cwd: Path = PROJECT_ROOT,
        env: Mapping[str, str] | None = None,
        log_file: Path | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.port = port
        self.key_file = key_file.absolute()
        self.ui_origins = list(ui_origins)
        self.cwd = cwd
        self.env = dict(env or {})
        super().__init__(log_file or _temp_log(self.name), start_timeout=start_timeout)

    @property
    def url(self) -> str:
        """Base URL of the codec server (what ``--ui-codec-endpoint`` takes)."""
        return f"http://{LOCALHOST}:{self.port}"

    def command(self) -> list[str]:
        """The command line that starts the codec server."""
        argv = [sys.executable, "-m", "tollgate.codec_server", "--host", LOCALHOST]
        argv += ["--port", str(self.port)]
        for origin in self.ui_origins:
            argv += ["--ui-origin", origin]
        return argv

    async def start(self) -> None:
        """Start the codec server and wait for its health check."""
        env = _python_env({**self.env, "PAYLOAD_KEY_FILE": str(self.key_file)})
        await self._spawn(self.command(), env=env, cwd=self.cwd)
        try:
            await self._wait_healthy(f"{self.url}/health")
        except BaseException:
            await self._abort_start()
            raise
        logger.info("codec server ready on %s (pid %s)", self.url, self.pid)


def ensure_stack_key(path: Path) -> None:
    """Create the stack's payload key file if it is missing; a bad one is a StackError."""
    try:
        ensure_key_file(path)
    except (OSError, ValueError) as exc:
        raise StackError(f"payload key: {exc}") from None
