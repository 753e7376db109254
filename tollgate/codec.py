"""Payload encryption: what Temporal stores of our workflows is ciphertext.

Every payload a Tollgate client or worker hands to Temporal (workflow and activity
inputs and results, signals, summaries, failure details) goes through
:class:`EncryptionCodec`: the serialized payload is sealed with AES-256-GCM under a
fresh 12-byte nonce, and the result is a new payload with ``encoding:
binary/encrypted`` and the id of the key that sealed it. Message bodies, e-mail
addresses and customer ids are then unreadable in the history, to the Temporal server,
to its database and to anyone with a Web UI but no key.

Two things are not payloads and stay readable: workflow ids and search attribute
values (the server has to index them).

Decoding passes through any payload that is not ``binary/encrypted``, so histories
written before encryption was switched on, and plain peers, still decode. The key id
(first 8 hex digits of the key's SHA-256) names the key of each payload, so a key can be
rotated: encode with the new one while still decoding with the old ones.

The key comes from the settings (:func:`load_key`): ``PAYLOAD_ENCRYPTION_KEY`` (base64 of
32 bytes) first, else the file ``PAYLOAD_KEY_FILE`` (default ``<STATE_DIR>/payload.key``,
which the local stack creates). With neither, a client refuses to start
(:func:`tollgate.temporal.data_converter`) unless ``PAYLOAD_ENCRYPTION=off``.
``PAYLOAD_OLD_KEYS`` lists retired keys that still decrypt (:func:`load_old_keys`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.converter import PayloadCodec

from tollgate.settings import Settings, read_secret

#: ``encoding`` metadata of an encrypted payload.
ENCODING = b"binary/encrypted"
#: Metadata naming the key that encrypted a payload.
KEY_ID_METADATA = "encryption-key-id"
#: Bytes in a key: AES-256.
KEY_BYTES = 32
NONCE_BYTES = 12


class PayloadDecryptionError(ValueError):
    """An encrypted payload could not be decrypted: unknown key, or altered ciphertext."""


def key_id(key: bytes) -> str:
    """The public name of ``key``: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(key).hexdigest()[:8]


def new_key() -> bytes:
    """A fresh random key."""
    return os.urandom(KEY_BYTES)


def encode_key(key: bytes) -> str:
    """``key`` as the base64 text that ``PAYLOAD_ENCRYPTION_KEY`` and key files hold."""
    return base64.b64encode(key).decode("ascii")


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM over whole serialized payloads.

    ``key`` encrypts; it and every key in ``old_keys`` decrypt (rotation: keep the old
    key here until no history that needs it is retained).
    """

    def __init__(self, key: bytes, *, old_keys: Iterable[bytes] = ()) -> None:
        _check_length(key, "the encryption key")
        self.key_id = key_id(key)
        # Search attributes are indexed by the server in clear, so customer and recipient
        # ids go there as a keyed hash (see search_token); derived, not the AES key itself.
        self._search_key = hashlib.sha256(b"tollgate-search-token:" + key).digest()
        self._encryptor = AESGCM(key)
        self._decryptors: dict[str, AESGCM] = {self.key_id: self._encryptor}
        for old in old_keys:
            _check_length(old, "an old key")
            self._decryptors.setdefault(key_id(old), AESGCM(old))

    def search_token(self, value: str) -> str:
        """A stable keyed hash of ``value`` for search attributes (``h-`` + 24 hex)."""
        return "h-" + hmac.new(self._search_key, value.encode(), hashlib.sha256).hexdigest()[:24]

    @property
    def key_ids(self) -> list[str]:
        """Ids of every key this codec decrypts with, the encrypting one first."""
        return list(self._decryptors)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Encrypt every payload (already encrypted ones are left as they are)."""
        return [self.encrypt(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Decrypt encrypted payloads; pass every other payload through unchanged."""
        return [self.decrypt(p) for p in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        """One payload, encrypted."""
        if payload.metadata.get("encoding") == ENCODING:
            return payload
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._encryptor.encrypt(nonce, payload.SerializeToString(), None)
        return Payload(
            metadata={"encoding": ENCODING, KEY_ID_METADATA: self.key_id.encode()},
            data=nonce + sealed,
        )

    def decrypt(self, payload: Payload) -> Payload:
        """One payload, decrypted; a payload that is not encrypted is returned as is."""
        if payload.metadata.get("encoding") != ENCODING:
            return payload
        kid = payload.metadata.get(KEY_ID_METADATA, b"").decode(errors="replace")
        aead = self._decryptors.get(kid)
        if aead is None:
            raise PayloadDecryptionError(
                f"payload is encrypted with key id {kid or '(none)'!r}, but this process "
                f"only has key(s) {', '.join(self.key_ids)}; configure the key that wrote "
                "it (PAYLOAD_ENCRYPTION_KEY or PAYLOAD_KEY_FILE)"
            )
        nonce, sealed = payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:]
        try:
            plain = aead.decrypt(nonce, sealed, None)
        except InvalidTag:
            raise PayloadDecryptionError(
                f"payload encrypted with key id {kid!r} failed authentication: "
                "it was altered or corrupted"
            ) from None
        return Payload.FromString(plain)


def search_token(client: Client, value: str) -> str:
    """What to store in a search attribute for ``value``: itself, or its keyed hash.

    With payload encryption on, ids that identify a person (customer, recipient) must not
    reach Temporal in clear; the hash still lets one find their workflows
    (``starter.py search-token VALUE`` prints it).
    """
    codec = client.data_converter.payload_codec
    return codec.search_token(value) if isinstance(codec, EncryptionCodec) else value


def load_key(settings: Settings) -> bytes | None:
    """The payload key: ``PAYLOAD_ENCRYPTION_KEY``, else ``PAYLOAD_KEY_FILE`` if it
    exists, else ``None`` (payloads stay plain).

    A malformed key raises :class:`ValueError` naming the setting it came from.
    """
    return read_secret(
        settings.payload_encryption_key,
        settings.payload_key_path,
        setting="PAYLOAD_ENCRYPTION_KEY",
        file_setting="PAYLOAD_KEY_FILE",
        parse=_parse_key,
    )


def load_old_keys(settings: Settings) -> list[bytes]:
    """Keys that still decrypt after a rotation: ``PAYLOAD_OLD_KEYS``, comma-separated
    base64. Keep an old key here until no retained history needs it."""
    if not settings.payload_old_keys:
        return []
    return [
        _parse_key(part, f"PAYLOAD_OLD_KEYS (entry {n})")
        for n, part in enumerate(settings.payload_old_keys.split(","), start=1)
        if part.strip()
    ]


def codec_from_settings(settings: Settings) -> EncryptionCodec | None:
    """The codec the settings describe: their key encrypts, it and every old key
    decrypt; ``None`` without a key. The worker, the CLI and the codec server all build
    theirs here, so a rotation reaches the Web UI too. ``ValueError`` names a bad key."""
    key = load_key(settings)
    if key is None:
        return None
    return EncryptionCodec(key, old_keys=load_old_keys(settings))


def ensure_key_file(path: Path) -> bytes:
    """The key in ``path``; a random one is written there first if the file is missing.

    The file is created with mode 0600 and published atomically (a concurrent caller
    sees either no file or the whole key), holding the key as one line of base64.
    """
    try:
        return _parse_key(path.read_text(encoding="ascii"), f"PAYLOAD_KEY_FILE {path}")
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{encode_key(new_key())}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)  # Fails if another process published a key meanwhile.
    except FileExistsError:
        pass
    finally:
        temp.unlink()
    return _parse_key(path.read_text(encoding="ascii"), f"PAYLOAD_KEY_FILE {path}")


def _parse_key(text: str, source: str) -> bytes:
    """Base64 ``text`` as a 32-byte key; the error names ``source`` (never the key)."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"{source}: not valid base64; it must be the base64 of {KEY_BYTES} random bytes, "
            f'e.g. from: python -c "import base64, os; '
            f'print(base64.b64encode(os.urandom({KEY_BYTES})).decode())"'
        ) from None
    _check_length(key, source)
    return key


def _check_length(key: bytes, source: str) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(
            f"{source}: a key must be {KEY_BYTES} bytes (AES-256), got {len(key)} bytes"
        )
