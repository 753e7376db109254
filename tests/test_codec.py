"""Payload encryption: the codec, key loading, the codec server, and the proof on a real
server that a canary in customer data never reaches Temporal's history in clear.

The session's shared ``client`` (conftest) is plain unless a key is configured; the
end-to-end test here builds its own encrypted client and worker on a fresh task queue.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import stat
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from google.protobuf.message import Message
from rich.console import Console
from temporalio.api.common.v1 import Payload
from temporalio.api.history.v1 import History
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from tests.conftest import PROJECT_ROOT, Harness, serve_in_process
from tollgate.codec import (
    ENCODING,
    KEY_ID_METADATA,
    EncryptionCodec,
    PayloadDecryptionError,
    encode_key,
    ensure_key_file,
    key_id,
    load_key,
    new_key,
)
from tollgate.errors import ConfigError
from tollgate.messages.models import MessageResult
from tollgate.messages.service import MessageService
from tollgate.messages.states import MessageStatus
from tollgate.ops.codec_server import create_app, load_codec_token, ui_origins_for
from tollgate.orders.models import OrderInput, OrderResult
from tollgate.orders.service import OrderService
from tollgate.orders.states import OrderStatus
from tollgate.providers.client import build_http_client
from tollgate.settings import Settings
from tollgate.temporal import PLAIN_CONVERTER, connect, data_converter
from tollgate.worker import WORKFLOWS, build_worker
from tollgate_dev.stack import (
    LocalStack,
    TemporalDevServer,
    free_port,
    port_is_free,
    temporal_binary,
)
from tollgate_dev.stack.__main__ import _summary
from tollgate_dev.stack.codec import CodecServerProcess, ensure_codec_token

KEY = bytes(range(32))
OTHER_KEY = bytes(range(32, 64))
UI_ORIGIN = "http://127.0.0.1:18233"


def _payload(text: str = '{"body": "hello"}') -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=text.encode())


# -- the codec ----------------------------------------------------------------------------


async def test_round_trip_restores_the_payload_exactly() -> None:
    codec = EncryptionCodec(KEY)
    original = [_payload(), Payload(metadata={"encoding": b"binary/null"})]
    encoded = await codec.encode(original)
    for payload in encoded:
        assert payload.metadata["encoding"] == ENCODING
        assert payload.metadata[KEY_ID_METADATA] == key_id(KEY).encode()
        assert b"hello" not in payload.data
    assert await codec.decode(encoded) == original


async def test_every_encoding_uses_a_fresh_nonce() -> None:
    codec = EncryptionCodec(KEY)
    first, second = await codec.encode([_payload(), _payload()])
    assert first.data[:12] != second.data[:12]
    assert first.data != second.data
    assert await codec.decode([first, second]) == [_payload(), _payload()]


async def test_tampered_ciphertext_is_refused() -> None:
    codec = EncryptionCodec(KEY)
    (encoded,) = await codec.encode([_payload()])
    data = bytearray(encoded.data)
    data[-1] ^= 0x01
    tampered = Payload(metadata=dict(encoded.metadata), data=bytes(data))
    with pytest.raises(PayloadDecryptionError, match="altered or corrupted"):
        await codec.decode([tampered])


async def test_plain_payloads_pass_through_decoding() -> None:
    """Histories from before encryption, and plain peers, still decode."""
    plain = [_payload(), Payload(metadata={"encoding": b"json/protobuf"}, data=b"{}")]
    assert await EncryptionCodec(KEY).decode(plain) == plain


async def test_unknown_key_id_is_a_clear_error() -> None:
    (encoded,) = await EncryptionCodec(new_key()).encode([_payload()])
    codec = EncryptionCodec(KEY)
    with pytest.raises(PayloadDecryptionError) as caught:
        await codec.decode([encoded])
    message = str(caught.value)
    assert encoded.metadata[KEY_ID_METADATA].decode() in message
    assert key_id(KEY) in message and "PAYLOAD_ENCRYPTION_KEY" in message


async def test_rotation_decodes_with_old_keys_and_encodes_with_the_new_one() -> None:
    old, new = new_key(), new_key()
    (written_before,) = await EncryptionCodec(old).encode([_payload()])
    rotated = EncryptionCodec(new, old_keys=[old])
    assert await rotated.decode([written_before]) == [_payload()]
    (written_after,) = await rotated.encode([_payload()])
    assert written_after.metadata[KEY_ID_METADATA] == key_id(new).encode()


def test_a_key_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        EncryptionCodec(b"short")


# -- key loading --------------------------------------------------------------------------


def _settings(tmp_path: Path, **fields: Any) -> Settings:
    fields.setdefault("payload_key_file", tmp_path / "payload.key")
    return Settings(**fields)


def test_load_key_prefers_the_setting_then_the_file_then_nothing(tmp_path: Path) -> None:
    assert load_key(_settings(tmp_path)) is None, "no key anywhere: payloads stay plain"

    file_key = ensure_key_file(tmp_path / "payload.key")
    assert load_key(_settings(tmp_path)) == file_key

    env_key = new_key()
    settings = _settings(tmp_path, payload_encryption_key=encode_key(env_key))
    assert load_key(settings) == env_key


def test_load_key_reads_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = new_key()
    monkeypatch.setenv("PAYLOAD_ENCRYPTION_KEY", encode_key(key))
    monkeypatch.setenv("PAYLOAD_KEY_FILE", str(tmp_path / "absent.key"))
    assert load_key(Settings()) == key


@pytest.mark.parametrize(
    ("value", "problem"),
    [("not base64!", "not valid base64"), (encode_key(b"x" * 16), "got 16 bytes")],
)
def test_a_malformed_key_names_the_setting(tmp_path: Path, value: str, problem: str) -> None:
    with pytest.raises(ValueError, match=f"PAYLOAD_ENCRYPTION_KEY: .*{problem}") as caught:
        load_key(_settings(tmp_path, payload_encryption_key=value))
    assert value not in str(caught.value), "a key is never echoed"

    bad_file = tmp_path / "bad.key"
    bad_file.write_text(value)
    with pytest.raises(ValueError, match=f"PAYLOAD_KEY_FILE {bad_file}: .*{problem}"):
        load_key(_settings(tmp_path, payload_key_file=bad_file))


def test_ensure_key_file_creates_a_private_key_once(tmp_path: Path) -> None:
    path = tmp_path / "state" / "payload.key"
    key = ensure_key_file(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert base64.b64decode(path.read_text().strip()) == key
    assert ensure_key_file(path) == key, "an existing key is kept"
    assert list(path.parent.iterdir()) == [path], "no temporary file left behind"


async def test_data_converter_fails_closed_without_a_key(tmp_path: Path) -> None:
    """Run from another directory, a client once sent plaintext silently; now it refuses."""
    with pytest.raises(ConfigError, match="no payload key") as refused:
        data_converter(_settings(tmp_path))
    assert "PAYLOAD_ENCRYPTION=off" in str(refused.value)
    assert str(tmp_path / "payload.key") in str(refused.value), "it says where it looked"
    opted_out = data_converter(_settings(tmp_path, payload_encryption="off"))
    assert opted_out is PLAIN_CONVERTER, "plaintext only by an explicit opt-out"


def test_key_path_follows_the_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "elsewhere"
    ensure_key_file(state / "payload.key")
    converter = data_converter(Settings(state_dir=state))
    assert isinstance(converter.payload_codec, EncryptionCodec)


def test_malformed_key_in_the_environment_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PAYLOAD_ENCRYPTION_KEY"):
        data_converter(_settings(tmp_path, payload_encryption_key="not-base64!"))
    with pytest.raises(ConfigError, match=r"PAYLOAD_OLD_KEYS \(entry 2\)"):
        data_converter(
            _settings(
                tmp_path,
                payload_encryption_key=encode_key(KEY),
                payload_old_keys=f"{encode_key(OTHER_KEY)},short",
            )
        )


async def test_data_converter_encrypts_with_the_key(tmp_path: Path) -> None:

    encrypting = data_converter(_settings(tmp_path, payload_encryption_key=encode_key(KEY)))
    order = OrderInput(
        order_id="o-1", customer_id="CANARY", items=[{"sku": "WIDGET", "quantity": 1}],
        amount_cents=100,
    )  # fmt: skip
    (payload,) = await encrypting.encode([order])
    assert payload.metadata["encoding"] == ENCODING and b"CANARY" not in payload.data
    assert await encrypting.decode([payload], [OrderInput]) == [order]


async def test_histories_recorded_without_encryption_replay_with_it() -> None:
    """tests/histories/ is plain; an encrypting worker must still replay such histories."""
    histories = sorted((Path(__file__).parent / "histories").glob("*.json"))
    assert histories
    converter = data_converter(Settings(payload_encryption_key=encode_key(KEY)))
    replayer = Replayer(workflows=list(WORKFLOWS), data_converter=converter)
    for path in histories:
        history = WorkflowHistory.from_json(path.stem, path.read_text())
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        assert result.replay_failure is None, (path.name, result.replay_failure)


# -- the codec server ---------------------------------------------------------------------

#: The credential of the codec servers in these tests.
TOKEN = "codec-test-token-0123456789abcdef"
#: What a client that may decode sends: the credential and the namespace served.
AUTH = {"Authorization": f"Bearer {TOKEN}", "X-Namespace": "default"}
#: A small body limit, so an oversized request stays small too.
MAX_BODY = 64 * 1024


@pytest.fixture
async def codec_url() -> AsyncIterator[str]:
    """The codec server app, served by uvicorn on a real socket of this process."""
    app = create_app(
        EncryptionCodec(KEY),
        token=TOKEN,
        namespace="default",
        ui_origins=ui_origins_for(UI_ORIGIN),
        max_body_bytes=MAX_BODY,
    )
    async with serve_in_process(app) as url:
        yield url


@pytest.fixture
async def codec_http(codec_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=codec_url, timeout=10) as http:
        yield http


def _wire(payload: Payload) -> dict[str, Any]:
    """A payload as proto3 JSON, the way the Web UI sends it: every bytes field base64."""
    return {
        "metadata": {k: base64.b64encode(v).decode() for k, v in payload.metadata.items()},
        "data": base64.b64encode(payload.data).decode(),
    }


def _unwire(item: dict[str, Any]) -> Payload:
    return Payload(
        metadata={k: base64.b64decode(v) for k, v in item.get("metadata", {}).items()},
        data=base64.b64decode(item.get("data", "")),
    )


async def _sealed_canary() -> dict[str, Any]:
    """A request body holding one encrypted payload whose plaintext says CANARY."""
    (sealed,) = await EncryptionCodec(KEY).encode([_payload('"CANARY"')])
    return {"payloads": [_wire(sealed)]}


def _assert_refused(response: httpx.Response, status: int) -> None:
    """Refused with ``status``, a JSON error, and nothing decrypted or encrypted."""
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}
    assert "CANARY" not in response.text and "payloads" not in response.json()


async def test_codec_server_encodes_and_decodes(codec_http: httpx.AsyncClient) -> None:
    original = [_payload('"CANARY"'), _payload("{}")]
    headers = {**AUTH, "Origin": UI_ORIGIN}
    encoded = await codec_http.post(
        "/encode", json={"payloads": [_wire(p) for p in original]}, headers=headers
    )
    assert encoded.status_code == 200
    assert encoded.headers["access-control-allow-origin"] == UI_ORIGIN
    sealed = [_unwire(item) for item in encoded.json()["payloads"]]
    assert all(p.metadata["encoding"] == ENCODING for p in sealed)
    assert b"CANARY" not in b"".join(p.data for p in sealed)

    # /{namespace}/decode is the CLI's --codec-endpoint templating; the path names the
    # namespace there, so the header is not needed.
    bearer = {"Authorization": AUTH["Authorization"]}
    for path, extra in (("/decode", headers), ("/default/decode", bearer)):
        decoded = await codec_http.post(path, json=encoded.json(), headers=extra)
        assert decoded.status_code == 200
        assert [_unwire(item) for item in decoded.json()["payloads"]] == original

    plain = await codec_http.post("/decode", json={"payloads": [_wire(_payload())]}, headers=AUTH)
    assert [_unwire(item) for item in plain.json()["payloads"]] == [_payload()]


async def test_codec_server_decodes_for_the_ui_through_its_capability_path(
    codec_http: httpx.AsyncClient,
) -> None:
    """What the Web UI does: POST <endpoint>/decode with X-Namespace and no header
    credential, the endpoint being /ui/<token>."""
    headers = {"X-Namespace": "default", "Origin": "http://localhost:18233"}
    decoded = await codec_http.post(
        f"/ui/{TOKEN}/decode", json=await _sealed_canary(), headers=headers
    )
    assert decoded.status_code == 200
    assert decoded.headers["access-control-allow-origin"] == "http://localhost:18233"
    assert [_unwire(i) for i in decoded.json()["payloads"]] == [_payload('"CANARY"')]

    encoded = await codec_http.post(
        f"/ui/{TOKEN}/encode", json={"payloads": [_wire(_payload())]}, headers=headers
    )
    assert encoded.status_code == 200
    assert _unwire(encoded.json()["payloads"][0]).metadata["encoding"] == ENCODING


async def test_codec_server_refuses_requests_without_a_credential(
    codec_http: httpx.AsyncClient,
) -> None:
    body = await _sealed_canary()
    namespace_only = {"X-Namespace": "default"}
    for path in ("/decode", "/encode", "/default/decode", "/default/encode", "/ui/decode"):
        response = await codec_http.post(path, json=body, headers=namespace_only)
        _assert_refused(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "Bearer" in response.json()["error"]
    assert (await codec_http.get("/health")).status_code == 200, "health stays open"


async def test_codec_server_refuses_a_wrong_credential(codec_http: httpx.AsyncClient) -> None:
    body = await _sealed_canary()
    near_miss = TOKEN[:-1] + ("0" if TOKEN[-1] != "0" else "1")
    basic = base64.b64encode(f"user:{TOKEN}".encode()).decode()
    for authorization in (
        f"Bearer {near_miss}",
        f"Bearer {TOKEN}-and-more",
        "Bearer",
        f"Basic {basic}",
        TOKEN,
    ):
        response = await codec_http.post(
            "/decode", json=body, headers={"Authorization": authorization, "X-Namespace": "default"}
        )
        _assert_refused(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")
    for capability in (near_miss, TOKEN.upper(), "x" * len(TOKEN)):
        # A right header does not make a wrong capability path right.
        response = await codec_http.post(f"/ui/{capability}/decode", json=body, headers=AUTH)
        _assert_refused(response, 401)


async def test_codec_server_serves_its_namespace_only(codec_http: httpx.AsyncClient) -> None:
    body = await _sealed_canary()
    bearer = {"Authorization": AUTH["Authorization"]}
    other = {**bearer, "X-Namespace": "payments"}
    _assert_refused(await codec_http.post("/decode", json=body, headers=other), 403)
    _assert_refused(await codec_http.post("/payments/decode", json=body, headers=bearer), 403)
    _assert_refused(await codec_http.post("/default/decode", json=body, headers=other), 403)
    _assert_refused(await codec_http.post("/payments/decode", json=body, headers=AUTH), 403)
    ui_other = {"X-Namespace": "payments"}
    _assert_refused(await codec_http.post(f"/ui/{TOKEN}/decode", json=body, headers=ui_other), 403)

    missing = await codec_http.post("/decode", json=body, headers=bearer)
    _assert_refused(missing, 400)
    assert "X-Namespace" in missing.json()["error"]
    _assert_refused(await codec_http.post(f"/ui/{TOKEN}/decode", json=body), 400)


async def _raw_http(url: str, head: str, chunks: Sequence[bytes] = ()) -> bytes:
    """Send a request head (and body bytes) over a plain socket; the response's status
    line, read without finishing the body first."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n")
        for chunk in chunks:
            writer.write(chunk)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_codec_server_refuses_an_oversized_body_without_reading_it(
    codec_url: str, codec_http: httpx.AsyncClient
) -> None:
    credentials = f"Authorization: {AUTH['Authorization']}\nX-Namespace: default\n"
    # A gigabyte announced and none of it sent: the answer comes anyway.
    head = f"POST /decode HTTP/1.1\nHost: codec\n{credentials}Content-Length: {1 << 30}\n"
    assert (await _raw_http(codec_url, head)).startswith(b"HTTP/1.1 413")

    # No length announced: chunks are read up to the limit, and no further.
    head = f"POST /decode HTTP/1.1\nHost: codec\n{credentials}Transfer-Encoding: chunked\n"
    piece = b"x" * 16384
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * (MAX_BODY // len(piece) + 1)
    assert (await _raw_http(codec_url, head, chunks)).startswith(b"HTTP/1.1 413")

    # Without the credential the size does not even matter: 401 first.
    head = f"POST /decode HTTP/1.1\nHost: codec\nContent-Length: {1 << 30}\n"
    assert (await _raw_http(codec_url, head)).startswith(b"HTTP/1.1 401")

    # Just under the limit is served.
    payload = _payload(json.dumps("y" * (MAX_BODY // 2)))
    body = json.dumps({"payloads": [_wire(payload)]}).encode()
    assert len(body) <= MAX_BODY
    response = await codec_http.post("/decode", content=body, headers=AUTH)
    assert response.status_code == 200
    too_big = await codec_http.post("/decode", content=body + b" " * MAX_BODY, headers=AUTH)
    _assert_refused(too_big, 413)


async def test_codec_server_answers_the_ui_preflight(codec_http: httpx.AsyncClient) -> None:
    for origin in ("http://127.0.0.1:18233", "http://localhost:18233"):
        for path in ("/decode", f"/ui/{TOKEN}/decode"):
            response = await codec_http.options(
                path,
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization,content-type,x-namespace",
                },
            )
            assert response.status_code == 200
            assert response.headers["access-control-allow-origin"] == origin
            assert "POST" in response.headers["access-control-allow-methods"]
            allowed = response.headers["access-control-allow-headers"].lower()
            assert {"authorization", "x-namespace", "content-type"} <= {
                h.strip() for h in allowed.split(",")
            }


async def test_codec_server_gives_other_origins_no_cors_answer(
    codec_http: httpx.AsyncClient,
) -> None:
    for stranger in ("http://evil.example", "http://127.0.0.1:9999", "null"):
        preflight = await codec_http.options(
            "/decode",
            headers={
                "Origin": stranger,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,x-namespace",
            },
        )
        assert preflight.status_code == 400
        assert "access-control-allow-origin" not in preflight.headers
        # Even a request that carries the credential gives a foreign page nothing to read.
        simple = await codec_http.post(
            "/decode", json=await _sealed_canary(), headers={**AUTH, "Origin": stranger}
        )
        assert "access-control-allow-origin" not in simple.headers


async def test_codec_server_errors(codec_http: httpx.AsyncClient) -> None:
    bad = await codec_http.post("/decode", content=b"not json", headers=AUTH)
    assert bad.status_code == 400 and "payloads" in bad.json()["error"]

    (foreign,) = await EncryptionCodec(new_key()).encode([_payload()])
    unknown = await codec_http.post("/decode", json={"payloads": [_wire(foreign)]}, headers=AUTH)
    assert unknown.status_code == 422 and "key id" in unknown.json()["error"]

    assert (await codec_http.get("/decode", headers=AUTH)).status_code == 405
    assert (await codec_http.get("/health")).status_code == 200


def test_ui_origins_cover_both_spellings_of_localhost() -> None:
    assert ui_origins_for("http://127.0.0.1:18233/") == [
        "http://127.0.0.1:18233",
        "http://localhost:18233",
    ]
    assert ui_origins_for("https://temporal.example") == ["https://temporal.example"]


@pytest.mark.parametrize("origin", ["*", "http://*.example", "file:///tmp/ui", "example.com"])
def test_a_wildcard_or_malformed_ui_origin_is_refused(origin: str) -> None:
    with pytest.raises(ValueError, match="not a browser origin"):
        ui_origins_for(origin)
    with pytest.raises(ValueError, match="not a browser origin"):
        create_app(EncryptionCodec(KEY), token=TOKEN, namespace="default", ui_origins=[origin])


# -- the codec server's credential ----------------------------------------------------------


def test_load_codec_token_prefers_the_setting_then_the_file(tmp_path: Path) -> None:
    path = tmp_path / "codec.token"
    assert load_codec_token(Settings(state_dir=tmp_path)) is None, "none: it will not start"
    path.write_text(f"{TOKEN}\n")
    assert load_codec_token(Settings(state_dir=tmp_path)) == TOKEN
    other = tmp_path / "elsewhere.token"
    other.write_text("another-token-0123456789")
    assert load_codec_token(Settings(codec_auth_token_file=other)) == "another-token-0123456789"
    from_env = Settings(state_dir=tmp_path, codec_auth_token="env-token-0123456789abcd")
    assert load_codec_token(from_env) == "env-token-0123456789abcd"


@pytest.mark.parametrize("bad", ["short", "has spaces in it 0123456789", "slash/in/it/0123456789"])
def test_a_weak_or_unusable_codec_token_is_refused_without_echoing_it(
    tmp_path: Path, bad: str
) -> None:
    with pytest.raises(ValueError, match="CODEC_AUTH_TOKEN: a codec token must") as caught:
        load_codec_token(Settings(codec_auth_token=bad))
    assert bad not in str(caught.value)
    path = tmp_path / "codec.token"
    path.write_text(bad)
    with pytest.raises(ValueError, match=f"CODEC_AUTH_TOKEN_FILE {path}"):
        load_codec_token(Settings(codec_auth_token_file=path))


def test_ensure_codec_token_creates_a_private_token_once(tmp_path: Path) -> None:
    path = tmp_path / "state" / "codec.token"
    token = ensure_codec_token(path)
    assert len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == token
    assert ensure_codec_token(path) == token, "an existing token is kept"
    assert list(path.parent.iterdir()) == [path], "no temporary file left behind"
    assert load_codec_token(Settings(codec_auth_token_file=path)) == token


async def test_codec_server_refuses_to_start_without_a_credential(tmp_path: Path) -> None:
    """Fail closed, in one line that names the settings to use."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEC_AUTH_TOKEN")}
    env |= {
        "PAYLOAD_ENCRYPTION_KEY": encode_key(KEY),
        "STATE_DIR": str(tmp_path),
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    port = free_port()
    for extra, problem in (
        ({}, "no codec credential"),
        ({"CODEC_AUTH_TOKEN": "weak"}, "CODEC_AUTH_TOKEN: a codec token must"),
    ):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tollgate.ops.codec_server", "--port", str(port),
            env=env | extra, cwd=PROJECT_ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 1
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1, lines
        assert problem in lines[0] and "weak" not in lines[0]
        if not extra:
            assert "CODEC_AUTH_TOKEN" in lines[0] and "CODEC_AUTH_TOKEN_FILE" in lines[0]
            assert str(tmp_path / "codec.token") in lines[0]
        assert out == b""
    assert port_is_free("127.0.0.1", port)


# -- the local stack ----------------------------------------------------------------------


def test_dev_server_gets_the_codec_endpoint_only_with_a_ui(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:18234/ui/{TOKEN}"
    server = TemporalDevServer(free_port(), free_port(), codec_endpoint=endpoint)
    argv = server.command()
    at = argv.index("--ui-codec-endpoint")
    assert argv[at + 1] == endpoint
    shown = server._shown_argv(argv)
    assert shown[at + 1] == "http://127.0.0.1:18234/<hidden>", "logs never show the token"
    assert TOKEN not in " ".join(shown)
    assert "--ui-codec-endpoint" not in TemporalDevServer(free_port(), free_port()).command()
    headless = TemporalDevServer(free_port(), None, codec_endpoint=endpoint).command()
    assert "--ui-codec-endpoint" not in headless


def test_local_stack_wires_key_codec_server_and_ui(tmp_path: Path) -> None:
    ui_port = free_port()

    def stack_in(state_dir: Path, ui_port: int | None, **options: Any) -> LocalStack:
        return LocalStack(
            state_dir,
            temporal_port=free_port(),
            ui_port=ui_port,
            postgres_port=free_port(),
            sandbox_port=free_port(),
            **options,
        )

    stack = stack_in(tmp_path / "state", ui_port)
    key_file = tmp_path / "state" / "payload.key"
    assert stack.payload_key_file == key_file
    assert stack.codec is not None and stack.codec.key_file == key_file
    assert stack.codec.token_file == tmp_path / "state" / "codec.token"
    assert stack.codec.namespace == stack.temporal.namespace
    assert stack.codec.ui_origins == [f"http://127.0.0.1:{ui_port}"]
    assert stack.temporal.codec_endpoint is None, "set on start, once the token exists"
    assert not (tmp_path / "state").exists(), "constructing a stack writes nothing"
    names = [part.name for part in stack.components]
    assert names.index("codec") < names.index("temporal"), "the UI's codec is up first"
    assert stack.worker is not None
    assert stack.worker.env["PAYLOAD_KEY_FILE"] == str(key_file)

    headless = stack_in(tmp_path / "h", None)
    assert headless.codec is None and "codec" not in [p.name for p in headless.components]
    assert headless.temporal.codec_endpoint is None

    elsewhere = tmp_path / "keys" / "k"
    settings = Settings(
        state_dir=tmp_path / "s", payload_key_file=elsewhere, codec_auth_token_file=elsewhere
    )
    configured = LocalStack.from_settings(settings)
    assert configured.payload_key_file == elsewhere
    assert configured.codec is not None and configured.codec.token_file == elsewhere
    default = LocalStack.from_settings(Settings(state_dir=tmp_path / "s"))
    assert default.payload_key_file == tmp_path / "s" / "payload.key"
    assert default.codec_token_file == tmp_path / "s" / "codec.token"

    # CODEC_AUTH_TOKEN wins over the file, for the UI's URL and the codec server alike.
    given = LocalStack.from_settings(Settings(state_dir=tmp_path / "s", codec_auth_token=TOKEN))
    assert given.codec_token() == TOKEN
    assert given.codec is not None and given.codec.env["CODEC_AUTH_TOKEN"] == TOKEN
    assert not (tmp_path / "s" / "codec.token").exists()


async def test_local_stack_points_the_web_ui_at_its_codec_server(
    tmp_path: Path, database_url: str, owner_url: str
) -> None:
    """The real thing: a stack whose Web UI is given the codec server's capability URL.
    The token file is made private, the UI's URL decrypts, the codec server's own URL
    needs the credential, and neither the logs nor `make up`'s summary show the token."""
    stack = LocalStack(
        tmp_path / "state",
        temporal_port=free_port(),
        ui_port=free_port(),
        postgres_port=free_port(),
        sandbox_port=free_port(),
        database_url=database_url,
        database_owner_url=owner_url,
        temporal_db_file=False,
        with_worker=False,
    )
    async with stack:
        assert stack.codec is not None and stack.ui_url is not None
        token_file = tmp_path / "state" / "codec.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        key = ensure_key_file(stack.payload_key_file)
        (sealed,) = await EncryptionCodec(key).encode([_payload('"CANARY"')])
        body = {"payloads": [_wire(sealed)]}
        async with httpx.AsyncClient(timeout=10) as http:
            ui = await http.get(f"{stack.ui_url}/api/v1/settings")
            endpoint = ui.json()["Codec"]["Endpoint"]
            assert endpoint == f"{stack.codec.url}/ui/{token}"

            # As the browser does it, from the UI's other spelling of its origin.
            origin = stack.ui_url.replace("127.0.0.1", "localhost")
            decoded = await http.post(
                f"{endpoint}/decode",
                json=body,
                headers={"X-Namespace": "default", "Origin": origin},
            )
            assert decoded.headers["access-control-allow-origin"] == origin
            assert [_unwire(i) for i in decoded.json()["payloads"]] == [_payload('"CANARY"')]

            _assert_refused(await http.post(f"{stack.codec.url}/decode", json=body), 401)
            namespace_only = {"X-Namespace": "default"}
            for path in ("/decode", "/default/decode"):
                refused = await http.post(
                    f"{stack.codec.url}{path}", json=body, headers=namespace_only
                )
                _assert_refused(refused, 401)
            bearer = {"Authorization": f"Bearer {token}"}
            other = {**bearer, "X-Namespace": "payments"}
            _assert_refused(
                await http.post(f"{stack.codec.url}/decode", json=body, headers=other), 403
            )
            ok = await http.post(f"{stack.codec.url}/default/decode", json=body, headers=bearer)
            assert ok.status_code == 200

        # The CLI's way: the {namespace} template and a bearer credential.
        workflow_id = f"codec-cli-{uuid.uuid4().hex[:8]}"
        client = await connect(
            Settings(
                temporal_address=stack.temporal_address, payload_key_file=stack.payload_key_file
            )
        )
        await client.start_workflow(
            "NobodyRunsThis", "CANARY-for-the-cli", id=workflow_id, task_queue=workflow_id
        )
        show = [
            str(temporal_binary()), "workflow", "show", "-w", workflow_id, "--output", "json",
            "--address", stack.temporal_address, "--namespace", "default",
            "--codec-endpoint", f"{stack.codec.url}/{{namespace}}",
        ]  # fmt: skip
        cli_env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPORAL_")}
        # --output json keeps payload data in base64, as in the protocol.
        canary = base64.b64encode(b'"CANARY-for-the-cli"').decode()
        for extra, readable in (([], False), (["--codec-auth", f"Bearer {token}"], True)):
            proc = await asyncio.create_subprocess_exec(
                *show, *extra, env=cli_env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            output, errors = await asyncio.wait_for(proc.communicate(), 60)
            assert (canary in output.decode()) is readable
            assert (proc.returncode == 0) is readable, errors.decode()

        # The default body limit (CODEC_MAX_BODY_BYTES, 4 MiB) holds in the real process.
        head = (
            f"POST /default/decode HTTP/1.1\nHost: codec\nAuthorization: Bearer {token}\n"
            f"Content-Length: {5 * 1024 * 1024}\n"
        )
        assert (await _raw_http(stack.codec.url, head)).startswith(b"HTTP/1.1 413")

        console = Console(record=True, width=200)
        console.print(_summary(stack))
        summary = console.export_text()
        assert stack.codec.url in summary and "codec.token" in summary
        assert token not in summary
    assert not stack.codec.running
    for log in (stack.log_dir / "temporal.log", stack.log_dir / "codec.log"):
        assert token not in log.read_text(), log
    assert "--ui-codec-endpoint" in (stack.log_dir / "temporal.log").read_text()


# -- end to end: the canary ---------------------------------------------------------------


def _occurrences(message: Message, needle: str, path: str = "") -> list[str]:
    """Paths of every string or bytes field under ``message`` that contains ``needle``.

    Looks at the protobuf itself, where payload data is raw bytes: in ``to_json()`` every
    bytes field is base64, so a plain-text search there would miss clear payloads.
    """
    found: list[str] = []

    def visit(value: object, where: str) -> None:
        if isinstance(value, Message):
            found.extend(_occurrences(value, needle, where))
        elif isinstance(value, bytes):
            if needle.encode() in value:
                found.append(where)
        elif isinstance(value, str):
            if needle in value:
                found.append(where)

    for field, value in message.ListFields():
        where = f"{path}.{field.name}" if path else field.name
        if hasattr(value, "items"):  # map field
            for k, v in value.items():
                visit(k, f"{where}<key>")
                visit(v, f"{where}[{k}]")
        elif field.is_repeated:
            for i, v in enumerate(value):
                visit(v, f"{where}[{i}]")
        else:
            visit(value, where)
    return found


def _decrypt_in_place(message: Message, codec: EncryptionCodec) -> None:
    """Replace every payload under ``message`` by its decryption (the control)."""
    for field, value in message.ListFields():
        if hasattr(value, "items"):
            children = list(value.values())
        elif field.is_repeated:
            children = list(value)
        else:
            children = [value]
        for child in children:
            if isinstance(child, Payload):
                clear = codec.decrypt(child)
                if clear is not child:
                    child.CopyFrom(clear)
            elif isinstance(child, Message):
                _decrypt_in_place(child, codec)


#: Ids that are also search attributes (CustomerId, RecipientId) go there as keyed
#: hashes, so not even the indexed fields may hold the canary. Nothing is exempt.
SEARCH_ATTRIBUTE_PATH = "(nothing is exempt)"


async def test_canary_in_customer_data_never_reaches_the_history_in_clear(h: Harness) -> None:
    canary = f"CANARY-{uuid.uuid4()}"
    key = new_key()
    encrypted_settings = h.settings.model_copy(update={"payload_encryption_key": encode_key(key)})
    encrypted = await connect(encrypted_settings)
    plain = await Client.connect(
        h.settings.temporal_address,
        namespace=h.settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )
    queue = f"codec-{uuid.uuid4().hex[:8]}"
    orders = OrderService(encrypted, h.pool, queue, inventory=h.inventory)
    messages = MessageService(encrypted, h.pool, queue)
    order = h.order(customer_id=canary)
    message = h.message(
        canary,  # nobody's devices: the message is e-mailed; RecipientId must be hashed
        sender_id=canary,
        recipient_email=f"{canary}@example.com",
        body=f"The door code is {canary}",
        read_window=timedelta(milliseconds=300),
    )
    async with (
        build_http_client(h.settings) as http,
        build_worker(encrypted, h.settings, h.pool, http, task_queue=queue),
    ):
        order_handle = await orders.create(order)
        message_handle = await messages.send(message)
        assert (await order_handle.result()).status == OrderStatus.COMPLETED
        assert (await message_handle.result()).status == MessageStatus.EMAILED
    # The sandbox saw the clear text: the data did travel, decrypted, to the providers.
    emails = (await h.sandbox.ledger(message_id=message.message_id)).emails
    assert [e.to for e in emails] == [message.recipient_email]

    codec = EncryptionCodec(key)
    for handle, result_type in ((order_handle, OrderResult), (message_handle, MessageResult)):
        history = await plain.get_workflow_handle(handle.id).fetch_history()
        assert canary not in history.to_json()
        leaks = _occurrences(History(events=history.events), canary)
        assert [p for p in leaks if SEARCH_ATTRIBUTE_PATH not in p] == [], handle.id

        # Control: decrypted, the same history is full of the canary (workflow input,
        # activity inputs, the summary), so the search above would have found it.
        clear = History(events=history.events)
        _decrypt_in_place(clear, codec)
        found = [p for p in _occurrences(clear, canary) if SEARCH_ATTRIBUTE_PATH not in p]
        assert any(".input.payloads[" in p for p in found), found
        assert any(p.startswith("events[0].user_metadata.summary") for p in found), found

        # The encrypted client reads the result; a client without the key cannot.
        result = await encrypted.get_workflow_handle(handle.id, result_type=result_type).result()
        assert result.status in (OrderStatus.COMPLETED, MessageStatus.EMAILED)
        with pytest.raises(Exception, match="encrypted"):
            await plain.get_workflow_handle(handle.id).result()

        # And today's code replays the encrypted history with the key.
        replayer = Replayer(workflows=list(WORKFLOWS), data_converter=encrypted.data_converter)
        replay = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        assert replay.replay_failure is None, replay.replay_failure


async def test_a_history_written_under_a_rotated_key_still_replays(h: Harness) -> None:
    """Rotation: the new key encrypts, PAYLOAD_OLD_KEYS keeps the old one decrypting."""
    order = h.order()
    handle = await h.service.create(order)
    await handle.result()
    history = await handle.fetch_history()
    old_key = h.settings.payload_encryption_key
    assert old_key

    rotated = Settings(payload_encryption_key=encode_key(OTHER_KEY), payload_old_keys=old_key)
    replayer = Replayer(workflows=list(WORKFLOWS), data_converter=data_converter(rotated))
    replayed = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert replayed.replay_failure is None

    forgotten = Settings(payload_encryption_key=encode_key(OTHER_KEY))
    replayer = Replayer(workflows=list(WORKFLOWS), data_converter=data_converter(forgotten))
    failed = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert failed.replay_failure is not None, "without the old key the history is unreadable"


async def test_the_codec_server_decodes_with_a_rotated_out_key(tmp_path: Path) -> None:
    """After a rotation, the Web UI still shows histories written with the old key:
    the codec server process reads ``PAYLOAD_OLD_KEYS`` as the worker does."""
    (before,) = await EncryptionCodec(KEY).encode([_payload('"CANARY"')])
    key_file = tmp_path / "new.key"
    key_file.write_text(encode_key(OTHER_KEY) + "\n")
    key_file.chmod(0o600)
    token_file = tmp_path / "codec.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    server = CodecServerProcess(
        free_port(),
        key_file=key_file,
        token_file=token_file,
        ui_origins=[UI_ORIGIN],
        env={"PAYLOAD_OLD_KEYS": encode_key(KEY)},
        log_file=tmp_path / "codec.log",
    )
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            decoded = await http.post("/decode", json={"payloads": [_wire(before)]}, headers=AUTH)
    finally:
        await server.stop()
    assert decoded.status_code == 200, decoded.text
    assert [_unwire(item) for item in decoded.json()["payloads"]] == [_payload('"CANARY"')]
