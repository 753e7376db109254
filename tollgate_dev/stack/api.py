"""The HTTP API (``python -m tollgate.api``) as a supervised child of the local stack.

It starts after the worker (the schema must be migrated: as the application role it
only checks) and reads the stack's payload key and receipt webhook secret, which is
created on the first start like the codec credential (see :func:`ensure_webhook_secret`).
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Mapping
from pathlib import Path

from tollgate.api.signatures import check_secret
from tollgate_dev.stack._files import ensure_secret_file
from tollgate_dev.stack._process import LOCALHOST, ManagedProcess, StackError, logger
from tollgate_dev.stack.services import PROJECT_ROOT, _python_env, _temp_log


class ApiProcess(ManagedProcess):
    """The API on ``127.0.0.1:port``, with ``env`` (the stack's addresses, its payload
    key) added to the environment and ``RECEIPT_WEBHOOK_SECRET_FILE`` set to
    ``secret_file``. Ready once ``GET /healthz`` answers 200."""

    name = "api"
    stop_timeout = 10.0

    def __init__(
        self,
        port: int,
        *,
        secret_file: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = PROJECT_ROOT,
        log_file: Path | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.port = port
        self.secret_file = secret_file.absolute()
        self.env = dict(env or {})
        self.cwd = cwd
        super().__init__(log_file or _temp_log(self.name), start_timeout=start_timeout)

    @property
    def url(self) -> str:
        """Base URL of the API."""
        return f"http://{LOCALHOST}:{self.port}"

    def command(self) -> list[str]:
        """The command line that starts the API."""
        return [sys.executable, "-m", "tollgate.api", "--host", LOCALHOST, "--port", str(self.port)]

    async def start(self) -> None:
        """Start the API and wait for its health check."""
        env = _python_env({**self.env, "RECEIPT_WEBHOOK_SECRET_FILE": str(self.secret_file)})
        await self._spawn(self.command(), env=env, cwd=self.cwd)
        try:
            await self._wait_healthy(f"{self.url}/healthz")
        except BaseException:
            await self._abort_start()
            raise
        logger.info("api ready on %s (pid %s)", self.url, self.pid)


def ensure_webhook_secret(path: Path) -> str:
    """The receipt webhook secret in ``path``; a random one is written there (0600,
    atomically) first if the file is missing. One the API would refuse is a StackError."""
    try:
        secret = ensure_secret_file(
            path, lambda: secrets.token_hex(32), what="receipt webhook secret"
        )
        return check_secret(secret, f"RECEIPT_WEBHOOK_SECRET_FILE {path}")
    except (OSError, ValueError) as exc:
        raise StackError(f"webhook secret: {exc}") from None
