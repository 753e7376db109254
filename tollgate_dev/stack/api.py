"""The HTTP API (``python -m tollgate.api``) as a supervised child of the local stack.

It starts after the worker (the schema must be migrated: as the application role it
only checks) and reads the stack's payload key and receipt webhook secret, which is
created on the first start like the codec credential (see :func:`ensure_webhook_secret`).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from tollgate.api.signatures import check_secret
from tollgate_dev.stack._files import ensure_secret_file
from tollgate_dev.stack._process import PythonServer, StackError


class ApiProcess(PythonServer):
    """The API on ``127.0.0.1:port``, with ``env`` (the stack's addresses, its payload
    key file and ``RECEIPT_WEBHOOK_SECRET_FILE``) added to the environment. Ready once
    ``GET /healthz`` answers 200."""

    name = "api"
    module = "tollgate.api"
    health_path = "/healthz"


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
