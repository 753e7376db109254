"""Tests of the provider sandbox: ledger, idempotency, voids, fault injection, and the
push and email providers of message delivery.

Most tests talk to a fresh in-process app through ``httpx.ASGITransport``; the last one
runs the real uvicorn server on a socket to prove the sandbox works over the wire.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from tests.conftest import serve_in_process
from tollgate_dev.sandbox import (
    UNLIMITED_SKU,
    FaultSpec,
    Ledger,
    SandboxAdmin,
    SandboxAdminError,
    SandboxConfig,
    create_app,
)
from tollgate_dev.sandbox import __main__ as sandbox_main

CHARGES = "/payments/charges"
REFUNDS = "/payments/refunds"
RESERVATIONS = "/inventory/reservations"
RELEASES = "/inventory/releases"
PUSHES = "/push/notifications"
EMAILS = "/email/messages"
NO_TRAFFIC = {"payments": 0, "inventory": 0, "push": 0, "email": 0}


@pytest.fixture
def app() -> Starlette:
    return create_app()


def client_of(app: Starlette) -> httpx.AsyncClient:
    """A client of ``app`` in this process, through its ASGI interface (no socket)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sandbox")


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(app) as c:
        yield c


@pytest.fixture
async def admin(app: Starlette) -> AsyncIterator[SandboxAdmin]:
    async with SandboxAdmin("http://sandbox", transport=httpx.ASGITransport(app=app)) as a:
        yield a


def charge_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "order_id": "o-1",
        "customer_id": "c-1",
        "amount_cents": 2_500,
        "currency": "USD",
    }
    body.update(overrides)
    return body


async def post(client: httpx.AsyncClient, path: str, key: str, body: Any) -> httpx.Response:
    return await client.post(path, json=body, headers={"Idempotency-Key": key})


def created(response: httpx.Response, id_field: str, **fields: Any) -> dict[str, Any]:
    """Check that ``response`` made a new record: a 201 whose body is exactly ``fields``
    and the record's own id (in ``id_field``, whatever its value). Returns the body."""
    assert response.status_code == 201
    body: dict[str, Any] = response.json()
    assert body == {id_field: body[id_field], **fields}
    return body


async def charge(client: httpx.AsyncClient, key: str, **overrides: Any) -> httpx.Response:
    return await post(client, CHARGES, key, charge_body(**overrides))


async def reserve(
    client: httpx.AsyncClient, key: str, items: list[dict[str, Any]], order_id: str = "o-1"
) -> httpx.Response:
    return await post(client, RESERVATIONS, key, {"order_id": order_id, "items": items})


def push_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "token": "tok-1",
        "message_id": "m-1",
        "kind": "message",
        "payload": {"title": "Hi", "badge": 1},
    }
    body.update(overrides)
    return body


def email_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "to": "ada@example.com",
        "subject": "New message",
        "body": "You have a new message.",
        "message_id": "m-1",
    }
    body.update(overrides)
    return body


async def push(client: httpx.AsyncClient, key: str, **overrides: Any) -> httpx.Response:
    return await post(client, PUSHES, key, push_body(**overrides))


async def email(client: httpx.AsyncClient, key: str, **overrides: Any) -> httpx.Response:
    return await post(client, EMAILS, key, email_body(**overrides))


@dataclass(frozen=True)
class Endpoint:
    """A provider POST that records an entry in the ledger, as these tests drive it."""

    provider: str
    path: str
    body: Callable[..., dict[str, Any]]
    #: The ledger's list of its entries, and the id the answer and the entry share.
    entries: str
    id_field: str
    id_prefix: str
    #: What the answer says besides its id and idempotency key, for the default body.
    answer: dict[str, Any]
    #: What the ledger entry records besides its id, idempotency key and time.
    entry: dict[str, Any]

    async def post(self, client: httpx.AsyncClient, key: str, **overrides: Any) -> httpx.Response:
        return await post(client, self.path, key, self.body(**overrides))

    def of(self, ledger: Ledger) -> list[Any]:
        """This endpoint's entries in ``ledger``."""
        entries: list[Any] = getattr(ledger, self.entries)
        return entries


CHARGE = Endpoint(
    "payments",
    CHARGES,
    charge_body,
    "charges",
    "charge_id",
    "ch_",
    answer={
        "order_id": "o-1",
        "customer_id": "c-1",
        "amount_cents": 2_500,
        "currency": "USD",
        "status": "captured",
    },
    entry={"status": "captured"},
)
PUSH = Endpoint(
    "push",
    PUSHES,
    push_body,
    "pushes",
    "push_id",
    "pu_",
    answer={"token": "tok-1", "message_id": "m-1", "kind": "message", "status": "sent"},
    entry={
        "token": "tok-1",
        "message_id": "m-1",
        "kind": "message",
        "payload": push_body()["payload"],
    },
)
EMAIL = Endpoint(
    "email",
    EMAILS,
    email_body,
    "emails",
    "email_id",
    "em_",
    answer={"to": "ada@example.com", "message_id": "m-1", "status": "sent"},
    entry={
        "to": "ada@example.com",
        "subject": "New message",
        "body": "You have a new message.",
        "message_id": "m-1",
    },
)
ENDPOINTS = {"charge": CHARGE, "push": PUSH, "email": EMAIL}
#: A valid body for each provider POST, to show a rejected key was not used up.
VALID_BODIES = {endpoint.path: endpoint.body() for endpoint in ENDPOINTS.values()}
#: Every list of the ledger.
LEDGER_LISTS = tuple(Ledger.model_fields)


# --------------------------------------------------------------------------- every provider


@pytest.mark.parametrize("endpoint", list(ENDPOINTS.values()), ids=list(ENDPOINTS))
async def test_happy_path(
    client: httpx.AsyncClient, admin: SandboxAdmin, endpoint: Endpoint
) -> None:
    response = await endpoint.post(client, "k-happy")
    body = created(response, endpoint.id_field, **endpoint.answer, idempotency_key="k-happy")
    new_id = body[endpoint.id_field]
    assert new_id.startswith(endpoint.id_prefix)

    ledger = await admin.ledger()
    assert len(endpoint.of(ledger)) == 1
    entry = endpoint.of(ledger)[0]
    assert getattr(entry, endpoint.id_field) == new_id
    assert {name: getattr(entry, name) for name in endpoint.entry} == endpoint.entry
    assert entry.idempotency_key == "k-happy"
    assert entry.created_at.tzinfo is not None
    # and nothing else
    assert all(getattr(ledger, name) == [] for name in LEDGER_LISTS if name != endpoint.entries)


@pytest.mark.parametrize(("endpoint", "failures"), [(CHARGE, 3), (PUSH, 2)], ids=["charge", "push"])
async def test_fail_next_then_success_records_once(
    client: httpx.AsyncClient, admin: SandboxAdmin, endpoint: Endpoint, failures: int
) -> None:
    await admin.set_fault(endpoint.provider, FaultSpec(fail_next=failures))
    for _ in range(failures):
        failed = await endpoint.post(client, "k-retry")
        assert failed.status_code == 503
        assert failed.json()["error"] == "injected_fault"
        # "before" faults touch nothing.
        assert endpoint.of(await admin.ledger()) == []
    assert (await admin.faults())[endpoint.provider].fail_next == 0
    # Faults are per provider: email is unaffected meanwhile.
    assert (await email(client, "k-mail")).status_code == 201

    final = await endpoint.post(client, "k-retry")
    assert final.status_code == 201
    assert "Idempotent-Replayed" not in final.headers
    recorded = endpoint.of(await admin.ledger())
    assert [getattr(e, endpoint.id_field) for e in recorded] == [final.json()[endpoint.id_field]]
    assert (await admin.request_counts())[endpoint.provider] == failures + 1


@pytest.mark.parametrize("endpoint", [CHARGE, PUSH], ids=["charge", "push"])
async def test_fail_after_processing_loses_only_the_response(
    client: httpx.AsyncClient, admin: SandboxAdmin, endpoint: Endpoint
) -> None:
    """The provider acts, then the answer is lost: the retry gets the original back."""
    await admin.set_fault(endpoint.provider, FaultSpec(fail_next=1, fail_phase="after"))
    lost = await endpoint.post(client, "k-after")
    assert lost.status_code == 503
    assert lost.json()["error"] == "injected_fault"
    recorded = endpoint.of(await admin.ledger())
    assert len(recorded) == 1

    retry = await endpoint.post(client, "k-after")
    assert retry.status_code == 201
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json()[endpoint.id_field] == getattr(recorded[0], endpoint.id_field)
    assert len(endpoint.of(await admin.ledger())) == 1


# --------------------------------------------------------------------------- payments


async def test_health(client: httpx.AsyncClient, admin: SandboxAdmin) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert await admin.health() == {"status": "ok"}


async def test_retry_with_same_key_replays_without_a_second_charge(
    client: httpx.AsyncClient, admin: SandboxAdmin
) -> None:
    first = await charge(client, "k-1")
    # Same body, different key order and whitespace: still the same request.
    replay = await client.post(
        CHARGES,
        content=(
            b'{"currency": "USD", "amount_cents": 2500,\n "customer_id": "c-1", "order_id": "o-1"}'
        ),
        headers={"Idempotency-Key": "k-1", "Content-Type": "application/json"},
    )
    assert replay.status_code == 201
    assert replay.json() == first.json()
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert len((await admin.ledger()).charges) == 1


async def test_provider_post_without_idempotency_key_is_400(
    client: httpx.AsyncClient, admin: SandboxAdmin
) -> None:
    for path, body in [
        (CHARGES, charge_body()),
        (REFUNDS, {"order_id": "o-1", "charge_idempotency_key": "k"}),
        (RESERVATIONS, {"order_id": "o-1", "items": [{"sku": "WIDGET", "quantity": 1}]}),
        (RELEASES, {"order_id": "o-1", "reservation_idempotency_key": "k"}),
        (PUSHES, push_body()),
        (EMAILS, email_body()),
    ]:
        response = await client.post(path, json=body)
        assert response.status_code == 400, path
        assert response.json()["error"] == "invalid_request"
        assert "Idempotency-Key" in response.json()["message"]
    ledger = await admin.ledger()
    assert ledger.charges == [] and ledger.voids == [] and ledger.reservations == []
    assert ledger.pushes == [] and ledger.emails == []


async def test_declined_charge_replays_the_same_402(
    client: httpx.AsyncClient, admin: SandboxAdmin
) -> None:
    await admin.decline_customer("c-bad")
    first = await charge(client, "k-decl", customer_id="c-bad")
    assert first.status_code == 402
    assert first.json()["error"] == "card_declined"

    # The card is fixed now, but a retry of the declined request is the same request:
    # it must get the same decision, not a new one.
    await admin.allow_customer("c-bad")
    retry = await charge(client, "k-decl", customer_id="c-bad")
    assert retry.status_code == 402
    assert retry.json() == first.json()

    fresh = await charge(client, "k-decl-2", customer_id="c-bad")
    assert fresh.status_code == 201
    assert len((await admin.ledger()).charges) == 1


async def test_charge_over_card_limit_is_insufficient_funds() -> None:
    async with client_of(create_app(SandboxConfig(card_limit_cents=10_000))) as client:
        over = await charge(client, "k-over", amount_cents=10_001)
        assert over.status_code == 402
        assert over.json()["error"] == "insufficient_funds"
        at_limit = await charge(client, "k-at", amount_cents=10_000)
        assert at_limit.status_code == 201


async def test_declined_customers_from_config() -> None:
    async with client_of(create_app(SandboxConfig(declined_customers={"c-x"}))) as client:
        assert (await charge(client, "k", customer_id="c-x")).status_code == 402


async def test_same_key_different_body_is_conflict(
    client: httpx.AsyncClient, admin: SandboxAdmin
) -> None:
    assert (await charge(client, "k-c")).status_code == 201
    conflict = await charge(client, "k-c", amount_cents=9_999)
    assert conflict.status_code == 409
    assert conflict.json()["error"] == "idempotency_conflict"
    ledger = await admin.ledger()
    assert [c.amount_cents for c in ledger.charges] == [2_500]


async def test_idempotency_keys_are_scoped_per_endpoint(client: httpx.AsyncClient) -> None:
    assert (await charge(client, "shared")).status_code == 201
    # Same key on another provider and on another payments endpoint: independent.
    assert (await reserve(client, "shared", [{"sku": "WIDGET", "quantity": 1}])).status_code == 201
    refund = await post(
        client, REFUNDS, "shared", {"order_id": "o-1", "charge_idempotency_key": "shared"}
    )
    assert refund.status_code == 201


async def test_refund_before_charge_voids_and_late_charge_is_refused(
    client: httpx.AsyncClient, admin: SandboxAdmin
) -> None:
    refund = await post(
        client, REFUNDS, "k-ref", {"order_id": "o-1", "charge_idempotency_key": "k-late"}
    )
    assert refund.status_code == 200
    assert refund.json() == {
        "status": "voided",
        "refund_id": None,
        "charge_id": None,
        "amount_cents": 0,
    }

    late = await charge(client, "k-late")
    assert late.status_code == 409
    assert late.json()["error"] == "voided"

    # A second compensation attempt (new key) does not add a second tombstone.
    again = await post(
        client, REFUNDS, "k-ref-2", {"order_id": "o-1", "charge_idempotency_key": "k-late"}
    )
    assert again.json()["status"] == "voided"

    ledger = await admin.ledger()
    assert ledger.charges == []
    assert ledger.refunds == []
    assert len(ledger.voids) == 1
    void = ledger.voids[0]
    assert (void.provider, void.kind, void.idempotency_key, void.voided_by) == (
        "payments",
        "charge",
        "k-late",
        "k-ref",
    )


async def test_refund_twice_makes_one_refund(
    client: httpx.AsyncClient, admin: SandboxAdmin
) -> None:
    charged = (await charge(client, "k-ch")).json()
    body = {"order_id": "o-1", "charge_idempotency_key": "k-ch", "reason": "cancelled"}

    first = created(
        await post(client, REFUNDS, "k-r1", body),
        "refund_id",
        status="refunded",
        charge_id=charged["charge_id"],
        amount_cents=2_500,
    )
    # A different compensation attempt: 200 with the existing refund.
    second = await post(client, REFUNDS, "k-r2", body)
    assert second.status_code == 200
    assert second.json() == first
    # A retry of the first attempt: its stored 201.
    replay = await post(client, REFUNDS, "k-r1", body)
    assert replay.status_code == 201
    assert replay.json() == first

    ledger = await admin.ledger()
    assert len(ledger.refunds) == 1
    assert ledger.refunds[0].reason == "cancelled"
    assert ledger.refunds[0].charge_idempotency_key == "k-ch"
    assert ledger.charges[0].status == "refunded"


async def test_refund_of_another_orders_charge_is_refused(
    client: httpx.AsyncClient, admin: SandboxAdmin
) -> None:
    await charge(client, "k-ch", order_id="o-1")
    wrong = await post(
        client, REFUNDS, "k-r", {"order_id": "o-2", "charge_idempotency_key": "k-ch"}
    )
    assert wrong.status_code == 409
    assert wrong.json()["error"] == "order_mismatch"
    ledger = await admin.ledger()
    assert ledger.refunds == [] and ledger.charges[0].status == "captured"


# --------------------------------------------------------------------------- inventory


async def test_get_sku(client: httpx.AsyncClient) -> None:
    found = await client.get("/inventory/skus/GADGET")
    assert found.status_code == 200
    assert found.json() == {"sku": "GADGET", "available": 50}
    missing = await client.get("/inventory/skus/NOPE")
    assert missing.status_code == 404
    assert missing.json()["error"] == "unknown_sku"


async def test_reservation_success_decrements_stock(
    client: httpx.AsyncClient, admin: SandboxAdmin
) -> None:
    items = [{"sku": "WIDGET", "quantity": 3}, {"sku": "GIZMO", "quantity": 25}]
    response = await reserve(client, "k-res", items)
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "reserved"
    assert body["items"] == items
    assert body["idempotency_key"] == "k-res"
    stock = await admin.stock()
    assert stock["WIDGET"] == 97
    assert stock["GIZMO"] == 0
    ledger = await admin.ledger(order_id="o-1")
    assert [r.reservation_id for r in ledger.reservations] == [body["reservation_id"]]


async def test_reservation_is_all_or_nothing(
    client: httpx.AsyncClient, admin: SandboxAdmin
) -> None:
    before = await admin.stock()

    short = await reserve(
        client, "k-1", [{"sku": "WIDGET", "quantity": 5}, {"sku": "GADGET", "quantity": 51}]
    )
    assert short.status_code == 422
    assert short.json() == {
        "error": "out_of_stock",
        "sku": "GADGET",
        "requested": 51,
        "available": 50,
        "message": short.json()["message"],
    }

    unknown = await reserve(
        client, "k-2", [{"sku": "WIDGET", "quantity": 5}, {"sku": "NOPE", "quantity": 1}]
    )
    assert unknown.status_code == 422
    assert unknown.json()["error"] == "unknown_sku"
    assert unknown.json()["sku"] == "NOPE"

    # Two lines of the same sku add up: 20 + 10 GIZMO > 25.
    summed = await reserve(
        client, "k-3", [{"sku": "GIZMO", "quantity": 20}, {"sku": "GIZMO", "quantity": 10}]
    )
    assert summed.status_code == 422
    assert summed.json()["requested"] == 30

    soldout = await reserve(client, "k-4", [{"sku": "SOLDOUT", "quantity": 1}])
    assert soldout.json()["error"] == "out_of_stock"

    assert await admin.stock() == before
    assert (await admin.ledger()).reservations == []


async def test_release_restores_stock(client: httpx.AsyncClient, admin: SandboxAdmin) -> None:
    reserved = (await reserve(client, "k-res", [{"sku": "WIDGET", "quantity": 10}])).json()
    assert (await admin.stock())["WIDGET"] == 90

    body = {"order_id": "o-1", "reservation_idempotency_key": "k-res"}
    released = created(
        await post(client, RELEASES, "k-rel", body),
        "release_id",
        status="released",
        reservation_id=reserved["reservation_id"],
    )
    assert (await admin.stock())["WIDGET"] == 100

    # A second release does not give the stock back twice.
    again = await post(client, RELEASES, "k-rel-2", body)
    assert again.status_code == 200
    assert again.json() == released
    assert (await admin.stock())["WIDGET"] == 100

    ledger = await admin.ledger()
    assert ledger.reservations[0].status == "released"
    assert len(ledger.releases) == 1


async def test_release_before_reservation_voids(
    client: httpx.AsyncClient, admin: SandboxAdmin
) -> None:
    body = {"order_id": "o-1", "reservation_idempotency_key": "k-late"}
    voided = await post(client, RELEASES, "k-rel", body)
    assert voided.status_code == 200
    assert voided.json() == {"status": "voided", "release_id": None, "reservation_id": None}

    late = await reserve(client, "k-late", [{"sku": "WIDGET", "quantity": 1}])
    assert late.status_code == 409
    assert late.json()["error"] == "voided"
    assert (await admin.stock())["WIDGET"] == 100
    assert [v.kind for v in (await admin.ledger()).voids] == ["reservation"]


async def test_concurrent_reservations_do_not_oversell(
    client: httpx.AsyncClient, admin: SandboxAdmin
) -> None:
    # Latency before the lock makes all ten requests overlap.
    await admin.set_fault("inventory", FaultSpec(latency_ms=50))
    responses = await asyncio.gather(
        *(reserve(client, f"k-{i}", [{"sku": "GIZMO", "quantity": 3}]) for i in range(10))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] * 8 + [422] * 2
    assert (await admin.stock())["GIZMO"] == 1


async def test_the_load_sku_never_runs_out_until_an_admin_gives_it_a_quantity(
    client: httpx.AsyncClient, admin: SandboxAdmin
) -> None:
    before = await admin.stock()
    found = await client.get(f"/inventory/skus/{UNLIMITED_SKU}")
    assert found.json() == {"sku": UNLIMITED_SKU, "available": None}
    for n in range(3):
        items = [{"sku": UNLIMITED_SKU, "quantity": 1_000_000}, {"sku": "WIDGET", "quantity": 1}]
        assert (await reserve(client, f"k-{n}", items, order_id=f"o-{n}")).status_code == 201
    body = {"order_id": "o-0", "reservation_idempotency_key": "k-0"}
    assert (await post(client, RELEASES, "k-rel", body)).status_code == 201
    # Only the finite SKU moved; the unlimited one never enters the stock table.
    assert await admin.stock() == {**before, "WIDGET": before["WIDGET"] - 2}

    await admin.set_stock(UNLIMITED_SKU, 1)
    assert (
        await reserve(client, "k-9", [{"sku": UNLIMITED_SKU, "quantity": 2}])
    ).status_code == 422
    await admin.reset()
    assert (await client.get(f"/inventory/skus/{UNLIMITED_SKU}")).json()["available"] is None


async def test_concurrent_same_key_charges_once(
    client: httpx.AsyncClient, admin: SandboxAdmin
) -> None:
    await admin.set_fault("payments", FaultSpec(latency_ms=50))
    responses = await asyncio.gather(*(charge(client, "k-same") for _ in range(10)))
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["charge_id"] for r in responses}) == 1
    assert len((await admin.ledger()).charges) == 1


# --------------------------------------------------------------------------- push


async def test_push_payload_is_optional_and_every_kind_is_accepted(
    client: httpx.AsyncClient, admin: SandboxAdmin
) -> None:
    await push(client, "k-push")
    for kind in ("read_receipt", "read_revert"):
        bare = {k: v for k, v in push_body(kind=kind).items() if k != "payload"}
        answer = await post(client, PUSHES, f"k-{kind}", bare)
        assert answer.status_code == 201
        assert answer.json()["kind"] == kind
    assert [p.payload for p in (await admin.ledger()).pushes] == [push_body()["payload"], {}, {}]


async def test_push_retry_with_same_key_sends_once(
    client: httpx.AsyncClient, admin: SandboxAdmin
) -> None:
    first = await push(client, "k-same")
    # Same request with the payload's keys in another order: not a different body.
    replay = await push(client, "k-same", payload={"badge": 1, "title": "Hi"})
    assert replay.status_code == 201
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == first.json()

    ledger = await admin.ledger()
    assert [p.push_id for p in ledger.pushes] == [first.json()["push_id"]]

    conflict = await push(client, "k-same", kind="read_receipt")
    assert conflict.status_code == 409
    assert conflict.json()["error"] == "idempotency_conflict"
    assert len((await admin.ledger()).pushes) == 1


# --------------------------------------------------------------------------- email


async def test_email_limits_themselves_are_accepted(client: httpx.AsyncClient) -> None:
    """A 200-character subject and a 100 000-character body are fine; so is no body."""
    longest = await email(client, "k-long", subject="s" * 200, body="b" * 100_000)
    assert longest.status_code == 201
    assert (await email(client, "k-empty", body="")).status_code == 201


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("subject", "New message from sam\r\nBcc: attacker@example.com"),
        ("subject", "bell\x07"),
        ("to", "ada@example.com\nBcc: attacker@example.com"),
    ],
)
async def test_email_headers_with_line_breaks_are_refused(
    client: httpx.AsyncClient, admin: SandboxAdmin, field: str, value: str
) -> None:
    """As real providers do: a CR/LF in a header would let the sender write more headers."""
    response = await email(client, f"k-hdr-{field}-{len(value)}", **{field: value})
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"
    assert (await admin.ledger()).emails == []


async def test_email_retry_with_same_key_sends_once(
    client: httpx.AsyncClient, admin: SandboxAdmin
) -> None:
    first = await email(client, "k-same")
    replay = await email(client, "k-same")
    assert replay.status_code == 201
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == first.json()
    ledger = await admin.ledger()
    assert [e.email_id for e in ledger.emails] == [first.json()["email_id"]]


# --------------------------------------------------------------------------- refused recipients


@dataclass(frozen=True)
class RefusedRecipients:
    """An admin list of recipients a provider refuses: tokens of removed apps, addresses
    that bounce. ``add``, ``remove`` and ``listed`` are the admin client's methods."""

    endpoint: Endpoint
    field: str
    value: str
    add: Callable[[SandboxAdmin, str], Awaitable[None]]
    remove: Callable[[SandboxAdmin, str], Awaitable[None]]
    listed: Callable[[SandboxAdmin], Awaitable[list[str]]]
    #: The SandboxConfig field that seeds the list.
    config: str
    status: int
    error: str


UNREGISTERED = RefusedRecipients(
    PUSH,
    "token",
    "tok-gone",
    SandboxAdmin.unregister_token,
    SandboxAdmin.register_token,
    SandboxAdmin.unregistered_tokens,
    "unregistered_tokens",
    410,
    "unregistered",
)
BOUNCED = RefusedRecipients(
    EMAIL,
    "to",
    "gone@example.com",
    SandboxAdmin.bounce_address,
    SandboxAdmin.unbounce_address,
    SandboxAdmin.bounced_addresses,
    "bounced_addresses",
    422,
    "bounced",
)
REFUSED_RECIPIENTS = {"unregistered token": UNREGISTERED, "bounced address": BOUNCED}


@pytest.mark.parametrize("refused", list(REFUSED_RECIPIENTS.values()), ids=list(REFUSED_RECIPIENTS))
async def test_a_listed_recipient_is_refused_and_the_refusal_replays(
    client: httpx.AsyncClient, admin: SandboxAdmin, refused: RefusedRecipients
) -> None:
    endpoint, to = refused.endpoint, {refused.field: refused.value}
    await refused.add(admin, refused.value)
    assert await refused.listed(admin) == [refused.value]
    first = await endpoint.post(client, "k-refused", **to)
    assert first.status_code == refused.status
    assert first.json() == {
        "error": refused.error,
        refused.field: refused.value,
        "message": first.json()["message"],
    }

    # The app is reinstalled (the mailbox fixed), but the retry of the refused request
    # gets the same answer.
    await refused.remove(admin, refused.value)
    assert await refused.listed(admin) == []
    retry = await endpoint.post(client, "k-refused", **to)
    assert retry.status_code == refused.status
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json() == first.json()
    assert endpoint.of(await admin.ledger()) == []

    fresh = await endpoint.post(client, "k-fresh", **to)
    assert fresh.status_code == 201
    assert len(endpoint.of(await admin.ledger())) == 1


@pytest.mark.parametrize("refused", list(REFUSED_RECIPIENTS.values()), ids=list(REFUSED_RECIPIENTS))
async def test_listed_recipients_from_config(refused: RefusedRecipients) -> None:
    config = SandboxConfig(**{refused.config: {refused.value}})
    async with client_of(create_app(config)) as client:
        listed = await refused.endpoint.post(client, "k", **{refused.field: refused.value})
        assert listed.status_code == refused.status
        # anyone else is served
        assert (await refused.endpoint.post(client, "k2")).status_code == 201


# --------------------------------------------------------------------------- message ledger


async def test_ledger_filters_by_message(client: httpx.AsyncClient, admin: SandboxAdmin) -> None:
    await push(client, "p-1", message_id="m-1")
    await push(client, "p-1r", message_id="m-1", kind="read_receipt")
    await push(client, "p-2", message_id="m-2")
    await email(client, "e-1", message_id="m-1")
    await email(client, "e-2", message_id="m-2")
    await charge(client, "c-1", order_id="o-1")

    only_m1 = await admin.ledger(message_id="m-1")
    assert [(p.message_id, p.kind) for p in only_m1.pushes] == [
        ("m-1", "message"),
        ("m-1", "read_receipt"),
    ]
    assert [e.idempotency_key for e in only_m1.emails] == ["e-1"]
    # Order entries have no message: a message filter leaves them out.
    assert only_m1.charges == []

    # ...and the other way round.
    only_o1 = await admin.ledger(order_id="o-1")
    assert len(only_o1.charges) == 1
    assert only_o1.pushes == [] and only_o1.emails == []

    both = await admin.ledger(order_id="o-1", message_id="m-2")
    assert len(both.charges) == 1
    assert [p.idempotency_key for p in both.pushes] == ["p-2"]
    assert [e.idempotency_key for e in both.emails] == ["e-2"]

    assert (await admin.ledger(message_id="m-none")).pushes == []
    everything = await admin.ledger()
    assert (len(everything.pushes), len(everything.emails), len(everything.charges)) == (3, 2, 1)

    raw = await client.get("/admin/ledger", params={"message_id": "m-2"})
    assert [p["idempotency_key"] for p in raw.json()["pushes"]] == ["p-2"]


async def test_request_counts_for_push_and_email(
    client: httpx.AsyncClient, admin: SandboxAdmin
) -> None:
    await admin.set_fault("push", FaultSpec(fail_next=1))
    await push(client, "k")  # injected failure
    await push(client, "k")
    await push(client, "k")  # replay
    await client.post(PUSHES, json=push_body())  # no key
    await email(client, "k", to="nobody")  # invalid body
    await email(client, "k")
    # Admin calls are not provider traffic.
    await admin.unregister_token("tok-9")
    await admin.bounce_address("z@example.com")
    await admin.ledger(message_id="m-1")
    assert await admin.request_counts() == {"payments": 0, "inventory": 0, "push": 4, "email": 2}


async def test_reset_clears_push_and_email(client: httpx.AsyncClient, admin: SandboxAdmin) -> None:
    first = (await push(client, "k-p")).json()
    await email(client, "k-e")
    await admin.unregister_token("tok-1")
    await admin.bounce_address("ada@example.com")
    await admin.set_fault("email", FaultSpec(fail_next=5))

    await admin.reset()

    ledger = await admin.ledger()
    assert ledger.pushes == [] and ledger.emails == []
    assert await admin.unregistered_tokens() == []
    assert await admin.bounced_addresses() == []
    assert await admin.request_counts() == NO_TRAFFIC
    assert (await admin.faults())["email"] == FaultSpec()
    # Not a replay of the old answer, and the token / address work again.
    again = await push(client, "k-p")
    assert again.status_code == 201
    assert again.json()["push_id"] != first["push_id"]
    assert (await email(client, "k-e")).status_code == 201


async def test_reset_restores_configured_push_and_email_seeds() -> None:
    config = SandboxConfig(unregistered_tokens={"tok-x"}, bounced_addresses={"x@example.com"})
    app = create_app(config)
    async with SandboxAdmin("http://sandbox", transport=httpx.ASGITransport(app=app)) as admin:
        await admin.register_token("tok-x")
        await admin.unbounce_address("x@example.com")
        await admin.unregister_token("tok-y")
        await admin.reset()
        assert await admin.unregistered_tokens() == ["tok-x"]
        assert await admin.bounced_addresses() == ["x@example.com"]


# --------------------------------------------------------------------------- faults


async def test_fail_status_is_configurable(client: httpx.AsyncClient, admin: SandboxAdmin) -> None:
    await admin.set_fault("inventory", FaultSpec(fail_next=1, fail_status=429))
    assert (await client.get("/inventory/skus/WIDGET")).status_code == 429
    assert (await client.get("/inventory/skus/WIDGET")).status_code == 200


async def test_fail_rate_is_reproducible_from_the_seed() -> None:
    async def pattern(seed: int, rate: float) -> list[int]:
        async with client_of(create_app(SandboxConfig(seed=seed))) as client:
            await client.put("/admin/faults/inventory", json={"fail_rate": rate})
            return [(await client.get("/inventory/skus/WIDGET")).status_code for _ in range(40)]

    first = await pattern(7, 0.5)
    assert first == await pattern(7, 0.5)
    assert set(first) == {200, 503}
    assert first != await pattern(8, 0.5)
    assert set(await pattern(7, 1.0)) == {503}
    assert set(await pattern(7, 0.0)) == {200}


async def test_latency_after_lets_a_release_overtake_the_response(
    client: httpx.AsyncClient, admin: SandboxAdmin
) -> None:
    # The reservation lands at once but its answer is held back: meanwhile the caller's
    # compensation arrives. It must find (and release) the reservation, not void it.
    await admin.set_fault("inventory", FaultSpec(latency_ms=300, latency_phase="after"))
    pending = asyncio.create_task(reserve(client, "k-res", [{"sku": "WIDGET", "quantity": 4}]))
    deadline = time.monotonic() + 2
    while (await admin.stock())["WIDGET"] != 96:
        assert time.monotonic() < deadline, "reservation never reached the ledger"
        await asyncio.sleep(0.01)
    assert not pending.done()

    released = await post(
        client, RELEASES, "k-rel", {"order_id": "o-1", "reservation_idempotency_key": "k-res"}
    )
    assert released.status_code == 201
    assert released.json()["status"] == "released"

    reserved = await pending
    assert reserved.status_code == 201
    assert released.json()["reservation_id"] == reserved.json()["reservation_id"]
    assert (await admin.stock())["WIDGET"] == 100
    ledger = await admin.ledger()
    assert [r.status for r in ledger.reservations] == ["released"]
    assert ledger.voids == []


async def test_latency_before_lets_a_release_void_the_reservation(
    client: httpx.AsyncClient, admin: SandboxAdmin
) -> None:
    await admin.set_fault("inventory", FaultSpec(latency_ms=300))
    pending = asyncio.create_task(reserve(client, "k-res", [{"sku": "WIDGET", "quantity": 4}]))
    await asyncio.sleep(0.05)
    # Only the slow reservation keeps its latency; the release goes straight through.
    await admin.clear_faults("inventory")
    released = await post(
        client, RELEASES, "k-rel", {"order_id": "o-1", "reservation_idempotency_key": "k-res"}
    )
    assert released.json()["status"] == "voided"

    late = await pending
    assert late.status_code == 409
    assert late.json()["error"] == "voided"
    assert (await admin.stock())["WIDGET"] == 100
    assert (await admin.ledger()).reservations == []


async def test_fault_admin_api(client: httpx.AsyncClient, admin: SandboxAdmin) -> None:
    spec = FaultSpec(latency_ms=5, fail_rate=0.25, fail_status=502, fail_phase="after")
    assert await admin.set_fault("payments", spec) == spec
    faults = await admin.faults()
    assert faults == {
        "payments": spec,
        "inventory": FaultSpec(),
        "push": FaultSpec(),
        "email": FaultSpec(),
    }

    await admin.set_fault("inventory", FaultSpec(fail_next=2))
    await admin.clear_faults("payments")
    faults = await admin.faults()
    assert faults["payments"] == FaultSpec()
    assert faults["inventory"].fail_next == 2

    await admin.clear_faults()
    assert all(f == FaultSpec() for f in (await admin.faults()).values())

    with pytest.raises(SandboxAdminError) as unknown:
        await admin.set_fault("carrier-pigeon", FaultSpec())
    assert unknown.value.status_code == 404
    assert unknown.value.body["error"] == "unknown_provider"

    bad = await client.put("/admin/faults/payments", json={"fail_rate": 1.5})
    assert bad.status_code == 400
    assert "fail_rate" in bad.json()["message"]
    typo = await client.put("/admin/faults/payments", json={"fail_nxt": 1})
    assert typo.status_code == 400
    assert "fail_nxt" in typo.json()["message"]


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (CHARGES, charge_body(amount_cents="lots"), "amount_cents"),
        (CHARGES, charge_body(amount_cents=0), "amount_cents"),
        (CHARGES, charge_body(amount_cents=12.5), "amount_cents"),
        (CHARGES, charge_body(currency="usd"), "currency"),
        (CHARGES, {k: v for k, v in charge_body().items() if k != "customer_id"}, "customer_id"),
        (CHARGES, charge_body(amount=1), "amount"),
        (REFUNDS, {"order_id": "o-1"}, "charge_idempotency_key"),
        (RESERVATIONS, {"order_id": "o-1", "items": []}, "items"),
        (
            RESERVATIONS,
            {"order_id": "o-1", "items": [{"sku": "WIDGET", "quantity": 0}]},
            "items.0.quantity",
        ),
        (RELEASES, {"reservation_idempotency_key": "k"}, "order_id"),
        (PUSHES, push_body(token=""), "token"),
        (PUSHES, push_body(token="t" * 513), "token"),
        (PUSHES, push_body(kind="ping"), "kind"),
        (PUSHES, push_body(payload=["not", "an", "object"]), "payload"),
        (PUSHES, {k: v for k, v in push_body().items() if k != "message_id"}, "message_id"),
        (PUSHES, push_body(badge=3), "badge"),
        (EMAILS, email_body(to="ada.example.com"), "to"),
        (EMAILS, email_body(subject=""), "subject"),
        (EMAILS, email_body(subject="s" * 201), "subject"),
        (EMAILS, email_body(body="b" * 100_001), "body"),
        (EMAILS, {k: v for k, v in email_body().items() if k != "message_id"}, "message_id"),
        (EMAILS, email_body(cc="bob@example.com"), "cc"),
    ],
)
async def test_invalid_body_names_the_field(
    client: httpx.AsyncClient, admin: SandboxAdmin, path: str, body: Any, field: str
) -> None:
    response = await post(client, path, "k-invalid", body)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert field in response.json()["message"]
    assert field in response.json()["fields"]
    # Nothing was stored: the corrected request with the same key goes through.
    if path in VALID_BODIES:
        assert (await post(client, path, "k-invalid", VALID_BODIES[path])).status_code == 201


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    for content in (b"{not json", b"", b"[1, 2]"):
        response = await client.post(CHARGES, content=content, headers={"Idempotency-Key": "k"})
        assert response.status_code == 400, content
        assert response.json()["error"] == "invalid_request"


async def test_unknown_route_is_json_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/payments/nope")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    wrong_method = await client.get(CHARGES)
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"] == "method_not_allowed"


# --------------------------------------------------------------------------- admin


async def test_request_counts(client: httpx.AsyncClient, admin: SandboxAdmin) -> None:
    assert await admin.request_counts() == NO_TRAFFIC
    await admin.set_fault("payments", FaultSpec(fail_next=1))
    await charge(client, "k")  # injected failure: still reached the provider
    await charge(client, "k")
    await charge(client, "k")  # replay
    await client.post(CHARGES, json=charge_body())  # no key: reached it too
    await client.get("/inventory/skus/WIDGET")
    await client.get("/inventory/skus/NOPE")
    # Admin calls are not provider traffic.
    await admin.stock()
    await admin.ledger()
    assert await admin.request_counts() == {"payments": 4, "inventory": 2, "push": 0, "email": 0}


async def test_stock_admin(client: httpx.AsyncClient, admin: SandboxAdmin) -> None:
    await admin.set_stock("NEW-SKU", 3)
    await admin.set_stock("WIDGET", 1)
    stock = await admin.stock()
    assert stock["NEW-SKU"] == 3 and stock["WIDGET"] == 1
    assert (await reserve(client, "k", [{"sku": "NEW-SKU", "quantity": 3}])).status_code == 201
    with pytest.raises(ValueError):
        await admin.set_stock("WIDGET", -1)  # refused client-side by the shared model
    negative = await client.put("/admin/stock/WIDGET", json={"quantity": -1})
    assert negative.status_code == 400
    assert "quantity" in negative.json()["message"]


async def test_ledger_filters_by_order(client: httpx.AsyncClient, admin: SandboxAdmin) -> None:
    await charge(client, "k-a", order_id="o-a")
    await charge(client, "k-b", order_id="o-b")
    await reserve(client, "r-b", [{"sku": "WIDGET", "quantity": 1}], order_id="o-b")
    await post(client, REFUNDS, "x", {"order_id": "o-c", "charge_idempotency_key": "k-c"})

    only_b = await admin.ledger(order_id="o-b")
    assert [c.order_id for c in only_b.charges] == ["o-b"]
    assert len(only_b.reservations) == 1
    assert only_b.voids == []
    assert len((await admin.ledger(order_id="o-c")).voids) == 1
    everything = await admin.ledger()
    assert len(everything.charges) == 2


async def test_reset_restores_the_start(client: httpx.AsyncClient, admin: SandboxAdmin) -> None:
    first = (await charge(client, "k")).json()
    await reserve(client, "r", [{"sku": "WIDGET", "quantity": 7}])
    await admin.set_stock("EXTRA", 1)
    await admin.decline_customer("c-2")
    await admin.set_fault("payments", FaultSpec(latency_ms=1))

    await admin.reset()

    assert await admin.stock() == {"WIDGET": 100, "GADGET": 50, "GIZMO": 25, "SOLDOUT": 0}
    ledger = await admin.ledger()
    assert ledger.charges == [] and ledger.reservations == []
    assert await admin.request_counts() == NO_TRAFFIC
    assert (await admin.faults())["payments"] == FaultSpec()
    assert (await charge(client, "k2", customer_id="c-2")).status_code == 201
    # Stored answers are gone too: the old key makes a new charge, not a replay.
    again = await charge(client, "k")
    assert again.status_code == 201
    assert again.json()["charge_id"] != first["charge_id"]


def test_main_reads_seed_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run(app: Starlette, **kwargs: Any) -> None:
        seen.update(kwargs, config=app.state.sandbox.config)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setenv("SANDBOX_SEED", "42")
    sandbox_main.main(["--port", "19999"])
    assert seen["config"].seed == 42
    assert (seen["host"], seen["port"], seen["log_level"]) == ("127.0.0.1", 19999, "warning")
    sandbox_main.main(["--seed", "3"])
    assert seen["config"].seed == 3


# --------------------------------------------------------------------------- real server


async def test_real_server_over_a_socket() -> None:
    """Hang longer than the client's timeout; the refund voids the key; the late charge
    lands after the client gave up and is refused."""
    async with (
        serve_in_process(create_app()) as url,
        SandboxAdmin(url) as admin,
        httpx.AsyncClient(base_url=url, timeout=0.2) as client,
    ):
        assert await admin.health() == {"status": "ok"}
        await admin.set_fault("payments", FaultSpec(hang_ms=500))
        with pytest.raises(httpx.TimeoutException):
            await charge(client, "k-hung")

        await admin.clear_faults()
        refund = await post(
            client, REFUNDS, "k-comp", {"order_id": "o-1", "charge_idempotency_key": "k-hung"}
        )
        assert refund.json()["status"] == "voided"

        # Well past the hang: the abandoned charge has been processed (and refused).
        await asyncio.sleep(1.0)
        retry = await charge(client, "k-hung")
        assert retry.status_code == 409
        assert retry.json()["error"] == "voided"
        assert retry.headers.get("Idempotent-Replayed") == "true"

        ledger = await admin.ledger()
        assert ledger.charges == []
        assert [v.idempotency_key for v in ledger.voids] == ["k-hung"]
        assert (await admin.request_counts())["payments"] == 3
