"""The provider sandbox: fake payments, inventory, push and email providers over real HTTP.

Tests and the demo point Tollgate's activities at this app to script outages and then
read the ledger to prove each side effect happened at most once.

How a provider request is handled (every provider alike):

1. It is counted (``GET /admin/requests``), whatever happens next, and its body is read
   in full, so a request whose caller then times out is still carried out (late).
2. Fault injection, per the provider's :class:`FaultSpec`: sleep ``hang_ms``, then
   ``latency_ms`` if its phase is ``before``; then decide whether this request fails
   (``fail_next`` first, else ``fail_rate`` from a seeded RNG). A ``before`` failure
   answers ``fail_status`` right away and nothing else happens.
3. The ``Idempotency-Key`` header and the JSON body are checked (400 if bad).
4. Under the provider's lock: a stored answer for (endpoint, key) is replayed (or 409 if
   the body differs); otherwise the ledger is changed and the answer stored.
5. ``latency_ms`` with phase ``after`` is slept, and an ``after`` failure replaces the
   real answer with ``fail_status``: the work is done but the caller never hears of it.

State lives on a :class:`SandboxState` owned by each app (also at ``app.state.sandbox``),
so one process can run many independent sandboxes.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypedDict, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from tollgate.telemetry import instrument_app
from tollgate_dev.sandbox.models import (
    PROVIDERS,
    Charge,
    ChargeRequest,
    ChargeResponse,
    Email,
    EmailRequest,
    EmailResponse,
    FaultSpec,
    Ledger,
    Push,
    PushRequest,
    PushResponse,
    Refund,
    RefundRequest,
    RefundResponse,
    Release,
    ReleaseRequest,
    ReleaseResponse,
    Reservation,
    ReservationRequest,
    ReservationResponse,
    SandboxConfig,
    SkuResponse,
    StockUpdate,
    Void,
)

__all__ = ["SandboxState", "create_app"]

Body = TypeVar("Body", bound=BaseModel)

IDEMPOTENCY_HEADER = "Idempotency-Key"
#: W3C trace context of the caller; recorded with every ledger entry a request makes.
TRACEPARENT_HEADER = "traceparent"
#: Set on a response that is a replay of a stored answer; handy when reading traces.
REPLAY_HEADER = "Idempotent-Replayed"
_MAX_KEY_LENGTH = 255
#: Request bodies here are a few hundred bytes; the cap only stops accidents.
_MAX_BODY_BYTES = 1 << 20
#: nginx's "client closed request": never seen by anyone, but clearer than a 500 in logs.
_CLIENT_CLOSED = 499

#: The ``traceparent`` of the request a handler is serving. Handlers never await, so
#: within one the value cannot change under them.
_caller: ContextVar[str | None] = ContextVar("sandbox_caller_traceparent", default=None)


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Outcome:
    """A provider's final answer, before it is rendered (and stored for replay)."""

    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class _StoredAnswer:
    fingerprint: str
    status: int
    content: bytes


class ProviderState:
    """Per-provider machinery: lock, fault spec, RNG, request counter, stored answers."""

    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        # Created once and never replaced: a reset must not hand a fresh lock to new
        # requests while an in-flight one still holds the old one.
        self.lock = asyncio.Lock()
        self.fault = FaultSpec()
        self.requests = 0
        self.answers: dict[tuple[str, str], _StoredAnswer] = {}
        self.rng = random.Random()
        self.reset(seed)

    def reset(self, seed: int) -> None:
        """Forget faults, counts and stored answers; re-seed the RNG."""
        self.fault = FaultSpec()
        self.requests = 0
        self.answers.clear()
        # One RNG per provider, seeded with the provider's name too: otherwise how many
        # payments requests ran would change which inventory requests fail.
        self.rng.seed(f"{seed}:{self.name}")

    def decide_failure(self) -> bool:
        """Whether the current request fails; consumes one ``fail_next`` if it does."""
        if self.fault.fail_next > 0:
            self.fault.fail_next -= 1
            return True
        rate = self.fault.fail_rate
        # No RNG draw at rate 0, so turning faults on later starts from the seed's sequence.
        return rate > 0 and self.rng.random() < rate


class SandboxState:
    """Everything one sandbox app knows: providers, stock, declined cards, unregistered
    device tokens, bounced addresses and the ledger."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.providers: dict[str, ProviderState] = {
            name: ProviderState(name, config.seed) for name in PROVIDERS
        }
        self.stock: dict[str, int] = {}
        #: SKUs sold without counting (``SandboxConfig.unlimited_skus``); setting a
        #: quantity for one through the admin API makes it finite.
        self.unlimited: set[str] = set()
        self.declined: set[str] = set()
        self.unregistered: set[str] = set()
        self.bounced: set[str] = set()
        # Keyed by the idempotency key that created them: refunds / releases look them up
        # that way. Dicts keep insertion order, so the ledger reads oldest first.
        self.charges: dict[str, Charge] = {}
        self.reservations: dict[str, Reservation] = {}
        # Keyed by the key of what they undo: at most one refund per charge, one release
        # per reservation.
        self.refunds: dict[str, Refund] = {}
        self.releases: dict[str, Release] = {}
        # Keyed by (provider, kind, voided key).
        self.voids: dict[tuple[str, str, str], Void] = {}
        # Keyed by the idempotency key that sent them.
        self.pushes: dict[str, Push] = {}
        self.emails: dict[str, Email] = {}
        self.reset()

    def reset(self) -> None:
        """Back to the configured start: seed stock, configured declines, unregistered
        tokens and bounces, empty ledger."""
        for provider in self.providers.values():
            provider.reset(self.config.seed)
        self.stock = dict(self.config.initial_stock)
        self.unlimited = set(self.config.unlimited_skus) - self.stock.keys()
        self.declined = set(self.config.declined_customers)
        self.unregistered = set(self.config.unregistered_tokens)
        self.bounced = set(self.config.bounced_addresses)
        self.charges.clear()
        self.reservations.clear()
        self.refunds.clear()
        self.releases.clear()
        self.voids.clear()
        self.pushes.clear()
        self.emails.clear()

    def ledger(self, order_id: str | None = None, message_id: str | None = None) -> Ledger:
        """The ledger, or only the entries of one order and / or one message.

        With neither filter, everything. Otherwise each filter selects its own kind of
        entry (``order_id``: charges, refunds, reservations, releases, voids; ``message_id``:
        pushes, emails) and kinds whose filter was not given are left out, so
        ``message_id="m-1"`` alone is exactly m-1's pushes and emails.
        """
        everything = order_id is None and message_id is None

        def order_keep(entry: Any) -> bool:
            return everything or (order_id is not None and entry.order_id == order_id)

        def message_keep(entry: Push | Email) -> bool:
            return everything or (message_id is not None and entry.message_id == message_id)

        return Ledger(
            charges=[c for c in self.charges.values() if order_keep(c)],
            refunds=[r for r in self.refunds.values() if order_keep(r)],
            reservations=[r for r in self.reservations.values() if order_keep(r)],
            releases=[r for r in self.releases.values() if order_keep(r)],
            voids=[v for v in self.voids.values() if order_keep(v)],
            pushes=[p for p in self.pushes.values() if message_keep(p)],
            emails=[e for e in self.emails.values() if message_keep(e)],
        )

    def add_void(self, provider: str, kind: str, order_id: str, key: str, by: str) -> None:
        """Leave a tombstone for ``key`` (once: repeating the undo adds nothing)."""
        slot = (provider, kind, key)
        if slot not in self.voids:
            self.voids[slot] = Void(
                provider=provider,
                kind=kind,
                order_id=order_id,
                idempotency_key=key,
                voided_by=by,
                created_at=_now(),
                traceparent=_caller.get(),
            )

    def is_voided(self, provider: str, kind: str, key: str) -> bool:
        """Whether an undo for ``key`` arrived before the request it undoes."""
        return (provider, kind, key) in self.voids


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id(prefix: str) -> str:
    # uuid, not the seeded RNG: drawing ids from it would shift the fault sequence.
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


# --------------------------------------------------------------------------- responses


def _render(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _json(
    body: dict[str, Any], status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(_render(body), status, headers, media_type="application/json")


def _error(status: int, error: str, message: str, **extra: Any) -> Outcome:
    return Outcome(status, {"error": error, "message": message, **extra})


def _send(outcome: Outcome) -> Response:
    return _json(outcome.body, outcome.status)


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


def _created(response: type[BaseModel], entry: object) -> Outcome:
    """201 with the new ledger ``entry`` as the provider's ``response`` shows it."""
    return Outcome(201, _dump(response.model_validate(entry, from_attributes=True)))


def _order_mismatch(kind: str, key: str, owner: str, order_id: str) -> Outcome:
    """409: the ``kind`` made with ``key`` belongs to order ``owner``, not ``order_id``."""
    return _error(
        409,
        "order_mismatch",
        f"{kind} key {key!r} belongs to order {owner!r}, not {order_id!r}",
    )


def _invalid(exc: ValidationError) -> Outcome:
    """400 whose message names every offending field, e.g. ``items.0.quantity: ...``."""
    problems: list[str] = []
    fields: list[str] = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(part) for part in err["loc"]) or "body"
        fields.append(field)
        problems.append(f"{field}: {err['msg']}")
    return _error(400, "invalid_request", "; ".join(problems), fields=fields)


async def _parse(request: Request, model: type[Body]) -> Body | Outcome:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        return _invalid(exc)


# --------------------------------------------------------------------------- business logic
# Each handler runs under its provider's lock, gets a validated body and the request's
# idempotency key, and returns the final answer. They never await: a handler that did
# would still be safe (the lock serialises them), but keeping them synchronous means an
# answer is decided and stored in one step. A new ledger entry is the request as the
# provider accepted it, plus its id and the request's _stamp.


class _Stamp(TypedDict):
    idempotency_key: str
    created_at: datetime
    traceparent: str | None


def _stamp(key: str) -> _Stamp:
    """What every new ledger entry records of the request that made it: its idempotency
    key, the time, and the caller's trace."""
    return {"idempotency_key": key, "created_at": _now(), "traceparent": _caller.get()}


class _Keyed(Protocol):
    @property
    def idempotency_key(self) -> str: ...


Entry = TypeVar("Entry", bound=_Keyed)


def _recorded(entries: dict[str, Entry], response: type[BaseModel], entry: Entry) -> Outcome:
    """Keep the new ``entry`` under its key; 201 with it as the provider's ``response``."""
    entries[entry.idempotency_key] = entry
    return _created(response, entry)


def _charge(state: SandboxState, body: ChargeRequest, key: str) -> Outcome:
    if state.is_voided("payments", "charge", key):
        return _error(409, "voided", f"a refund for charge key {key!r} arrived first")
    if body.customer_id in state.declined:
        return _error(402, "card_declined", f"card of customer {body.customer_id!r} declined")
    if body.amount_cents > state.config.card_limit_cents:
        return _error(
            402,
            "insufficient_funds",
            f"{body.amount_cents} cents is over the card limit of "
            f"{state.config.card_limit_cents} cents",
        )
    charge = Charge(charge_id=_new_id("ch"), status="captured", **body.model_dump(), **_stamp(key))
    return _recorded(state.charges, ChargeResponse, charge)


class _OrderEntry(Protocol):
    @property
    def order_id(self) -> str: ...


Original = TypeVar("Original", bound=_OrderEntry)
Undone = TypeVar("Undone", bound=BaseModel)


@dataclass(frozen=True)
class _Undo(Generic[Original, Undone]):
    """A kind of undo request (a refund of a charge, a release of a reservation): what it
    undoes, where both are kept, and how it answers."""

    provider: str
    #: What it undoes, as its void and its errors name it.
    undoes: str
    #: What it undoes, keyed by the idempotency key that made each.
    originals: Callable[[SandboxState], dict[str, Original]]
    #: Keyed by the key of what they undo: at most one undo each.
    undos: Callable[[SandboxState], dict[str, Undone]]
    #: The answer for an undo done (now, or by an earlier request).
    answer: Callable[[Undone], BaseModel]
    #: The answer when there was nothing to undo (yet).
    voided: BaseModel


def _refunded(refund: Refund) -> RefundResponse:
    return RefundResponse(
        status="refunded",
        refund_id=refund.refund_id,
        charge_id=refund.charge_id,
        amount_cents=refund.amount_cents,
    )


def _released(release: Release) -> ReleaseResponse:
    return ReleaseResponse(
        status="released", release_id=release.release_id, reservation_id=release.reservation_id
    )


_REFUND = _Undo(
    "payments",
    "charge",
    lambda state: state.charges,
    lambda state: state.refunds,
    _refunded,
    voided=RefundResponse(status="voided", refund_id=None, charge_id=None, amount_cents=0),
)
_RELEASE = _Undo(
    "inventory",
    "reservation",
    lambda state: state.reservations,
    lambda state: state.releases,
    _released,
    voided=ReleaseResponse(status="voided", release_id=None, reservation_id=None),
)


def _undo(
    state: SandboxState,
    kind: _Undo[Original, Undone],
    order_id: str,
    original_key: str,
    key: str,
    undo: Callable[[Original], Undone],
) -> Outcome:
    """Undo, with request ``key``, what ``original_key`` made for ``order_id``, once:
    ``undo`` does it and returns the record of it (201); a repeat answers that record
    again (200)."""
    original = kind.originals(state).get(original_key)
    if original is None:
        # It may still be on its way (slow network, retry in flight): make sure it can
        # never land, and report that nothing was taken.
        state.add_void(kind.provider, kind.undoes, order_id, original_key, key)
        return Outcome(200, _dump(kind.voided))
    if original.order_id != order_id:
        # Undoing another order's money or stock is a caller bug, never something to do
        # quietly.
        return _order_mismatch(kind.undoes, original_key, original.order_id, order_id)
    undos = kind.undos(state)
    existing = undos.get(original_key)
    if existing is not None:
        return Outcome(200, _dump(kind.answer(existing)))
    undos[original_key] = done = undo(original)
    return Outcome(201, _dump(kind.answer(done)))


def _refund(state: SandboxState, body: RefundRequest, key: str) -> Outcome:
    def refund(charge: Charge) -> Refund:
        charge.status = "refunded"
        return Refund(
            refund_id=_new_id("re"),
            reason=body.reason,
            charge_idempotency_key=body.charge_idempotency_key,
            # Always of the whole charge: its amount, in its currency, for its order.
            **charge.model_dump(include={"charge_id", "order_id", "amount_cents", "currency"}),
            **_stamp(key),
        )

    return _undo(state, _REFUND, body.order_id, body.charge_idempotency_key, key, refund)


def _reserve(state: SandboxState, body: ReservationRequest, key: str) -> Outcome:
    if state.is_voided("inventory", "reservation", key):
        return _error(409, "voided", f"a release for reservation key {key!r} arrived first")
    # Sum per sku first: two lines of 60 WIDGET need 120 in stock, not 60 twice.
    wanted: dict[str, int] = {}
    for item in body.items:
        wanted[item.sku] = wanted.get(item.sku, 0) + item.quantity
    # Check everything before touching anything: the reservation is all-or-nothing.
    for sku, quantity in wanted.items():
        if sku in state.unlimited:
            continue
        if sku not in state.stock:
            return _error(422, "unknown_sku", f"no such sku {sku!r}", sku=sku)
        available = state.stock[sku]
        if available < quantity:
            return _error(
                422,
                "out_of_stock",
                f"{quantity} of {sku!r} requested, {available} available",
                sku=sku,
                requested=quantity,
                available=available,
            )
    for sku, quantity in wanted.items():
        if sku not in state.unlimited:
            state.stock[sku] -= quantity
    reservation = Reservation(
        reservation_id=_new_id("rs"), status="reserved", **body.model_dump(), **_stamp(key)
    )
    return _recorded(state.reservations, ReservationResponse, reservation)


def _release(state: SandboxState, body: ReleaseRequest, key: str) -> Outcome:
    def release(reservation: Reservation) -> Release:
        for item in reservation.items:
            if item.sku in state.unlimited:
                continue  # nothing was taken from it, so nothing goes back
            # .get: an admin may have replaced the stock table since; giving back is still right.
            state.stock[item.sku] = state.stock.get(item.sku, 0) + item.quantity
        reservation.status = "released"
        return Release(
            release_id=_new_id("rl"),
            reservation_idempotency_key=body.reservation_idempotency_key,
            # Always of the whole reservation: every item goes back.
            **reservation.model_dump(include={"reservation_id", "order_id", "items"}),
            **_stamp(key),
        )

    return _undo(state, _RELEASE, body.order_id, body.reservation_idempotency_key, key, release)


def _push(state: SandboxState, body: PushRequest, key: str) -> Outcome:
    if body.token in state.unregistered:
        # APNs / FCM answer 410 Gone (UNREGISTERED) for a token whose app was removed.
        return _error(
            410,
            "unregistered",
            f"device token {body.token!r} is no longer registered",
            token=body.token,
        )
    push = Push(push_id=_new_id("pu"), **body.model_dump(), **_stamp(key))
    return _recorded(state.pushes, PushResponse, push)


def _send_email(state: SandboxState, body: EmailRequest, key: str) -> Outcome:
    if body.to in state.bounced:
        return _error(422, "bounced", f"address {body.to!r} bounces", to=body.to)
    email = Email(email_id=_new_id("em"), **body.model_dump(), **_stamp(key))
    return _recorded(state.emails, EmailResponse, email)


def _sku(state: SandboxState, sku: str) -> Outcome:
    if sku in state.unlimited:
        return Outcome(200, _dump(SkuResponse(sku=sku, available=None)))
    if sku not in state.stock:
        return _error(404, "unknown_sku", f"no such sku {sku!r}")
    return Outcome(200, _dump(SkuResponse(sku=sku, available=state.stock[sku])))


# --------------------------------------------------------------------------- request pipeline


async def _sleep_ms(ms: int) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000)


async def _with_faults(
    provider: ProviderState, request: Request, work: Callable[[], Awaitable[Response]]
) -> Response:
    """Count the request and wrap ``work`` (validation + ledger) in the provider's faults.

    The spec is re-read at each step rather than copied once, so a fault set while a
    request is hanging applies to it, as a real outage would.
    """
    provider.requests += 1
    try:
        # Receive the whole body before any simulated slowness: a real provider has the
        # request in hand and carries on after the caller times out and hangs up. Read
        # later, the body would be gone with the connection and the late side effect
        # (the thing voids exist for) could never happen. Starlette caches it for work().
        await request.body()
    except ClientDisconnect:
        # Gone before the request was even complete: nothing to do, nobody to answer.
        return Response(status_code=_CLIENT_CLOSED)
    await _sleep_ms(provider.fault.hang_ms)
    if provider.fault.latency_phase == "before":
        await _sleep_ms(provider.fault.latency_ms)
    failing = provider.decide_failure()
    fail_status, fail_phase = provider.fault.fail_status, provider.fault.fail_phase
    if failing and fail_phase == "before":
        return _injected(provider.name, fail_status, "before")
    response = await work()
    if provider.fault.latency_phase == "after":
        await _sleep_ms(provider.fault.latency_ms)
    if failing:
        # The ledger changed and the answer is stored; only this response is lost.
        return _injected(provider.name, fail_status, "after")
    return response


def _injected(provider: str, status: int, phase: str) -> Response:
    return _send(_error(status, "injected_fault", f"injected {provider} fault ({phase})"))


async def _idempotent(
    state: SandboxState,
    provider: ProviderState,
    endpoint: str,
    request: Request,
    model: type[Body],
    handler: Callable[[SandboxState, Body, str], Outcome],
) -> Response:
    """Validate, then replay the stored answer for (endpoint, key) or run ``handler``."""
    key = request.headers.get(IDEMPOTENCY_HEADER, "").strip()
    if not key or len(key) > _MAX_KEY_LENGTH:
        return _send(
            _error(
                400,
                "invalid_request",
                f"{IDEMPOTENCY_HEADER}: header is required (1-{_MAX_KEY_LENGTH} characters)",
                fields=[IDEMPOTENCY_HEADER],
            )
        )
    parsed = await _parse(request, model)
    if isinstance(parsed, Outcome):
        return _send(parsed)
    # The validated body, not the raw bytes: key order and whitespace are not a change,
    # including inside free-form objects (a push's payload), hence sort_keys.
    fingerprint = json.dumps(parsed.model_dump(mode="json"), sort_keys=True)
    async with provider.lock:
        stored = provider.answers.get((endpoint, key))
        if stored is not None:
            if stored.fingerprint != fingerprint:
                return _send(
                    _error(
                        409,
                        "idempotency_conflict",
                        f"{IDEMPOTENCY_HEADER} {key!r} was already used for "
                        f"{endpoint} with a different body",
                    )
                )
            return Response(
                stored.content,
                stored.status,
                {REPLAY_HEADER: "true"},
                media_type="application/json",
            )
        token = _caller.set(request.headers.get(TRACEPARENT_HEADER))
        try:
            outcome = handler(state, parsed, key)
        finally:
            _caller.reset(token)
        content = _render(outcome.body)
        # Every answer a handler gives is final (2xx, 402, 409 voided, 422...): storing
        # them all is what makes a retried decline get the same decline.
        provider.answers[(endpoint, key)] = _StoredAnswer(fingerprint, outcome.status, content)
    return Response(content, outcome.status, media_type="application/json")


def _provider_post(
    state: SandboxState,
    provider_name: str,
    endpoint: str,
    model: type[Body],
    handler: Callable[[SandboxState, Body, str], Outcome],
) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint for an idempotent provider POST. Adding a provider = more of these."""
    provider = state.providers[provider_name]

    async def endpoint_fn(request: Request) -> Response:
        return await _with_faults(
            provider,
            request,
            lambda: _idempotent(state, provider, endpoint, request, model, handler),
        )

    return endpoint_fn


# --------------------------------------------------------------------------- routes


def _name_set_routes(path: str, key: str, names: Callable[[], set[str]]) -> list[Route]:
    """The admin routes of a set of names (declined customers, unregistered tokens,
    bounced addresses): ``GET path`` lists them, ``PUT`` / ``DELETE path/{name}`` adds /
    removes one. Each answers ``{key: [the names, sorted]}``, which the admin client
    reads as ``TokenList`` / ``AddressList``.

    ``names`` is read on each request: a reset replaces the set.
    """

    async def listing(request: Request) -> Response:
        return _json({key: sorted(names())})

    async def add(request: Request) -> Response:
        names().add(_name_param(request, "name"))
        return await listing(request)

    async def remove(request: Request) -> Response:
        names().discard(_name_param(request, "name"))
        return await listing(request)

    return [
        Route(path, listing, methods=["GET"]),
        Route(f"{path}/{{name:path}}", add, methods=["PUT"]),
        Route(f"{path}/{{name:path}}", remove, methods=["DELETE"]),
    ]


def _name_param(request: Request, param: str) -> str:
    """A name at the end of an admin path (``{param:path}``), "/" and all.

    Names are user data: :class:`SandboxAdmin` percent-encodes them whole, so a "/" in
    one arrives decoded in the path and must not end the match. An empty one is no name.
    """
    name: str = request.path_params[param]
    if not name:
        raise HTTPException(404)
    return name


def _routes(state: SandboxState) -> list[Route]:
    inventory = state.providers["inventory"]

    async def get_sku(request: Request) -> Response:
        sku = request.path_params["sku"]

        async def work() -> Response:
            async with inventory.lock:
                return _send(_sku(state, sku))

        return await _with_faults(inventory, request, work)

    def provider_or_404(request: Request) -> ProviderState | Response:
        name = request.path_params["provider"]
        found = state.providers.get(name)
        if found is None:
            known = ", ".join(state.providers)
            return _send(_error(404, "unknown_provider", f"no provider {name!r} (known: {known})"))
        return found

    async def health(request: Request) -> Response:
        return _json({"status": "ok"})

    async def list_faults(request: Request) -> Response:
        return _json({name: _dump(p.fault) for name, p in state.providers.items()})

    async def clear_all_faults(request: Request) -> Response:
        for provider in state.providers.values():
            provider.fault = FaultSpec()
        return await list_faults(request)

    async def get_fault(request: Request) -> Response:
        provider = provider_or_404(request)
        if isinstance(provider, Response):
            return provider
        return _json(_dump(provider.fault))

    async def put_fault(request: Request) -> Response:
        provider = provider_or_404(request)
        if isinstance(provider, Response):
            return provider
        spec = await _parse(request, FaultSpec)
        if isinstance(spec, Outcome):
            return _send(spec)
        provider.fault = spec
        return _json(_dump(spec))

    async def clear_fault(request: Request) -> Response:
        provider = provider_or_404(request)
        if isinstance(provider, Response):
            return provider
        provider.fault = FaultSpec()
        return _json(_dump(provider.fault))

    async def request_counts(request: Request) -> Response:
        return _json({name: p.requests for name, p in state.providers.items()})

    async def get_stock(request: Request) -> Response:
        return _json(dict(state.stock))

    async def put_stock(request: Request) -> Response:
        sku = _name_param(request, "sku")
        update = await _parse(request, StockUpdate)
        if isinstance(update, Outcome):
            return _send(update)
        async with inventory.lock:
            state.stock[sku] = update.quantity
            state.unlimited.discard(sku)
        return _json(_dump(SkuResponse(sku=sku, available=update.quantity)))

    async def ledger(request: Request) -> Response:
        order_id = request.query_params.get("order_id")
        message_id = request.query_params.get("message_id")
        return _json(_dump(state.ledger(order_id, message_id)))

    async def reset(request: Request) -> Response:
        # Take every provider lock so no handler sees a half-reset sandbox.
        locks = [p.lock for p in state.providers.values()]
        for lock in locks:
            await lock.acquire()
        try:
            state.reset()
        finally:
            for lock in locks:
                lock.release()
        return _json({"status": "reset"})

    payments_charges = _provider_post(state, "payments", "charges", ChargeRequest, _charge)
    payments_refunds = _provider_post(state, "payments", "refunds", RefundRequest, _refund)
    reservations = _provider_post(state, "inventory", "reservations", ReservationRequest, _reserve)
    releases = _provider_post(state, "inventory", "releases", ReleaseRequest, _release)
    push_notifications = _provider_post(state, "push", "notifications", PushRequest, _push)
    email_messages = _provider_post(state, "email", "messages", EmailRequest, _send_email)

    return [
        Route("/health", health, methods=["GET"]),
        # providers
        Route("/payments/charges", payments_charges, methods=["POST"]),
        Route("/payments/refunds", payments_refunds, methods=["POST"]),
        Route("/inventory/skus/{sku}", get_sku, methods=["GET"]),
        Route("/inventory/reservations", reservations, methods=["POST"]),
        Route("/inventory/releases", releases, methods=["POST"]),
        Route("/push/notifications", push_notifications, methods=["POST"]),
        Route("/email/messages", email_messages, methods=["POST"]),
        # admin
        Route("/admin/faults", list_faults, methods=["GET"]),
        Route("/admin/faults", clear_all_faults, methods=["DELETE"]),
        Route("/admin/faults/{provider}", get_fault, methods=["GET"]),
        Route("/admin/faults/{provider}", put_fault, methods=["PUT"]),
        Route("/admin/faults/{provider}", clear_fault, methods=["DELETE"]),
        Route("/admin/requests", request_counts, methods=["GET"]),
        Route("/admin/stock", get_stock, methods=["GET"]),
        Route("/admin/stock/{sku:path}", put_stock, methods=["PUT"]),
        *_name_set_routes("/admin/payments/declined", "declined", lambda: state.declined),
        *_name_set_routes("/admin/push/unregistered", "unregistered", lambda: state.unregistered),
        *_name_set_routes("/admin/email/bounced", "bounced", lambda: state.bounced),
        Route("/admin/ledger", ledger, methods=["GET"]),
        Route("/admin/reset", reset, methods=["POST"]),
    ]


_HTTP_ERRORS = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


async def _http_error(request: Request, exc: Exception) -> Response:
    # Routing errors as JSON too, so clients can always read ``error``.
    assert isinstance(exc, HTTPException)
    error = _HTTP_ERRORS.get(exc.status_code, "http_error")
    return _json({"error": error, "message": exc.detail}, exc.status_code, exc.headers)


def create_app(config: SandboxConfig | None = None) -> Starlette:
    """A new sandbox with its own state; ``app.state.sandbox`` is its :class:`SandboxState`."""
    state = SandboxState(config or SandboxConfig())
    app = Starlette(
        routes=_routes(state),
        exception_handlers={HTTPException: _http_error},
        max_body_size=_MAX_BODY_BYTES,
    )
    app.state.sandbox = state
    # A server span per provider request, the child of the caller's (the traceparent it
    # sends). The admin API is scripting, and its paths name customers, addresses and
    # tokens: no spans for it, nor for health checks.
    instrument_app(app, untraced="/admin/,/health$")
    return app
