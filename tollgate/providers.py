"""The one place HTTP clients for providers are built and their answers classified.

Every provider call goes through :meth:`ProviderClient.call`, which maps transport
failures and status codes onto the error taxonomy in :mod:`tollgate.errors`:

* timeouts, connection errors, 5xx and 429 -> ``ProviderUnavailable`` (retried)
* a 2xx body that is not a JSON object     -> ``MalformedProviderResponse`` (retried)
* 4xx with a business ``error`` code       -> the matching ``ProviderRejected`` subclass
"""

from __future__ import annotations

from typing import Any

import httpx

from tollgate.errors import (
    EmailBounced,
    IdempotencyConflict,
    InvalidProviderRequest,
    MalformedProviderResponse,
    OutOfStock,
    PaymentDeclined,
    ProviderRejected,
    ProviderUnavailable,
    StepVoided,
    TokenUnregistered,
    UnknownSku,
)
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


def build_http_client(settings: Settings) -> httpx.AsyncClient:
    """The worker's shared HTTP client for every provider (connection pooling, timeouts)."""
    return httpx.AsyncClient(
        base_url=settings.sandbox_url,
        timeout=httpx.Timeout(settings.provider_timeout_seconds),
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        headers={"User-Agent": "tollgate-worker"},
    )


class ProviderClient:
    """Calls one provider's HTTP API and classifies what comes back."""

    def __init__(self, http: httpx.AsyncClient, provider: str) -> None:
        self._http = http
        self.provider = provider

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Send one request; return ``(status, body)`` for a 2xx, raise otherwise."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        try:
            response = await self._http.request(method, path, json=json, headers=headers)
        except httpx.TimeoutException as exc:
            raise ProviderUnavailable(
                self.provider, f"{method} {path} timed out", code="timeout"
            ) from exc
        except httpx.TransportError as exc:
            raise ProviderUnavailable(
                self.provider, f"{method} {path} failed: {type(exc).__name__}", code="connection"
            ) from exc
        return response.status_code, self._classify(method, path, response)

    def _classify(self, method: str, path: str, response: httpx.Response) -> dict[str, Any]:
        status = response.status_code
        what = f"{method} {path} -> {status}"
        if status >= 500 or status == 429:
            raise ProviderUnavailable(self.provider, what, code=f"http_{status}")
        try:
            body = response.json()
        except ValueError as exc:
            raise MalformedProviderResponse(self.provider, f"{what}: body is not JSON") from exc
        if not isinstance(body, dict):
            raise MalformedProviderResponse(self.provider, f"{what}: body is not a JSON object")
        if status < 300:
            return body
        code = body.get("error")
        message = body.get("message") or code or "rejected"
        error_cls = _REJECTIONS.get(code) if isinstance(code, str) else None
        if error_cls is None:
            # A 4xx we do not know is still a refusal of this exact request; retrying the
            # same bytes will not change the answer.
            raise ProviderRejected(self.provider, f"{what}: {message}", code=str(code))
        raise error_cls(self.provider, str(message), code=code)


def require_str(provider: str, body: dict[str, Any], field: str) -> str:
    """A required string field of a provider answer, or ``MalformedProviderResponse``."""
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise MalformedProviderResponse(provider, f"answer lacks a string {field!r}: {body!r:.200}")
    return value
