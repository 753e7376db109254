"""Payload encryption: the codec, key loading, the codec server, and the proof on a real
server that a canary in customer data never reaches Temporal's history in clear.

The session's shared ``client`` (conftest) is plain unless a key is configured; the
end-to-end test here builds its own encrypted client and worker on a fresh task queue.
"""

from __future__ import annotations

import base64
import stat
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.api.history.v1 import History
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from tests.conftest import Harness
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
from tollgate.codec_server import create_app, ui_origins_for
from tollgate.errors import ConfigError
from tollgate.message_models import MessageResult
from tollgate.message_service import MessageService
from tollgate.models import OrderInput, OrderResult
from tollgate.providers import build_http_client
from tollgate.service import OrderService
from tollgate.settings import Settings
from tollgate.stack import LocalStack, TemporalDevServer, free_port
from tollgate.stack.codec import CodecServerProcess
from tollgate.states import MessageStatus, OrderStatus
from tollgate.temporal import connect, data_converter
from tollgate.worker import WORKFLOWS, build_worker

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
    assert opted_out is pydantic_data_converter, "plaintext only by an explicit opt-out"


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


@pytest.fixture
async def codec_http() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(EncryptionCodec(KEY), ui_origins=ui_origins_for(UI_ORIGIN))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://codec") as http:
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


async def test_codec_server_encodes_and_decodes(codec_http: httpx.AsyncClient) -> None:
    original = [_payload('"CANARY"'), _payload("{}")]
    headers = {"X-Namespace": "default", "Origin": UI_ORIGIN}
    encoded = await codec_http.post(
        "/encode", json={"payloads": [_wire(p) for p in original]}, headers=headers
    )
    assert encoded.status_code == 200
    assert encoded.headers["access-control-allow-origin"] == UI_ORIGIN
    sealed = [_unwire(item) for item in encoded.json()["payloads"]]
    assert all(p.metadata["encoding"] == ENCODING for p in sealed)
    assert b"CANARY" not in b"".join(p.data for p in sealed)

    # /{namespace}/decode is the CLI's --codec-endpoint templating.
    for path in ("/decode", "/default/decode"):
        decoded = await codec_http.post(path, json=encoded.json(), headers=headers)
        assert decoded.status_code == 200
        assert [_unwire(item) for item in decoded.json()["payloads"]] == original

    plain = await codec_http.post("/decode", json={"payloads": [_wire(_payload())]})
    assert [_unwire(item) for item in plain.json()["payloads"]] == [_payload()]


async def test_codec_server_answers_the_ui_preflight(codec_http: httpx.AsyncClient) -> None:
    for origin in ("http://127.0.0.1:18233", "http://localhost:18233"):
        response = await codec_http.options(
            "/decode",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-namespace",
            },
        )
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == origin
        assert "POST" in response.headers["access-control-allow-methods"]
        allowed = response.headers["access-control-allow-headers"].lower()
        assert "x-namespace" in allowed and "content-type" in allowed

    stranger = await codec_http.options(
        "/decode",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert stranger.status_code == 400
    assert "access-control-allow-origin" not in stranger.headers


async def test_codec_server_errors(codec_http: httpx.AsyncClient) -> None:
    bad = await codec_http.post("/decode", content=b"not json")
    assert bad.status_code == 400 and "payloads" in bad.json()["error"]

    (foreign,) = await EncryptionCodec(new_key()).encode([_payload()])
    unknown = await codec_http.post("/decode", json={"payloads": [_wire(foreign)]})
    assert unknown.status_code == 422 and "key id" in unknown.json()["error"]

    assert (await codec_http.get("/decode")).status_code == 405
    assert (await codec_http.get("/health")).status_code == 200


def test_ui_origins_cover_both_spellings_of_localhost() -> None:
    assert ui_origins_for("http://127.0.0.1:18233/") == [
        "http://127.0.0.1:18233",
        "http://localhost:18233",
    ]
    assert ui_origins_for("https://temporal.example") == ["https://temporal.example"]


# -- the local stack ----------------------------------------------------------------------


def test_dev_server_gets_the_codec_endpoint_only_with_a_ui() -> None:
    endpoint = "http://127.0.0.1:18234"
    argv = TemporalDevServer(free_port(), free_port(), codec_endpoint=endpoint).command()
    at = argv.index("--ui-codec-endpoint")
    assert argv[at + 1] == endpoint
    assert "--ui-codec-endpoint" not in TemporalDevServer(free_port(), free_port()).command()
    headless = TemporalDevServer(free_port(), None, codec_endpoint=endpoint).command()
    assert "--ui-codec-endpoint" not in headless


def test_local_stack_wires_key_codec_server_and_ui(tmp_path: Path) -> None:
    ui_port = free_port()

    def stack_in(state_dir: Path, ui_port: int | None) -> LocalStack:
        return LocalStack(
            state_dir,
            temporal_port=free_port(),
            ui_port=ui_port,
            postgres_port=free_port(),
            sandbox_port=free_port(),
        )

    stack = stack_in(tmp_path / "state", ui_port)
    key_file = tmp_path / "state" / "payload.key"
    assert stack.payload_key_file == key_file
    assert stack.codec is not None and stack.codec.key_file == key_file
    assert stack.codec.ui_origins == [f"http://127.0.0.1:{ui_port}"]
    assert stack.temporal.codec_endpoint == stack.codec.url
    names = [part.name for part in stack.components]
    assert names.index("codec") < names.index("temporal"), "the UI's codec is up first"
    assert stack.worker is not None
    assert stack.worker.env["PAYLOAD_KEY_FILE"] == str(key_file)

    headless = stack_in(tmp_path / "h", None)
    assert headless.codec is None and "codec" not in [p.name for p in headless.components]
    assert headless.temporal.codec_endpoint is None

    elsewhere = tmp_path / "keys" / "k"
    settings = Settings(state_dir=tmp_path / "s", payload_key_file=elsewhere)
    assert LocalStack.from_settings(settings).payload_key_file == elsewhere
    default = LocalStack.from_settings(Settings(state_dir=tmp_path / "s"))
    assert default.payload_key_file == tmp_path / "s" / "payload.key"


async def test_codec_server_process_behind_the_web_ui(tmp_path: Path) -> None:
    """The real thing: a dev server whose UI advertises the codec server, which decrypts."""
    key = ensure_key_file(tmp_path / "payload.key")
    ui_port = free_port()
    codec = CodecServerProcess(
        free_port(),
        key_file=tmp_path / "payload.key",
        ui_origins=[f"http://127.0.0.1:{ui_port}"],
        log_file=tmp_path / "codec.log",
    )
    server = TemporalDevServer(
        free_port(), ui_port, log_file=tmp_path / "temporal.log", codec_endpoint=codec.url
    )
    await codec.start()
    try:
        await server.start()
        try:
            async with httpx.AsyncClient(timeout=5) as http:
                ui = await http.get(f"{server.ui_url}/api/v1/settings")
                assert ui.json()["Codec"]["Endpoint"] == codec.url

                (sealed,) = await EncryptionCodec(key).encode([_payload()])
                decoded = await http.post(
                    f"{codec.url}/decode",
                    json={"payloads": [_wire(sealed)]},
                    headers={"Origin": f"http://localhost:{ui_port}"},
                )
                assert decoded.headers["access-control-allow-origin"] == (
                    f"http://localhost:{ui_port}"
                )
                assert [_unwire(i) for i in decoded.json()["payloads"]] == [_payload()]
        finally:
            await server.stop()
    finally:
        await codec.stop()
    assert codec.returncode is not None and not codec.running


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
    orders = OrderService(encrypted, h.pool, queue, catalog=h.catalog)
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
