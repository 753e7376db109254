"""docker-compose.yml describes the same system the code expects (no engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tollgate.names import SEARCH_ATTRIBUTES
from tollgate.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


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


def test_app_postgres_matches_database_url(compose: dict[str, Any]) -> None:
    db_env = _env(compose["services"]["app-db"])
    url = _env(compose["services"]["worker"])["DATABASE_URL"]
    assert f"{db_env['POSTGRES_USER']}:{db_env['POSTGRES_PASSWORD']}@" in url
    assert url.endswith("/" + db_env["POSTGRES_DB"])
