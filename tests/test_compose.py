"""docker-compose.yml describes the same system the code expects (no engine runs here).

The shell scripts the Temporal jobs run are run here against stand-ins for their tools,
which record what they were asked. The app database's init script is plain SQL, so it is
run against a real (embedded) Postgres to show the roles it creates are the ones the URLs
name, and that with them the migrations apply as the owner and the application role is
confined.
"""

from __future__ import annotations

import asyncio
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
from tollgate.stack.temporal import DYNAMIC_CONFIG

ROOT = Path(__file__).resolve().parent.parent
INIT_DIR = "/docker-entrypoint-initdb.d/"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    return {str(k): str(v) for k, v in env.items()}


def _mount_source(service: dict[str, Any], target: str) -> Path:
    """The host file ``service`` mounts at ``target``."""
    for volume in service.get("volumes", []):
        source, mounted_at = str(volume).split(":")[:2]
        if mounted_at == target:
            return ROOT / source
    raise AssertionError(f"nothing is mounted at {target}")


def _entrypoint_script(service: dict[str, Any]) -> Path:
    """The host copy of the shell script ``service`` runs as its entrypoint."""
    shell, target = service["entrypoint"]
    assert shell == "sh"
    return _mount_source(service, target)


def _stub(directory: Path, name: str, body: str) -> None:
    """An executable ``name`` in ``directory`` standing in for a tool of an image."""
    path = directory / name
    path.write_text(f'#!/bin/sh\nprintf \'%s\\n\' "$*" >> "$CALLS"\n{body}\n')
    path.chmod(0o755)


async def _run_script(script: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run ``script`` with ``sh`` and only ``env``; (exit status, output)."""
    process = await asyncio.create_subprocess_exec(
        "sh",
        str(script),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


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


def test_temporal_runs_from_the_server_image_not_the_deprecated_auto_setup(
    compose: dict[str, Any],
) -> None:
    images = {name: s["image"] for name, s in compose["services"].items() if "image" in s}
    assert not [i for i in images.values() if i.startswith("temporalio/auto-setup")]
    server, _, version = images["temporal"].partition(":")
    assert server == "temporalio/server"
    # The schema files the job applies come with admin-tools: same version as the server.
    for name in ("temporal-schema", "temporal-setup"):
        assert images[name] == f"temporalio/admin-tools:{version}", name


def test_temporal_server_and_schema_job_use_the_same_database(compose: dict[str, Any]) -> None:
    services = compose["services"]
    db, server, job = (
        _env(services[name]) for name in ("temporal-db", "temporal", "temporal-schema")
    )
    assert server["DB"] == job["SQL_PLUGIN"] == "postgres12"
    assert server["POSTGRES_SEEDS"] == job["SQL_HOST"] == "temporal-db"
    assert server.get("DB_PORT", "5432") == job["SQL_PORT"] == "5432"
    assert server["POSTGRES_USER"] == job["SQL_USER"] == db["POSTGRES_USER"]
    assert server["POSTGRES_PWD"] == job["SQL_PASSWORD"] == db["POSTGRES_PASSWORD"]
    # The server listens where the other containers and the published port reach it.
    assert server["BIND_ON_IP"] == "0.0.0.0"


def test_the_schema_job_runs_before_the_server(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["temporal"]["depends_on"]["temporal-schema"] == {
        "condition": "service_completed_successfully"
    }
    assert services["temporal-schema"]["depends_on"]["temporal-db"] == {
        "condition": "service_healthy"
    }
    assert services["temporal-setup"]["depends_on"]["temporal"] == {"condition": "service_healthy"}
    assert services["worker"]["depends_on"]["temporal-setup"] == {
        "condition": "service_completed_successfully"
    }


async def test_the_schema_job_creates_and_migrates_both_databases(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """docker/temporal-schema.sh, with temporal-sql-tool standing in for the real one."""
    services = compose["services"]
    server = _env(services["temporal"])
    _stub(tmp_path, "temporal-sql-tool", "")
    calls = tmp_path / "calls"
    env = {**_env(services["temporal-schema"]), "PATH": f"{tmp_path}:/usr/bin:/bin"}
    status, output = await _run_script(
        _entrypoint_script(services["temporal-schema"]), {**env, "CALLS": str(calls)}
    )
    assert status == 0, output

    schema = "/etc/temporal/schema/postgresql/v12"
    expected = []
    # The databases the server opens (its defaults unless the file names others).
    for database, kind in (
        (server.get("DBNAME", "temporal"), "temporal"),
        (server.get("VISIBILITY_DBNAME", "temporal_visibility"), "visibility"),
    ):
        expected += [
            f"--db {database} create",
            f"--db {database} setup-schema -v 0.0",
            f"--db {database} update-schema -d {schema}/{kind}/versioned",
        ]
    assert calls.read_text().splitlines() == expected


async def test_a_failed_migration_fails_the_schema_job(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """...so the server, which waits for its success, never starts on half a schema."""
    job = compose["services"]["temporal-schema"]
    _stub(tmp_path, "temporal-sql-tool", 'case "$*" in *update-schema*) exit 1 ;; esac')
    calls = tmp_path / "calls"
    env = {**_env(job), "PATH": f"{tmp_path}:/usr/bin:/bin", "CALLS": str(calls)}
    status, _ = await _run_script(_entrypoint_script(job), env)
    assert status != 0
    assert calls.read_text().splitlines()[-1].endswith("/temporal/versioned")


def test_temporal_dynamic_config_is_the_local_stacks(compose: dict[str, Any]) -> None:
    server = compose["services"]["temporal"]
    path = _env(server)["DYNAMIC_CONFIG_FILE_PATH"]
    values = yaml.safe_load(_mount_source(server, path).read_text())
    assert {key: str(v[0]["value"]) for key, v in values.items()} == DYNAMIC_CONFIG


async def test_setup_creates_the_namespace_and_the_search_attributes_of_the_code(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """docker/temporal-setup.sh, with the temporal CLI standing in for the real one and
    answering like a server that has no namespace yet."""
    services = compose["services"]
    setup = _env(services["temporal-setup"])
    worker = _env(services["worker"])
    assert setup["TEMPORAL_ADDRESS"] == worker["TEMPORAL_ADDRESS"]
    namespace = setup["TEMPORAL_NAMESPACE"]
    assert namespace == worker["TEMPORAL_NAMESPACE"]

    created = tmp_path / "namespace-created"
    _stub(
        tmp_path,
        "temporal",
        f"""case "$*" in
            "operator namespace describe"*) [ -e {created} ] || exit 1 ;;
            "operator namespace create"*) touch {created} ;;
        esac""",
    )
    calls = tmp_path / "calls"
    env = {**setup, "PATH": f"{tmp_path}:/usr/bin:/bin", "CALLS": str(calls)}
    status, output = await _run_script(_entrypoint_script(services["temporal-setup"]), env)
    assert status == 0, output

    lines = calls.read_text().splitlines()
    assert f"operator namespace create --namespace {namespace} --retention 24h" in lines
    registered = {}
    for line in lines:
        match = re.fullmatch(
            rf"operator search-attribute create --namespace {namespace} --name (\w+) --type (\w+)",
            line,
        )
        if match:
            registered[match.group(1)] = match.group(2)
    assert registered == SEARCH_ATTRIBUTES


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
        # Passwords are not checked here (trust authentication); the test above compares them.
        return f"postgresql://{url.username}@127.0.0.1:{server.port}/{database}"

    try:
        # Undo what LocalPostgres provisions, back to a cluster as the image leaves it.
        admin = await asyncpg.connect(server.admin_url)
        try:
            await admin.execute(f"DROP DATABASE {database}")
            for role in ("tollgate", "tollgate_owner", "tollgate_app"):
                await admin.execute(f"DROP ROLE {role}")
            await admin.execute(f"CREATE DATABASE {database}")
        finally:
            await admin.close()
        admin = await asyncpg.connect(server.admin_url.rsplit("/", 1)[0] + f"/{database}")
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
