"""``ProviderClient`` and the provider activities against ``httpx.MockTransport``.

How an answer is classified is a unit of logic: a scripted transport shows every branch
(including answers the sandbox never gives) without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, cast

import asyncpg
import httpx
import pytest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory
from temporalio.testing import ActivityEnvironment

from activities import reaching_the_store, to_application_error
from activities.email import EmailActivities
from activities.inventory import InventoryActivities
from activities.orders import OrderStoreActivities
from activities.payments import PaymentActivities
from activities.push import PushActivities
from tollgate import errors
from tollgate.messages.models import Device, EmailInput, PushInput
from tollgate.orders.models import (
    ChargeInput,
    OrderInput,
    OrderItem,
    OrderSnapshot,
    RefundInput,
    ReleaseInput,
    ReserveInput,
    ValidateInput,
    ValidateResult,
)
from tollgate.orders.states import OrderStatus
from tollgate.providers.breaker import BreakerConfig, Breakers, BreakerState, CircuitBreaker
from tollgate.providers.client import ProviderClient
from tollgate.providers.email import EmailProvider
from tollgate.providers.inventory import ASKED_AT_ONCE, Inventory
from tollgate.providers.payments import PaymentGateway
from tollgate.providers.push import PushProvider

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class Script:
    """A transport answering every request with one scripted response (or exception)."""

    def __init__(self, answer: httpx.Response | Exception | Handler) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if isinstance(self.answer, Exception):
            raise self.answer
        if isinstance(self.answer, httpx.Response):
            return self.answer
        return await self.answer(request)

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.MockTransport(self), base_url="http://provider.test"
        )


def answer(status: int, body: Any = None, *, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.Response(status, content=content, headers={"content-type": "application/json"})


async def send(script: Script, breaker: CircuitBreaker | None = None) -> dict[str, Any]:
    async with script.http() as http:
        _, body = await ProviderClient(http, "payments", breaker).call(
            "POST", "/payments/charges", json={"x": 1}, idempotency_key="k-1"
        )
        return body


# --- classification ------------------------------------------------------------------


async def test_a_2xx_object_is_returned_with_the_idempotency_key_sent() -> None:
    script = Script(answer(201, {"charge_id": "ch_1"}))
    assert await send(script) == {"charge_id": "ch_1"}
    assert script.requests[0].headers["Idempotency-Key"] == "k-1"


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429, 408])
async def test_server_errors_and_throttling_are_unavailable(status: int) -> None:
    with pytest.raises(errors.ProviderUnavailable) as caught:
        await send(Script(answer(status, {"error": "card_declined", "message": "no"})))
    assert caught.value.code == f"http_{status}"
    assert caught.value.retryable


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (httpx.ReadTimeout("slow"), "timeout"),
        (httpx.ConnectTimeout("slow"), "timeout"),
        (httpx.ConnectError("refused"), "connection"),
        (httpx.RemoteProtocolError("hung up"), "connection"),
    ],
)
async def test_timeouts_and_connection_errors_are_unavailable(exc: Exception, code: str) -> None:
    with pytest.raises(errors.ProviderUnavailable) as caught:
        await send(Script(exc))
    assert caught.value.code == code and caught.value.retryable


@pytest.mark.parametrize(
    "raw",
    [b"<html>oops</html>", b"", b"[1, 2]", b'"ok"', b"null", b"\xff\xfe"],
    ids=["html", "empty", "list", "string", "null", "not-utf8"],
)
@pytest.mark.parametrize("status", [200, 201])
async def test_a_2xx_that_is_not_a_json_object_is_malformed(status: int, raw: bytes) -> None:
    with pytest.raises(errors.MalformedProviderResponse) as caught:
        await send(Script(answer(status, raw=raw)))
    assert caught.value.retryable


async def test_a_body_that_cannot_be_decoded_is_malformed() -> None:
    garbled = httpx.Response(
        200, stream=httpx.ByteStream(b"not gzip"), headers={"content-encoding": "gzip"}
    )
    with pytest.raises(errors.MalformedProviderResponse):
        await send(Script(garbled))


@pytest.mark.parametrize(
    "body", [{"error": "teapot", "message": "no"}, {"message": "no"}, {"error": 7}]
)
async def test_a_4xx_with_an_unknown_code_is_a_plain_permanent_rejection(
    body: dict[str, Any],
) -> None:
    with pytest.raises(errors.ProviderRejected) as caught:
        await send(Script(answer(400, body)))
    assert type(caught.value) is errors.ProviderRejected and not caught.value.retryable


@pytest.mark.parametrize(
    ("code", "status", "cls"),
    [
        ("card_declined", 402, errors.PaymentDeclined),
        ("insufficient_funds", 402, errors.PaymentDeclined),
        ("out_of_stock", 409, errors.OutOfStock),
        ("unknown_sku", 404, errors.UnknownSku),
        ("invalid_request", 400, errors.InvalidProviderRequest),
        ("idempotency_conflict", 409, errors.IdempotencyConflict),
        ("voided", 409, errors.StepVoided),
        ("unregistered", 410, errors.TokenUnregistered),
        ("bounced", 422, errors.EmailBounced),
    ],
)
async def test_each_business_code_becomes_its_class(
    code: str, status: int, cls: type[errors.ProviderRejected]
) -> None:
    with pytest.raises(errors.ProviderRejected) as caught:
        await send(Script(answer(status, {"error": code, "message": f"{code}!"})))
    assert type(caught.value) is cls
    assert caught.value.code == code and not caught.value.retryable


async def test_a_rejection_keeps_the_code_and_drops_the_providers_text() -> None:
    """Provider text quotes what it was sent (an address, a customer); error text ends up
    in logs, failure reasons and histories, so only the machine code is kept."""
    body = {"error": "bounced", "message": "address ada@example.com bounces", "to": "ada@"}
    with pytest.raises(errors.EmailBounced) as caught:
        await send(Script(answer(422, body)))
    assert "ada@example.com" not in str(caught.value)
    assert str(caught.value) == "payments: POST /payments/charges -> 422: bounced"
    application = to_application_error(caught.value)
    assert "ada" not in str(application) and "ada" not in json.dumps(application.details)


@pytest.mark.parametrize(
    "code", ["customer ada@example.com", "BOUNCED", "x" * 65, "bounced\r\nX-Evil: 1"]
)
async def test_a_code_that_is_not_a_plain_token_is_treated_as_none(code: str) -> None:
    with pytest.raises(errors.ProviderRejected) as caught:
        await send(Script(answer(400, {"error": code, "message": "no"})))
    assert type(caught.value) is errors.ProviderRejected and caught.value.code is None
    assert code not in str(caught.value)


# --- every activity's use of the body ------------------------------------------------

ActivityCall = Callable[[httpx.AsyncClient, Breakers | None], Awaitable[Any]]
#: These steps carry no move, so their activities never reach Postgres: no pool is needed.
NO_ROWS = OrderStoreActivities(cast(asyncpg.Pool, None))


def _charge(http: httpx.AsyncClient, breakers: Breakers | None) -> Awaitable[Any]:
    req = ChargeInput(
        order_id="o-1", customer_id="c", amount_cents=100, currency="USD", idempotency_key="k"
    )
    return ActivityEnvironment().run(
        PaymentActivities(PaymentGateway(http, breakers), NO_ROWS).charge, req
    )


def _refund(http: httpx.AsyncClient, breakers: Breakers | None) -> Awaitable[Any]:
    req = RefundInput(order_id="o-1", charge_idempotency_key="k", idempotency_key="r", reason="x")
    return ActivityEnvironment().run(
        PaymentActivities(PaymentGateway(http, breakers), NO_ROWS).refund, req
    )


def _reserve(http: httpx.AsyncClient, breakers: Breakers | None) -> Awaitable[Any]:
    req = ReserveInput(
        order_id="o-1", items=[OrderItem(sku="WIDGET", quantity=1)], idempotency_key="k"
    )
    return ActivityEnvironment().run(
        InventoryActivities(Inventory(http, breakers), NO_ROWS).reserve, req
    )


def _release(http: httpx.AsyncClient, breakers: Breakers | None) -> Awaitable[Any]:
    req = ReleaseInput(order_id="o-1", reservation_idempotency_key="k", idempotency_key="r")
    return ActivityEnvironment().run(
        InventoryActivities(Inventory(http, breakers), NO_ROWS).release, req
    )


def _push(http: httpx.AsyncClient, breakers: Breakers | None) -> Awaitable[Any]:
    # kind "read_receipt" records nothing in Postgres, so no pool is needed
    req = PushInput(
        message_id="m-1",
        devices=[Device(device_id="d-1", user_id="u", push_token="tok", platform="ios")],
        kind="read_receipt",
        idempotency_prefix="p",
    )
    acts = PushActivities(cast(asyncpg.Pool, None), PushProvider(http, breakers))
    return ActivityEnvironment().run(acts.push, req)


def _send(http: httpx.AsyncClient, breakers: Breakers | None) -> Awaitable[Any]:
    req = EmailInput(message_id="m-1", to="a@b.c", subject="s", body="b", idempotency_key="k")
    return ActivityEnvironment().run(EmailActivities(EmailProvider(http, breakers)).send, req)


#: activity -> (how to run it, a valid answer and what it yields, wrong answers)
ACTIVITIES: dict[str, tuple[ActivityCall, dict[str, Any], str, list[Any]]] = {
    "charge": (
        _charge,
        {"charge_id": "ch_1", "status": "captured"},
        "charge_id='ch_1' moved=None",
        [{"charge_id": 5}, {"charge_id": None}, {"charge_id": ""}, {"id": "ch_1"}],
    ),
    "refund": (
        _refund,
        {"status": "refunded", "refund_id": "rf_1"},
        "outcome='refunded' reference='rf_1'",
        [
            {"status": None, "refund_id": "rf_1"},
            {"status": "refunded"},
            {"status": "refunded", "refund_id": None},
            {"status": "refunded", "refund_id": 5},
            {"status": "pending", "refund_id": "rf_1"},
            {"status": 1},
        ],
    ),
    "reserve": (
        _reserve,
        {"reservation_id": "rs_1"},
        "reservation_id='rs_1' moved=None",
        [
            {"reservation_id": 5},
            {"reservation_id": ["rs_1"]},
            {"reservation_id": ""},
            {"status": "reserved"},
        ],
    ),
    "release": (
        _release,
        {"status": "released", "release_id": "rl_1"},
        "outcome='released' reference='rl_1'",
        [
            {"status": None},
            {"status": "released", "release_id": None},
            {"status": "released", "release_id": {"id": 1}},
            {"status": "RELEASED", "release_id": "rl_1"},
        ],
    ),
    "push": (
        _push,
        {"push_id": "pu_1"},
        "pushed={'d-1': 'pu_1'} removed=[]",
        [{"push_id": 5}, {"push_id": None}, {"push_id": ""}],
    ),
    "send": (
        _send,
        {"email_id": "em_1"},
        "email_id='em_1'",
        [{"email_id": 5}, {"email_id": True}, {"email_id": ""}, {}],
    ),
}

PROVIDER_OF = {
    "charge": "payments",
    "refund": "payments",
    "reserve": "inventory",
    "release": "inventory",
    "push": "push",
    "send": "email",
}

#: Bodies no activity can use (raw bytes).
NOT_OBJECTS: list[Any] = [b"not json", b"[1, 2]", b"null", b'"ok"']

MALFORMED = [
    pytest.param(name, body, id=f"{name}-{i}")
    for name, (_, _, _, wrong) in ACTIVITIES.items()
    for i, body in enumerate([*NOT_OBJECTS, *wrong])
]


@pytest.mark.parametrize("name", ACTIVITIES)
async def test_each_activity_accepts_its_valid_answer(name: str) -> None:
    run, good, expected, _ = ACTIVITIES[name]
    async with Script(answer(201, good)).http() as http:
        assert str(await run(http, None)) == expected


@pytest.mark.parametrize("name", ["refund", "release"])
async def test_compensations_accept_a_voided_answer_without_an_id(name: str) -> None:
    run = ACTIVITIES[name][0]
    async with Script(answer(200, {"status": "voided", "refund_id": None})).http() as http:
        assert str(await run(http, None)) == "outcome='voided' reference=None"


@pytest.mark.parametrize(("name", "body"), MALFORMED)
async def test_a_malformed_answer_is_a_retryable_application_error(name: str, body: Any) -> None:
    run = ACTIVITIES[name][0]
    response = answer(201, raw=body) if isinstance(body, bytes) else answer(201, body)
    async with Script(response).http() as http:
        with pytest.raises(ApplicationError) as caught:
            await run(http, None)
    assert caught.value.type == "MalformedProviderResponse"
    assert caught.value.non_retryable is False
    assert isinstance(caught.value.__cause__, errors.MalformedProviderResponse)


# --- the breaker around the call -----------------------------------------------------


def breakers(clock: FakeClock, **overrides: Any) -> Breakers:
    fields: dict[str, Any] = {
        "consecutive_failures": 2,
        "min_calls": 10,
        "window": 10,
        "open_seconds": 4.0,
        "half_open_probes": 1,
    }
    fields.update(overrides)
    return Breakers(config=BreakerConfig(**fields), clock=clock)


@pytest.mark.parametrize(
    ("response", "state"),
    [
        (answer(503, {}), BreakerState.OPEN),
        (httpx.ConnectError("refused"), BreakerState.OPEN),
        (answer(201, {"charge_id": 5}), BreakerState.OPEN),
        (answer(200, raw=b"<html>"), BreakerState.OPEN),
        (answer(402, {"error": "card_declined", "message": "no"}), BreakerState.CLOSED),
        (answer(400, {"error": "teapot", "message": "no"}), BreakerState.CLOSED),
        (answer(201, {"charge_id": "ch_1"}), BreakerState.CLOSED),
    ],
    ids=["503", "connect", "wrong-type", "not-json", "declined", "unknown-4xx", "ok"],
)
async def test_only_transient_failures_count_against_the_provider(
    response: httpx.Response | Exception, state: BreakerState
) -> None:
    b = breakers(FakeClock())
    async with Script(response).http() as http:
        for _ in range(2):
            try:
                await _charge(http, b)
            except ApplicationError as err:
                assert err.type != "ProviderCircuitOpen"
    assert b.get("payments").state is state


@pytest.mark.parametrize("name", ACTIVITIES)
async def test_an_open_circuit_fails_fast_and_says_when_to_retry(name: str) -> None:
    clock = FakeClock()
    b = breakers(clock, open_seconds=4.0)
    provider = PROVIDER_OF[name]
    script = Script(answer(503, {}))
    run = ACTIVITIES[name][0]
    async with script.http() as http:
        for _ in range(2):
            with pytest.raises(ApplicationError) as failed:
                await run(http, b)
            assert failed.value.type == "ProviderUnavailable"
        assert b.get(provider).state is BreakerState.OPEN
        clock.now += 1.5
        with pytest.raises(ApplicationError) as caught:
            await run(http, b)
    assert len(script.requests) == 2, "the open circuit sent nothing"
    err = caught.value
    assert err.type == "ProviderCircuitOpen"
    assert err.non_retryable is False
    assert err.category is ApplicationErrorCategory.BENIGN
    assert err.next_retry_delay == timedelta(seconds=2.5)
    assert err.details[0]["provider"] == provider
    assert isinstance(err.__cause__, errors.ProviderUnavailable), (
        "a retryable domain error at heart"
    )


async def test_the_client_itself_raises_the_temporal_form_when_open() -> None:
    clock = FakeClock()
    b = breakers(clock).get("payments")
    for _ in range(2):
        b.record(b.before_call(), success=False)
    with pytest.raises(ApplicationError) as caught:
        await send(Script(answer(201, {})), b)
    assert caught.value.type == "ProviderCircuitOpen"
    assert caught.value.next_retry_delay == timedelta(seconds=4.0)


async def test_a_cancelled_probe_gives_its_slot_back() -> None:
    clock = FakeClock()
    b = breakers(clock, half_open_probes=1).get("payments")
    for _ in range(2):
        b.record(b.before_call(), success=False)
    clock.now += 4.0
    started = asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async with Script(hang).http() as http:
        client = ProviderClient(http, "payments", b)
        probe = asyncio.create_task(client.call("POST", "/payments/charges"))
        await started.wait()
        with pytest.raises(ApplicationError):  # the only probe slot is taken
            await client.call("POST", "/payments/charges")
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
    assert b.state is BreakerState.HALF_OPEN
    assert b.before_call().probe, "the slot is free again"


async def test_without_a_breaker_nothing_is_refused() -> None:
    script = Script(answer(503, {}))
    for _ in range(5):
        with pytest.raises(errors.ProviderError):
            await send(script)
    assert len(script.requests) == 5


@pytest.mark.parametrize(
    "unreachable",
    [
        ConnectionRefusedError("connection refused"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    ],
    ids=type,
)
def test_postgres_out_of_reach_during_a_steps_move_is_store_unavailable(
    unreachable: Exception,
) -> None:
    """What the workflow waits out with a local activity (tests/test_specs_order.py)."""
    with pytest.raises(errors.StoreUnavailable) as caught, reaching_the_store():
        raise unreachable
    assert to_application_error(caught.value).non_retryable is False


def test_a_statement_postgres_refuses_during_a_step_is_not_store_unavailable() -> None:
    with pytest.raises(asyncpg.UniqueViolationError), reaching_the_store():
        raise asyncpg.UniqueViolationError("duplicate key value violates unique constraint")


def test_a_validation_scheduled_by_the_code_before_validate_input_still_decodes() -> None:
    """A task left on the queue by a worker that sent the order itself (before the
    validation began the order) decodes into today's input, and does not begin it."""
    order = OrderInput(
        order_id="o-1", customer_id="c", items=[OrderItem(sku="WIDGET", quantity=1)], amount_cents=1
    )
    converter = pydantic_data_converter.payload_converter
    (decoded,) = converter.from_payloads(converter.to_payloads([order]), [ValidateInput])
    assert decoded == ValidateInput(order=order, begin=False)


# --- validation: the catalog is asked while the order moves ---------------------------


class _Begins(OrderStoreActivities):
    """Stand-in rows whose begin waits for ``go``, then answers ``outcome`` (or raises it)."""

    def __init__(self, outcome: OrderSnapshot | Exception) -> None:
        super().__init__(cast(asyncpg.Pool, None))
        self.go = asyncio.Event()
        self.outcome = outcome
        self.done = False

    async def begin_order(self, order: OrderInput) -> OrderSnapshot:
        await self.go.wait()
        await asyncio.sleep(0.02)  # a round trip's worth
        self.done = True
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


_ORDER = OrderInput(
    order_id="o-1", customer_id="c-1", items=[OrderItem(sku="WIDGET", quantity=1)], amount_cents=5
)


async def _validate(rows: _Begins, catalog: Handler, *, attempt: int = 1) -> ValidateResult:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=attempt)
    async with Script(catalog).http() as http:
        acts = InventoryActivities(Inventory(http, None), rows)
        run = env.run(acts.validate, ValidateInput(order=_ORDER, begin=True))
        return await asyncio.wait_for(run, timeout=5)


async def test_a_validation_asks_the_catalog_while_the_order_moves() -> None:
    """The catalog question is a read: it need not wait for the move to VALIDATING. Here
    the move only ends once the catalog was asked, which waiting for it would deadlock."""
    rows = _Begins(OrderSnapshot(status=OrderStatus.VALIDATING, version=2))

    async def known(request: httpx.Request) -> httpx.Response:
        rows.go.set()
        return answer(200, {"sku": "WIDGET"})

    result = await _validate(rows, known)
    assert result == ValidateResult(
        problems=[], begun=OrderSnapshot(status=OrderStatus.VALIDATING, version=2)
    )


async def test_a_validation_that_finds_the_order_cancelled_drops_the_catalogs_answer() -> None:
    rows = _Begins(OrderSnapshot(status=OrderStatus.CANCELLING, version=2))
    dropped = asyncio.Event()

    async def never(request: httpx.Request) -> httpx.Response:
        rows.go.set()
        try:
            await asyncio.Event().wait()
        finally:
            dropped.set()
        raise AssertionError("unreachable")

    result = await _validate(rows, never)
    assert result == ValidateResult(begun=OrderSnapshot(status=OrderStatus.CANCELLING, version=2))
    assert dropped.is_set()


async def test_when_postgres_and_the_catalog_both_fail_a_validation_reports_postgres() -> None:
    """The workflow waits a Postgres outage out (StoreUnavailable), whatever the catalog
    said meanwhile."""
    rows = _Begins(ConnectionRefusedError("connection refused"))

    async def down(request: httpx.Request) -> httpx.Response:
        rows.go.set()
        return answer(503, {"error": "unavailable"})

    with pytest.raises(ApplicationError) as failed:
        await _validate(rows, down)
    assert failed.value.type == errors.StoreUnavailable.__name__


async def test_the_catalog_is_asked_about_many_skus_at_once_and_answers_in_order() -> None:
    """An order of 20 SKUs is not 20 round trips one after another: up to
    ``ASKED_AT_ONCE`` are in flight together, and the unknown ones come back in the
    order given."""
    in_flight, most = 0, 0

    async def catalog(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        sku = request.url.path.rsplit("/", 1)[1]
        if int(sku.removeprefix("S")) % 7 == 3:
            return answer(404, {"error": "unknown_sku"})
        return answer(200, {"sku": sku})

    async with Script(catalog).http() as http:
        unknown = await Inventory(http, None).unknown_skus(f"S{n}" for n in range(20))
    assert unknown == ["S3", "S10", "S17"]
    assert most == ASKED_AT_ONCE


async def test_a_catalog_failure_is_raised_after_every_question_ended() -> None:
    asked: list[str] = []

    async def catalog(request: httpx.Request) -> httpx.Response:
        sku = request.url.path.rsplit("/", 1)[1]
        asked.append(sku)
        await asyncio.sleep(0.01 if sku == "B" else 0)
        if sku == "B":
            return answer(503, {"error": "unavailable"})
        return answer(200, {"sku": sku})

    async with Script(catalog).http() as http:
        with pytest.raises(errors.ProviderUnavailable):
            await Inventory(http, None).unknown_skus(["A", "B", "C"])
    assert sorted(asked) == ["A", "B", "C"]


async def test_a_retried_validation_moves_the_order_before_it_asks_the_catalog() -> None:
    """A retry may be waiting a Postgres outage out: it asks nothing of the catalog
    until the move went through, and nothing at all while Postgres is out of reach."""
    down = _Begins(ConnectionRefusedError("connection refused"))
    down.go.set()
    asked = Script(answer(200, {"sku": "WIDGET"}))
    with pytest.raises(ApplicationError) as failed:
        await _validate(down, asked, attempt=2)
    assert failed.value.type == errors.StoreUnavailable.__name__
    assert asked.requests == []

    for attempt, begun_before_asking in ((1, False), (2, True)):
        rows = _Begins(OrderSnapshot(status=OrderStatus.VALIDATING, version=2))
        rows.go.set()
        seen: list[bool] = []

        async def known(
            request: httpx.Request, rows: _Begins = rows, seen: list[bool] = seen
        ) -> httpx.Response:
            seen.append(rows.done)
            return answer(200, {"sku": "WIDGET"})

        result = await _validate(rows, known, attempt=attempt)
        assert result.problems == [] and seen == [begun_before_asking], attempt


# --- the push fan-out's heartbeats -----------------------------------------------------


async def _fan_out(latency: float, heartbeat_timeout: timedelta) -> list[dict[str, Any]]:
    """Push a read receipt to 3 devices whose provider answers after ``latency`` s;
    returns the heartbeats the attempt sent, in order."""

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(latency)
        return answer(201, {"push_id": f"pu-{json.loads(request.content)['token']}"})

    req = PushInput(
        message_id="m-1",
        devices=[
            Device(device_id=f"d-{n}", user_id="u", push_token=f"t{n}", platform="ios")
            for n in range(3)
        ],
        kind="read_receipt",
        idempotency_prefix="p",
    )
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, heartbeat_timeout=heartbeat_timeout)
    beats: list[dict[str, Any]] = []
    env.on_heartbeat = lambda *details: beats.append(details[0])
    async with Script(slow).http() as http:
        acts = PushActivities(cast(asyncpg.Pool, None), PushProvider(http, None))
        result = await env.run(acts.push, req)
    assert result.pushed == {"d-0": "pu-t0", "d-1": "pu-t1", "d-2": "pu-t2"}
    return beats


async def test_a_fan_out_that_ends_within_a_quarter_of_its_heartbeat_timeout_sends_no_heartbeat() -> (
    None
):
    """Each heartbeat is a write under the workflow's lock on the server, and the first
    one went out just as the first device confirmed delivery."""
    assert await _fan_out(0.001, timedelta(seconds=5)) == []


async def test_a_slow_fan_out_heartbeats_the_devices_done_once_past_a_quarter_of_its_timeout() -> (
    None
):
    """0.3 s a device against a 0.8 s timeout: quiet for the first 0.2 s, then a
    heartbeat after each device, naming all the devices done so far."""
    beats = await _fan_out(0.3, timedelta(seconds=0.8))
    assert [sorted(b["pushed"]) for b in beats] == [["d-0"], ["d-0", "d-1"], ["d-0", "d-1", "d-2"]]


class _ImportsSeen:
    """A ``sys.meta_path`` finder that only records the modules looked for: an import
    already in ``sys.modules`` never reaches it, a missing one does, every time."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        self.names.append(name)


async def test_a_provider_call_looks_for_no_missing_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httpcore imports ``sniffio`` on every request; when it was not installed, each call
    paid four failed imports, each a scan of ``sys.path``: a quarter of the client's CPU
    per provider call. Over a real socket, a warmed-up client imports nothing."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    seen = _ImportsSeen()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/warm-up")).status_code == 200
            monkeypatch.setattr(sys, "meta_path", [seen, *sys.meta_path])
            for _ in range(3):
                assert (await http.get("/inventory/skus/A")).json() == {}
    finally:
        server.close()
    assert seen.names == []
