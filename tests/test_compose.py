"""docker-compose.yml describes the same system the code expects, and keeps its secrets.

No engine runs here, so the file is checked, not run. It is read twice: as written
(``raw``), for the rules about what the file may contain, and interpolated the way
``docker compose`` does it with a ``.env`` generated from ``.env.example`` (``compose``),
for everything about values. The rules:

* every published port is bound to 127.0.0.1, and only the ones a user on the host
  needs are published (not the sandbox's admin API, not the databases);
* no password or credential is written in the file: each is a ``${NAME:?...}``
  reference, so compose refuses to start without it, and ``.env.example`` lists every
  one of them, with no value;
* Temporal runs from the server image, after a schema job that migrates both of its
  databases, and the Web UI reaches the codec server with the credential.

The shell scripts the services run are run here too: the Temporal jobs against stand-ins
for their tools (which record what they were asked), and the app database's init script
with real psql against a real (embedded) Postgres that checks passwords, to show that
the roles it creates are the ones the URLs name, that each logs in with its password
from .env, and that with them the migrations apply as the owner and the application
role is confined.
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import secrets
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit, urlunsplit

import asyncpg
import pytest
import yaml
from dotenv import dotenv_values

from tests.waiting import eventually
from tollgate.migrate import apply_migrations
from tollgate.names import SEARCH_ATTRIBUTES
from tollgate.settings import Settings
from tollgate_dev.stack import LocalPostgres, free_port, postgres_bin_dir
from tollgate_dev.stack.temporal import DYNAMIC_CONFIG

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
INIT_DIR = "/docker-entrypoint-initdb.d/"

#: What a user on the host needs, and nothing else: (service, port in the container).
PUBLISHED = {
    ("temporal-ui", 8080),  # the Web UI
    ("temporal", 7233),  # gRPC, for the temporal CLI on the host
    ("jaeger", 16686),  # the traces UI
    ("codec", 8081),  # called by the browser that runs the Web UI
    ("api", 8082),  # the HTTP API
}
#: Services whose environment is Tollgate's own Settings.
TOLLGATE_SERVICES = ("worker", "starter", "codec", "api")
#: Environment names that hold a secret (``..._FILE`` ones hold a path to one).
SECRET_NAME = re.compile(r"PASSWORD|PWD|SECRET|TOKEN")
#: The only reference form the file may use: the variable is required, no default.
REQUIRED_REFERENCE = re.compile(r"\{(?P<name>[A-Za-z_][A-Za-z0-9_]*):\?(?P<message>[^}]+)\}")
# After "$": "$" (an escaped dollar), "{...}", a bare name, or anything else (invalid).
_DOLLAR = re.compile(r"\$(\$|\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*|)")
#: The login roles of the app database, as docker/app-db-init.sh creates them.
LOGIN_ROLES = ("tollgate_owner", "tollgate")


# --- reading the file the way compose does ----------------------------------------------


class InterpolationError(Exception):
    """What ``docker compose`` refuses to start with."""


def _tokens(value: str) -> list[str]:
    """What follows each ``$`` in ``value`` (``$`` for an escaped one)."""
    return _DOLLAR.findall(value)


def _interpolate(value: str, env: dict[str, str]) -> str:
    """``value`` with each ``${NAME:?message}`` replaced by ``env[NAME]``.

    Like compose: an unset or empty variable is an error carrying the message, and ``$$``
    is a dollar sign. Every other form (a default, a bare ``$NAME``) is an error here,
    because the file must not use one.
    """

    def replace(match: re.Match[str]) -> str:
        token = match.group(1)
        if token == "$":
            return "$"
        required = REQUIRED_REFERENCE.fullmatch(token)
        if required is None:
            raise InterpolationError(f"${token} is not of the form ${{NAME:?message}}")
        if not env.get(required["name"]):
            raise InterpolationError(f"{required['name']}: {required['message']}")
        return env[required["name"]]

    return _DOLLAR.sub(replace, value)


def _map_strings(node: Any, apply: Callable[[str], Any]) -> Any:
    """``node`` with ``apply`` run over every string value (mapping keys stay as they are)."""
    if isinstance(node, dict):
        return {key: _map_strings(value, apply) for key, value in node.items()}
    if isinstance(node, list):
        return [_map_strings(value, apply) for value in node]
    if isinstance(node, str):
        return apply(node)
    return node


def _strings(node: Any) -> Iterable[str]:
    """Every string value in ``node``."""
    found: list[str] = []
    _map_strings(node, found.append)
    return found


def _referenced_names(raw: dict[str, Any]) -> set[str]:
    """Every variable the file refers to, in whatever form."""
    return {
        match.group(1)
        for value in _strings(raw)
        for token in _tokens(value)
        if (match := re.match(r"\{?([A-Za-z_][A-Za-z0-9_]*)", token))
    }


def _example_values() -> dict[str, str | None]:
    return dict(dotenv_values(ENV_EXAMPLE))


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """docker-compose.yml as written (YAML anchors and merge keys resolved)."""
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


@pytest.fixture(scope="module")
def dotenv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A .env made as the README says: .env.example with a fresh hex value on every
    ``NAME=`` line; read back with the same kind of parser compose uses."""
    lines = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        if re.fullmatch(r"[A-Z][A-Z0-9_]*=", line):
            line += secrets.token_hex(32)
        lines.append(line)
    path = tmp_path_factory.mktemp("dotenv") / ".env"
    path.write_text("\n".join(lines) + "\n")
    return {name: value for name, value in dotenv_values(path).items() if value is not None}


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any], dotenv: dict[str, str]) -> dict[str, Any]:
    """docker-compose.yml as compose runs it with that .env."""
    data: dict[str, Any] = _map_strings(raw, lambda value: _interpolate(value, dotenv))
    return data


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    return {str(k): str(v) for k, v in env.items()}


def _published(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(host address, port in the container) of each entry of ``ports``; "" is every
    interface, which is what compose does when no address is given."""
    entries = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            entries.append((str(port.get("host_ip", "")), int(port["target"])))
            continue
        parts = str(port).split("/", 1)[0].split(":")
        host_ip = parts[0] if len(parts) == 3 else ""
        entries.append((host_ip, int(parts[-1])))
    return entries


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


# --- images ----------------------------------------------------------------------------


def test_every_image_is_pinned(raw: dict[str, Any]) -> None:
    for name, service in raw["services"].items():
        if "image" not in service:
            assert "build" in service, f"{name} has neither image nor build"
            continue
        image = service["image"]
        tag = image.rpartition(":")[2] if ":" in image else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), (
            f"{name}: image {image} is not pinned"
        )


def test_temporal_runs_from_the_server_image_not_the_deprecated_auto_setup(
    raw: dict[str, Any],
) -> None:
    images = {name: s["image"] for name, s in raw["services"].items() if "image" in s}
    assert not [i for i in images.values() if i.startswith("temporalio/auto-setup")]
    server, _, version = images["temporal"].partition(":")
    assert server == "temporalio/server"
    # The schema files the job applies come with admin-tools: same version as the server.
    for name in ("temporal-schema", "temporal-setup"):
        assert images[name] == f"temporalio/admin-tools:{version}", name


# --- what reaches the host --------------------------------------------------------------


def test_every_published_port_is_bound_to_loopback(raw: dict[str, Any]) -> None:
    for name, service in raw["services"].items():
        assert service.get("network_mode") != "host", f"{name} shares the host's network"
        for host_ip, port in _published(service):
            assert host_ip == "127.0.0.1", f"{name} publishes {port} on {host_ip or 'all'}"


def test_only_what_a_user_on_the_host_needs_is_published(raw: dict[str, Any]) -> None:
    published = {
        (name, port) for name, service in raw["services"].items() for _, port in _published(service)
    }
    assert published == PUBLISHED


def test_sandbox_admin_api_is_not_reachable_from_outside(
    raw: dict[str, Any], compose: dict[str, Any]
) -> None:
    sandbox = raw["services"]["sandbox"]
    assert not sandbox.get("ports") and "network_mode" not in sandbox
    # ...while the worker and the CLI still reach it by name on the project's network.
    url = urlsplit(_env(compose["services"]["worker"])["SANDBOX_URL"])
    assert url.hostname == "sandbox" and str(url.port) in sandbox["command"]


def test_the_checks_above_catch_a_port_on_every_interface(raw: dict[str, Any]) -> None:
    """The old file's way of publishing (no address) fails them."""
    exposed = copy.deepcopy(raw)
    exposed["services"]["sandbox"]["ports"] = ["18081:18081"]
    with pytest.raises(AssertionError):
        test_every_published_port_is_bound_to_loopback(exposed)
    with pytest.raises(AssertionError):
        test_only_what_a_user_on_the_host_needs_is_published(exposed)


# --- secrets ---------------------------------------------------------------------------


def _literal_secrets(raw: dict[str, Any]) -> list[str]:
    """Secrets written in the file: environment values named like a secret, and
    passwords inside URLs, that do not come from a ``${NAME:?...}`` reference."""
    names = _referenced_names(raw)
    sentinels = {name: f"from-env-{name}" for name in names}
    interpolated = _map_strings(raw, lambda value: _interpolate(value, sentinels))
    from_env = set(sentinels.values())
    found = []
    for name, service in interpolated["services"].items():
        for key, value in _env(service).items():
            if SECRET_NAME.search(key) and not key.endswith("_FILE") and value not in from_env:
                found.append(f"{name}: {key}")
            url = urlsplit(value)
            if url.scheme and url.password is not None and url.password not in from_env:
                found.append(f"{name}: password in {key}")
    return found


def test_no_password_or_credential_is_written_in_the_file(raw: dict[str, Any]) -> None:
    assert _literal_secrets(raw) == []


@pytest.mark.parametrize(
    ("service", "key", "value"),
    [
        ("temporal", "POSTGRES_PWD", "temporal"),
        ("app-db", "POSTGRES_PASSWORD", "postgres"),
        ("worker", "DATABASE_OWNER_URL", "postgresql://tollgate_owner:tollgate_owner@app-db/x"),
        ("codec", "CODEC_AUTH_TOKEN", "0123456789abcdef"),
        ("api", "RECEIPT_WEBHOOK_SECRET", "0123456789abcdef0123456789abcdef"),
    ],
)
def test_the_secret_check_catches_a_literal(
    raw: dict[str, Any], service: str, key: str, value: str
) -> None:
    leaked = copy.deepcopy(raw)
    leaked["services"][service]["environment"][key] = value
    assert _literal_secrets(leaked)


def test_every_reference_requires_its_variable(raw: dict[str, Any]) -> None:
    """``${NAME:?message}`` only: no default (``:-``, ``-``), no bare ``$NAME``."""
    for value in _strings(raw):
        for token in _tokens(value):
            assert token == "$" or REQUIRED_REFERENCE.fullmatch(token), f"${token} in {value!r}"
    assert _referenced_names(raw), "the file references no variable at all"


def test_compose_refuses_to_start_without_each_variable(
    raw: dict[str, Any], dotenv: dict[str, str]
) -> None:
    for name in _referenced_names(raw):
        for incomplete in ({k: v for k, v in dotenv.items() if k != name}, {**dotenv, name: ""}):
            with pytest.raises(InterpolationError, match=name):
                _map_strings(raw, partial(_interpolate, env=incomplete))


def test_env_example_lists_every_variable_and_sets_none(raw: dict[str, Any]) -> None:
    """A copy nobody filled in must not start the stack with a known password."""
    example = _example_values()
    assert set(example) == _referenced_names(raw)
    assert {name: value for name, value in example.items() if value} == {}


def test_every_password_and_the_codec_credential_come_from_env(raw: dict[str, Any]) -> None:
    assert {
        "TEMPORAL_DB_PASSWORD",
        "APP_DB_SUPERUSER_PASSWORD",
        "TOLLGATE_OWNER_PASSWORD",
        "TOLLGATE_PASSWORD",
        "CODEC_AUTH_TOKEN",
        "RECEIPT_WEBHOOK_SECRET",
    } <= _referenced_names(raw)


def _git_ignores(path: str) -> bool:
    check = ["git", "-C", str(ROOT), "check-ignore", "--quiet", "--no-index", path]
    return subprocess.run(check, check=False).returncode == 0


def test_env_file_stays_out_of_git_and_of_the_build_context() -> None:
    assert _git_ignores(".env")
    assert not _git_ignores(".env.example"), "the example is meant to be committed"
    assert ".env" in (ROOT / ".dockerignore").read_text().splitlines()


# --- the app's environment ---------------------------------------------------------------


@pytest.mark.parametrize("service", TOLLGATE_SERVICES)
def test_app_environment_is_what_settings_read(compose: dict[str, Any], service: str) -> None:
    env = _env(compose["services"][service])
    fields = {name.upper() for name in Settings.model_fields}
    unknown = set(env) - fields
    assert not unknown, f"{service} sets variables Settings does not read: {unknown}"
    parsed = Settings(**{k.lower(): v for k, v in env.items()})  # type: ignore[arg-type]
    if service == "codec":
        return
    for required in ("TEMPORAL_ADDRESS", "DATABASE_URL", "SANDBOX_URL", "TASK_QUEUE"):
        assert required in env, f"{service} lacks {required}"
    assert parsed.database_url.startswith("postgresql://")


def test_only_the_worker_gets_the_owner_connection(compose: dict[str, Any]) -> None:
    """The worker migrates at start-up; the CLI and the API have no business changing
    the schema."""
    worker = _env(compose["services"]["worker"])
    assert "DATABASE_OWNER_URL" not in _env(compose["services"]["starter"])
    assert "DATABASE_OWNER_URL" not in _env(compose["services"]["api"])
    owner, app = urlsplit(worker["DATABASE_OWNER_URL"]), urlsplit(worker["DATABASE_URL"])
    assert owner.username != app.username
    assert owner.password != app.password
    assert (owner.hostname, owner.port, owner.path) == (app.hostname, app.port, app.path)


def test_addresses_point_at_services_that_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = _env(services["worker"])
    temporal_host, _, temporal_port = env["TEMPORAL_ADDRESS"].partition(":")
    assert temporal_host in services and temporal_port == "7233"
    assert urlsplit(env["DATABASE_URL"]).hostname in services
    sandbox = re.match(r"http://([^:]+):(\d+)$", env["SANDBOX_URL"])
    assert sandbox and sandbox.group(1) in services
    assert sandbox.group(2) in services[sandbox.group(1)]["command"]
    otel = re.match(r"http://([^:]+):4318$", env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert otel and otel.group(1) in services


def test_every_traced_process_sends_its_spans_to_jaeger(compose: dict[str, Any]) -> None:
    """Under compose, traces go to Jaeger (OTLP/HTTP on 4318), not to the local stack's
    receiver: the CLI, the API, the worker and the sandbox all export there, so one
    lifecycle is one trace in Jaeger's UI."""
    services = compose["services"]
    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert _env(jaeger).get("COLLECTOR_OTLP_ENABLED") == "true"
    for name in ("starter", "api", "worker", "sandbox"):
        env = _env(services[name])
        assert env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == "http://jaeger:4318", name
        assert env.get("OTEL_SERVICE_NAME") == "tollgate", name
        assert "OTEL_TRACES_EXPORTER" not in env and "OTEL_SDK_DISABLED" not in env, name
    # Settings reads the same variable, so the Tollgate processes export there.
    worker = Settings(**{k.lower(): v for k, v in _env(services["worker"]).items()})  # type: ignore[arg-type]
    assert worker.otlp_endpoint == "http://jaeger:4318"


# --- Temporal ---------------------------------------------------------------------------


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


def test_the_schema_job_runs_before_the_server(raw: dict[str, Any]) -> None:
    services = raw["services"]
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


# --- the codec server and the Web UI ------------------------------------------------------


def test_payload_key_is_shared_and_the_ui_can_decrypt(compose: dict[str, Any]) -> None:
    services = compose["services"]
    key_file = _env(services["worker"])["PAYLOAD_KEY_FILE"]
    key_dir = key_file.rsplit("/", 1)[0]
    for name in ("worker", "starter", "codec", "keygen", "api"):
        mounts = [v.split(":")[1] for v in services[name].get("volumes", [])]
        assert key_dir in mounts, f"{name} does not mount the payload key volume at {key_dir}"
    assert _env(services["codec"])["PAYLOAD_KEY_FILE"] == key_file
    port = urlsplit(_env(services["temporal-ui"])["TEMPORAL_CODEC_ENDPOINT"]).port
    assert f"127.0.0.1:{port}:{port}" in services["codec"]["ports"], (
        "the browser must reach the codec server"
    )
    assert str(port) in services["codec"]["command"]


def test_the_ui_codec_endpoint_carries_the_codec_servers_credential(
    raw: dict[str, Any], compose: dict[str, Any]
) -> None:
    reference = REQUIRED_REFERENCE.pattern.replace(r"\{", r"\$\{")
    ui = _env(raw["services"]["temporal-ui"])["TEMPORAL_CODEC_ENDPOINT"]
    codec = _env(raw["services"]["codec"])["CODEC_AUTH_TOKEN"]
    in_path = re.fullmatch(rf"http://localhost:\d+/ui/{reference}", ui)
    in_codec = re.fullmatch(reference, codec)
    assert in_path and in_codec and in_path["name"] == in_codec["name"] == "CODEC_AUTH_TOKEN"

    token = _env(compose["services"]["codec"])["CODEC_AUTH_TOKEN"]
    endpoint = urlsplit(_env(compose["services"]["temporal-ui"])["TEMPORAL_CODEC_ENDPOINT"])
    assert endpoint.path == f"/ui/{token}"


# --- the app database ---------------------------------------------------------------------


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
    # The image runs *.sh scripts (and *.sql ones, which cannot read the environment).
    assert script.suffix == ".sh"
    owner, app = _urls(compose)
    assert (owner.username, app.username) == LOGIN_ROLES
    for url in (owner, app):
        assert url.hostname == "app-db" and url.path == "/" + db_env["POSTGRES_DB"]
        # neither is the image's superuser
        assert url.username != db_env["POSTGRES_USER"]
    # The init script gets the passwords the URLs carry (the test below shows it gives
    # each to the right role).
    assert owner.password == db_env["TOLLGATE_OWNER_PASSWORD"]
    assert app.password == db_env["TOLLGATE_PASSWORD"]


@pytest.mark.parametrize("missing", ["TOLLGATE_OWNER_PASSWORD", "TOLLGATE_PASSWORD"])
async def test_app_db_init_script_refuses_to_run_without_a_password(
    compose: dict[str, Any], tmp_path: Path, missing: str
) -> None:
    db_env = _env(compose["services"]["app-db"])
    (script,) = _init_scripts(compose["services"]["app-db"])
    _stub(tmp_path, "psql", "")
    calls = tmp_path / "calls"
    env = {**db_env, missing: "", "PATH": f"{tmp_path}:/usr/bin:/bin", "CALLS": str(calls)}
    status, output = await _run_script(script, env)
    assert status != 0 and missing in output
    assert not calls.exists(), "psql ran anyway"


def _libpq_env(dsn: str) -> dict[str, str]:
    """PGHOST / PGPORT (and PGPASSWORD) that make psql reach the server ``dsn`` names,
    over TCP or a unix socket (``host`` in the query, or a %-encoded path)."""
    url = urlsplit(dsn)
    hostport = url.netloc.rpartition("@")[2]
    host, port = hostport, ""
    if ":" in hostport and not hostport.endswith("]"):
        host, port = hostport.rsplit(":", 1)
    query = parse_qs(url.query)
    host = query.get("host", [unquote(host)])[0]
    port = query.get("port", [port])[0]
    env = {"PGHOST": host} if host else {}
    if port:
        env["PGPORT"] = port
    if url.password:
        env["PGPASSWORD"] = unquote(url.password)
    return env


def _with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


async def _as_the_image_leaves_it(server: LocalPostgres, database: str) -> None:
    """Undo what LocalPostgres (or a previous test) provisioned: an empty ``database``
    and no Tollgate role, as the postgres image is before its init scripts run."""
    admin = await asyncpg.connect(server.admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        for role in ("tollgate", "tollgate_owner", "tollgate_app"):
            await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()


async def _run_init_script(
    server: LocalPostgres, script: Path, database: str, passwords: dict[str, str]
) -> None:
    """What the image does: the script, as the superuser, with psql on PATH."""
    superuser = urlsplit(server.admin_url).username or "postgres"
    env = {
        "PATH": f"{postgres_bin_dir()}{os.pathsep}/usr/bin:/bin",
        "LC_ALL": "C",
        "POSTGRES_USER": superuser,
        "POSTGRES_DB": database,
        **passwords,
        **_libpq_env(server.admin_url),
    }
    status, output = await _run_script(script, env)
    assert status == 0, output


async def _require_passwords(server: LocalPostgres, roles: Iterable[str]) -> None:
    """Make the server check passwords (scram-sha-256, the image's rule for connections
    over the network) when ``roles`` connect over TCP; LocalPostgres trusts every local
    connection, which would make any password look right."""
    admin = await asyncpg.connect(server.admin_url)
    try:
        hba = Path(await admin.fetchval("SHOW hba_file"))
        loaded_before = await admin.fetchval("SELECT pg_conf_load_time()")
        rules = "".join(
            f"host all {role} {network} scram-sha-256\n"
            for role in roles
            for network in ("127.0.0.1/32", "::1/128")
        )
        # First in the file: the first matching line decides.
        hba.write_text(rules + hba.read_text())
        assert await admin.fetchval("SELECT pg_reload_conf()")
    finally:
        await admin.close()

    # A reload is a signal to the server; sessions started after it see the new rules.
    async def reloaded() -> bool:
        admin = await asyncpg.connect(server.admin_url)
        try:
            return bool(await admin.fetchval("SELECT pg_conf_load_time()") > loaded_before)
        finally:
            await admin.close()

    await eventually(reloaded, what="the server reloaded pg_hba.conf")


def _tcp(server: LocalPostgres) -> tuple[str, int]:
    """Where the login roles connect: the address of :attr:`LocalPostgres.url`."""
    url = urlsplit(server.url)
    assert url.hostname and url.port
    return url.hostname, url.port


async def _assert_logs_in(server: LocalPostgres, database: str, user: str, password: str) -> None:
    """``user`` logs in with ``password``, and not with anything else."""
    host, port = _tcp(server)
    conn = await asyncpg.connect(
        host=host, port=port, user=user, password=password, database=database
    )
    try:
        assert await conn.fetchval("SELECT current_user") == user
    finally:
        await conn.close()
    for wrong in (password + "x", password[:-1], ""):
        with pytest.raises(
            (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)
        ):
            await asyncpg.connect(
                host=host, port=port, user=user, password=wrong, database=database
            )


@pytest.fixture(scope="module")
async def app_postgres(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalPostgres]:
    """An embedded Postgres that checks the login roles' passwords, shared by the tests
    below; each starts by putting it back into the state the image starts from."""
    server = LocalPostgres(tmp_path_factory.mktemp("app-db") / "data", free_port(), durable=False)
    await server.start()
    try:
        await _require_passwords(server, LOGIN_ROLES)
        yield server
    finally:
        await server.stop()


async def test_app_postgres_init_script_on_a_real_postgres(
    compose: dict[str, Any], app_postgres: LocalPostgres
) -> None:
    """What the image does (POSTGRES_DB, then the init script as the superuser, with the
    passwords from .env) on an embedded server, then the worker's part: migrate as the
    owner, work as the app, each logging in with its URL's password."""
    server = app_postgres
    db_env = _env(compose["services"]["app-db"])
    (script,) = _init_scripts(compose["services"]["app-db"])
    owner, app = _urls(compose)
    database = db_env["POSTGRES_DB"]
    passwords = {name: db_env[name] for name in ("TOLLGATE_OWNER_PASSWORD", "TOLLGATE_PASSWORD")}

    await _as_the_image_leaves_it(server, database)
    await _run_init_script(server, script, database, passwords)

    admin = await asyncpg.connect(_with_database(server.admin_url, database))
    try:
        roles = await admin.fetch(
            "SELECT rolname, rolcanlogin AS login,"
            " rolsuper OR rolcreaterole OR rolcreatedb AS powerful,"
            " rolpassword LIKE 'SCRAM-SHA-256$%' AS hashed"
            " FROM pg_authid WHERE rolname = ANY($1::text[])",
            ["tollgate_owner", "tollgate_app", "tollgate"],
        )
        assert {r["rolname"]: (r["login"], r["powerful"]) for r in roles} == {
            "tollgate_owner": (True, False),
            "tollgate_app": (False, False),
            "tollgate": (True, False),
        }
        assert all(r["hashed"] for r in roles if r["login"])
        assert await admin.fetchval("SELECT pg_has_role('tollgate', 'tollgate_app', 'MEMBER')")
        assert not await admin.fetchval(
            "SELECT pg_has_role('tollgate_owner', 'tollgate_app', 'MEMBER')"
        )
        assert (
            await admin.fetchval(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1", database
            )
            == owner.username
        )
    finally:
        await admin.close()

    for url in (owner, app):
        assert url.username and url.password
        await _assert_logs_in(server, database, url.username, url.password)

    host, port = _tcp(server)

    def local(url: SplitResult) -> str:
        """The worker's URL, with this server's address instead of app-db:5432."""
        return f"postgresql://{url.username}:{url.password}@{host}:{port}/{database}"

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
            await conn.execute("ALTER TABLE orders DISABLE TRIGGER orders_guard")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM order_transitions")
    finally:
        await conn.close()


async def test_app_db_init_script_takes_any_password_literally(
    compose: dict[str, Any], app_postgres: LocalPostgres, tmp_path: Path
) -> None:
    """Quotes, semicolons, backslashes, shell and psql syntax in a password stay part of
    the password: nothing of it runs, in the shell or in SQL."""
    server = app_postgres
    db_env = _env(compose["services"]["app-db"])
    (script,) = _init_scripts(compose["services"]["app-db"])
    database = db_env["POSTGRES_DB"]
    marker = tmp_path / "ran"
    passwords = {
        "TOLLGATE_OWNER_PASSWORD": 'it\'s "x"; DROP ROLE postgres; -- \\',
        "TOLLGATE_PASSWORD": f"$(touch {marker}) `id` $HOME :'owner_password' :\"database\" \\'",
    }

    await _as_the_image_leaves_it(server, database)
    await _run_init_script(server, script, database, passwords)

    await _assert_logs_in(server, database, "tollgate_owner", passwords["TOLLGATE_OWNER_PASSWORD"])
    await _assert_logs_in(server, database, "tollgate", passwords["TOLLGATE_PASSWORD"])
    admin = await asyncpg.connect(server.admin_url)
    try:
        assert await admin.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = 'postgres'")
    finally:
        await admin.close()
    assert not marker.exists()


# --- the HTTP API ---------------------------------------------------------------------------


def test_the_api_serves_where_it_is_published_with_its_webhook_secret(
    raw: dict[str, Any], compose: dict[str, Any]
) -> None:
    api = compose["services"]["api"]
    command = api["command"]
    port = int(command[command.index("--port") + 1])
    assert f"127.0.0.1:{port}:{port}" in api["ports"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    env = _env(api)
    assert urlsplit(env["API_URL"]).port == port
    reference = REQUIRED_REFERENCE.pattern.replace(r"\{", r"\$\{")
    written = _env(raw["services"]["api"])["RECEIPT_WEBHOOK_SECRET"]
    assert re.fullmatch(reference, written), written
    # The same Temporal, database and task queue as the worker whose workflows it starts.
    worker = _env(compose["services"]["worker"])
    for name in ("TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE", "TASK_QUEUE", "DATABASE_URL"):
        assert env[name] == worker[name], name
    assert api["depends_on"]["worker"] == {"condition": "service_started"}
