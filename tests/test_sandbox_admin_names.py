"""Names the admin client puts in a path (customers, tokens, addresses, skus) reach the
sandbox whole: ``SandboxAdmin`` percent-encodes them, "/" included, and the sandbox's
routes take everything after the prefix as the name."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import serve_in_process
from tollgate_dev.sandbox import SandboxAdmin, SandboxAdminError, create_app

#: Names that would reshape a URL if they were pasted into it as they are.
AWKWARD = ["a/b", "../up", "x/", "q?x=1", "p%2Fc", "sp ace", "#frag", "ü@example.com"]


@pytest.fixture(params=["in-process", "over-http"])
async def admin(request: pytest.FixtureRequest) -> AsyncIterator[SandboxAdmin]:
    """An admin client of a fresh sandbox: through ASGI, and through a real server
    (which decodes the path itself before routing)."""
    app = create_app()
    if request.param == "in-process":
        transport = httpx.ASGITransport(app=app)
        async with SandboxAdmin("http://sandbox", transport=transport) as client:
            yield client
        return
    async with serve_in_process(app) as url, SandboxAdmin(url) as client:
        yield client


async def test_awkward_names_round_trip_through_every_name_set(admin: SandboxAdmin) -> None:
    for name in AWKWARD:
        await admin.unregister_token(name)
        await admin.bounce_address(name)
        await admin.decline_customer(name)
    assert await admin.unregistered_tokens() == sorted(AWKWARD)
    assert await admin.bounced_addresses() == sorted(AWKWARD)
    for name in AWKWARD:
        await admin.register_token(name)
        await admin.unbounce_address(name)
        await admin.allow_customer(name)
    assert await admin.unregistered_tokens() == []
    assert await admin.bounced_addresses() == []


async def test_a_sku_with_a_slash_gets_its_stock(admin: SandboxAdmin) -> None:
    await admin.set_stock("BOX/12", 7)
    assert (await admin.stock())["BOX/12"] == 7


async def test_an_empty_name_is_not_found_and_changes_nothing(admin: SandboxAdmin) -> None:
    for add in (admin.bounce_address, admin.unregister_token, admin.decline_customer):
        with pytest.raises(SandboxAdminError, match="404"):
            await add("")
    assert await admin.bounced_addresses() == []
    assert await admin.unregistered_tokens() == []
