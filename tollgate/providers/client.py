"""The one place HTTP clients for providers are built and their answers classified.

Each provider has a module of its own beside this one (payments, inventory, push,
email) that says what it is asked and what it must answer.

Every provider call goes through :class:`ProviderClient`, which maps transport failures,
status codes and bodies onto the error taxonomy in :mod:`tollgate.errors`:

* timeouts, connection errors, 5xx, 408 and 429   -> ``ProviderUnavailable`` (retried)
* a body that is not a JSON object, or a 2xx
  answer that lacks what the API promises        -> ``MalformedProviderResponse`` (retried)
* 4xx with a business ``error`` code              -> the matching ``ProviderRejected`` subclass

With a :class:`~tollgate.providers.breaker.CircuitBreaker`, each call also reports its outcome
(transient failures count against the provider, business answers for it), and while
the breaker is open the call is not sent: it fails fast with a retryable, benign
``ApplicationError`` of type ``ProviderCircuitOpen`` whose ``next_retry_delay`` is the
time left until the breaker half-opens, so Temporal waits instead of hammering.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, NamedTuple, Self, TypeVar

import httpx
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tollgate.errors import (
    EmailBounced,
    IdempotencyConflict,
    InvalidProviderRequest,
    MalformedProviderResponse,
    OutOfStock,
    PaymentDeclined,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    StepVoided,
    TokenUnregistered,
    UnknownSku,
)
from tollgate.providers.breaker import Breakers, CircuitBreaker, ProviderCircuitOpen
from tollgate.settings import Settings

_REJECTIONS: dict[str, type[ProviderRejected]] = {
    "card_declined": PaymentDeclined,
    "insufficient_funds": PaymentDeclined,
    "out_of_stock": OutOfStock,
    "unknown_sku": UnknownSku,
    "invalid_request": InvalidProviderRequest,
    "idempotency_conflict": IdempotencyConflict,
    "voided": StepVoided,
    "unregistered": TokenUnregistered,
    "bounced": EmailBounced,
}

#: What a provider's ``error`` code must look like to be kept.
_ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")

#: 4xx statuses that say "not now" rather than "no": retried like a 5xx.
_TRANSIENT_4XX = frozenset({408, 429})

T = TypeVar("T")
AnswerT = TypeVar("AnswerT", bound=BaseModel)

#: A required, non-empty string field of a provider answer.
NonEmptyStr = Annotated[str, Field(min_length=1)]


class ProviderAnswer(BaseModel):
    """Base of the answer shapes activities expect: strict types, unknown fields ignored.

    Strict, so ``{"charge_id": 5}`` or ``{"status": null}`` is malformed rather than
    coerced; only the fields an activity uses are declared.
    """

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class UndoAnswer(ProviderAnswer):
    """Base of what an undo (a refund, a release) must answer: ``voided`` when there was
    nothing to undo, else its ``done`` status with the id of what it did.

    A subclass narrows ``status`` to its two values, declares the id field its provider
    names, and says which status and field those are (``done``, ``id_field``).
    """

    done: ClassVar[str]
    id_field: ClassVar[str]

    status: str

    @property
    def reference(self) -> str | None:
        """The id of what the undo did; None when it was voided."""
        reference: str | None = getattr(self, self.id_field)
        return reference

    @model_validator(mode="after")
    def _done_has_id(self) -> Self:
        if self.status == self.done and self.reference is None:
            raise ValueError(f"a {self.done} answer needs a {self.id_field}")
        return self


def build_http_client(settings: Settings) -> httpx.AsyncClient:
    """The worker's shared HTTP client for every provider (connection pooling, timeouts).

    Every request is a span (OpenTelemetry's httpx instrumentation) and carries the W3C
    ``traceparent`` of the activity that sends it, so a provider's record of a call
    leads back to the lifecycle's trace. Paths carry no personal data (a SKU at most):
    what a provider is told goes in the body, which no span records.
    """
    client = httpx.AsyncClient(
        base_url=settings.sandbox_url,
        timeout=httpx.Timeout(settings.provider_timeout_seconds),
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        headers={"User-Agent": "tollgate-worker"},
    )
    HTTPXClientInstrumentor.instrument_client(client)
    return client


class _Request(NamedTuple):
    method: str
    path: str
    json: dict[str, Any] | None
    idempotency_key: str | None


class ProviderClient:
    """Calls one provider's HTTP API and classifies what comes back."""

    def __init__(
        self, http: httpx.AsyncClient, provider: str, breaker: CircuitBreaker | None = None
    ) -> None:
        self._http = http
        self.provider = provider
        self.breaker = breaker

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Send one request; return ``(status, body)`` for a 2xx, raise otherwise."""
        return await self._guarded(_Request(method, path, json, idempotency_key), _as_is)

    async def call_as(
        self,
        answer: type[AnswerT],
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> AnswerT:
        """Like :meth:`call`, but the 2xx body must validate as ``answer``.

        A body that does not (missing field, wrong type) is ``MalformedProviderResponse``
        and counts as a transient failure of the provider.
        """

        def parse(body: dict[str, Any]) -> AnswerT:
            try:
                return answer.model_validate(body)
            except ValidationError as exc:
                raise MalformedProviderResponse(
                    self.provider,
                    f"{method} {path}: answer is not a valid {answer.__name__}: {_summary(exc)}",
                ) from exc

        _, parsed = await self._guarded(_Request(method, path, json, idempotency_key), parse)
        return parsed

    async def _guarded(
        self, request: _Request, parse: Callable[[dict[str, Any]], T]
    ) -> tuple[int, T]:
        """One exchange under the breaker, if there is one."""
        breaker = self.breaker
        if breaker is None:
            return await self._exchange(request, parse)
        try:
            permit = breaker.before_call()
        except ProviderCircuitOpen as exc:
            # Raised in its Temporal form: ``activities.classified`` would drop the delay.
            raise exc.to_application_error() from exc
        try:
            result = await self._exchange(request, parse)
        except ProviderError as exc:
            # Transient errors are the retryable ones; a business "no" means it is up.
            breaker.record(permit, success=not exc.retryable)
            raise
        except BaseException:
            breaker.abandon(permit)
            raise
        breaker.record(permit, success=True)
        return result

    async def _exchange(
        self, request: _Request, parse: Callable[[dict[str, Any]], T]
    ) -> tuple[int, T]:
        method, path, json, idempotency_key = request
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        try:
            response = await self._http.request(method, path, json=json, headers=headers)
        except httpx.TimeoutException as exc:
            raise ProviderUnavailable(
                self.provider, f"{method} {path} timed out", code="timeout"
            ) from exc
        except httpx.DecodingError as exc:
            raise MalformedProviderResponse(
                self.provider, f"{method} {path}: body cannot be decoded"
            ) from exc
        except httpx.RequestError as exc:
            raise ProviderUnavailable(
                self.provider, f"{method} {path} failed: {type(exc).__name__}", code="connection"
            ) from exc
        return response.status_code, parse(self._classify(method, path, response))

    def _classify(self, method: str, path: str, response: httpx.Response) -> dict[str, Any]:
        status = response.status_code
        what = f"{method} {path} -> {status}"
        if status >= 500 or status in _TRANSIENT_4XX:
            raise ProviderUnavailable(self.provider, what, code=f"http_{status}")
        try:
            body = response.json()
        except ValueError as exc:
            raise MalformedProviderResponse(self.provider, f"{what}: body is not JSON") from exc
        if not isinstance(body, dict):
            raise MalformedProviderResponse(self.provider, f"{what}: body is not a JSON object")
        if status < 300:
            return body
        # Only the machine-readable code is kept: a provider's free-text message quotes
        # what it was sent (an address, a customer), and error text ends up in logs,
        # failure reasons and Temporal histories. A code that is not a plain token is
        # treated as none, so a hostile answer cannot smuggle text in through it either.
        raw = body.get("error")
        code = raw if isinstance(raw, str) and _ERROR_CODE.fullmatch(raw) else None
        error_cls = _REJECTIONS.get(code) if code is not None else None
        detail = f"{what}: {code or 'rejected'}"
        if error_cls is None:
            # A 4xx we do not know is still a refusal of this exact request; retrying the
            # same bytes will not change the answer.
            raise ProviderRejected(self.provider, detail, code=code)
        raise error_cls(self.provider, detail, code=code)


class Provider:
    """Base of one provider's API: its name, and a client behind its own breaker."""

    #: The provider's name: its breaker's, its metrics' and its errors'.
    name: ClassVar[str]

    def __init__(self, http: httpx.AsyncClient, breakers: Breakers | None = None) -> None:
        breaker = breakers.get(self.name) if breakers is not None else None
        self._client = ProviderClient(http, self.name, breaker)


def _as_is(body: dict[str, Any]) -> dict[str, Any]:
    return body


def _summary(exc: ValidationError) -> str:
    """Where and what, without the offending values (answers may carry personal data)."""
    parts = [
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
        for err in exc.errors()[:3]
    ]
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
