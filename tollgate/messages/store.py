"""Messages, devices and per-device delivery facts in Postgres.

Status changes go through :mod:`tollgate.gate` with :data:`MESSAGES`, the same gate as
orders. Per-device facts (pushed, delivered, read, receipt shown) are written
first-writer-wins, so a repeated or late signal never moves a recorded time. Returns
rows, never Temporal types.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg
from pydantic import BaseModel, ConfigDict

from tollgate import gate
from tollgate.errors import (
    AlreadyExists,
    DeviceNotFound,
    InputError,
    LimitReached,
    MessageNotFound,
    MessageRecalled,
)
from tollgate.gate import Lifecycle
from tollgate.lifecycle import EntityRow, entity_columns
from tollgate.messages.models import Device, MessageInput
from tollgate.messages.states import MESSAGE_TERMINAL, MessageStatus
from tollgate.postgres import Executor

#: Active devices a user may have; the ``devices_cap`` trigger (schema/005) enforces it.
MAX_ACTIVE_DEVICES = 10
#: SQLSTATE of that trigger's refusal.
DEVICE_LIMIT_SQLSTATE = "TG005"

_FACT_COLUMNS = {"delivered": "delivered_at", "read": "read_at", "receipt": "receipt_at"}

MESSAGES = Lifecycle(
    kind="message",
    initial=MessageStatus.INITIATED,
    stopped=frozenset({MessageStatus.CANCELLED}),
    stop_status=MessageStatus.CANCELLED,
    # read, or over (FAILED, CANCELLED): a recall changes nothing there
    stop_refused=frozenset({MessageStatus.READ, *MESSAGE_TERMINAL}),
    stop_columns=lambda reason: {"failure_reason": f"recalled: {reason}"},
    identity=(
        "sender_id",
        "recipient_id",
        "recipient_email",
        "body",
        "deadline_ms",
        "workflow_id",
        "client_id",
    ),
    stopped_error=MessageRecalled,
    not_found=MessageNotFound,
)


class _Row(BaseModel):
    model_config = ConfigDict(frozen=True)


class MessageRow(EntityRow[MessageStatus]):
    """A message as Postgres holds it."""

    sender_id: str
    recipient_id: str
    recipient_email: str
    body: str
    deadline_ms: int


class DeviceRow(_Row):
    id: str
    user_id: str
    push_token: str
    platform: str
    active: bool
    removed_reason: str | None
    registered_at: datetime
    removed_at: datetime | None
    #: The API client that registered it; None for devices the CLI registered.
    client_id: str | None = None

    def ref(self) -> Device:
        return Device(
            device_id=self.id,
            user_id=self.user_id,
            push_token=self.push_token,
            platform=self.platform,
        )


class DeliveryRow(_Row):
    device_id: str
    push_id: str | None
    pushed_at: datetime | None
    delivered_at: datetime | None
    read_at: datetime | None
    receipt_at: datetime | None


def _columns(message: MessageInput, workflow_id: str) -> dict[str, object]:
    return {
        **entity_columns(message.message_id, workflow_id, message.client_id),
        "sender_id": message.sender_id,
        "recipient_id": message.recipient_id,
        "recipient_email": message.recipient_email,
        "body": message.body,
        "deadline_ms": int(message.deadline.total_seconds() * 1000),
    }


MESSAGE_STORE = gate.Store(MESSAGES, MessageRow.model_validate, MessageStatus, _columns)

#: The message row, or None.
get_message = MESSAGE_STORE.get
#: Insert the INITIATED row, or recognise an identical one already there.
insert_message = MESSAGE_STORE.insert
#: Record CANCELLED unless the message is read or ended; return the row as it stands.
recall_message = MESSAGE_STORE.stop
#: The audited transitions of a message, oldest first.
list_transitions = MESSAGE_STORE.audit_trail


async def register_device(
    pool: asyncpg.Pool,
    *,
    device_id: str,
    user_id: str,
    push_token: str,
    platform: str,
    client_id: str | None = None,
) -> DeviceRow:
    """Add a device; a token or id already in use is refused with a clear error."""
    try:
        record = await pool.fetchrow(
            "INSERT INTO devices (id, user_id, push_token, platform, client_id)"
            " VALUES ($1, $2, $3, $4, $5) RETURNING *",
            device_id,
            user_id,
            push_token,
            platform,
            client_id,
        )
    except asyncpg.UniqueViolationError as exc:
        holder = await pool.fetchval(
            "SELECT id FROM devices WHERE push_token = $1 OR id = $2 LIMIT 1", push_token, device_id
        )
        raise AlreadyExists(
            f"device {device_id} or its token is already registered (device {holder})"
        ) from exc
    except asyncpg.CheckViolationError as exc:
        raise InputError(f"device rejected: {exc.constraint_name}") from exc
    except asyncpg.PostgresError as exc:
        if exc.sqlstate == DEVICE_LIMIT_SQLSTATE:
            raise LimitReached(
                f"user {user_id} already has {MAX_ACTIVE_DEVICES} active devices; "
                "remove one (starter.py device remove ID) before adding another"
            ) from None
        raise
    assert record is not None
    return DeviceRow.model_validate(dict(record))


async def get_device(conn: Executor, device_id: str) -> DeviceRow:
    record = await conn.fetchrow("SELECT * FROM devices WHERE id = $1", device_id)
    if record is None:
        raise DeviceNotFound(device_id)
    return DeviceRow.model_validate(dict(record))


async def active_devices(conn: Executor, user_id: str) -> list[DeviceRow]:
    rows = await conn.fetch(
        "SELECT * FROM devices WHERE user_id = $1 AND active ORDER BY registered_at, id", user_id
    )
    return [DeviceRow.model_validate(dict(r)) for r in rows]


async def deactivate_device(conn: Executor, device_id: str, reason: str) -> bool:
    """Mark a device removed; False if it was not active (unknown, or removed already)."""
    status = await conn.execute(
        "UPDATE devices SET active = false, removed_reason = $2, removed_at = now() WHERE id = $1 AND active",
        device_id,
        reason,
    )
    return status == "UPDATE 1"


async def record_push(conn: Executor, message_id: str, device_id: str, push_id: str) -> None:
    await conn.execute(
        """
        INSERT INTO message_deliveries (message_id, device_id, push_id, pushed_at)
        VALUES ($1, $2, $3, now())
        ON CONFLICT (message_id, device_id) DO UPDATE
           SET push_id = coalesce(message_deliveries.push_id, excluded.push_id),
               pushed_at = coalesce(message_deliveries.pushed_at, excluded.pushed_at)
        """,
        message_id,
        device_id,
        push_id,
    )


async def record_fact(conn: Executor, message_id: str, device_ids: list[str], fact: str) -> None:
    """Set ``delivered_at`` / ``read_at`` / ``receipt_at`` for devices that have none yet."""
    column = _FACT_COLUMNS[fact]
    await conn.execute(
        f"""
        INSERT INTO message_deliveries (message_id, device_id, {column})
        SELECT $1, d, now() FROM unnest($2::text[]) AS d
        ON CONFLICT (message_id, device_id) DO UPDATE
           SET {column} = coalesce(message_deliveries.{column}, excluded.{column})
        """,
        message_id,
        device_ids,
    )


async def clear_read(conn: Executor, message_id: str, device_id: str) -> None:
    """Undo a read mark (the sync saga's compensation)."""
    await conn.execute(
        "UPDATE message_deliveries SET read_at = NULL WHERE message_id = $1 AND device_id = $2",
        message_id,
        device_id,
    )


async def deliveries(conn: Executor, message_id: str) -> list[DeliveryRow]:
    rows = await conn.fetch(
        "SELECT device_id, push_id, pushed_at, delivered_at, read_at, receipt_at"
        " FROM message_deliveries WHERE message_id = $1 ORDER BY device_id",
        message_id,
    )
    return [DeliveryRow.model_validate(dict(r)) for r in rows]
