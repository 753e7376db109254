"""Who may call the HTTP API: clients, their keys, and the check of a presented key.

A client is a name from the safe id alphabet (a storefront, an app backend). Each may
hold any number of keys, shown once when created and stored only as a hash
(``schema/007_api.sql``)::

    tg_<id>_<secret>     id: 12 characters [a-z0-9], public, finds the row
                         secret: 32 random bytes, base64url; only its SHA-256 is stored

A plain SHA-256 is enough because the secret is random and long: there is nothing to
guess, so nothing to slow down. Comparisons are constant-time. Revoking sets
``revoked_at``; the key stops working at once in the CLI and within the API's cache
period (``API_KEY_CACHE_SECONDS``) in a running API.

The CLI (``starter.py apikey ...``) and the API both use this module; it knows nothing of
Temporal or HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from pydantic import BaseModel, ConfigDict

from tollgate.errors import InputError, NotFound
from tollgate.ids import require_safe_id
from tollgate.postgres import Executor

KEY_PREFIX = "tg"
_KEY_ID_ALPHABET = string.ascii_lowercase + string.digits
_KEY_ID_LENGTH = 12
_KEY = re.compile(r"tg_([a-z0-9]{12})_([A-Za-z0-9_-]{43})", re.ASCII)
#: Compared against when a key id is unknown, so a miss costs what a hit costs.
_NO_SECRET = "0" * 64


class ApiKeyNotFound(NotFound):
    """No API key with this id."""

    kind = "API key"


@dataclass(frozen=True)
class NewKey:
    """A key as created: the full key (shown once) and its public id."""

    key: str
    key_id: str
    client_id: str


class KeyRow(BaseModel):
    """An API key as Postgres holds it (no secret in it)."""

    model_config = ConfigDict(frozen=True)

    id: str
    client_id: str
    created_at: datetime
    revoked_at: datetime | None


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def parse_key(presented: str) -> tuple[str, str] | None:
    """``(key id, secret)`` of a well-formed key; None for anything else."""
    match = _KEY.fullmatch(presented)
    return None if match is None else (match.group(1), match.group(2))


def key_id_of(presented: str) -> str | None:
    """The public id of a well-formed key (safe to log); None otherwise."""
    parsed = parse_key(presented)
    return None if parsed is None else parsed[0]


def secret_matches(secret: str, stored_sha256: str | None) -> bool:
    """Whether ``secret`` hashes to ``stored_sha256``, in constant time."""
    return hmac.compare_digest(_sha256(secret), stored_sha256 or _NO_SECRET) and (
        stored_sha256 is not None
    )


async def create_key(pool: asyncpg.Pool, client_id: str) -> NewKey:
    """A new key for ``client_id`` (the client is created on its first key)."""
    require_safe_id("client", client_id)
    key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(_KEY_ID_LENGTH))
    secret = secrets.token_urlsafe(32)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO api_clients (id) VALUES ($1) ON CONFLICT (id) DO NOTHING", client_id
        )
        await conn.execute(
            "INSERT INTO api_keys (id, client_id, secret_sha256) VALUES ($1, $2, $3)",
            key_id,
            client_id,
            _sha256(secret),
        )
    return NewKey(key=f"{KEY_PREFIX}_{key_id}_{secret}", key_id=key_id, client_id=client_id)


async def revoke_key(pool: asyncpg.Pool, key_id: str) -> KeyRow:
    """Revoke a key (again is harmless); ``ApiKeyNotFound`` if there is no such key."""
    if not re.fullmatch(r"[a-z0-9]{12}", key_id):
        raise InputError(f"{key_id!r} is not an API key id (12 characters a-z 0-9)")
    record = await pool.fetchrow(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1"
        " RETURNING id, client_id, created_at, revoked_at",
        key_id,
    )
    if record is None:
        raise ApiKeyNotFound(key_id)
    return KeyRow.model_validate(dict(record))


async def list_keys(conn: Executor, client_id: str | None = None) -> list[KeyRow]:
    """Every key (of one client), oldest first; revoked ones too."""
    rows = await conn.fetch(
        "SELECT id, client_id, created_at, revoked_at FROM api_keys"
        " WHERE $1::text IS NULL OR client_id = $1 ORDER BY created_at, id",
        client_id,
    )
    return [KeyRow.model_validate(dict(r)) for r in rows]


async def stored_key(conn: Executor, key_id: str) -> tuple[str, str] | None:
    """``(client id, secret hash)`` of an active key, or None (unknown or revoked)."""
    record = await conn.fetchrow(
        "SELECT client_id, secret_sha256 FROM api_keys WHERE id = $1 AND revoked_at IS NULL",
        key_id,
    )
    return None if record is None else (record["client_id"], record["secret_sha256"])
