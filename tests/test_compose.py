"""docker-compose.yml describes the same system the code expects (no engine runs here).

The app database's init script is the exception: it is plain SQL, so it is run against a
real (embedded) Postgres to show the roles it creates are the ones the URLs name, and
that with them the migrations apply as the owner and the application role is confined.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

import asyncpg
import pytest
import yaml

from tollgate.migrate import apply_migrations
from tollgate.names import SEARCH_ATTRIBUTES
from tollgate.settings import Settings
from tollgate.stack import LocalPostgres, free_port

ROOT = Path(__file__).resolve().parent.parent
INIT_DIR = "/docker-entrypoint-initdb.d/"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    return {str(k): str(v) for k, v in env.items()}


def test_every_image_is_pinned(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "image" not in service:
            assert "build" in service, f"{name} has neither image nor build"
            continue
        image = service["image"]
        tag = image.rpartition(":")[2] if ":" in image else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), (
            f"{name}: image {image} is not pinned"
        )


@pytest.mark.parametrize("service", ["worker", "starter"])
def test_app_environment_is_what_settings_read(compose: dict[str, Any], service: str) -> None:
    env = _env(compose["services"][service])
    fields = {name.upper() for name in Settings.model_fields}
    unknown = set(env) - fields
    assert not unknown, f"{service} sets variables Settings does not read: {unknown}"
    for required in ("TEMPORAL_ADDRESS", "DATABASE_URL", "SANDBOX_URL", "TASK_QUEUE"):
        assert required in env, f"{service} lacks {required}"
    parsed = Settings(**{k.lower(): v for k, v in env.items()})  # type: ignore[arg-type]
    assert parsed.database_url.startswith("postgresql://")


def test_only_the_worker_gets_the_owner_connection(compose: dict[str, Any]) -> None:
    """The worker migrates at start-up; the CLI has no business changing the schema."""
    worker = _env(compose["services"]["worker"])
    assert "DATABASE_OWNER_URL" not in _env(compose["services"]["starter"])
    owner, app = urlsplit(worker["DATABASE_OWNER_URL"]), urlsplit(worker["DATABASE_URL"])
    assert owner.username != app.username
    assert (owner.hostname, owner.port, owner.path) == (app.hostname, app.port, app.path)


def test_addresses_point_at_services_that_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = _env(services["worker"])
    temporal_host, _, temporal_port = env["TEMPORAL_ADDRESS"].partition(":")
    assert temporal_host in services and temporal_port == "7233"
    db_host = re.search(r"@([^:/]+):(\d+)/", env["DATABASE_URL"])
    assert db_host and db_host.group(1) in services
    sandbox = re.match(r"http://([^:]+):(\d+)$", env["SANDBOX_URL"])
    assert sandbox and sandbox.group(1) in services
    assert sandbox.group(2) in services[sandbox.group(1)]["command"]
    otel = re.match(r"http://([^:]+):4318$", env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert otel and otel.group(1) in services


def test_search_attributes_registered_match_the_code(compose: dict[str, Any]) -> None:
    script = " ".join(compose["services"]["temporal-setup"]["command"])
    created = dict(re.findall(r"--name (\w+) --type (\w+)", script))
    assert created == SEARCH_ATTRIBUTES


def _init_scripts(service: dict[str, Any]) -> list[Path]:
    """Host files mounted into the postgres image's init directory."""
    scripts = []
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if target.startswith(INIT_DIR):
            scripts.append(ROOT / source)
    return scripts


def _urls(compose: dict[str, Any]) -> tuple[SplitResult, SplitResult]:
    """(owner, application) connections of the worker."""
    worker = _env(compose["services"]["worker"])
    return urlsplit(worker["DATABASE_OWNER_URL"]), urlsplit(worker["DATABASE_URL"])


def test_app_postgres_creates_the_roles_the_urls_use(compose: dict[str, Any]) -> None:
    db_env = _env(compose["services"]["app-db"])
    (script,) = _init_scripts(compose["services"]["app-db"])
    sql = script.read_text()
    for url in _urls(compose):
        assert url.hostname == "app-db" and url.path == "/" + db_env["POSTGRES_DB"]
        # neither is the image's superuser
        assert url.username != db_env["POSTGRES_USER"]
        created = re.search(
            rf"CREATE ROLE {url.username} LOGIN PASSWORD '([^']*)'", sql, re.IGNORECASE
        )
        assert created, f"{script.name} does not create the login role {url.username}"
        assert created.group(1) == url.password


async def test_app_postgres_init_script_on_a_real_postgres(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """What the image does (POSTGRES_DB, then the init script as the superuser) on an
    embedded server, then the worker's part: migrate as the owner, work as the app."""
    db_env = _env(compose["services"]["app-db"])
    (script,) = _init_scripts(compose["services"]["app-db"])
    owner, app = _urls(compose)
    database = db_env["POSTGRES_DB"]

    server = LocalPostgres(tmp_path / "data", free_port(), durable=False)
    await server.start()

    def local(url: SplitResult) -> str:
        # The embedded server checks the owner's password (the one the script sets).
        return f"postgresql://{url.username}:{url.password}@127.0.0.1:{server.port}/{database}"

    try:
        # Undo what LocalPostgres provisions, back to a cluster as the image leaves it.
        admin = await server.connect_admin()
        try:
            await admin.execute(f"DROP DATABASE {database}")
            for role in ("tollgate", "tollgate_owner", "tollgate_app"):
                await admin.execute(f"DROP ROLE {role}")
            await admin.execute(f"CREATE DATABASE {database}")
        finally:
            await admin.close()
        admin = await server.connect_admin(database)
        try:
            await admin.execute(script.read_text())
            roles = await admin.fetch(
                "SELECT rolname, rolsuper OR rolcreaterole OR rolcreatedb AS powerful"
                " FROM pg_roles WHERE rolname = ANY($1::text[])",
                [owner.username, app.username],
            )
            assert {r["rolname"]: r["powerful"] for r in roles} == {
                owner.username: False,
                app.username: False,
            }
        finally:
            await admin.close()

        assert "003_least_privilege.sql" in await apply_migrations(local(owner))
        conn = await asyncpg.connect(local(app))
        try:
            await conn.execute(
                "INSERT INTO orders (id, customer_id, items, amount_cents, currency, workflow_id)"
                """ VALUES ('c-1', 'alice', '[{"sku": "A", "quantity": 1}]', 100, 'USD', 'order-c-1')"""
            )
            await conn.execute("UPDATE orders SET status = 'VALIDATING' WHERE id = 'c-1'")
            assert await conn.fetchval("SELECT count(*) FROM order_transitions") == 2
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("ALTER TABLE orders DISABLE TRIGGER orders_guard_update")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("DELETE FROM order_transitions")
        finally:
            await conn.close()
    finally:
        await server.stop()


def test_payload_key_is_shared_and_the_ui_can_decrypt(compose: dict[str, Any]) -> None:
    services = compose["services"]
    key_file = _env(services["worker"])["PAYLOAD_KEY_FILE"]
    key_dir = key_file.rsplit("/", 1)[0]
    for name in ("worker", "starter", "codec", "keygen"):
        mounts = [v.split(":")[1] for v in services[name].get("volumes", [])]
        assert key_dir in mounts, f"{name} does not mount the payload key volume at {key_dir}"
    assert _env(services["codec"])["PAYLOAD_KEY_FILE"] == key_file
    endpoint = _env(services["temporal-ui"])["TEMPORAL_CODEC_ENDPOINT"]
    port = endpoint.rsplit(":", 1)[1]
    assert f"{port}:{port}" in services["codec"]["ports"], "the browser must reach the codec server"
    assert port in services["codec"]["command"]
