"""The HTTP API as a Starlette application: routes, their handlers, and the rules every
request goes through.

Per request, in this order, before anything is written: the credential (an API key, or
for receipts the webhook signature), the client's token bucket, the headers, the body
(size, media type, JSON, validation). Then the write, through the same services the CLI
uses. Every refusal is a problem document (:mod:`tollgate.api.problems`).

A create (``POST /v1/orders``, ``POST /v1/messages``) needs an ``Idempotency-Key``. The
entity's id is derived from the client and the key, and the key is recorded in the
transaction that inserts the row and starts the workflow, so a retry finds either all
three or none. The same key with the same body answers with the entity as it stands
now; with another body, 409. When Temporal or Postgres cannot be reached, or the start
takes longer than ``API_START_TIMEOUT_SECONDS``, the transaction rolls back and the
answer is 503 with a ``Retry-After``.

A client sees only what it created: another client's order, message or device, and
everything the CLI created, is 404, the same answer as for an id that does not exist.

Access logs carry the route template, status, duration and client, never a body, a
query, a key or a signature. Unexpected errors are logged by type and stack only: an
exception's message may quote personal data.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, Protocol, TypeVar

import asyncpg
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from temporalio.client import (
    Client,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.service import RPCError, RPCStatusCode

from tollgate.api import store as idem
from tollgate.api.auth import KeyCache
from tollgate.api.limits import Backlog, ClientLimits, StartSlots
from tollgate.api.metrics import PROMETHEUS_MEDIA_TYPE, ApiMetrics
from tollgate.api.models import (
    CancelRequest,
    CancelView,
    DeliveryView,
    DeviceCreate,
    DeviceView,
    Health,
    MessageCreate,
    MessageView,
    OrderCreate,
    OrderView,
    RecallRequest,
    RecallView,
    Receipt,
    ReceiptOutcome,
    Transition,
    View,
    WorkflowView,
)
from tollgate.api.problems import EDGE, Problem
from tollgate.api.signatures import SIGNATURE_HEADER, SignatureError, SignatureExpired, verify
from tollgate.api.spec import Answer, Handler, Operation, Param, openapi_document, problem
from tollgate.errors import (
    AlreadyExists,
    DeviceNotFound,
    IllegalTransition,
    InputError,
    MessageNotFound,
    NotRunning,
    OrderNotFound,
    TollgateError,
)
from tollgate.ids import SAFE_ID_PATTERN, is_safe_id
from tollgate.messages import store as message_store
from tollgate.messages.models import MessageInput
from tollgate.messages.service import MessageReport, MessageService, RecallOutcome
from tollgate.models import parse_input
from tollgate.orders import store as order_store
from tollgate.orders.models import OrderInput
from tollgate.orders.service import CancelOutcome, OrderReport, OrderService
from tollgate.orders.states import OrderStatus
from tollgate.postgres import UNREACHABLE
from tollgate.settings import Settings
from tollgate.telemetry import instrument_app

API_VERSION = "1.0.0"
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: Printable ASCII without spaces, as the column's CHECK says (schema/007_api.sql).
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]{1,255}$"
_BEFORE_CHARGED = frozenset({OrderStatus.PENDING, OrderStatus.VALIDATING, OrderStatus.CHARGING})

_log = logging.getLogger("tollgate.api")
_access = logging.getLogger("tollgate.api.access")

ModelT = TypeVar("ModelT", bound=BaseModel)


class _ClientRow(Protocol):
    """A row a client owns: ``None`` for what the CLI created."""

    @property
    def id(self) -> str: ...
    @property
    def client_id(self) -> str | None: ...


RowT = TypeVar("RowT", bound=_ClientRow)


@dataclass
class ApiDeps:
    """What the API runs on: settings, connections, the services, the webhook secrets."""

    settings: Settings
    pool: asyncpg.Pool
    client: Client
    orders: OrderService
    messages: MessageService
    #: The current webhook secret first, then old ones still accepted.
    webhook_secrets: list[str]
    metrics: ApiMetrics


def _json(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        model.model_dump_json(), status_code=status, headers=headers, media_type="application/json"
    )


_UNAVAILABLE_RPC = frozenset(
    {
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.CANCELLED,
        RPCStatusCode.ABORTED,
        RPCStatusCode.UNKNOWN,
    }
)


def unreachable(exc: BaseException) -> str | None:
    """Which dependency ``exc`` says is unreachable (``temporal``/``postgres``), if any."""
    if isinstance(exc, RPCError) and exc.status in _UNAVAILABLE_RPC:
        return "temporal"
    if isinstance(exc, WorkflowUpdateRPCTimeoutOrCancelledError):
        return "temporal"
    if isinstance(exc, RuntimeError) and "client connect" in str(exc).lower():
        return "temporal"  # a lazy client that cannot connect
    if isinstance(exc, UNREACHABLE):
        return "postgres"
    if isinstance(exc, TimeoutError):
        return "temporal or postgres"
    return None


def _created_headers(location: str, replayed: bool) -> dict[str, str]:
    """A create's answer headers: where the entity is, and whether an earlier request
    with the same Idempotency-Key created it."""
    if replayed:
        return {"Location": location, "Idempotent-Replayed": "true"}
    return {"Location": location}


def _history(report: OrderReport | MessageReport) -> dict[str, Any]:
    """What a ``GET`` shows besides the row: its audited transitions and its workflow."""
    return {
        "transitions": [Transition.of(t) for t in report.transitions],
        "workflow": _workflow_view(report),
    }


def _workflow_view(report: OrderReport | MessageReport) -> WorkflowView:
    progress = report.workflow_progress
    return WorkflowView(
        id=report.workflow_id,
        status=report.workflow_status,
        step=progress.step if progress else None,
    )


class _StopOutcome(Protocol):
    """What a cancel or a recall answers: at least a sentence for people."""

    @property
    def message(self) -> str: ...


OutcomeT = TypeVar("OutcomeT", bound=_StopOutcome)


#: The header every answer that names a created or changed entity carries.
_CREATED = ("Location",)

_IDEMPOTENCY = Param(
    IDEMPOTENCY_HEADER,
    "header",
    {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
    "The same on every retry of this request; a new one for a new request",
)


@dataclass(frozen=True)
class _Resource(Generic[RowT]):
    """A kind of entity clients create and own, served under ``/v1/<name>s``: how the
    handlers find one (the path's ``<name>_id``, read with ``get``, else ``not_found``),
    and what its operations in the document share (paths, id parameter, view, tag)."""

    name: str
    view: type[BaseModel]
    get: Callable[[asyncpg.Pool, str], Awaitable[RowT | None]]
    not_found: Callable[[str], TollgateError]

    @property
    def collection(self) -> str:
        return f"/v1/{self.name}s"

    def location(self, entity_id: str) -> str:
        """Where the entity can be read."""
        return f"{self.collection}/{entity_id}"

    @property
    def id_param(self) -> Param:
        """The path parameter that names one entity."""
        return Param(
            f"{self.name}_id",
            "path",
            {"type": "string", "pattern": SAFE_ID_PATTERN},
            f"The {self.name}'s id",
        )

    @property
    def tags(self) -> tuple[str, ...]:
        return (f"{self.name}s",)

    def create(
        self,
        operation_id: str,
        summary: str,
        handler: Handler,
        body: type[BaseModel],
        *params: Param,
    ) -> Operation:
        """``POST /v1/<name>s`` under an Idempotency-Key. It answers the entity (for a
        retry too), or that the key was used with another body, or that nothing was
        written at all."""
        return Operation(
            "POST",
            self.collection,
            operation_id,
            summary,
            handler,
            params=(_IDEMPOTENCY, *params),
            body=body,
            answers=(
                Answer(
                    202,
                    f"Accepted; the {self.name} as it stands (a replay too)",
                    self.view,
                    headers=_CREATED,
                ),
                problem(409, "The Idempotency-Key was used with another body"),
                problem(
                    503, "Unavailable, or still starting; nothing half-written", retry_after=True
                ),
            ),
            tags=self.tags,
        )

    def on_one(
        self,
        method: str,
        suffix: str,
        operation_id: str,
        summary: str,
        handler: Handler,
        *answers: Answer,
        body: type[BaseModel] | None = None,
    ) -> Operation:
        """An operation on one entity: ``/v1/<name>s/{<name>_id}`` and then ``suffix``."""
        id_param = self.id_param
        return Operation(
            method,
            f"{self.collection}/{{{id_param.name}}}{suffix}",
            operation_id,
            summary,
            handler,
            params=(id_param,),
            body=body,
            answers=answers,
            tags=self.tags,
        )

    def read(self, operation_id: str, summary: str, handler: Handler) -> Operation:
        """``GET /v1/<name>s/{<name>_id}``: the entity's view."""
        return self.on_one(
            "GET", "", operation_id, summary, handler, Answer(200, f"The {self.name}", self.view)
        )


_ORDERS = _Resource("order", OrderView, order_store.get_order, OrderNotFound)
_MESSAGES = _Resource("message", MessageView, message_store.get_message, MessageNotFound)
# get_device raises DeviceNotFound itself; _mine's None check never fires for it.
_DEVICES = _Resource("device", DeviceView, message_store.get_device, DeviceNotFound)


@dataclass(frozen=True)
class _Stop(Generic[OutcomeT]):
    """How a client stops one of its entities (cancels an order, recalls a message):
    ``POST /v1/<name>s/{<name>_id}/<verb>`` with a ``body`` that gives the reason. The
    stop is recorded in Postgres first and then told to the workflow: 202 with ``view``
    of the outcome, or 409 when nothing was ``recorded`` (the entity is past stopping)."""

    resource: _Resource[Any]
    verb: str
    body: type[CancelRequest | RecallRequest]
    view: type[View]
    recorded: Callable[[OutcomeT], bool]

    def operation(
        self, summary: str, handler: Handler, *, accepted: str, refused: str
    ) -> Operation:
        """The stop in the document; its operation id is ``<verb><Name>``."""
        return self.resource.on_one(
            "POST",
            f"/{self.verb}",
            f"{self.verb}{self.resource.name.capitalize()}",
            summary,
            handler,
            Answer(202, accepted, self.view, headers=_CREATED),
            problem(409, refused),
            body=self.body,
        )


_CANCEL_ORDER: _Stop[CancelOutcome] = _Stop(
    _ORDERS, "cancel", CancelRequest, CancelView, lambda outcome: outcome.recorded
)
_RECALL_MESSAGE: _Stop[RecallOutcome] = _Stop(
    _MESSAGES, "recall", RecallRequest, RecallView, lambda outcome: outcome.recalled
)


class Api:
    """The handlers, over :class:`ApiDeps`."""

    def __init__(self, deps: ApiDeps) -> None:
        self.deps = deps
        s = deps.settings
        self.metrics = deps.metrics
        self.keys = KeyCache(deps.pool, s.api_key_cache_seconds)
        self.limits = ClientLimits(s.api_client_rate, s.api_client_burst)
        self.slots = StartSlots(s.api_max_starts_in_flight)

        async def count() -> dict[str, int]:
            return {str(k): n for k, n in (await idem.open_lifecycles(deps.pool)).items()}

        self.backlog = Backlog(s.api_max_open_lifecycles, count)
        self._retry_after = s.api_unavailable_retry_after_seconds

    # --- the rules every request goes through ---------------------------------------

    def refuse(
        self, reason: str, slug: str, detail: str, *, retry_after: int | None = None
    ) -> Problem:
        """A refusal at the door, counted by reason."""
        self.metrics.refusals.add(1, {"reason": reason})
        found = Problem.edge(slug, detail, retry_after=retry_after)
        if slug == "unauthenticated":
            found.headers["WWW-Authenticate"] = 'Bearer realm="tollgate"'
        return found

    async def client(self, request: Request) -> str:
        """The calling client, after its key and its token bucket."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        client = None
        if scheme.lower() == "bearer" and token.strip():
            client = await self.keys.client_for(token.strip())
        if client is None:
            raise self.refuse(
                "unauthenticated",
                "unauthenticated",
                "send 'Authorization: Bearer <key>' with a key from "
                "'starter.py apikey create --client NAME'",
            )
        request.state.client = client
        wait = self.limits.retry_after(client)
        if wait is not None:
            raise self.refuse(
                "rate_limited",
                "rate-limited",
                f"client {client} is over {self.limits.rate:g} requests per second "
                f"(burst {self.limits.burst}); retry in {wait} s",
                retry_after=wait,
            )
        return client

    async def body(self, request: Request) -> bytes:
        """The body, or 413 as soon as it is known to exceed the limit."""
        limit = self.deps.settings.api_max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise Problem.edge("malformed-request", "Content-Length is not a number")
            if int(declared) > limit:
                raise self.refuse(
                    "body_too_large", "body-too-large", f"the body is over {limit} bytes"
                )
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise self.refuse(
                    "body_too_large", "body-too-large", f"the body is over {limit} bytes"
                )
        return bytes(data)

    def parse(self, request: Request, raw: bytes, model: type[ModelT]) -> ModelT:
        """A JSON body validated into ``model``: 415, 400 or 422 when it is not one."""
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise Problem.edge("unsupported-media-type", "send the body as application/json")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise Problem.edge("malformed-request", "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise InputError("the body must be a JSON object")
        return parse_input(model, data)

    def idempotency_key(self, request: Request) -> str:
        """The request's Idempotency-Key, checked (400 without one)."""
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is None:
            raise Problem.edge(
                "idempotency-key-required",
                f"send an {IDEMPOTENCY_HEADER} header (1-255 printable ASCII characters, no "
                "spaces), the same on every retry of this request",
            )
        if re.fullmatch(IDEMPOTENCY_KEY_PATTERN, key) is None:
            raise Problem.edge(
                "malformed-request",
                f"{IDEMPOTENCY_HEADER} must be 1-255 printable ASCII characters without spaces",
            )
        return key

    def unavailable(self, detail: str) -> Problem:
        """503 with the settings' Retry-After."""
        return self.refuse("unavailable", "unavailable", detail, retry_after=self._retry_after)

    # --- what creates, cancels and recalls share ----------------------------------------

    async def _create_once(
        self,
        client: str,
        key: str,
        entry: idem.IdempotencyRecord,
        resource: _Resource[RowT],
        start: Callable[[Any], Awaitable[object]],
        same: Callable[[RowT], bool],
    ) -> dict[str, str]:
        """Start the create unless its key was used before; the answer's headers. A
        create that finds its key used, or its id taken, answers with what is there if
        that was this very request (a replay), else 409."""
        found = await idem.find(self.deps.pool, client, key)
        if found is None:
            try:
                await self._start(start, client, key, entry)
                return _created_headers(resource.location(entry.entity_id), replayed=False)
            except AlreadyExists:
                found = await self._recover(client, key, entry, resource, same)
        self._same_request(found, entry, key)
        return _created_headers(resource.location(entry.entity_id), replayed=True)

    async def _start(
        self,
        start: Callable[[Any], Awaitable[object]],
        client: str,
        key: str,
        entry: idem.IdempotencyRecord,
    ) -> None:
        """Run one create under the backlog bound, the start-slot bound and the start
        timeout; the key is recorded in its transaction."""
        if await self.backlog.full(entry.kind):
            raise self.refuse(
                "backlog",
                "overloaded",
                f"{self.backlog.limit} {entry.kind}s are under way, the most the system takes "
                "(API_MAX_OPEN_LIFECYCLES); retry shortly",
                retry_after=1,
            )
        if not self.slots.try_take():
            raise self.refuse(
                "overloaded",
                "overloaded",
                f"{self.slots.limit} creates are in flight; retry shortly",
                retry_after=1,
            )
        self.metrics.starts_in_flight.add(1)
        try:
            async with asyncio.timeout(self.deps.settings.api_start_timeout_seconds):
                await start(lambda conn: idem.record(conn, client, key, entry, must_be_new=True))
            self.backlog.started(entry.kind)
        except idem.IdempotencyKeyTaken:
            # A concurrent request with this key committed first: answer from its record.
            raise AlreadyExists(key) from None
        except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
            raise self.unavailable(
                "the create did not finish in time (Temporal or Postgres slow or down); "
                "nothing was recorded: retry with the same Idempotency-Key"
            ) from None
        finally:
            self.slots.give_back()
            self.metrics.starts_in_flight.add(-1)

    async def _recover(
        self,
        client: str,
        key: str,
        entry: idem.IdempotencyRecord,
        resource: _Resource[RowT],
        same: Callable[[RowT], bool],
    ) -> idem.IdempotencyRecord:
        """The create found its id taken: by a concurrent request with the same key, or
        by an earlier attempt whose workflow started but whose commit was lost (its
        first activity then inserts the row). Answer from what is there: the row, if
        ``same`` says this request created it."""
        found = await idem.find(self.deps.pool, client, key)
        if found is not None:
            return found
        row = await resource.get(self.deps.pool, entry.entity_id)
        if row is None:
            raise Problem.edge(
                "still-starting",
                f"an earlier request with this Idempotency-Key started the {entry.kind} and it "
                "is not recorded yet; retry shortly with the same key",
                retry_after=self._retry_after,
            )
        if not same(row):
            raise Problem.edge(
                "idempotency-key-conflict",
                f"{IDEMPOTENCY_HEADER} {key!r} already created {entry.kind} {row.id} from "
                "another request",
            )
        async with self.deps.pool.acquire() as conn:
            await idem.record(conn, client, key, entry, must_be_new=False)
        return entry

    def _same_request(
        self, found: idem.IdempotencyRecord, entry: idem.IdempotencyRecord, key: str
    ) -> None:
        if found.kind != entry.kind or found.request_sha256 != entry.request_sha256:
            raise Problem.edge(
                "idempotency-key-conflict",
                f"{IDEMPOTENCY_HEADER} {key!r} was used for {found.kind} {found.entity_id} with "
                "a different request body; use a new key for a new request",
            )

    async def _mine(self, request: Request, client: str, resource: _Resource[RowT]) -> RowT:
        """The row the path's ``<name>_id`` names, if ``client`` created it: otherwise 404,
        the same answer as no row at all."""
        entity_id = request.path_params[resource.id_param.name]
        if not is_safe_id(entity_id):
            raise resource.not_found(entity_id)
        row = await resource.get(self.deps.pool, entity_id)
        if row is None or row.client_id != client:
            raise resource.not_found(entity_id)
        return row

    async def _stop(
        self,
        request: Request,
        how: _Stop[OutcomeT],
        stop: Callable[..., Awaitable[OutcomeT]],
    ) -> Response:
        """A cancel or a recall, as ``how`` describes it, through the service's ``stop``."""
        client = await self.client(request)
        body = self.parse(request, await self.body(request), how.body)
        row = await self._mine(request, client, how.resource)
        outcome = await stop(row.id, reason=body.reason, requested_by=client, actor=f"api:{client}")
        if not how.recorded(outcome):
            raise IllegalTransition(row.id, outcome.message)
        return _json(how.view.of(outcome), 202, {"Location": how.resource.location(row.id)})

    # --- orders ---------------------------------------------------------------------------

    async def create_order(self, request: Request) -> Response:
        """``POST /v1/orders`` (``?wait=charged`` to wait for the charge's outcome)."""
        client = await self.client(request)
        key = self.idempotency_key(request)
        wait = request.query_params.get("wait")
        if wait not in (None, "charged"):
            raise InputError("wait: the only value is 'charged'")
        body = self.parse(request, await self.body(request), OrderCreate)
        order_id = idem.entity_id_for("order", client, key)
        order = parse_input(
            OrderInput,
            {**body.model_dump(), "order_id": order_id, "client_id": client},
        )
        entry = idem.IdempotencyRecord("order", idem.request_hash(body), order_id)

        def start(also: Any) -> Awaitable[object]:
            return self.deps.orders.create(order, actor=f"api:{client}", also=also)

        def same(row: order_store.OrderRow) -> bool:
            return (row.client_id, row.customer_id, row.items, row.amount_cents, row.currency) == (
                client,
                order.customer_id,
                order.items,
                order.amount_cents,
                order.currency,
            )

        headers = await self._create_once(client, key, entry, _ORDERS, start, same)
        if wait and (await self.deps.orders.row(order_id)).status in _BEFORE_CHARGED:
            # Asked once the row is committed, for a new order as for a replay: the
            # update is accepted in a workflow task, and the order's first one records
            # the order from that row.
            await self._until_charged(self.deps.orders.until_charged(order_id))
        return _json(OrderView.of(await self.deps.orders.row(order_id)), 202, headers)

    async def _until_charged(self, waiting: Any) -> None:
        """Wait for the ``charged`` answer up to API_WAIT_SECONDS; the row says the rest."""
        try:
            async with asyncio.timeout(self.deps.settings.api_wait_seconds):
                await waiting
        except (TimeoutError, WorkflowUpdateFailedError, WorkflowUpdateRPCTimeoutOrCancelledError):
            pass  # still charging, or the workflow is gone: the row is the answer
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise

    async def get_order(self, request: Request) -> Response:
        """``GET /v1/orders/{order_id}``."""
        row = await self._mine(request, await self.client(request), _ORDERS)
        report = await self.deps.orders.report(row.id)
        return _json(OrderView.of(report.order, **_history(report)))

    async def cancel_order(self, request: Request) -> Response:
        """``POST /v1/orders/{order_id}/cancel``."""
        return await self._stop(request, _CANCEL_ORDER, self.deps.orders.cancel)

    # --- messages -------------------------------------------------------------------------

    async def create_message(self, request: Request) -> Response:
        """``POST /v1/messages``."""
        client = await self.client(request)
        key = self.idempotency_key(request)
        body = self.parse(request, await self.body(request), MessageCreate)
        message_id = idem.entity_id_for("message", client, key)
        message = parse_input(
            MessageInput,
            {
                "message_id": message_id,
                "sender_id": body.sender_id,
                "recipient_id": body.recipient_id,
                "recipient_email": body.recipient_email,
                "body": body.body,
                "deadline": timedelta(seconds=body.deadline_seconds),
                "read_window": timedelta(seconds=body.read_window_seconds),
                "client_id": client,
            },
        )
        entry = idem.IdempotencyRecord("message", idem.request_hash(body), message_id)

        def start(also: Any) -> Awaitable[object]:
            return self.deps.messages.send(message, actor=f"api:{client}", also=also)

        def same(row: message_store.MessageRow) -> bool:
            return (
                row.client_id,
                row.sender_id,
                row.recipient_id,
                row.recipient_email,
                row.body,
                row.deadline_ms,
            ) == (
                client,
                message.sender_id,
                message.recipient_id,
                message.recipient_email,
                message.body,
                int(message.deadline.total_seconds() * 1000),
            )

        headers = await self._create_once(client, key, entry, _MESSAGES, start, same)
        return _json(MessageView.of(await self.deps.messages.row(message_id)), 202, headers)

    async def get_message(self, request: Request) -> Response:
        """``GET /v1/messages/{message_id}``."""
        row = await self._mine(request, await self.client(request), _MESSAGES)
        report = await self.deps.messages.report(row.id)
        return _json(
            MessageView.of(
                report.message,
                deliveries=[DeliveryView.of(d) for d in report.deliveries],
                **_history(report),
            )
        )

    async def recall_message(self, request: Request) -> Response:
        """``POST /v1/messages/{message_id}/recall``."""
        return await self._stop(request, _RECALL_MESSAGE, self.deps.messages.recall)

    # --- devices --------------------------------------------------------------------------

    async def create_device(self, request: Request) -> Response:
        """``POST /v1/devices``: 201, or 200 when this client registered the very same
        device before (a retry)."""
        client = await self.client(request)
        body = self.parse(request, await self.body(request), DeviceCreate)
        device_id = body.device_id or f"dev-{uuid.uuid4().hex[:16]}"
        headers = {"Location": _DEVICES.location(device_id)}
        taken = AlreadyExists(f"device id {device_id} or its push token is already registered")
        try:
            existing = await message_store.get_device(self.deps.pool, device_id)
        except DeviceNotFound:
            existing = None
        if existing is not None:
            same = (existing.client_id, existing.user_id, existing.push_token, existing.platform)
            if same == (client, body.user_id, body.push_token, body.platform) and existing.active:
                return _json(DeviceView.of(existing), 200, headers)
            raise taken
        try:
            row = await self.deps.messages.register_device(
                device_id=device_id,
                user_id=body.user_id,
                push_token=body.push_token,
                platform=body.platform,
                client_id=client,
            )
        except AlreadyExists:
            raise taken from None  # without naming the device that holds the token
        return _json(DeviceView.of(row), 201, headers)

    async def get_device(self, request: Request) -> Response:
        """``GET /v1/devices/{device_id}``."""
        client = await self.client(request)
        return _json(DeviceView.of(await self._mine(request, client, _DEVICES)))

    async def delete_device(self, request: Request) -> Response:
        """``DELETE /v1/devices/{device_id}``: stop pushing to it (again is harmless)."""
        row = await self._mine(request, await self.client(request), _DEVICES)
        return _json(DeviceView.of(await self.deps.messages.remove_device(row.id)))

    # --- receipts -------------------------------------------------------------------------

    async def receipt(self, request: Request) -> Response:
        """``POST /v1/receipts``: a signed delivery or read receipt, applied once."""
        raw = await self.body(request)
        try:
            verify(
                request.headers.get(SIGNATURE_HEADER),
                raw,
                self.deps.webhook_secrets,
                now=time.time(),
                tolerance=self.deps.settings.receipt_tolerance_seconds,
            )
        except SignatureExpired as exc:
            raise self.refuse("signature_expired", "signature-expired", str(exc)) from None
        except SignatureError as exc:
            raise self.refuse("bad_signature", "invalid-signature", str(exc)) from None
        request.state.client = "webhook"
        wait = self.limits.retry_after("webhook:receipts")
        if wait is not None:
            raise self.refuse(
                "rate_limited",
                "rate-limited",
                f"too many receipts; retry in {wait} s",
                retry_after=wait,
            )
        receipt = self.parse(request, raw, Receipt)
        outcome = await self._apply(receipt)
        self.metrics.receipts.add(1, {"outcome": outcome})
        return _json(ReceiptOutcome(receipt_id=receipt.receipt_id, outcome=outcome))

    async def _apply(self, receipt: Receipt) -> Any:
        pool = self.deps.pool
        if await idem.receipt_seen(pool, receipt.receipt_id):
            return "duplicate"
        outcome: idem.ReceiptStatus
        if not await idem.device_exists(pool, receipt.device_id):
            outcome = "unknown_device"
        elif await message_store.get_message(pool, receipt.message_id) is None:
            outcome = "unknown_message"
        else:
            # Told first, recorded second: if Temporal cannot be reached nothing is
            # recorded and the sender's retry applies it. A retry racing this one may
            # signal twice; the workflow applies a device's receipt once.
            try:
                await self.deps.messages.device_says(
                    receipt.message_id, receipt.device_id, receipt.kind
                )
                outcome = "applied"
            except NotRunning:
                outcome = "not_running"
        recorded = await idem.record_receipt(
            pool,
            receipt_id=receipt.receipt_id,
            message_id=receipt.message_id,
            device_id=receipt.device_id,
            kind=receipt.kind,
            outcome=outcome,
        )
        return outcome if recorded else "duplicate"

    # --- health, metrics, the document -----------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        """``GET /healthz``: the process answers."""
        return _json(Health(status="ok"))

    async def readyz(self, request: Request) -> Response:
        """``GET /readyz``: Temporal and Postgres both answer."""
        checks: dict[str, str] = {}

        async def check(name: str, probe: Any) -> None:
            try:
                async with asyncio.timeout(2):
                    await probe
                checks[name] = "ok"
            except Exception as exc:  # any failure means not ready; the type says which
                checks[name] = f"unavailable ({type(exc).__name__})"

        await asyncio.gather(
            check("postgres", self.deps.pool.fetchval("SELECT 1")),
            check("temporal", self.deps.client.service_client.check_health()),
        )
        ready = all(v == "ok" for v in checks.values())
        health = Health(status="ok" if ready else "unavailable", checks=checks)
        return _json(health, 200 if ready else 503, None if ready else {"Retry-After": "5"})

    async def prometheus(self, request: Request) -> Response:
        """``GET /metrics``."""
        return Response(self.metrics.exposition(), media_type=PROMETHEUS_MEDIA_TYPE)


def _public(
    path: str, operation_id: str, summary: str, handler: Handler, *answers: Answer
) -> Operation:
    """A ``GET`` that needs no credential: health, metrics, the document."""
    return Operation("GET", path, operation_id, summary, handler, auth="none", answers=answers)


def operations(api: Api, document: dict[str, Any] | None = None) -> list[Operation]:
    """Every route of the API, with what it takes and answers."""
    wait = Param(
        "wait",
        "query",
        {"type": "string", "enum": ["charged"]},
        "charged: answer once the order is charged, failing or cancelled "
        "(at most API_WAIT_SECONDS); the checkout goes on",
        required=False,
    )

    async def openapi(request: Request) -> Response:
        assert document is not None
        return Response(json.dumps(document), media_type="application/json")

    return [
        _ORDERS.create(
            "createOrder",
            "Create an order and start its checkout",
            api.create_order,
            OrderCreate,
            wait,
        ),
        _ORDERS.read(
            "getOrder",
            "An order: row, version, audited transitions, workflow status",
            api.get_order,
        ),
        _CANCEL_ORDER.operation(
            "Cancel an order: recorded in Postgres first, then the workflow is told",
            api.cancel_order,
            accepted="Cancellation recorded; compensating",
            refused="The order has finished",
        ),
        _MESSAGES.create(
            "sendMessage",
            "Send a message to every device of the recipient, email as the fallback",
            api.create_message,
            MessageCreate,
        ),
        _MESSAGES.read(
            "getMessage",
            "A message: status, per-device facts, audited transitions, workflow",
            api.get_message,
        ),
        _RECALL_MESSAGE.operation(
            "Recall a message: recorded in Postgres first, then the workflow is told",
            api.recall_message,
            accepted="Recalled",
            refused="The message was read or has ended",
        ),
        Operation(
            "POST",
            _DEVICES.collection,
            "registerDevice",
            "Register a device and its push token",
            api.create_device,
            body=DeviceCreate,
            answers=(
                Answer(
                    200, "Registered before, identically (a retry)", DeviceView, headers=_CREATED
                ),
                Answer(201, "Registered", DeviceView, headers=_CREATED),
                problem(409, "The device id or push token is taken, or the user has 10 devices"),
            ),
            tags=_DEVICES.tags,
        ),
        _DEVICES.read("getDevice", "A device (never its push token)", api.get_device),
        _DEVICES.on_one(
            "DELETE",
            "",
            "removeDevice",
            "Stop pushing to a device (it keeps its history)",
            api.delete_device,
            Answer(200, "Removed", DeviceView),
        ),
        Operation(
            "POST",
            "/v1/receipts",
            "postReceipt",
            "A device's delivery or read receipt, signed with the webhook secret",
            api.receipt,
            auth="signature",
            body=Receipt,
            answers=(
                Answer(200, "Applied, or recognised as a duplicate, or ignored", ReceiptOutcome),
                problem(429, "Too many receipts", retry_after=True),
            ),
            tags=("receipts",),
        ),
        _public(
            "/healthz", "healthz", "The process answers", api.healthz, Answer(200, "Alive", Health)
        ),
        _public(
            "/readyz",
            "readyz",
            "Temporal and Postgres are reachable",
            api.readyz,
            Answer(200, "Ready", Health),
            Answer(503, "Not ready", Health, headers=("Retry-After",)),
        ),
        _public(
            "/metrics",
            "metrics",
            "Prometheus metrics",
            api.prometheus,
            Answer(200, "Prometheus text", media_type="text/plain"),
        ),
        _public(
            "/v1/openapi.json",
            "openapi",
            "This document",
            openapi,
            Answer(200, "The OpenAPI 3.1 document"),
        ),
    ]


def _wrap(api: Api, op: Operation) -> Any:
    """The handler with the rules around it: problems, metrics, access log."""
    metrics = api.metrics

    async def endpoint(request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await op.handler(request)
        except Problem as found:
            response = found.response()
        except TollgateError as exc:
            response = Problem.of(exc).response()
        except Exception as exc:
            down = unreachable(exc)
            if down is not None:
                response = api.unavailable(
                    f"{down} cannot be reached; nothing was recorded, retry later"
                ).response()
            else:
                # Type and stack only: the message may quote personal data.
                _log.error(
                    "unexpected error",
                    extra={
                        "route": op.path,
                        "error": type(exc).__name__,
                        "stack": "".join(traceback.format_tb(exc.__traceback__)),
                    },
                )
                response = Problem.edge(
                    "internal-error", "an unexpected error; it was logged"
                ).response()
        seconds = time.perf_counter() - started
        metrics.requests.add(
            1, {"route": op.path, "method": op.method, "status": response.status_code}
        )
        metrics.duration.record(seconds, {"route": op.path, "method": op.method})
        _access.info(
            "request",
            extra={
                "method": op.method,
                "route": op.path,
                "status": response.status_code,
                "ms": round(seconds * 1000, 1),
                "client": getattr(request.state, "client", None),
            },
        )
        return response

    return endpoint


def create_app(deps: ApiDeps) -> Starlette:
    """The API over ``deps``."""
    api = Api(deps)
    document: dict[str, Any] = {}
    ops = operations(api, document)
    document.update(openapi_document(ops, title="Tollgate API", version=API_VERSION))
    routes = [Route(op.path, _wrap(api, op), methods=[op.method]) for op in ops]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        slug = "method-not-allowed" if exc.status_code == 405 else "route-not-found"
        found = Problem(EDGE[slug], f"{request.method} {request.url.path}: {EDGE[slug].title}")
        if exc.headers:
            found.headers.update(exc.headers)
        deps.metrics.requests.add(
            1, {"route": "unmatched", "method": request.method, "status": exc.status_code}
        )
        return found.response()

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.api = api
    app.state.document = document
    # A server span per request, named by its route template: the root of the trace of
    # every order or message it creates. No header, body or key is recorded.
    instrument_app(app)
    return app
