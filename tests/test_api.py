"""The HTTP API end to end: real uvicorn on a socket, httpx, the session's Temporal dev
server, Postgres, sandbox and an in-process worker (the ``h`` fixture).

Orders: create, the idempotent replay and the conflict, ``?wait=charged``, reads,
cancel, ownership. Backpressure: the token bucket's 429 and its Retry-After, the bound
on creates in flight, 413, and 503 with nothing half-written when Temporal or Postgres
cannot be reached. Messages, devices and signed receipts. Metrics and health.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from temporalio.client import Client
from temporalio.service import RPCError

from tests.api_support import ServedApi, serve_api
from tests.conftest import Harness
from tests.waiting import eventually
from tollgate import access
from tollgate.api.store import entity_id_for
from tollgate.messages.states import MessageStatus
from tollgate.names import order_workflow_id
from tollgate.orders.states import OrderStatus
from tollgate.providers.client import build_http_client
from tollgate.settings import Settings
from tollgate.temporal import connect
from tollgate.worker import build_worker
from tollgate_dev.sandbox import FaultSpec
from tollgate_dev.stack import free_port

pytestmark = pytest.mark.e2e

PROBLEM = "application/problem+json"


def order_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "customer_id": f"cust-{uuid.uuid4().hex[:8]}",
        "items": [{"sku": "WIDGET", "quantity": 1}],
        "amount_cents": 1250,
        "currency": "USD",
    }
    body.update(overrides)
    return body


def new_key() -> str:
    return f"key-{uuid.uuid4().hex}"


async def create_order(
    api: ServedApi, body: dict[str, Any], key: str, *, wait: bool = False, auth: str | None = None
) -> httpx.Response:
    return await api.http.post(
        "/v1/orders" + ("?wait=charged" if wait else ""),
        json=body,
        headers={**api.auth(auth), "Idempotency-Key": key},
    )


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem: dict[str, Any] = response.json()
    assert problem["type"] == f"urn:tollgate:problem:{slug}", problem
    assert problem["status"] == status
    return problem


async def workflow_exists(client: Client, workflow_id: str) -> bool:
    try:
        await client.get_workflow_handle(workflow_id).describe()
    except RPCError:
        return False
    return True


# --- orders: idempotency --------------------------------------------------------------------


async def test_the_same_key_and_body_return_the_same_order_and_start_one_workflow(
    h: Harness,
) -> None:
    async with serve_api(h) as api:
        body, key = order_body(), new_key()
        first = await create_order(api, body, key)
        assert first.status_code == 202, first.text
        order_id = first.json()["id"]
        assert first.headers["location"] == f"/v1/orders/{order_id}"
        assert "idempotent-replayed" not in first.headers
        # The storefront's connection dropped; it sends the same request again, with the
        # keys of the body in another order.
        again = await create_order(api, dict(reversed(list(body.items()))), key)
        assert again.status_code == 202, again.text
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == order_id
        assert again.headers["location"] == first.headers["location"]

        result = await h.service.handle(order_id).result()
        assert result.status is OrderStatus.COMPLETED
        third = await create_order(api, body, key)
        assert third.json()["status"] == "COMPLETED", "the replay shows the current state"
        assert await h.pool.fetchval("SELECT count(*) FROM orders WHERE id = $1", order_id) == 1
        ledger = await h.sandbox.ledger(order_id)
        assert len(ledger.charges) == 1


async def test_the_same_key_with_another_body_is_refused_naming_the_conflict(h: Harness) -> None:
    async with serve_api(h) as api:
        key = new_key()
        first = await create_order(api, order_body(amount_cents=1000), key)
        assert first.status_code == 202
        order_id = first.json()["id"]
        other = await create_order(api, order_body(amount_cents=2000), key)
        problem = assert_problem(other, 409, "idempotency-key-conflict")
        assert order_id in problem["detail"] and key in problem["detail"]
        row = await h.service.row(order_id)
        assert row.amount_cents == 1000
        # The same key sent to another route is another request too.
        message = await api.http.post(
            "/v1/messages",
            json={
                "sender_id": "sam",
                "recipient_id": "bob",
                "recipient_email": "bob@example.com",
                "body": "hi",
            },
            headers={**api.auth(), "Idempotency-Key": key},
        )
        assert_problem(message, 409, "idempotency-key-conflict")


async def test_concurrent_requests_with_one_key_make_one_order(h: Harness) -> None:
    async with serve_api(h) as api:
        body, key = order_body(), new_key()
        answers = await asyncio.gather(*(create_order(api, body, key) for _ in range(5)))
        assert {a.status_code for a in answers} == {202}, [a.text for a in answers]
        assert len({a.json()["id"] for a in answers}) == 1
        assert sum(1 for a in answers if "idempotent-replayed" not in a.headers) == 1
        order_id = answers[0].json()["id"]
        assert (
            await h.pool.fetchval(
                "SELECT count(*) FROM api_idempotency_keys WHERE entity_id = $1", order_id
            )
            == 1
        )


async def test_a_retry_after_a_lost_commit_finds_the_order_its_workflow_recorded(
    h: Harness,
) -> None:
    """The first attempt's workflow started but its transaction did not commit (no row,
    no key). Until the workflow's first activity records the row, a retry is told to
    come back (503); then it gets the order, and no second one is started."""
    async with serve_api(h) as api:
        body, key = order_body(), new_key()
        order_id = entity_id_for("order", api.client_id, key)
        # The lost attempt: the workflow alone, on a queue no worker polls yet.
        parked = h.order(
            order_id=order_id,
            client_id=api.client_id,
            customer_id=body["customer_id"],
            items=body["items"],
            amount_cents=body["amount_cents"],
        )
        idle_queue = f"idle-{uuid.uuid4().hex[:8]}"
        await h.client.start_workflow(
            "OrderWorkflow", parked, id=order_workflow_id(order_id), task_queue=idle_queue
        )
        early = await create_order(api, body, key)
        problem = assert_problem(early, 503, "still-starting")
        assert int(early.headers["retry-after"]) >= 1
        assert "key" in problem["detail"]
        assert await h.pool.fetchval("SELECT count(*) FROM orders WHERE id = $1", order_id) == 0

        # A worker comes for that queue: the workflow records the row itself.
        async with (
            build_http_client(h.settings) as http,
            build_worker(h.client, h.settings, h.pool, http, task_queue=idle_queue),
        ):
            await h.client.get_workflow_handle(order_workflow_id(order_id)).result()
        later = await create_order(api, body, key)
        assert later.status_code == 202, later.text
        assert later.json()["id"] == order_id and later.json()["status"] == "COMPLETED"
        assert (await h.service.row(order_id)).client_id == api.client_id
        changed = await create_order(api, order_body(), key)
        assert_problem(changed, 409, "idempotency-key-conflict")


# --- orders: wait=charged, reads, cancel, ownership ----------------------------------------


async def test_wait_charged_answers_once_charged_while_the_checkout_goes_on(h: Harness) -> None:
    async with serve_api(h) as api:
        reply = await create_order(api, order_body(), new_key(), wait=True)
        assert reply.status_code == 202, reply.text
        assert reply.json()["status"] in ("RESERVING", "COMPLETED")
        order_id = reply.json()["id"]
        assert len((await h.sandbox.ledger(order_id)).charges) == 1
        assert (await h.service.handle(order_id).result()).status is OrderStatus.COMPLETED


async def test_wait_charged_does_not_wait_for_the_first_workflow_task_to_time_out(
    h: Harness,
) -> None:
    """The promise: an answer at most API_WAIT_SECONDS after the start. Sent with the
    start (update-with-start), the update held the row's transaction while the
    workflow's first task waited for that row, until the task's heartbeat at 8 s, so a
    5 s wait answered after 8.5 s. Sent after the commit, it answers once charged."""
    wait = 5.0
    async with serve_api(h, api_wait_seconds=wait) as api:
        began = time.monotonic()
        reply = await create_order(api, order_body(), new_key(), wait=True)
        took = time.monotonic() - began
    assert reply.status_code == 202, reply.text
    assert reply.json()["status"] in ("RESERVING", "COMPLETED"), reply.json()
    # The bound is the API's own (plus a margin for a loaded machine), not a benchmark.
    assert took < wait + 1.5, f"answered after {took:.1f} s, past the {wait:.0f} s wait"


async def test_wait_charged_tells_a_declined_card_at_once(h: Harness) -> None:
    async with serve_api(h) as api:
        body = order_body()
        await h.sandbox.decline_customer(body["customer_id"])
        reply = await create_order(api, body, new_key(), wait=True)
        assert reply.status_code == 202, reply.text
        order = reply.json()
        assert order["status"] in ("COMPENSATING", "FAILED"), order
        assert (
            "declined" in (order["failure_reason"] or "").lower()
            or order["status"] == "COMPENSATING"
        )
        assert (await h.service.handle(order["id"]).result()).status is OrderStatus.FAILED


async def test_get_order_shows_row_version_transitions_and_workflow(h: Harness) -> None:
    async with serve_api(h) as api:
        created = await create_order(api, order_body(), new_key())
        order_id = created.json()["id"]
        await h.service.handle(order_id).result()
        reply = await api.http.get(f"/v1/orders/{order_id}", headers=api.auth())
        assert reply.status_code == 200
        order = reply.json()
        assert order["status"] == "COMPLETED" and order["version"] == 5
        path = [(t["from_status"], t["to_status"]) for t in order["transitions"]]
        assert path == [
            (None, "PENDING"),
            ("PENDING", "VALIDATING"),
            ("VALIDATING", "CHARGING"),
            ("CHARGING", "RESERVING"),
            ("RESERVING", "COMPLETED"),
        ]
        assert order["transitions"][0]["actor"] == f"api:{api.client_id}"
        assert order["workflow"]["id"] == order_workflow_id(order_id)
        assert order["workflow"]["status"] in ("RUNNING", "COMPLETED")


async def test_another_clients_order_is_404_like_one_that_does_not_exist(h: Harness) -> None:
    async with serve_api(h) as api:
        created = await create_order(api, order_body(), new_key())
        order_id = created.json()["id"]
        _, other_key = await api.new_client()
        theirs = await api.http.get(f"/v1/orders/{order_id}", headers=api.auth(other_key))
        missing = await api.http.get("/v1/orders/no-such-order", headers=api.auth(other_key))
        assert_problem(theirs, 404, "order-not-found")
        assert_problem(missing, 404, "order-not-found")
        cancel = await api.http.post(
            f"/v1/orders/{order_id}/cancel", json={}, headers=api.auth(other_key)
        )
        assert_problem(cancel, 404, "order-not-found")
        assert (await h.service.row(order_id)).status is not OrderStatus.CANCELLING
        # An order the CLI created belongs to no client.
        cli = h.order()
        await h.service.create(cli)
        from_cli = await api.http.get(f"/v1/orders/{cli.order_id}", headers=api.auth())
        assert_problem(from_cli, 404, "order-not-found")


async def test_cancel_records_first_then_signals_and_a_finished_order_is_409(h: Harness) -> None:
    async with serve_api(h) as api:
        await h.sandbox.set_fault("inventory", FaultSpec(latency_ms=1500))
        created = await create_order(api, order_body(), new_key())
        order_id = created.json()["id"]
        cancel = await api.http.post(
            f"/v1/orders/{order_id}/cancel", json={"reason": "changed my mind"}, headers=api.auth()
        )
        assert cancel.status_code == 202, cancel.text
        assert cancel.json()["status"] == "CANCELLING" and cancel.json()["signalled"]
        result = await h.service.handle(order_id).result()
        assert result.status is OrderStatus.CANCELLED
        await h.sandbox.clear_faults()
        again = await api.http.post(f"/v1/orders/{order_id}/cancel", json={}, headers=api.auth())
        problem = assert_problem(again, 409, "illegal-transition")
        assert "CANCELLED" in problem["detail"]


# --- who may call ----------------------------------------------------------------------------


async def test_no_key_a_wrong_key_and_a_revoked_key_get_401(h: Harness) -> None:
    async with serve_api(h, api_key_cache_seconds=0) as api:
        body = order_body()
        for headers in (
            {},
            {"Authorization": "Bearer nonsense"},
            {"Authorization": f"Bearer {api.key[:-4]}AAAA"},
            {"Authorization": api.key},
        ):
            reply = await api.http.post(
                "/v1/orders", json=body, headers={**headers, "Idempotency-Key": new_key()}
            )
            assert_problem(reply, 401, "unauthenticated")
            assert reply.headers["www-authenticate"].startswith("Bearer")
        key_id = access.key_id_of(api.key)
        assert key_id is not None
        await access.revoke_key(h.pool, key_id)
        revoked = await api.http.get("/v1/orders/x", headers=api.auth())
        assert_problem(revoked, 401, "unauthenticated")
        assert (
            await h.pool.fetchval(
                "SELECT count(*) FROM orders WHERE customer_id = $1", body["customer_id"]
            )
            == 0
        )


async def test_a_create_without_an_idempotency_key_is_400_and_writes_nothing(h: Harness) -> None:
    async with serve_api(h) as api:
        body = order_body()
        reply = await api.http.post("/v1/orders", json=body, headers=api.auth())
        assert_problem(reply, 400, "idempotency-key-required")
        bad = await api.http.post(
            "/v1/orders", json=body, headers={**api.auth(), "Idempotency-Key": "has space"}
        )
        assert_problem(bad, 400, "malformed-request")
        invalid = await create_order(
            api, order_body(items=[{"sku": "NOPE", "quantity": 1}]), new_key()
        )
        problem = assert_problem(invalid, 422, "input-error")
        assert "NOPE" in problem["detail"]
        assert (
            await h.pool.fetchval(
                "SELECT count(*) FROM orders WHERE customer_id = $1", body["customer_id"]
            )
            == 0
        )


# --- backpressure and failure --------------------------------------------------------------


async def test_a_burst_gets_429_with_a_retry_after_that_when_honoured_succeeds(h: Harness) -> None:
    async with serve_api(h, api_client_rate=1.0, api_client_burst=2) as api:
        burst = [await api.http.get("/v1/orders/none", headers=api.auth()) for _ in range(4)]
        assert [r.status_code for r in burst[:2]] == [404, 404]
        refused = burst[2]
        assert_problem(refused, 429, "rate-limited")
        retry_after = int(refused.headers["retry-after"])
        assert 1 <= retry_after <= 2
        assert burst[3].status_code == 429
        # Honour it (this wait is the behaviour under test), then the same request goes in.
        await asyncio.sleep(retry_after)
        body, key = order_body(), new_key()
        created = await create_order(api, body, key)
        assert created.status_code == 202, created.text
        metrics = (await api.http.get("/metrics")).text
        assert "tollgate_api_refusals_total{" in metrics and 'reason="rate_limited"' in metrics


async def test_creates_beyond_the_in_flight_bound_get_429(h: Harness) -> None:
    async with serve_api(h, api_max_starts_in_flight=1) as api:
        # The start's SKU check waits on a slow inventory: the one slot stays taken.
        await h.sandbox.set_fault("inventory", FaultSpec(latency_ms=1500))
        first = asyncio.create_task(create_order(api, order_body(), new_key()))
        await eventually(lambda: api.api.slots.in_flight == 1)
        second = await create_order(api, order_body(), new_key())
        assert_problem(second, 429, "overloaded")
        assert int(second.headers["retry-after"]) >= 1
        assert (await first).status_code == 202
        await h.sandbox.clear_faults()
        assert api.api.slots.in_flight == 0
        third = await create_order(api, order_body(), new_key())
        assert third.status_code == 202


async def test_creates_past_the_backlog_bound_get_429_until_lifecycles_end(h: Harness) -> None:
    async with serve_api(h) as api:
        # The bound counts every order under way in the database; earlier tests may have
        # left some (their workers are gone, so the count holds still): one more is full.
        backlog = api.api.backlog
        already = await backlog.open("order")
        backlog.limit = already + 1
        await h.sandbox.set_fault("payments", FaultSpec(latency_ms=1500))
        first = await create_order(api, order_body(), new_key())
        assert first.status_code == 202
        second = await create_order(api, order_body(), new_key())
        problem = assert_problem(second, 429, "overloaded")
        assert "API_MAX_OPEN_LIFECYCLES" in problem["detail"]
        assert int(second.headers["retry-after"]) == 1
        await h.service.handle(first.json()["id"]).result()
        await h.sandbox.clear_faults()
        await eventually(lambda: _backlog_at(api, already))
        third = await create_order(api, order_body(), new_key())
        assert third.status_code == 202, third.text
        metrics = (await api.http.get("/metrics")).text
        assert 'reason="backlog"' in metrics


async def _backlog_at(api: ServedApi, count: int) -> bool:
    return await api.api.backlog.open("order") == count


async def test_a_body_over_the_limit_is_413(h: Harness) -> None:
    async with serve_api(h, api_max_body_bytes=2048) as api:
        body = order_body(customer_id="x" * 3000)
        reply = await create_order(api, body, new_key())
        assert_problem(reply, 413, "body-too-large")

        async def chunks() -> Any:
            for _ in range(10):
                yield b" " * 1024

        streamed = await api.http.post(
            "/v1/orders",
            content=chunks(),
            headers={
                **api.auth(),
                "Idempotency-Key": new_key(),
                "Content-Type": "application/json",
            },
        )
        assert_problem(streamed, 413, "body-too-large")


async def test_temporal_unreachable_is_503_and_leaves_no_row(
    h: Harness, settings: Settings
) -> None:
    dead = settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"})
    temporal = await connect(dead, lazy=True)
    async with serve_api(h, temporal=temporal, api_start_timeout_seconds=3) as api:
        body, key = order_body(), new_key()
        reply = await create_order(api, body, key)
        assert_problem(reply, 503, "unavailable")
        assert int(reply.headers["retry-after"]) >= 1
        order_id = entity_id_for("order", api.client_id, key)
        assert await h.pool.fetchval("SELECT count(*) FROM orders WHERE id = $1", order_id) == 0
        assert (
            await h.pool.fetchval(
                "SELECT count(*) FROM api_idempotency_keys WHERE entity_id = $1", order_id
            )
            == 0
        )
        ready = await api.http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["postgres"] == "ok"
        assert ready.json()["checks"]["temporal"].startswith("unavailable")
    # The same key against the real Temporal: created once, as if the first never happened.
    async with serve_api(h) as api2:
        api2.key, api2.client_id = api.key, api.client_id
        again = await create_order(api2, body, key)
        assert again.status_code == 202 and "idempotent-replayed" not in again.headers


async def test_postgres_unreachable_is_503_and_starts_no_workflow(h: Harness) -> None:
    dead = await asyncpg.create_pool(
        f"postgresql://nobody@127.0.0.1:{free_port()}/none", min_size=0, max_size=1
    )
    try:
        async with serve_api(h, pool=dead) as api:
            key = new_key()
            reply = await create_order(api, order_body(), key, auth=None)
            # The key itself is checked in Postgres: unreachable means 503, not 401.
            assert_problem(reply, 503, "unavailable")
            order_id = entity_id_for("order", api.client_id, key)
            assert not await workflow_exists(h.client, order_workflow_id(order_id))
            assert (
                (await api.http.get("/readyz"))
                .json()["checks"]["postgres"]
                .startswith("unavailable")
            )
    finally:
        await dead.close()


# --- messages, devices ---------------------------------------------------------------------


async def register(api: ServedApi, user: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        reply = await api.http.post(
            "/v1/devices",
            json={
                "device_id": f"{user}-d{i}",
                "user_id": user,
                "push_token": f"tok-{user}-{i}",
                "platform": "ios",
            },
            headers=api.auth(),
        )
        assert reply.status_code == 201, reply.text
        ids.append(reply.json()["id"])
    return ids


def message_body(recipient: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "sender_id": "sam",
        "recipient_id": recipient,
        "recipient_email": f"{recipient}@example.com",
        "body": "lunch?",
        "deadline_seconds": 30,
        "read_window_seconds": 5,
    }
    body.update(overrides)
    return body


async def test_send_get_and_recall_a_message(h: Harness) -> None:
    async with serve_api(h) as api:
        user = f"u-{uuid.uuid4().hex[:8]}"
        await register(api, user, 1)
        await h.sandbox.set_fault("push", FaultSpec(latency_ms=1000))
        body, key = message_body(user), new_key()
        sent = await api.http.post(
            "/v1/messages", json=body, headers={**api.auth(), "Idempotency-Key": key}
        )
        assert sent.status_code == 202, sent.text
        message_id = sent.json()["id"]
        assert sent.headers["location"] == f"/v1/messages/{message_id}"
        again = await api.http.post(
            "/v1/messages", json=body, headers={**api.auth(), "Idempotency-Key": key}
        )
        assert again.json()["id"] == message_id and again.headers["idempotent-replayed"] == "true"

        recall = await api.http.post(
            f"/v1/messages/{message_id}/recall", json={"reason": "wrong chat"}, headers=api.auth()
        )
        assert recall.status_code == 202, recall.text
        assert recall.json() == {"message_id": message_id, "status": "CANCELLED", "signalled": True}
        assert (await h.messages.handle(message_id).result()).status is MessageStatus.CANCELLED
        await h.sandbox.clear_faults()
        got = await api.http.get(f"/v1/messages/{message_id}", headers=api.auth())
        assert got.status_code == 200
        message = got.json()
        assert message["status"] == "CANCELLED" and "body" not in message
        assert message["transitions"][0]["actor"] == f"api:{api.client_id}"
        _, other_key = await api.new_client()
        theirs = await api.http.get(f"/v1/messages/{message_id}", headers=api.auth(other_key))
        assert_problem(theirs, 404, "message-not-found")


async def test_devices_register_once_and_belong_to_their_client(h: Harness) -> None:
    async with serve_api(h) as api:
        user = f"u-{uuid.uuid4().hex[:8]}"
        device = {
            "device_id": f"{user}-p",
            "user_id": user,
            "push_token": f"tok-{user}",
            "platform": "android",
        }
        first = await api.http.post("/v1/devices", json=device, headers=api.auth())
        assert first.status_code == 201 and "push_token" not in first.json()
        retry = await api.http.post("/v1/devices", json=device, headers=api.auth())
        assert retry.status_code == 200 and retry.json()["id"] == device["device_id"]
        clash = await api.http.post(
            "/v1/devices", json={**device, "device_id": f"{user}-q"}, headers=api.auth()
        )
        problem = assert_problem(clash, 409, "already-exists")
        assert device["device_id"] not in problem["detail"].replace(f"{user}-q", "")
        _, other_key = await api.new_client()
        assert_problem(
            await api.http.delete(
                f"/v1/devices/{device['device_id']}", headers=api.auth(other_key)
            ),
            404,
            "device-not-found",
        )
        removed = await api.http.delete(f"/v1/devices/{device['device_id']}", headers=api.auth())
        assert removed.status_code == 200 and removed.json()["active"] is False
        row = await h.pool.fetchrow(
            "SELECT active, client_id FROM devices WHERE id = $1", device["device_id"]
        )
        assert row is not None
        assert row["active"] is False and row["client_id"] == api.client_id


# --- receipts -----------------------------------------------------------------------------


async def _delivering(h: Harness, api: ServedApi) -> tuple[str, list[str]]:
    user = f"u-{uuid.uuid4().hex[:8]}"
    devices = await register(api, user, 2)
    sent = await api.http.post(
        "/v1/messages",
        json=message_body(user),
        headers={**api.auth(), "Idempotency-Key": new_key()},
    )
    message_id = sent.json()["id"]
    await eventually(lambda: _status_is(h, message_id, MessageStatus.DISPATCHED))
    return message_id, devices


async def _status_is(h: Harness, message_id: str, status: MessageStatus) -> bool:
    return (await h.messages.row(message_id)).status is status


async def _signals(h: Harness, message_id: str) -> int:
    history = await h.messages.handle(message_id).fetch_history()
    return sum(
        1 for e in history.events if e.HasField("workflow_execution_signaled_event_attributes")
    )


def _receipt(message_id: str, device_id: str) -> dict[str, str]:
    """A delivery receipt with a fresh id."""
    return {
        "receipt_id": f"r-{uuid.uuid4().hex}",
        "message_id": message_id,
        "device_id": device_id,
        "kind": "delivered",
    }


async def test_a_receipt_is_applied_once_however_often_it_is_sent(h: Harness) -> None:
    async with serve_api(h) as api:
        message_id, devices = await _delivering(h, api)
        receipt = _receipt(message_id, devices[0])
        first = await api.post_receipt(receipt)
        assert first.status_code == 200, first.text
        assert first.json()["outcome"] == "applied"
        await eventually(lambda: _status_is(h, message_id, MessageStatus.DELIVERED))
        before = (await h.messages.row(message_id), await _signals(h, message_id))
        again = await api.post_receipt(receipt)
        assert again.status_code == 200 and again.json()["outcome"] == "duplicate"
        after = (await h.messages.row(message_id), await _signals(h, message_id))
        assert after == before, "the second copy changed nothing: no signal, no write"

        read = {**receipt, "receipt_id": f"r-{uuid.uuid4().hex}", "kind": "read"}
        assert (await api.post_receipt(read)).json()["outcome"] == "applied"
        await eventually(lambda: _status_is(h, message_id, MessageStatus.READ))


async def test_a_receipt_for_an_unknown_device_is_counted_and_ignored(h: Harness) -> None:
    async with serve_api(h) as api:
        message_id, _ = await _delivering(h, api)
        signals = await _signals(h, message_id)
        reply = await api.post_receipt(_receipt(message_id, "no-such-device"))
        assert reply.status_code == 200 and reply.json()["outcome"] == "unknown_device"
        assert await _signals(h, message_id) == signals
        metrics = (await api.http.get("/metrics")).text
        line = next(
            m
            for m in metrics.splitlines()
            if m.startswith("tollgate_api_receipts_total{") and 'outcome="unknown_device"' in m
        )
        assert line.endswith(" 1.0")


async def test_receipts_with_a_bad_signature_or_an_expired_timestamp_are_refused(
    h: Harness,
) -> None:
    async with serve_api(h, receipt_tolerance_seconds=300) as api:
        message_id, devices = await _delivering(h, api)
        receipt = _receipt(message_id, devices[0])
        forged = await api.post_receipt(receipt, secret="x" * 40)
        assert_problem(forged, 401, "invalid-signature")
        # Timestamps are whole seconds and the server reads its clock later: a margin of
        # 10 s keeps "outside the tolerance" true however long the request takes.
        stale = await api.post_receipt(receipt, at=time.time() - 310)
        assert_problem(stale, 401, "signature-expired")
        future = await api.post_receipt(receipt, at=time.time() + 310)
        assert_problem(future, 401, "signature-expired")
        unsigned = await api.http.post("/v1/receipts", json=receipt)
        assert_problem(unsigned, 401, "invalid-signature")
        # A signed body with one byte changed does not verify either.
        signed = await api.post_receipt(receipt)
        assert signed.json()["outcome"] == "applied"
        assert (
            await h.pool.fetchval(
                "SELECT count(*) FROM api_receipts WHERE id = $1", receipt["receipt_id"]
            )
            == 1
        )
        # A captured request replayed within the window is the same receipt: a duplicate.
        replay = await api.post_receipt(receipt)
        assert replay.json()["outcome"] == "duplicate"


# --- the rest ---------------------------------------------------------------------------


async def test_health_readiness_metrics_and_unknown_routes(h: Harness) -> None:
    async with serve_api(h) as api:
        assert (await api.http.get("/healthz")).json() == {"status": "ok", "checks": {}}
        ready = await api.http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {
            "postgres": "ok",
            "temporal": "ok",
        }
        assert_problem(await api.http.get("/v2/orders"), 404, "route-not-found")
        wrong = await api.http.put("/v1/orders", headers=api.auth())
        assert_problem(wrong, 405, "method-not-allowed")
        assert "POST" in wrong.headers["allow"]
        metrics = await api.http.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        for name in (
            "tollgate_api_requests_total",
            "tollgate_api_request_duration_seconds_bucket",
            "tollgate_api_starts_in_flight",
        ):
            assert name in text, name
        assert 'route="/readyz"' in text and 'status="200"' in text


async def test_client_id_is_fixed_once_written_whoever_writes(
    h: Harness, owner_pool: asyncpg.Pool
) -> None:
    async with serve_api(h) as api:
        created = await create_order(api, order_body(), new_key())
        order_id = created.json()["id"]
        other, _ = await api.new_client()
        for pool in (h.pool, owner_pool):
            with pytest.raises(asyncpg.PostgresError) as refused:
                await pool.execute(
                    "UPDATE orders SET client_id = $2 WHERE id = $1", order_id, other
                )
            assert refused.value.sqlstate == "TG002"
        user = f"u-{uuid.uuid4().hex[:8]}"
        (device,) = await register(api, user, 1)
        with pytest.raises(asyncpg.PostgresError) as refused:
            await owner_pool.execute("UPDATE devices SET client_id = NULL WHERE id = $1", device)
        assert refused.value.sqlstate == "TG002"
        # The application role may not rewrite the API's own records either.
        for statement in (
            "DELETE FROM api_idempotency_keys",
            "UPDATE api_receipts SET outcome = 'applied'",
            "UPDATE api_keys SET secret_sha256 = repeat('0', 64)",
            "DELETE FROM api_keys",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await h.pool.execute(statement)
        stored = await h.pool.fetchval(
            "SELECT secret_sha256 FROM api_keys WHERE client_id = $1", api.client_id
        )
        assert stored not in api.key and len(stored) == 64


async def test_logs_carry_no_body_key_or_signature(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    canary = f"canary{uuid.uuid4().hex[:12]}"
    caplog.set_level("DEBUG")
    async with serve_api(h) as api:
        key = new_key()
        await create_order(api, order_body(customer_id=canary), key)
        await api.http.get(f"/v1/orders/{canary}", headers=api.auth())
        await api.http.get("/v1/orders/x?token=" + canary, headers=api.auth())
        await api.post_receipt(
            {"receipt_id": canary, "message_id": canary, "device_id": canary, "kind": "read"}
        )
        await api.http.post("/v1/orders", content=b"{" + canary.encode(), headers=api.auth())
    access = [r for r in caplog.records if r.name == "tollgate.api.access"]
    assert len(access) >= 5, "every request is logged"
    assert {r.__dict__["route"] for r in access} >= {"/v1/orders", "/v1/orders/{order_id}"}
    secret = api.key.split("_", 2)[2]
    # The server's loggers (the test's own HTTP client logs the URLs it calls).
    server = [
        r for r in caplog.records if r.name.split(".")[0] in ("tollgate", "uvicorn", "starlette")
    ]
    assert server
    for record in server:
        text = record.getMessage() + repr(record.__dict__)
        for leak in (canary, secret, key):
            assert leak not in text, (record.name, text)
