"""Temporal's codec server protocol over Tollgate's payload key, for the Web UI and CLI.

Payloads in Temporal are encrypted (:mod:`tollgate.codec`), so the Web UI shows
ciphertext unless it can ask someone holding the key. A codec server is that someone,
which makes it exactly as sensitive as the key: ``/decode`` turns any history's payloads
into plaintext and ``/encode`` seals whatever it is given. So every request but the
health check must carry the credential, and name the one namespace served:

* ``POST /decode`` and ``POST /encode``, also under ``/{namespace}/...`` (the CLI's
  ``--codec-endpoint 'http://host:port/{namespace}'`` templating), with
  ``Authorization: Bearer <token>``: for scripts and ``temporal ... --codec-auth``.
* ``POST /ui/<token>/decode`` and ``.../encode``: the same with the token in the path,
  for a Web UI that can only be given a URL (``temporal server start-dev
  --ui-codec-endpoint`` has no way to add a header).
* The namespace comes from the ``X-Namespace`` header (the Web UI and the CLI send it) or
  the path; another namespace gets 403, none at all 400.
* Bodies larger than ``CODEC_MAX_BODY_BYTES`` get 413 before they are read.
* ``GET /health`` answers 200 once it serves, without a credential.

Bodies are JSON ``{"payloads": [...]}``: a ``temporal.api.common.v1.Payloads`` in proto3
JSON, so every metadata value and ``data`` is base64. The Web UI calls from the browser,
so CORS preflights are answered for the UI's origins only, allowing the
``Content-Type``, ``X-Namespace`` and ``Authorization`` headers the UI sends.

Run it with ``python -m tollgate.ops.codec_server --port 18234 --ui-origin
http://127.0.0.1:18233``; the local stack does that for you. It reads the key the way
every Tollgate process does (``PAYLOAD_ENCRYPTION_KEY``, else ``PAYLOAD_KEY_FILE``), the
credential from ``CODEC_AUTH_TOKEN``, else the file ``CODEC_AUTH_TOKEN_FILE`` (default
``<STATE_DIR>/codec.token``), refuses to start without either, and binds 127.0.0.1
unless told otherwise.
"""

from __future__ import annotations

import hmac
import json
import string
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

from tollgate.codec import PayloadDecryptionError, codec_from_settings
from tollgate.ops.serving import server_parser
from tollgate.settings import Settings, read_secret

#: Headers the Web UI sends with its codec requests.
ALLOWED_HEADERS = ("Content-Type", "X-Namespace", "Authorization")
#: A token must fit in a URL path segment and a header unchanged.
TOKEN_ALPHABET = frozenset(string.ascii_letters + string.digits + "-._~")
#: Shorter tokens are refused: they could be guessed.
MIN_TOKEN_LENGTH = 16
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024

_Apply = Callable[[Payloads], Awaitable[None]]


def check_token(token: str, source: str) -> str:
    """``token`` if it can serve as the codec credential; a :class:`ValueError` naming
    ``source`` (never the token) if not."""
    if len(token) < MIN_TOKEN_LENGTH or not set(token) <= TOKEN_ALPHABET:
        raise ValueError(
            f"{source}: a codec token must be at least {MIN_TOKEN_LENGTH} characters of "
            "A-Z a-z 0-9 - . _ ~ (it goes into a URL path), e.g. from: "
            'python -c "import secrets; print(secrets.token_urlsafe(32))"'
        )
    return token


def load_codec_token(settings: Settings) -> str | None:
    """The codec credential: ``CODEC_AUTH_TOKEN``, else the contents of
    ``CODEC_AUTH_TOKEN_FILE`` (default ``<state_dir>/codec.token``) if it exists, else
    ``None``. A malformed or unreadable one raises :class:`ValueError` naming its source.
    """
    return read_secret(
        settings.codec_auth_token,
        settings.codec_token_path,
        setting="CODEC_AUTH_TOKEN",
        file_setting="CODEC_AUTH_TOKEN_FILE",
        parse=check_token,
    )


def create_app(
    codec: PayloadCodec,
    *,
    token: str,
    namespace: str,
    ui_origins: Sequence[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> Starlette:
    """The codec server app: ``codec`` behind the protocol for ``namespace``, open only
    to requests carrying ``token``, CORS for ``ui_origins``."""
    expected = check_token(token, "token").encode("ascii")

    def endpoint(apply: _Apply, *, token_in_path: bool) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            presented = request.path_params["token"] if token_in_path else _bearer(request)
            # compare_digest takes as long for a near miss as for a wild guess.
            if presented is None or not hmac.compare_digest(
                presented.encode("utf-8", errors="replace"), expected
            ):
                return _unauthorized()
            refusal = _check_namespace(request, namespace)
            if refusal is not None:
                return refusal
            body = await _read_body(request, max_body_bytes)
            if isinstance(body, Response):
                return body
            return await _run(body, apply)

        return handle

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    encode, decode = codec.encode_wrapper, codec.decode_wrapper
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/encode", endpoint(encode, token_in_path=False), methods=["POST"]),
        Route("/decode", endpoint(decode, token_in_path=False), methods=["POST"]),
        Route("/ui/{token}/encode", endpoint(encode, token_in_path=True), methods=["POST"]),
        Route("/ui/{token}/decode", endpoint(decode, token_in_path=True), methods=["POST"]),
        Route("/{namespace}/encode", endpoint(encode, token_in_path=False), methods=["POST"]),
        Route("/{namespace}/decode", endpoint(decode, token_in_path=False), methods=["POST"]),
    ]
    middleware = [
        Middleware(
            CORSMiddleware,
            allow_origins=[check_origin(o) for o in ui_origins],
            allow_methods=["POST"],
            allow_headers=list(ALLOWED_HEADERS),
            # The UI's "include cross-origin credentials" switch needs this. The
            # credential checked here is never a cookie, so it grants nothing by itself.
            allow_credentials=True,
            max_age=600,
        )
    ]
    return Starlette(routes=routes, middleware=middleware)


def _bearer(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if there is one."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _unauthorized() -> Response:
    return JSONResponse(
        {
            "error": "this codec server needs its credential: send 'Authorization: Bearer "
            "<token>' or use the /ui/<token>/ path (the token is CODEC_AUTH_TOKEN, or the "
            "file CODEC_AUTH_TOKEN_FILE)"
        },
        status_code=401,
        headers={"WWW-Authenticate": 'Bearer realm="tollgate-codec"'},
    )


def _check_namespace(request: Request, served: str) -> Response | None:
    """A refusal unless the request names ``served``, and nothing else, as its namespace."""
    named = [
        n
        for n in (request.path_params.get("namespace"), request.headers.get("x-namespace"))
        if n is not None
    ]
    if not named:
        return JSONResponse(
            {"error": "name the namespace: an X-Namespace header or a /{namespace}/ path"},
            status_code=400,
        )
    if any(n != served for n in named):
        return JSONResponse(
            {"error": f"this codec server serves namespace {served!r} only"}, status_code=403
        )
    return None


async def _read_body(request: Request, limit: int) -> bytes | Response:
    """The request body, or a 413 as soon as it is known to exceed ``limit`` bytes.

    A declared ``Content-Length`` is checked before reading anything; a chunked body is
    read only up to the limit.
    """
    too_large = JSONResponse({"error": f"request body larger than {limit} bytes"}, status_code=413)
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            return JSONResponse({"error": "malformed Content-Length"}, status_code=400)
        if size > limit:
            return too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return too_large
    return bytes(body)


async def _run(body: bytes, apply: _Apply) -> Response:
    """Parse ``Payloads`` JSON, run ``apply`` over it in place, answer the same shape."""
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


def check_origin(origin: str) -> str:
    """``origin`` if it names one browser origin (``scheme://host[:port]``).

    A wildcard would make the CORS middleware answer every site, so it is refused like
    any other value that is not an origin.
    """
    parts = urlsplit(origin)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or "*" in origin
        or parts.path
        or parts.query
        or parts.fragment
    ):
        raise ValueError(f"{origin!r} is not a browser origin like http://127.0.0.1:18233")
    return origin


def ui_origins_for(ui_url: str) -> list[str]:
    """The browser origins of a Web UI at ``ui_url``: as given, and with ``localhost``
    and ``127.0.0.1`` swapped (a user types either)."""
    parts = urlsplit(ui_url)
    origin = check_origin(f"{parts.scheme}://{parts.netloc}")
    twin = {"127.0.0.1": "localhost", "localhost": "127.0.0.1"}.get(parts.hostname or "")
    if twin is None:
        return [origin]
    port = f":{parts.port}" if parts.port is not None else ""
    return [origin, f"{parts.scheme}://{twin}{port}"]


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the codec server under uvicorn until interrupted."""
    parser = server_parser(
        "python -m tollgate.ops.codec_server",
        "Temporal codec server: encrypt/decrypt Tollgate payloads for the Web UI.",
    )
    parser.add_argument(
        "--ui-origin",
        action="append",
        default=[],
        help="Web UI URL allowed to call from a browser (repeatable; default TEMPORAL_UI_URL)",
    )
    parser.add_argument(
        "--namespace", help="the namespace served (default TEMPORAL_NAMESPACE, or 'default')"
    )
    args = parser.parse_args(argv)
    settings = Settings()
    try:
        codec = codec_from_settings(settings)
        token = load_codec_token(settings)
        origins = [
            o for url in args.ui_origin or [settings.temporal_ui_url] for o in ui_origins_for(url)
        ]
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if codec is None:
        raise SystemExit(
            "error: no payload key: set PAYLOAD_ENCRYPTION_KEY, or PAYLOAD_KEY_FILE to an "
            f"existing key file (looked for {settings.payload_key_path})"
        )
    if token is None:
        # Fail closed: without a credential, whoever reaches the port could decrypt.
        raise SystemExit(
            "error: no codec credential: set CODEC_AUTH_TOKEN, or CODEC_AUTH_TOKEN_FILE to "
            f"an existing token file (looked for {settings.codec_token_path}); the codec "
            "server does not run without one"
        )
    namespace = args.namespace or settings.temporal_namespace
    print(
        f"codec server: key id {codec.key_id}, namespace {namespace}, "
        f"UI origins {', '.join(origins)}",
        flush=True,
    )
    app = create_app(
        codec,
        token=token,
        namespace=namespace,
        ui_origins=origins,
        max_body_bytes=settings.codec_max_body_bytes,
    )
    # No access log: the /ui/<token>/ paths carry the credential.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
