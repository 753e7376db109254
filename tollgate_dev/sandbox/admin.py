"""Async client for the sandbox's admin API: script outages, seed stock, unregister device
tokens, bounce addresses, read the ledger.

Tests and the demo use it against a running sandbox::

    async with SandboxAdmin("http://127.0.0.1:18081") as admin:
        await admin.set_fault("payments", FaultSpec(fail_next=3))
        ...
        ledger = await admin.ledger(order_id="o-1")
        assert len(ledger.charges) == 1
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import TypeAdapter

from tollgate_dev._context import StartStop
from tollgate_dev.sandbox.models import AddressList, FaultSpec, Ledger, StockUpdate, TokenList

__all__ = ["SandboxAdmin", "SandboxAdminError"]

_FAULTS = TypeAdapter(dict[str, FaultSpec])
_COUNTS = TypeAdapter(dict[str, int])


class SandboxAdminError(Exception):
    """The sandbox answered an admin call with an error status."""

    def __init__(self, status_code: int, body: Any, method: str, url: str) -> None:
        self.status_code = status_code
        self.body = body
        super().__init__(f"{method} {url} -> {status_code}: {body}")


def _segment(value: str) -> str:
    # Path segments are user data (sku, customer id, token, address): "/" or "?" must not
    # reshape the URL.
    return quote(value, safe="")


class _NameSet:
    """One of the sandbox's sets of names (declined customers, unregistered tokens,
    bounced addresses), as its admin routes serve it: ``GET path`` lists it, ``PUT`` /
    ``DELETE path/<name>`` adds / removes a name."""

    def __init__(self, call: Callable[..., Awaitable[Any]], path: str) -> None:
        self._call = call
        self._path = path

    async def add(self, name: str) -> None:
        await self._call("PUT", f"{self._path}/{_segment(name)}")

    async def remove(self, name: str) -> None:
        await self._call("DELETE", f"{self._path}/{_segment(name)}")

    async def listing(self) -> Any:
        return await self._call("GET", self._path)


class SandboxAdmin(StartStop):
    """Admin client over ``httpx.AsyncClient``; every call raises :class:`SandboxAdminError`
    on a non-2xx answer.

    Pass ``transport`` (e.g. ``httpx.ASGITransport(app=create_app())``) to talk to an
    in-process app without a socket.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self._client = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport)
        self._declined = _NameSet(self._call, "/admin/payments/declined")
        self._unregistered = _NameSet(self._call, "/admin/push/unregistered")
        self._bounced = _NameSet(self._call, "/admin/email/bounced")

    async def stop(self) -> None:
        """Close the underlying HTTP client."""
        await self._client.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._client.request(method, path, **kwargs)
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        if response.is_error:
            raise SandboxAdminError(response.status_code, body, method, str(response.url))
        return body

    # -- health and reset -------------------------------------------------------------

    async def health(self) -> dict[str, str]:
        """``{"status": "ok"}`` when the sandbox is up (raises ``httpx`` errors when not)."""
        body: dict[str, str] = await self._call("GET", "/health")
        return body

    async def reset(self) -> None:
        """Clear ledger, faults, counters, declines, unregistered tokens and bounces; restore
        the configured seeds (stock, declined customers, unregistered tokens, bounces)."""
        await self._call("POST", "/admin/reset")

    # -- faults -----------------------------------------------------------------------

    async def set_fault(self, provider: str, spec: FaultSpec) -> FaultSpec:
        """Replace ``provider``'s fault spec; returns it as the sandbox stored it."""
        body = await self._call(
            "PUT", f"/admin/faults/{_segment(provider)}", json=spec.model_dump(mode="json")
        )
        return FaultSpec.model_validate(body)

    async def faults(self) -> dict[str, FaultSpec]:
        """Every provider's current spec (``fail_next`` shows what is left)."""
        return _FAULTS.validate_python(await self._call("GET", "/admin/faults"))

    async def clear_faults(self, provider: str | None = None) -> None:
        """Clear one provider's faults, or every provider's when ``provider`` is None."""
        path = "/admin/faults" if provider is None else f"/admin/faults/{_segment(provider)}"
        await self._call("DELETE", path)

    async def request_counts(self) -> dict[str, int]:
        """How many business requests reached each provider, failed ones included."""
        return _COUNTS.validate_python(await self._call("GET", "/admin/requests"))

    # -- inventory --------------------------------------------------------------------

    async def set_stock(self, sku: str, quantity: int) -> None:
        """Set ``sku``'s available quantity, creating the sku if it is new."""
        update = StockUpdate(quantity=quantity)
        await self._call(
            "PUT", f"/admin/stock/{_segment(sku)}", json=update.model_dump(mode="json")
        )

    async def stock(self) -> dict[str, int]:
        """Available quantity of every sku."""
        return _COUNTS.validate_python(await self._call("GET", "/admin/stock"))

    # -- payments, push, email: the name sets ----------------------------------------------

    async def decline_customer(self, customer_id: str) -> None:
        """Make every new charge for ``customer_id`` fail with ``card_declined``."""
        await self._declined.add(customer_id)

    async def allow_customer(self, customer_id: str) -> None:
        """Undo :meth:`decline_customer` (already-stored declines still replay)."""
        await self._declined.remove(customer_id)

    async def unregister_token(self, token: str) -> None:
        """Make every new push to ``token`` fail with 410 ``unregistered``."""
        await self._unregistered.add(token)

    async def register_token(self, token: str) -> None:
        """Undo :meth:`unregister_token` (already-stored 410s still replay)."""
        await self._unregistered.remove(token)

    async def unregistered_tokens(self) -> list[str]:
        """The unregistered device tokens, sorted."""
        return TokenList.model_validate(await self._unregistered.listing()).unregistered

    async def bounce_address(self, address: str) -> None:
        """Make every new email to ``address`` fail with 422 ``bounced``."""
        await self._bounced.add(address)

    async def unbounce_address(self, address: str) -> None:
        """Undo :meth:`bounce_address` (already-stored bounces still replay)."""
        await self._bounced.remove(address)

    async def bounced_addresses(self) -> list[str]:
        """The bouncing addresses, sorted."""
        return AddressList.model_validate(await self._bounced.listing()).bounced

    # -- ledger -----------------------------------------------------------------------

    async def ledger(self, order_id: str | None = None, message_id: str | None = None) -> Ledger:
        """The ledger; or only ``order_id``'s order entries and / or ``message_id``'s
        pushes and emails (see ``SandboxState.ledger``)."""
        params: dict[str, str] = {}
        if order_id is not None:
            params["order_id"] = order_id
        if message_id is not None:
            params["message_id"] = message_id
        return Ledger.model_validate(await self._call("GET", "/admin/ledger", params=params))
