"""The gate in Postgres for messages: the same trigger, version column and audit as orders.

Like ``test_gate.py`` these write with plain SQL where they can, so the guarantees are
shown to hold for any writer, and use ``tollgate.message_db`` where it is the subject.
Tests taking ``writer`` run as the application role and again as the schema owner. That
the audit is append-only is shown for both lifecycles at once, in ``test_gate.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid

import asyncpg
import pytest

from tests.db import new_message, path_to
from tollgate import gate
from tollgate.errors import InputError, MessageNotFound
from tollgate.messages import store as message_store
from tollgate.messages.states import MESSAGE_EDGES, MessageStatus

M = MessageStatus


async def _new_message(pool: asyncpg.Pool) -> str:
    """Insert a fresh INITIATED message row the way the CLI and the workflow do."""
    return await new_message(pool, "mg", party="gate", body="gate test body")


def _path_to(target: MessageStatus) -> list[MessageStatus]:
    return path_to(MESSAGE_EDGES, M.INITIATED, target)


async def _force(pool: asyncpg.Pool, message_id: str, target: MessageStatus) -> None:
    for step in _path_to(target):
        await pool.execute("UPDATE messages SET status = $2 WHERE id = $1", message_id, step.value)


async def _audit(pool: asyncpg.Pool, message_id: str) -> list[gate.AuditRow[MessageStatus]]:
    return await message_store.list_transitions(pool, message_id)


async def _new_device(pool: asyncpg.Pool, user: str = "gate-user") -> str:
    device_id = f"gd-{uuid.uuid4().hex[:10]}"
    await message_store.register_device(
        pool, device_id=device_id, user_id=user, push_token=f"tok-{device_id}", platform="ios"
    )
    return device_id


async def test_python_message_graph_is_the_sql_graph(pool: asyncpg.Pool) -> None:
    sql_edges = {
        (M(r["from_status"]), M(r["to_status"]))
        for r in await pool.fetch("SELECT from_status, to_status FROM message_transition_edges")
    }
    sql_terminal = {
        r["status"]: r["terminal"]
        for r in await pool.fetch("SELECT status, terminal FROM message_statuses")
    }
    assert sql_edges == set(MESSAGE_EDGES)
    assert sql_terminal == {s.value: s.terminal for s in M}


async def test_every_message_edge_outside_the_graph_is_refused_from_plain_sql(
    writer: asyncpg.Pool,
) -> None:
    """All 81 (from, to) pairs: edges apply and are audited, every other change is TG001."""
    pool = writer
    refused = applied = same = 0
    for src, dst in itertools.product(M, M):
        message_id = await _new_message(pool)
        await _force(pool, message_id, src)
        before = await message_store.get_message(pool, message_id)
        assert before is not None and before.status == src, (src, before)
        audit_before = await _audit(pool, message_id)
        assert len(audit_before) == len(_path_to(src)) + 1

        if src == dst and not src.terminal:
            # not a transition: the status stays, the version moves, nothing is audited
            await pool.execute(
                "UPDATE messages SET status = $2 WHERE id = $1", message_id, dst.value
            )
            after = await message_store.get_message(pool, message_id)
            assert after is not None
            assert (after.status, after.version) == (src, before.version + 1), (src, dst)
            assert await _audit(pool, message_id) == audit_before, (src, dst)
            same += 1
            continue

        if (src, dst) in MESSAGE_EDGES:
            await pool.execute(
                "UPDATE messages SET status = $2 WHERE id = $1", message_id, dst.value
            )
            after = await message_store.get_message(pool, message_id)
            assert after is not None
            assert (after.status, after.version) == (dst, before.version + 1), (src, dst)
            audit_after = await _audit(pool, message_id)
            assert audit_after[:-1] == audit_before, (src, dst)
            last = audit_after[-1]
            assert (last.from_status, last.to_status) == (src, dst)
            assert (last.from_version, last.to_version) == (before.version, before.version + 1)
            applied += 1
            continue

        with pytest.raises(asyncpg.PostgresError) as caught:
            await pool.execute(
                "UPDATE messages SET status = $2 WHERE id = $1", message_id, dst.value
            )
        assert caught.value.sqlstate == gate.ILLEGAL_TRANSITION_SQLSTATE, (src, dst, caught.value)
        assert f"{src.value} -> {dst.value}" in str(caught.value), (src, dst, caught.value)
        assert message_id in str(caught.value)
        after = await message_store.get_message(pool, message_id)
        assert after == before, "a refused transition must leave the row untouched"
        assert await _audit(pool, message_id) == audit_before
        refused += 1

    terminal = sum(1 for s in M if s.terminal)
    assert applied == len(MESSAGE_EDGES)
    assert same == len(M) - terminal
    assert refused == 81 - len(MESSAGE_EDGES) - (len(M) - terminal)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("body", "a different body"),
        ("recipient_id", "someone-else"),
        ("recipient_email", "someone-else@example.com"),
        ("sender_id", "impostor"),
        ("deadline_ms", 1),
        ("workflow_id", "message-hijacked"),
    ],
)
async def test_message_content_is_immutable(
    writer: asyncpg.Pool, column: str, value: object
) -> None:
    pool = writer
    message_id = await _new_message(pool)
    await _force(pool, message_id, M.DELIVERED)
    before = await message_store.get_message(pool, message_id)
    with pytest.raises(asyncpg.PostgresError) as caught:
        # also with a legal status change in the same statement: the whole update is refused
        await pool.execute(
            f"UPDATE messages SET {column} = $2, status = 'READ' WHERE id = $1", message_id, value
        )
    assert caught.value.sqlstate == gate.IMMUTABLE_COLUMN_SQLSTATE, caught.value
    assert await message_store.get_message(pool, message_id) == before


async def test_mutable_columns_change_and_bump_the_version(pool: asyncpg.Pool) -> None:
    message_id = await _new_message(pool)
    await pool.execute(
        "UPDATE messages SET failure_reason = 'note', version = 1 WHERE id = $1", message_id
    )
    row = await message_store.get_message(pool, message_id)
    assert row is not None and (row.failure_reason, row.version, row.status) == (
        "note",
        2,
        M.INITIATED,
    )


@pytest.mark.parametrize("status", [s for s in M if s is not M.INITIATED])
async def test_a_message_must_be_created_initiated(
    writer: asyncpg.Pool, status: MessageStatus
) -> None:
    pool = writer
    message_id = f"mg-{uuid.uuid4().hex[:12]}"
    with pytest.raises(asyncpg.PostgresError) as caught:
        await pool.execute(
            "INSERT INTO messages (id, sender_id, recipient_id, recipient_email, body,"
            " deadline_ms, workflow_id, status)"
            " VALUES ($1, 's', 'r', 'r@example.com', 'hi', 1000, $2, $3)",
            message_id,
            f"message-{message_id}",
            status.value,
        )
    assert caught.value.sqlstate == "TG004", caught.value
    assert status.value in str(caught.value)
    assert await message_store.get_message(pool, message_id) is None
    assert await _audit(pool, message_id) == []


@pytest.mark.parametrize("status", list(M))
async def test_recall_cancels_unless_read_or_ended(
    pool: asyncpg.Pool, status: MessageStatus
) -> None:
    message_id = await _new_message(pool)
    await _force(pool, message_id, status)
    before = await message_store.get_message(pool, message_id)
    assert before is not None
    audit_before = await _audit(pool, message_id)

    row = await message_store.recall_message(pool, message_id, reason="wrong chat", actor="cli:sam")

    if status is M.READ or status.terminal:
        # refused: the row is returned as it stands and nothing is written
        assert row == before
        assert await message_store.get_message(pool, message_id) == before
        assert await _audit(pool, message_id) == audit_before
        return
    assert (row.status, row.version) == (M.CANCELLED, before.version + 1)
    assert row.failure_reason == "recalled: wrong chat"
    assert await message_store.get_message(pool, message_id) == row
    audit = await _audit(pool, message_id)
    assert audit[:-1] == audit_before
    assert (audit[-1].from_status, audit[-1].to_status) == (status, M.CANCELLED)
    assert (audit[-1].actor, audit[-1].reason) == ("cli:sam", "wrong chat")


async def test_recall_of_an_unknown_message_is_not_found(pool: asyncpg.Pool) -> None:
    with pytest.raises(MessageNotFound, match="no-such-message"):
        await message_store.recall_message(pool, "no-such-message", reason="x", actor="cli:sam")


async def test_concurrent_recalls_cancel_once(pool: asyncpg.Pool) -> None:
    message_id = await _new_message(pool)
    await _force(pool, message_id, M.DELIVERED)
    first, second = await asyncio.gather(
        message_store.recall_message(pool, message_id, reason="first", actor="cli:a"),
        message_store.recall_message(pool, message_id, reason="second", actor="cli:b"),
    )
    assert first.status == second.status == M.CANCELLED
    assert first.version == second.version == 5
    audit = await _audit(pool, message_id)
    assert [(a.from_status, a.to_status) for a in audit].count((M.DELIVERED, M.CANCELLED)) == 1
    assert audit[-1].to_status == M.CANCELLED and len(audit) == 5
    row = await message_store.get_message(pool, message_id)
    assert row is not None and row.failure_reason in ("recalled: first", "recalled: second")
    assert row.failure_reason == f"recalled: {audit[-1].reason}"


async def test_device_facts_are_first_writer_wins(pool: asyncpg.Pool) -> None:
    message_id = await _new_message(pool)
    d0, d1 = await _new_device(pool), await _new_device(pool)
    await message_store.record_push(pool, message_id, d0, "push-1")
    await message_store.record_fact(pool, message_id, [d0], "delivered")
    first = {d.device_id: d for d in await message_store.deliveries(pool, message_id)}
    assert list(first) == [d0] and first[d0].delivered_at is not None

    await asyncio.sleep(0.05)
    # a repeated confirmation, and a later one from another device
    await message_store.record_fact(pool, message_id, [d0, d1], "delivered")
    await message_store.record_push(pool, message_id, d0, "push-2")
    await message_store.record_fact(pool, message_id, [d0], "read")
    later = {d.device_id: d for d in await message_store.deliveries(pool, message_id)}

    assert sorted(later) == sorted([d0, d1])
    assert later[d0].delivered_at == first[d0].delivered_at
    assert (later[d0].push_id, later[d0].pushed_at) == ("push-1", first[d0].pushed_at)
    assert later[d0].read_at is not None and later[d0].receipt_at is None
    d1_delivered, d0_delivered = later[d1].delivered_at, first[d0].delivered_at
    assert d1_delivered is not None and d0_delivered is not None and d1_delivered > d0_delivered
    assert later[d1].pushed_at is None and later[d1].read_at is None

    read_at = later[d0].read_at
    await asyncio.sleep(0.05)
    await message_store.record_fact(pool, message_id, [d0], "read")
    again = {d.device_id: d for d in await message_store.deliveries(pool, message_id)}
    assert again[d0].read_at == read_at


async def test_a_push_token_belongs_to_one_device(pool: asyncpg.Pool) -> None:
    first = await _new_device(pool, user="token-owner")
    token = f"tok-{first}"
    newcomer = f"gd-{uuid.uuid4().hex[:10]}"
    with pytest.raises(InputError) as caught:
        await message_store.register_device(
            pool, device_id=newcomer, user_id="someone-else", push_token=token, platform="android"
        )
    assert first in str(caught.value)
    assert await pool.fetchval("SELECT count(*) FROM devices WHERE push_token = $1", token) == 1
    assert await pool.fetchval("SELECT count(*) FROM devices WHERE id = $1", newcomer) == 0
    kept = await message_store.get_device(pool, first)
    assert (kept.user_id, kept.platform, kept.active) == ("token-owner", "ios", True)
