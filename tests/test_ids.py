"""One id alphabet and printable free text, in the models and in Postgres for any writer.

Hostile testing found order ``foo:recovery`` taking the recovery workflow id of order
``foo``, a message id taking another message's read-sync child id, and a sender id
carrying CR/LF into an email subject. The models refuse such input at the edge; the
CHECKs of ``schema/005_safe_input.sql`` refuse it from psql too, as the application
role and as the schema owner.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from pydantic import TypeAdapter, ValidationError

from tollgate.errors import InputError, LimitReached
from tollgate.ids import SAFE_ID_PATTERN, Body, Reason, SafeId, clip, is_safe_id, one_line
from tollgate.messages import store as message_store
from tollgate.messages.models import MessageInput
from tollgate.models import parse_input
from tollgate.orders.models import OrderInput

HOSTILE_IDS = [
    "foo:recovery",
    "mx:read-sync:1",
    "a b",
    "a/b",
    "../x",
    "-leading-dash",
    ".hidden",
    "[/x]",
    "sam\r\nBcc: attacker@example.com",
    "tab\tid",
    "nul\x00",
    "é",
    "x" * 65,
    "",
]


@pytest.mark.parametrize("value", HOSTILE_IDS)
def test_hostile_ids_are_outside_the_alphabet(value: str) -> None:
    assert not is_safe_id(value)
    with pytest.raises(ValidationError):
        TypeAdapter(SafeId).validate_python(value)


@pytest.mark.parametrize("value", ["a", "A1", "order-42", "u_1.x-y", "9" * 64])
def test_ordinary_ids_are_inside_it(value: str) -> None:
    assert is_safe_id(value)
    assert TypeAdapter(SafeId).validate_python(value) == value


def test_no_separator_of_a_derived_id_is_in_the_alphabet() -> None:
    assert ":" not in SAFE_ID_PATTERN.replace("{0,63}", "")
    for separator in (":", "/", " ", "\n"):
        assert not is_safe_id(f"a{separator}b")


@pytest.mark.parametrize("field", ["order_id", "customer_id"], ids=["order id", "customer id"])
def test_an_order_refuses_a_hostile_id_naming_the_rule(field: str) -> None:
    fields: dict[str, object] = {
        "order_id": "o-1",
        "customer_id": "c-1",
        "items": [{"sku": "WIDGET", "quantity": 1}],
        "amount_cents": 100,
        field: "foo:recovery",
    }
    with pytest.raises(InputError, match=rf"{field}: not a valid id: 1-64 characters"):
        parse_input(OrderInput, fields)


@pytest.mark.parametrize("field", ["message_id", "sender_id", "recipient_id"])
def test_a_message_refuses_a_hostile_id(field: str) -> None:
    fields: dict[str, object] = {
        "message_id": "m-1",
        "sender_id": "sam",
        "recipient_id": "rita",
        "recipient_email": "rita@example.com",
        "body": "hi",
        field: "sam\r\nBcc: attacker@example.com",
    }
    with pytest.raises(InputError, match=field):
        parse_input(MessageInput, fields)


@pytest.mark.parametrize(
    "address", ["rita@example.com\r\nBcc: a@b.c", "rita@example", "ri ta@example.com", "@x.io"]
)
def test_an_address_with_a_header_break_or_no_domain_is_refused(address: str) -> None:
    with pytest.raises(ValidationError):
        MessageInput(
            message_id="m-1",
            sender_id="sam",
            recipient_id="rita",
            recipient_email=address,
            body="hi",
        )


def test_free_text_must_be_printable_and_a_body_may_hold_newlines() -> None:
    reason, body = TypeAdapter(Reason), TypeAdapter(Body)
    assert reason.validate_python("changed my mind 🙂") == "changed my mind 🙂"
    assert body.validate_python("line one\nline two") == "line one\nline two"
    for bad in ("a\nb", "bell\x07", "esc\x1b[31m", "bidi\u202eevil", "sep\u2028x"):
        with pytest.raises(ValidationError):
            reason.validate_python(bad)
    for bad in ("a\r\nb", "tab\tx", "nul\x00", "bidi\u2066x"):
        with pytest.raises(ValidationError):
            body.validate_python(bad)
    with pytest.raises(ValidationError):
        reason.validate_python("x" * 501)


def test_one_line_flattens_what_reaches_a_header_or_a_log_line() -> None:
    assert one_line("sam\r\nBcc: attacker@example.com") == "sam  Bcc: attacker@example.com"
    assert one_line("a\u202eb\x1b[0m") == "a b [0m"
    assert len(one_line("x" * 500, limit=200)) == 200
    assert clip("y" * 2000) is not None and len(clip("y" * 2000) or "") == 1000
    assert clip(None) is None


# --- the same rules in Postgres, whoever writes ------------------------------------------


def _order_sql(order_id: str, customer_id: str) -> tuple[str, list[object]]:
    return (
        "INSERT INTO orders (id, customer_id, items, amount_cents, currency, workflow_id)"
        " VALUES ($1, $2, $3, 100, 'USD', $4)",
        [order_id, customer_id, [{"sku": "WIDGET", "quantity": 1}], f"order-{order_id}"],
    )


@pytest.mark.parametrize("who", ["app", "owner"])
@pytest.mark.parametrize(
    ("order_id", "customer_id"),
    [("foo:recovery", "alice"), ("ok-1", "sam\r\nBcc: x"), ("ok-2", "[/x]")],
)
async def test_postgres_refuses_ids_outside_the_alphabet(
    pool: asyncpg.Pool, owner_pool: asyncpg.Pool, who: str, order_id: str, customer_id: str
) -> None:
    writer = pool if who == "app" else owner_pool
    unique = f"{order_id}{uuid.uuid4().hex[:6]}" if order_id.startswith("ok") else order_id
    sql, args = _order_sql(unique, customer_id)
    with pytest.raises(asyncpg.CheckViolationError):
        await writer.execute(sql, *args)
    assert await pool.fetchval("SELECT count(*) FROM orders WHERE id = $1", unique) == 0


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("cancel_reason", "x" * 501),
        ("cancel_reason", "line\nbreak"),
        ("failure_reason", "esc \x1b[2J"),
        ("failure_reason", "y" * 1001),
    ],
)
async def test_postgres_bounds_free_text_columns(
    pool: asyncpg.Pool, column: str, value: str
) -> None:
    order_id = f"txt-{uuid.uuid4().hex[:8]}"
    sql, args = _order_sql(order_id, "alice")
    await pool.execute(sql, *args)
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(f"UPDATE orders SET {column} = $2 WHERE id = $1", order_id, value)


async def test_postgres_refuses_a_body_with_control_characters_but_keeps_newlines(
    pool: asyncpg.Pool,
) -> None:
    insert = (
        "INSERT INTO messages (id, sender_id, recipient_id, recipient_email, body, deadline_ms,"
        " workflow_id) VALUES ($1, 'sam', 'rita', 'rita@example.com', $2, 1000, $3)"
    )
    good, bad = f"b-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    await pool.execute(insert, good, "two\nlines", f"message-{good}")
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(insert, bad, "cr\r\nlf", f"message-{bad}")


async def test_an_eleventh_active_device_is_refused_even_when_registrations_race(
    pool: asyncpg.Pool,
) -> None:
    user = f"cap-{uuid.uuid4().hex[:8]}"

    async def register(n: int) -> str:
        try:
            await message_store.register_device(
                pool, device_id=f"{user}-{n}", user_id=user, push_token=f"t-{user}-{n}",
                platform="ios",
            )  # fmt: skip
        except LimitReached:
            return "refused"
        return "registered"

    outcomes = await asyncio.gather(*(register(n) for n in range(14)))
    assert outcomes.count("registered") == message_store.MAX_ACTIVE_DEVICES == 10
    assert outcomes.count("refused") == 4
    active = await pool.fetchval("SELECT count(*) FROM devices WHERE user_id = $1 AND active", user)
    assert active == 10

    # removing one makes room; reactivating a removed one counts again
    first = (await message_store.active_devices(pool, user))[0].id
    assert await message_store.deactivate_device(pool, first, "removed by its user")
    assert await register(99) == "registered"
    with pytest.raises(asyncpg.PostgresError) as caught:
        await pool.execute("UPDATE devices SET active = true WHERE id = $1", first)
    assert caught.value.sqlstate == message_store.DEVICE_LIMIT_SQLSTATE


@pytest.mark.parametrize("bad", ["mx:read-sync:1", "tab\there", "-lead", "x" * 65])
@pytest.mark.parametrize("column", ["id", "sender_id", "recipient_id"])
async def test_postgres_refuses_message_ids_outside_the_alphabet(
    owner_pool: asyncpg.Pool, column: str, bad: str
) -> None:
    """The same alphabet holds for messages, whoever writes (the schema owner here)."""
    insert = (
        "INSERT INTO messages (id, sender_id, recipient_id, recipient_email, body, deadline_ms,"
        " workflow_id) VALUES ($1, $2, $3, 'rita@example.com', 'hi', 1000, 'message-' || $1)"
    )
    good = {"id": f"mi-{uuid.uuid4().hex[:8]}", "sender_id": "sam", "recipient_id": "rita"}
    await owner_pool.execute(insert, *good.values())  # the same row with good ids goes in
    with pytest.raises(asyncpg.CheckViolationError):
        await owner_pool.execute(
            insert, *{**good, "id": f"mi-{uuid.uuid4().hex[:8]}", column: bad}.values()
        )


@pytest.mark.parametrize("column", ["id", "user_id"])
async def test_postgres_refuses_device_ids_outside_the_alphabet(
    owner_pool: asyncpg.Pool, column: str
) -> None:
    insert = "INSERT INTO devices (id, user_id, push_token, platform) VALUES ($1, $2, $3, 'ios')"
    good = {"id": f"di-{uuid.uuid4().hex[:8]}", "user_id": f"u-{uuid.uuid4().hex[:8]}"}
    await owner_pool.execute(insert, *good.values(), f"tok-{uuid.uuid4().hex}")
    bad = {**good, "id": f"di-{uuid.uuid4().hex[:8]}", column: "phone:1"}
    with pytest.raises(asyncpg.CheckViolationError):
        await owner_pool.execute(insert, *bad.values(), f"tok-{uuid.uuid4().hex}")
