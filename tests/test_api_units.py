"""The API's pieces on their own: signatures, token buckets, keys, problem types, ids and
request hashes, the OpenAPI document. No servers."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tollgate import access, errors
from tollgate.api.limits import Backlog, ClientLimits, StartSlots, TokenBucket
from tollgate.api.models import OrderCreate
from tollgate.api.problems import EDGE, Problem, all_kinds, kind_of, taxonomy
from tollgate.api.signatures import (
    SignatureError,
    SignatureExpired,
    check_secret,
    load_webhook_secrets,
    sign,
    verify,
)
from tollgate.api.store import entity_id_for, request_hash
from tollgate.ids import is_safe_id
from tollgate.settings import Settings

SECRET = "a" * 32
OLD = "b" * 40
BODY = b'{"receipt_id":"r-1"}'


# --- signatures ---------------------------------------------------------------------------


def test_a_signature_is_hmac_sha256_over_the_timestamp_and_the_body() -> None:
    header = sign(SECRET, BODY, 1_700_000_000)
    expected = hmac.new(SECRET.encode(), b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify(header, BODY, [SECRET], now=1_700_000_000, tolerance=300) == 1_700_000_000


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "v1=abc",
        "t=1700000000",
        "t=abc,v1=00",
        "t=\uff11\uff17,v1=00",  # full-width digits: isdigit() says yes, int() would too
        f"t=1700000000,v1={'0' * 64}",
    ],
)
def test_a_missing_malformed_or_wrong_signature_does_not_verify(header: str | None) -> None:
    with pytest.raises(SignatureError) as refused:
        verify(header, BODY, [SECRET], now=1_700_000_000, tolerance=300)
    assert not isinstance(refused.value, SignatureExpired)


def test_a_changed_body_or_timestamp_does_not_verify() -> None:
    header = sign(SECRET, BODY, 1_700_000_000)
    with pytest.raises(SignatureError):
        verify(header, BODY + b" ", [SECRET], now=1_700_000_000, tolerance=300)
    moved = header.replace("t=1700000000", "t=1700000001")
    with pytest.raises(SignatureError):
        verify(moved, BODY, [SECRET], now=1_700_000_000, tolerance=300)


def test_the_replay_window_holds_both_ways_at_its_edge() -> None:
    header = sign(SECRET, BODY, 1_000)
    assert verify(header, BODY, [SECRET], now=1_300, tolerance=300) == 1_000
    assert verify(header, BODY, [SECRET], now=700, tolerance=300) == 1_000
    for now in (1_301, 699):
        with pytest.raises(SignatureExpired):
            verify(header, BODY, [SECRET], now=now, tolerance=300)


def test_rotation_either_secret_and_either_signature_verifies() -> None:
    by_old = sign(OLD, BODY, 5)
    assert verify(by_old, BODY, [SECRET, OLD], now=5, tolerance=1) == 5
    with pytest.raises(SignatureError):
        verify(by_old, BODY, [SECRET], now=5, tolerance=1)
    both = by_old + "," + sign(SECRET, BODY, 5).split(",")[1]
    assert verify(both, BODY, [SECRET], now=5, tolerance=1) == 5


def test_the_webhook_secret_fails_closed(tmp_path: Path) -> None:
    none = Settings(state_dir=tmp_path, receipt_webhook_secret=None)
    assert load_webhook_secrets(none) == []
    with pytest.raises(ValueError, match="RECEIPT_WEBHOOK_SECRET") as weak:
        load_webhook_secrets(Settings(receipt_webhook_secret="short"))
    assert "short" not in str(weak.value)
    with pytest.raises(ValueError):
        check_secret("x" * 31, "here")
    got = load_webhook_secrets(
        Settings(receipt_webhook_secret=SECRET, receipt_webhook_old_secrets=f" {OLD} ,")
    )
    assert got == [SECRET, OLD]


def test_the_api_refuses_to_start_without_a_webhook_secret(tmp_path: Path) -> None:
    from tollgate.api.server import webhook_secrets_or_refuse

    with pytest.raises(errors.ConfigError, match="RECEIPT_WEBHOOK_SECRET"):
        webhook_secrets_or_refuse(Settings(state_dir=tmp_path))
    (tmp_path / "webhook.secret").write_text(SECRET + "\n")
    assert webhook_secrets_or_refuse(Settings(state_dir=tmp_path)) == [SECRET]


# --- limits -------------------------------------------------------------------------------


def test_a_token_bucket_grants_its_burst_then_says_when_the_next_token_comes() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.25) == pytest.approx(0.25)
    assert bucket.take(0.5) == 0.0
    assert bucket.take(10.0) == 0.0  # refilled to the burst, not beyond
    assert [bucket.take(10.0) for _ in range(3)][-1] == pytest.approx(0.5)


def test_client_limits_are_per_client_and_round_retry_after_up() -> None:
    now = [0.0]
    limits = ClientLimits(rate=0.5, burst=1, clock=lambda: now[0])
    assert limits.retry_after("a") is None
    assert limits.retry_after("a") == 2
    assert limits.retry_after("b") is None
    now[0] = 1.9
    assert limits.retry_after("a") == 1  # 0.1 s left: still at least a whole second
    now[0] = 2.0
    assert limits.retry_after("a") is None


def test_start_slots_never_wait_and_come_back() -> None:
    slots = StartSlots(2)
    assert slots.try_take() and slots.try_take()
    assert not slots.try_take()
    slots.give_back()
    assert slots.try_take()


async def test_the_backlog_counts_at_most_every_refresh_and_adds_its_own_starts() -> None:
    now = [0.0]
    counted = []

    async def count() -> dict[str, int]:
        counted.append(now[0])
        return {"order": 2}

    backlog = Backlog(3, count, refresh=0.5, clock=lambda: now[0])
    assert not await backlog.full("order") and await backlog.open("message") == 0
    backlog.started("order")
    assert await backlog.full("order")  # 2 counted + 1 started since
    now[0] = 0.4
    assert await backlog.full("order") and counted == [0.0]
    now[0] = 0.5  # the next count has seen that start (or its end)
    assert await backlog.open("order") == 2 and counted == [0.0, 0.5]


# --- keys ---------------------------------------------------------------------------------


def test_keys_parse_only_in_their_exact_shape() -> None:
    key = "tg_abcdefghij12_" + "A" * 43
    assert access.parse_key(key) == ("abcdefghij12", "A" * 43)
    assert access.key_id_of(key) == "abcdefghij12"
    for bad in (key[:-1], key + "A", "tg_ABCDEFGHIJ12_" + "A" * 43, key.replace("tg_", "xx_"), ""):
        assert access.parse_key(bad) is None, bad


def test_a_secret_matches_only_its_own_hash() -> None:
    stored = hashlib.sha256(b"s3cret").hexdigest()
    assert access.secret_matches("s3cret", stored)
    assert not access.secret_matches("s3cres", stored)
    assert not access.secret_matches("s3cret", None)


# --- problems -----------------------------------------------------------------------------


def test_every_error_of_the_taxonomy_has_a_stable_type_and_status() -> None:
    classes = taxonomy()
    assert errors.OrderNotFound in classes and errors.AlreadyExists in classes
    documented = re.findall(r"── (\w+)", errors.__doc__ or "")
    assert {c.__name__ for c in classes} == {"TollgateError", *documented}
    kinds = {c: kind_of(c) for c in classes}
    assert kinds[errors.OrderNotFound].type == "urn:tollgate:problem:order-not-found"
    assert kinds[errors.OrderNotFound].status == 404
    assert kinds[errors.InputError].status == 422
    assert kinds[errors.AlreadyExists].status == 409
    assert kinds[errors.IllegalTransition].status == 409
    assert kinds[errors.ProviderUnavailable].status == 503
    assert kinds[errors.PaymentDeclined].status == 422
    types = [k.type for k in all_kinds()]
    assert len(types) == len(set(types)), "every type names one kind of problem"
    assert all(400 <= k.status <= 599 for k in all_kinds())


def test_a_problem_document_is_rfc_9457() -> None:
    response = Problem.edge("rate-limited", "slow down", retry_after=3).response()
    assert response.status_code == 429
    assert response.media_type == "application/problem+json"
    assert response.headers["retry-after"] == "3"
    assert json.loads(bytes(response.body)) == {
        "type": EDGE["rate-limited"].type,
        "title": EDGE["rate-limited"].title,
        "status": 429,
        "detail": "slow down",
    }


# --- ids and hashes -----------------------------------------------------------------------


@given(st.text(min_size=1, max_size=255), st.text(min_size=1, max_size=64))
def test_derived_entity_ids_are_safe_and_distinct_per_kind(key: str, client: str) -> None:
    order = entity_id_for("order", client, key)
    message = entity_id_for("message", client, key)
    assert is_safe_id(order) and is_safe_id(message)
    assert order.startswith("o-") and message.startswith("m-") and order[2:] != message[2:]
    assert entity_id_for("order", client + "x", key) != order


def test_a_request_hash_ignores_how_the_json_was_spelled() -> None:
    a = OrderCreate.model_validate_json(
        '{"customer_id": "c", "items": [{"sku": "W", "quantity": 1}], "amount_cents": 5}'
    )
    b = OrderCreate.model_validate_json(
        '{"amount_cents":5.0,"items":[{"quantity":1,"sku":"W"}],"customer_id":"c","currency":"USD"}'
    )
    c = OrderCreate.model_validate_json(
        '{"customer_id": "c", "items": [{"sku": "W", "quantity": 2}], "amount_cents": 5}'
    )
    assert request_hash(a) == request_hash(b) != request_hash(c)


# --- the document -------------------------------------------------------------------------


def test_the_openapi_document_lists_every_route_and_its_problems() -> None:
    from tollgate.api.app import Api, operations
    from tollgate.api.spec import openapi_document

    ops = operations(Api.__new__(Api))
    doc = openapi_document(ops, title="t", version="1")
    assert doc["openapi"] == "3.1.0"
    routes = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert routes == {
        ("POST", "/v1/orders"),
        ("GET", "/v1/orders/{order_id}"),
        ("POST", "/v1/orders/{order_id}/cancel"),
        ("POST", "/v1/messages"),
        ("GET", "/v1/messages/{message_id}"),
        ("POST", "/v1/messages/{message_id}/recall"),
        ("POST", "/v1/devices"),
        ("GET", "/v1/devices/{device_id}"),
        ("DELETE", "/v1/devices/{device_id}"),
        ("POST", "/v1/receipts"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/v1/openapi.json"),
    }
    create = doc["paths"]["/v1/orders"]["post"]
    assert set(create["responses"]) == {
        "202",
        "400",
        "401",
        "409",
        "413",
        "415",
        "422",
        "429",
        "503",
    }
    assert create["responses"]["429"]["headers"]["Retry-After"]["required"] is True
    assert create["parameters"][0]["name"] == "Idempotency-Key"
    assert "OrderCreate" in doc["components"]["schemas"]
    assert "push_token" not in doc["components"]["schemas"]["DeviceView"]["properties"]
