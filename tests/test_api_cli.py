"""``starter.py apikey create|list|revoke``: a key printed once, stored as a hash,
listed without secrets, revoked for good; bad input exits 2 writing nothing."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest

from tests.conftest import Harness
from tests.test_cli import run_starter
from tollgate import access

pytestmark = pytest.mark.e2e


async def _apikey(h: Harness, *args: str) -> tuple[int, str, str]:
    run = await run_starter(h, "apikey", *args)
    return run.code, run.out, run.err


async def test_a_key_is_printed_once_stored_as_a_hash_listed_without_it_and_revoked(
    h: Harness,
) -> None:
    client = f"shop-{uuid.uuid4().hex[:8]}"
    code, out, err = await _apikey(h, "create", "--client", client, "--json")
    assert code == 0 and err == "", err
    created = json.loads(out)
    key, key_id = created["key"], created["key_id"]
    assert access.key_id_of(key) == key_id and created["client"] == client
    row = await h.pool.fetchrow("SELECT * FROM api_keys WHERE id = $1", key_id)
    assert row is not None
    secret = key.split("_", 2)[2]
    assert row["secret_sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in str(dict(row))
    assert await access.stored_key(h.pool, key_id) == (client, row["secret_sha256"])

    code, out, _ = await _apikey(h, "list", "--client", client)
    assert code == 0 and key_id in out and secret not in out

    code, out, _ = await _apikey(h, "revoke", key_id)
    assert code == 0 and "revoked" in out
    assert await access.stored_key(h.pool, key_id) is None
    code, out, _ = await _apikey(h, "revoke", key_id, "--json")  # again: harmless
    assert code == 0 and json.loads(out)["revoked_at"]


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["create", "--client", "has space"], 2),
        (["create", "--client", "a:b"], 2),
        (["create"], 2),
        (["revoke", "NOT-AN-ID"], 2),
        (["revoke", "abcdefghij12"], 1),
        (["list", "--client", "../etc"], 2),
    ],
)
async def test_bad_input_gets_one_line_and_writes_nothing(
    h: Harness, args: list[str], code: int
) -> None:
    before = await h.pool.fetchval("SELECT count(*) FROM api_keys")
    got, out, err = await _apikey(h, *args)
    assert got == code, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    assert await h.pool.fetchval("SELECT count(*) FROM api_keys") == before
