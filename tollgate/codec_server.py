"""Temporal's codec server protocol over Tollgate's payload key, for the Web UI and CLI.

Payloads in Temporal are encrypted (:mod:`tollgate.codec`), so the Web UI shows
ciphertext unless it can ask someone holding the key. A codec server is that someone:

* ``POST /decode`` and ``POST /encode`` (also under ``/{namespace}/...``, for the CLI's
  ``--codec-endpoint 'http://host:port/{namespace}'`` templating) take and return JSON
  ``{"payloads": [...]}``: a ``temporal.api.common.v1.Payloads`` in proto3 JSON, so every
  metadata value and ``data`` is base64.
* The Web UI calls it from the browser, so it answers CORS preflights (``OPTIONS``) for
  the UI's origins, allowing the ``Content-Type``, ``X-Namespace`` and ``Authorization``
  headers the UI sends.
* ``GET /health`` answers 200 once it serves.

Run it with ``python -m tollgate.codec_server --port 18234 --ui-origin
http://127.0.0.1:18233``; the local stack does that for you. It reads the key the way
every Tollgate process does (``PAYLOAD_ENCRYPTION_KEY``, else ``PAYLOAD_KEY_FILE``) and
binds 127.0.0.1 only: whoever reaches it can decrypt.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import uvicorn
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from temporalio.api.common.v1 import Payloads
from temporalio.converter import PayloadCodec

from tollgate.codec import EncryptionCodec, PayloadDecryptionError, load_key
from tollgate.settings import Settings

#: Headers the Web UI sends with its codec requests.
ALLOWED_HEADERS = ("Content-Type", "X-Namespace", "Authorization")


def create_app(codec: PayloadCodec, *, ui_origins: Sequence[str] = ()) -> Starlette:
    """The codec server app: ``codec`` behind the protocol, CORS for ``ui_origins``."""

    async def encode(request: Request) -> Response:
        return await _run(request, codec.encode_wrapper)

    async def decode(request: Request) -> Response:
        return await _run(request, codec.decode_wrapper)

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/encode", encode, methods=["POST"]),
        Route("/decode", decode, methods=["POST"]),
        Route("/{namespace}/encode", encode, methods=["POST"]),
        Route("/{namespace}/decode", decode, methods=["POST"]),
    ]
    middleware = [
        Middleware(
            CORSMiddleware,
            allow_origins=list(ui_origins),
            allow_methods=["POST"],
            allow_headers=list(ALLOWED_HEADERS),
            # The UI's "include cross-origin credentials" switch needs this.
            allow_credentials=True,
            max_age=600,
        )
    ]
    return Starlette(routes=routes, middleware=middleware)


async def _run(request: Request, apply: Callable[[Payloads], Awaitable[None]]) -> Response:
    """Parse ``Payloads`` JSON, run ``apply`` over it in place, answer the same shape."""
    body = await request.body()
    payloads = Payloads()
    try:
        json_format.Parse(body, payloads)
    except (json_format.ParseError, UnicodeDecodeError) as exc:
        return JSONResponse(
            {"error": f'expected JSON {{"payloads": [...]}} of Temporal payloads: {exc}'},
            status_code=400,
        )
    try:
        await apply(payloads)
    except PayloadDecryptionError as exc:
        return JSONResponse({"error": str(exc)}, status_code=422)
    return Response(json.dumps(json_format.MessageToDict(payloads)), media_type="application/json")


def ui_origins_for(ui_url: str) -> list[str]:
    """The browser origins of a Web UI at ``ui_url``: as given, and with ``localhost``
    and ``127.0.0.1`` swapped (a user types either)."""
    parts = urlsplit(ui_url)
    origin = f"{parts.scheme}://{parts.netloc}"
    twin = {"127.0.0.1": "localhost", "localhost": "127.0.0.1"}.get(parts.hostname or "")
    if twin is None:
        return [origin]
    port = f":{parts.port}" if parts.port is not None else ""
    return [origin, f"{parts.scheme}://{twin}{port}"]


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the codec server under uvicorn until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m tollgate.codec_server",
        description="Temporal codec server: encrypt/decrypt Tollgate payloads for the Web UI.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind")
    parser.add_argument("--port", type=int, required=True, help="port to bind")
    parser.add_argument(
        "--ui-origin",
        action="append",
        default=[],
        help="Web UI URL allowed to call from a browser (repeatable; default TEMPORAL_UI_URL)",
    )
    args = parser.parse_args(argv)
    settings = Settings()
    try:
        key = load_key(settings)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if key is None:
        raise SystemExit(
            "error: no payload key: set PAYLOAD_ENCRYPTION_KEY, or PAYLOAD_KEY_FILE to an "
            f"existing key file (looked for {settings.payload_key_path})"
        )
    origins = [
        o for url in args.ui_origin or [settings.temporal_ui_url] for o in ui_origins_for(url)
    ]
    codec = EncryptionCodec(key)
    print(f"codec server: key id {codec.key_id}, UI origins {', '.join(origins)}", flush=True)
    uvicorn.run(
        create_app(codec, ui_origins=origins), host=args.host, port=args.port, log_level="warning"
    )


if __name__ == "__main__":
    main()
