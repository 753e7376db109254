"""Least privilege: what the application role may do, and what it is refused.

The suite connects as the application role (``pool``), as the worker and the CLI do; the
schema owner (``owner_pool``) applied the migrations. ``schema/003_least_privilege.sql``
describes the design. Every refusal here is SQLSTATE 42501 (insufficient_privilege),
raised before any trigger runs; statements are tried inside a transaction that is always
rolled back, so a regression fails the test without damaging the shared database.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import apply_transition
from tests.db import INSUFFICIENT_PRIVILEGE, acts_as_owner, attempt, move, new_message, new_order
from tollgate import gate
from tollgate.messages import store as message_store
from tollgate.messages.states import MessageStatus
from tollgate.migrate import SCHEMA_DIR, MigrationError, apply_migrations
from tollgate.orders import store as order_store
from tollgate.orders.states import OrderStatus
from tollgate_dev.stack import LocalPostgres, free_port

APP_GROUP = "tollgate_app"

#: What the application role may do on each table 003 covers; anything else is refused.
EXPECTED_PRIVILEGES: dict[str, set[str]] = {
    "orders": {"SELECT", "INSERT", "UPDATE"},
    "messages": {"SELECT", "INSERT", "UPDATE"},
    "devices": {"SELECT", "INSERT", "UPDATE"},
    "message_deliveries": {"SELECT", "INSERT", "UPDATE"},
    "order_transitions": {"SELECT"},
    "message_transitions": {"SELECT"},
    "order_statuses": {"SELECT"},
    "order_transition_edges": {"SELECT"},
    "message_statuses": {"SELECT"},
    "message_transition_edges": {"SELECT"},
    "schema_migrations": {"SELECT"},
}
ALL_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


@pytest.fixture
async def app(pool: asyncpg.Pool, owner_pool: asyncpg.Pool) -> asyncpg.Pool:
    """The application role's pool; skips when the tests were given a single role."""
    app_role = await pool.fetchval("SELECT session_user")
    owner_role = await owner_pool.fetchval("SELECT session_user")
    if app_role == owner_role:
        pytest.skip(
            f"the application and owner connections are the same role ({app_role!r}): set "
            f"TOLLGATE_TEST_DATABASE_URL to a login role in {APP_GROUP} and "
            "TOLLGATE_TEST_DATABASE_OWNER_URL to the schema owner to test the separation"
        )
    owns = await acts_as_owner(pool, "orders")
    assert not owns, f"{app_role!r} has the rights of the schema owner (a superuser?)"
    return pool


REFUSED = {
    # the gate itself
    "disable guard": "ALTER TABLE orders DISABLE TRIGGER orders_guard",
    "disable all triggers": "ALTER TABLE orders DISABLE TRIGGER ALL",
    "disable message guard": "ALTER TABLE messages DISABLE TRIGGER messages_guard",
    "disable append-only": "ALTER TABLE order_transitions DISABLE TRIGGER order_transitions_append_only",
    "drop guard": "DROP TRIGGER orders_guard ON orders",
    "replace guard": (
        "CREATE OR REPLACE FUNCTION orders_guard() RETURNS trigger"
        " LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$"
    ),
    "alter table": "ALTER TABLE orders ADD COLUMN x int",
    "alter messages": "ALTER TABLE messages ALTER COLUMN body DROP NOT NULL",
    "replication role": "SET session_replication_role = replica",
    "create table": "CREATE TABLE sneaky (x int)",
    # audit: neither rewritten nor forged
    "update order audit": "UPDATE order_transitions SET actor = 'someone else'",
    "delete order audit": "DELETE FROM order_transitions",
    "truncate order audit": "TRUNCATE order_transitions",
    "forge order audit": (
        "INSERT INTO order_transitions (order_id, from_status, to_status, from_version,"
        " to_version, actor) VALUES ('x', 'RESERVING', 'COMPLETED', 4, 5, 'worker')"
    ),
    "update message audit": "UPDATE message_transitions SET to_status = 'READ'",
    "delete message audit": "DELETE FROM message_transitions",
    "truncate message audit": "TRUNCATE message_transitions",
    "forge message audit": (
        "INSERT INTO message_transitions (message_id, from_status, to_status, from_version,"
        " to_version, actor) VALUES ('x', 'DISPATCHED', 'READ', 3, 4, 'worker')"
    ),
    # the graph
    "add order edge": "INSERT INTO order_transition_edges VALUES ('COMPLETED', 'PENDING')",
    "remove order edges": "DELETE FROM order_transition_edges",
    "unfreeze order status": "UPDATE order_statuses SET terminal = false",
    "add message edge": "INSERT INTO message_transition_edges VALUES ('FAILED', 'INITIATED')",
    "unfreeze message status": "UPDATE message_statuses SET terminal = false",
    # rows are written, never removed
    "delete orders": "DELETE FROM orders",
    "truncate orders": "TRUNCATE orders CASCADE",
    "delete messages": "DELETE FROM messages",
    "delete devices": "DELETE FROM devices",
    "delete deliveries": "DELETE FROM message_deliveries",
    # the migration runner's bookkeeping (readable: see test_the_app_role_checks_...)
    "record a migration": "INSERT INTO schema_migrations (name, checksum) VALUES ('999_x.sql', 'x')",
    "forget a migration": "DELETE FROM schema_migrations",
}


@pytest.mark.parametrize("statement", list(REFUSED.values()), ids=list(REFUSED))
async def test_the_app_role_is_refused(app: asyncpg.Pool, statement: str) -> None:
    assert await attempt(app, statement) == INSUFFICIENT_PRIVILEGE


@pytest.mark.parametrize(
    "statement",
    [
        "ALTER TABLE orders DISABLE TRIGGER orders_guard",
        "ALTER TABLE orders ADD COLUMN x int",
        "INSERT INTO order_transition_edges VALUES ('COMPLETED', 'PENDING')",
        "DELETE FROM order_transitions WHERE false",
    ],
)
async def test_the_owner_is_not_refused(owner_pool: asyncpg.Pool, statement: str) -> None:
    """The control: the refusals above come from the role, not from the statement."""
    assert await attempt(owner_pool, statement) == "ok"


async def test_the_app_role_cannot_become_the_owner(app: asyncpg.Pool) -> None:
    owner = await app.fetchval(
        "SELECT relowner::regrole::text FROM pg_class WHERE oid = 'orders'::regclass"
    )
    assert await attempt(app, f"SET ROLE {owner}") == INSUFFICIENT_PRIVILEGE
    role = await app.fetchrow(
        "SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication"
        " FROM pg_roles WHERE rolname = session_user"
    )
    assert role is not None
    assert not any(role.values()), dict(role)
    assert await app.fetchval("SELECT pg_has_role(session_user, $1, 'USAGE')", APP_GROUP)


async def test_the_app_role_holds_exactly_its_grants(app: asyncpg.Pool) -> None:
    """Per table of the schema: what 003 grants, no more. A table added later may get
    row access (SELECT, INSERT, UPDATE) but never DELETE, TRUNCATE, REFERENCES, TRIGGER."""
    rows = await app.fetch(
        """
        SELECT c.relname, c.oid, pg_get_userbyid(c.relowner) AS owner
          FROM pg_class c
         WHERE c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'orders'::regclass)
           AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
        """
    )
    held: dict[str, set[str]] = {}
    for row in rows:
        held[row["relname"]] = {
            p
            for p in ALL_PRIVILEGES
            if await app.fetchval("SELECT has_table_privilege($1::oid, $2)", row["oid"], p)
        }
        assert not await app.fetchval("SELECT pg_has_role(session_user, $1, 'USAGE')", row["owner"])
    for table, expected in EXPECTED_PRIVILEGES.items():
        assert held.get(table) == expected, (table, held.get(table))
    for table in held.keys() - EXPECTED_PRIVILEGES.keys():
        assert held[table] <= {"SELECT", "INSERT", "UPDATE"}, (table, held[table])
    # nextval/setval on the audit ids: the database numbers audit rows, nobody else
    for sequence in ("order_transitions_id_seq", "message_transitions_id_seq"):
        for privilege in ("USAGE", "SELECT", "UPDATE"):
            assert not await app.fetchval(
                "SELECT has_sequence_privilege($1, $2)", sequence, privilege
            ), (sequence, privilege)

    functions = {
        name: await app.fetchval("SELECT has_function_privilege($1, 'EXECUTE')", name)
        for name in (
            "tollgate_setting(text)",
            "orders_guard()",
            "orders_audit()",
            "messages_guard()",
            "messages_audit()",
            "lifecycle_install_gate(regclass, regclass, regclass, text, regclass, name, name[])",
            "audit_append_only()",
        )
    }
    assert functions == {name: name.startswith("tollgate_setting") for name in functions}


async def test_no_one_attaches_the_audit_function_to_a_table_of_their_own(
    app: asyncpg.Pool,
) -> None:
    """A temporary table is the one table the app role can create. Were it allowed to hang
    the (SECURITY DEFINER) audit function on it, its inserts would write audit rows."""
    async with app.acquire() as conn, conn.transaction():
        await conn.execute(
            "CREATE TEMP TABLE fake_orders (id text, status text, version int,"
            " last_transition_id text) ON COMMIT DROP"
        )
        with pytest.raises(asyncpg.PostgresError) as caught:
            async with conn.transaction():
                await conn.execute(
                    "CREATE TRIGGER forge AFTER INSERT ON fake_orders FOR EACH ROW"
                    " EXECUTE FUNCTION orders_audit()"
                )
        assert caught.value.sqlstate == INSUFFICIENT_PRIVILEGE, caught.value


async def test_the_app_role_writes_orders_and_the_database_audits_them(
    app: asyncpg.Pool,
) -> None:
    order_id = await new_order(app, "p", customer_id="privileges-test", actor="privileges:insert")
    moved = await apply_transition(
        app,
        move(
            order_id,
            1,
            OrderStatus.VALIDATING,
            f"privileges:{order_id}:VALIDATING",
            actor="privileges:move",
        ),
    )
    assert (moved.version, moved.already_applied) == (2, False)
    # a writer that describes nothing is recorded as its login role, not as the owner
    # the SECURITY DEFINER trigger runs as
    await app.execute("UPDATE orders SET status = 'CANCELLING' WHERE id = $1", order_id)

    audit = await order_store.list_transitions(app, order_id)
    app_role = await app.fetchval("SELECT session_user")
    assert [(a.from_status, a.to_status, a.actor) for a in audit] == [
        (None, OrderStatus.PENDING, "privileges:insert"),
        (OrderStatus.PENDING, OrderStatus.VALIDATING, "privileges:move"),
        (OrderStatus.VALIDATING, OrderStatus.CANCELLING, app_role),
    ]
    assert audit[1].transition_id == f"privileges:{order_id}:VALIDATING"


async def test_the_app_role_writes_messages_devices_and_deliveries(app: asyncpg.Pool) -> None:
    message_id = await new_message(
        app, "pm", party="privileges", body="least privilege", actor="privileges:insert"
    )
    device_id = f"pd-{uuid.uuid4().hex[:10]}"
    await message_store.register_device(
        app,
        device_id=device_id,
        user_id="privileges-recipient",
        push_token=f"tok-{device_id}",
        platform="web",
    )
    await message_store.record_push(app, message_id, device_id, "push-1")
    await message_store.record_fact(app, message_id, [device_id], "delivered")
    await app.execute("UPDATE messages SET status = 'STORED' WHERE id = $1", message_id)
    await message_store.deactivate_device(app, device_id, "privileges test")

    (delivery,) = await message_store.deliveries(app, message_id)
    assert delivery.push_id == "push-1" and delivery.delivered_at is not None
    assert not (await message_store.get_device(app, device_id)).active
    audit = await message_store.list_transitions(app, message_id)
    app_role = await app.fetchval("SELECT session_user")
    assert [(a.from_status, a.to_status, a.actor) for a in audit] == [
        (None, MessageStatus.INITIATED, "privileges:insert"),
        (MessageStatus.INITIATED, MessageStatus.STORED, app_role),
    ]


async def test_a_temporary_table_does_not_shadow_the_graph_or_the_audit(
    app: asyncpg.Pool, owner_pool: asyncpg.Pool
) -> None:
    """Temporary tables come first on a default search_path. The trigger functions pin
    theirs, so a session's own ``order_transition_edges`` widens nothing, and its own
    ``order_transitions`` does not swallow the audit row."""
    order_id = await new_order(app, "p", customer_id="privileges-test", actor="t")
    message_id = await new_message(app, "pm", party="privileges", body="shadow", actor="t")

    schema = await app.fetchval(
        "SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = 'orders'::regclass"
    )
    async with app.acquire() as conn, conn.transaction():
        for table in ("order_transition_edges", "message_transition_edges", "order_transitions"):
            await conn.execute(f"CREATE TEMP TABLE {table} (LIKE {schema}.{table}) ON COMMIT DROP")
        await conn.execute("INSERT INTO order_transition_edges VALUES ('PENDING', 'COMPLETED')")
        await conn.execute("INSERT INTO message_transition_edges VALUES ('INITIATED', 'READ')")
        for statement, entity in (
            ("UPDATE orders SET status = 'COMPLETED' WHERE id = $1", order_id),
            ("UPDATE messages SET status = 'READ' WHERE id = $1", message_id),
        ):
            with pytest.raises(asyncpg.PostgresError) as caught:
                async with conn.transaction():
                    await conn.execute(statement, entity)
            assert caught.value.sqlstate == gate.ILLEGAL_TRANSITION_SQLSTATE, caught.value

        await conn.execute("UPDATE orders SET status = 'VALIDATING' WHERE id = $1", order_id)
        assert await conn.fetchval("SELECT count(*) FROM pg_temp.order_transitions") == 0
    audit = await order_store.list_transitions(owner_pool, order_id)
    assert [a.to_status for a in audit] == [OrderStatus.PENDING, OrderStatus.VALIDATING]


async def test_the_app_role_checks_but_cannot_apply_migrations(
    app: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """A worker given only the application role starts on an up-to-date schema, stops on
    an edited migration, and stops, naming DATABASE_OWNER_URL, on a pending one."""
    assert await apply_migrations(database_url) == []

    schema = tmp_path / "schema"
    shutil.copytree(SCHEMA_DIR, schema)
    (schema / "999_extra.sql").write_text("CREATE TABLE extra_from_the_app (x int);\n")
    with pytest.raises(MigrationError, match=r"999_extra\.sql.*DATABASE_OWNER_URL"):
        await apply_migrations(database_url, schema)
    assert await app.fetchval("SELECT to_regclass('extra_from_the_app')") is None
    assert not await app.fetchval("SELECT 1 FROM schema_migrations WHERE name = '999_extra.sql'")

    (schema / "999_extra.sql").unlink()
    first = min(schema.glob("*.sql"))
    first.write_text(first.read_text() + "\n-- edited after the fact\n")
    with pytest.raises(MigrationError, match=f"{first.name} changed after it was applied"):
        await apply_migrations(database_url, schema)


async def test_the_migration_needs_the_app_group_or_the_right_to_create_it(
    tmp_path: Path,
) -> None:
    """On a fresh cluster without ``tollgate_app``: an owner that may not create roles gets
    a message saying what to run; one that may (CREATEROLE) creates it, NOLOGIN."""
    server = LocalPostgres(tmp_path / "data", free_port(), durable=False)
    await server.start()
    try:
        admin = await server.connect_admin()
        try:
            await admin.execute(f"DROP ROLE {APP_GROUP}")
            with pytest.raises(MigrationError, match="003_least_privilege") as caught:
                await apply_migrations(server.owner_url)
            assert f"CREATE ROLE {APP_GROUP} NOLOGIN" in str(caught.value)
            assert not await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", APP_GROUP)

            await admin.execute("ALTER ROLE tollgate_owner CREATEROLE")
            assert "003_least_privilege.sql" in await apply_migrations(server.owner_url)
            assert await admin.fetchval(
                "SELECT NOT rolcanlogin FROM pg_roles WHERE rolname = $1", APP_GROUP
            )
        finally:
            await admin.close()
    finally:
        await server.stop()
