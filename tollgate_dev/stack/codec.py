"""The codec server (``python -m tollgate.ops.codec_server``) as a child of the local stack.

It decrypts payloads for the Temporal Web UI, which the dev server is told about with
``--ui-codec-endpoint``. It reads the same key file as the stack's worker, and its
credential from the stack's token file (see :func:`ensure_codec_token`).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Unpack

from tollgate.codec import ensure_key_file
from tollgate.ops.codec_server import check_token
from tollgate_dev.stack._files import ensure_secret_file
from tollgate_dev.stack._process import PythonServer, ServerOptions, StackError, _python_env


class CodecServerProcess(PythonServer):
    """The codec server on ``127.0.0.1:port`` for ``namespace``, with the key in
    ``key_file`` and the credential in ``token_file``.

    Browsers may call it from ``ui_origins`` (the Web UI). ``env`` is added to the
    environment; ``PAYLOAD_KEY_FILE`` and ``CODEC_AUTH_TOKEN_FILE`` are set to the two
    files. An explicit ``PAYLOAD_ENCRYPTION_KEY`` in the environment still wins, as for
    every Tollgate process; a ``CODEC_AUTH_TOKEN`` only when ``env`` gives it, because
    whoever points the Web UI at this server must know which token it checks. Ready once
    ``GET /health`` answers 200.
    """

    name = "codec"
    module = "tollgate.ops.codec_server"

    def __init__(
        self,
        port: int,
        *,
        key_file: Path,
        token_file: Path,
        ui_origins: Sequence[str],
        namespace: str = "default",
        **options: Unpack[ServerOptions],
    ) -> None:
        self.key_file = key_file.absolute()
        self.token_file = token_file.absolute()
        self.ui_origins = list(ui_origins)
        self.namespace = namespace
        super().__init__(port, **options)

    def ui_endpoint(self, token: str) -> str:
        """The capability URL for a Web UI: requests below it carry ``token`` in the path."""
        return f"{self.url}/ui/{token}"

    def _options(self) -> list[str]:
        options = ["--namespace", self.namespace]
        for origin in self.ui_origins:
            options += ["--ui-origin", origin]
        return options

    def _environment(self) -> dict[str, str]:
        env = _python_env(
            {
                **self.env,
                "PAYLOAD_KEY_FILE": str(self.key_file),
                "CODEC_AUTH_TOKEN_FILE": str(self.token_file),
            }
        )
        if "CODEC_AUTH_TOKEN" not in self.env:
            # One inherited from the shell would win over the file the UI was given.
            env.pop("CODEC_AUTH_TOKEN", None)
        return env


def ensure_stack_key(path: Path) -> None:
    """Create the stack's payload key file if it is missing; a bad one is a StackError."""
    try:
        ensure_key_file(path)
    except (OSError, ValueError) as exc:
        raise StackError(f"payload key: {exc}") from None


def ensure_codec_token(path: Path) -> str:
    """The codec credential in ``path``; a random one is written there (0600, atomically)
    first if the file is missing. A token the codec server would refuse is a StackError.
    """
    try:
        token = ensure_secret_file(path, _new_token, what="codec server credential")
        return check_token(token, f"CODEC_AUTH_TOKEN_FILE {path}")
    except (OSError, ValueError) as exc:
        raise StackError(f"codec token: {exc}") from None


def _new_token() -> str:
    return secrets.token_urlsafe(32)
