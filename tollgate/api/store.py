"""The API's own rows: idempotency keys of creates, and receipts already handled.

Both tables are insert-only for the application (``schema/007_api.sql``). Knows nothing
of Temporal or HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from tollgate.postgres import Connection, Executor

EntityKind = Literal["order", "message"]
ReceiptStatus = Literal["applied", "unknown_device", "unknown_message", "not_running"]


class IdempotencyKeyTaken(Exception):
    """Another request recorded this (client, key) first; read it and answer from it."""


@dataclass(frozen=True)
class IdempotencyRecord:
    """What a (client, key) created, and the hash of the request that created it."""

    kind: EntityKind
    request_sha256: str
    entity_id: str


def request_hash(request: BaseModel) -> str:
    """SHA-256 of a validated request in canonical JSON: the same request however its
    JSON was spelled (key order, spacing, ``1.0`` for ``1``)."""
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def entity_id_for(kind: EntityKind, client_id: str, key: str) -> str:
    """The id of the entity a client's Idempotency-Key creates: ``o-``/``m-`` and 26
    base32 characters of a hash of both. The same key always names the same id, so
    even a retry that finds no record (the first attempt's commit was lost after its
    workflow started) starts nothing new: Temporal refuses a second workflow id."""
    digest = hashlib.sha256(f"{kind}\n{client_id}\n{key}".encode()).digest()
    return f"{kind[0]}-{base64.b32encode(digest).decode()[:26].lower()}"


async def find(conn: Executor, client_id: str, key: str) -> IdempotencyRecord | None:
    """The record of (client, key), if any."""
    row = await conn.fetchrow(
        "SELECT kind, request_sha256, entity_id FROM api_idempotency_keys"
        " WHERE client_id = $1 AND key = $2",
        client_id,
        key,
    )
    return (
        None
        if row is None
        else IdempotencyRecord(row["kind"], row["request_sha256"], row["entity_id"])
    )


async def record(
    conn: Connection, client_id: str, key: str, entry: IdempotencyRecord, *, must_be_new: bool
) -> None:
    """Record (client, key). A concurrent request with the same key waits here for the
    first one's transaction; if that commits, ``IdempotencyKeyTaken`` when
    ``must_be_new``, else nothing."""
    inserted = await conn.fetchval(
        "INSERT INTO api_idempotency_keys (client_id, key, kind, request_sha256, entity_id)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (client_id, key) DO NOTHING RETURNING true",
        client_id,
        key,
        entry.kind,
        entry.request_sha256,
        entry.entity_id,
    )
    if inserted is None and must_be_new:
        raise IdempotencyKeyTaken(key)


async def receipt_seen(conn: Executor, receipt_id: str) -> bool:
    """Whether a receipt with this id was handled already."""
    return bool(await conn.fetchval("SELECT true FROM api_receipts WHERE id = $1", receipt_id))


async def record_receipt(
    conn: Executor,
    *,
    receipt_id: str,
    message_id: str,
    device_id: str,
    kind: str,
    outcome: ReceiptStatus,
) -> bool:
    """Record a handled receipt; False if its id was recorded meanwhile."""
    inserted = await conn.fetchval(
        "INSERT INTO api_receipts (id, message_id, device_id, kind, outcome)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING RETURNING true",
        receipt_id,
        message_id,
        device_id,
        kind,
        outcome,
    )
    return inserted is not None


async def device_exists(conn: Executor, device_id: str) -> bool:
    """Whether Tollgate knows the device (active or not)."""
    return bool(await conn.fetchval("SELECT true FROM devices WHERE id = $1", device_id))


async def open_lifecycles(conn: Executor) -> dict[EntityKind, int]:
    """Lifecycles under way: orders not finished, messages not yet delivered or emailed
    (a delivered message may wait days for a read; it costs the workers nothing)."""
    row = await conn.fetchrow(
        """
        SELECT (SELECT count(*) FROM orders
                 WHERE status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED')) AS orders,
               (SELECT count(*) FROM messages
                 WHERE status IN ('INITIATED', 'STORED', 'DISPATCHED', 'FALLBACK_EMAIL')) AS messages
        """
    )
    assert row is not None
    return {"order": row["orders"], "message": row["messages"]}
