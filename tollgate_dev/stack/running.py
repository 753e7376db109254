"""Whether a stack is already serving: ``make demo`` and the benches reuse one that is."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from tollgate.settings import DEFAULT_POSTGRES_PORT, Settings
from tollgate.temporal import connect
from tollgate_dev.sandbox import SandboxAdmin
from tollgate_dev.stack.postgres import LocalPostgres


async def stack_is_up(settings: Settings) -> bool:
    """Whether the settings' sandbox answers and their Temporal accepts a connection
    (``make up`` running, or your own servers)."""
    try:
        async with SandboxAdmin(settings.sandbox_url, timeout=1.0) as sandbox:
            await sandbox.health()
        await asyncio.wait_for(connect(settings), timeout=3.0)
    except Exception:
        return False
    return True


def running_owner_url(settings: Settings) -> str:
    """The schema owner's URL of a running stack: DATABASE_OWNER_URL, else the one
    ``make up``'s own Postgres has (its password is in the state directory)."""
    if settings.database_owner_url:
        return settings.database_owner_url
    data_dir = settings.state_dir / "pgdata"
    if LocalPostgres(data_dir, 0).owner_password_file.is_file():
        port = urlsplit(settings.database_url).port or DEFAULT_POSTGRES_PORT
        return LocalPostgres(data_dir, port).owner_url
    return settings.database_url  # creating the gate's plain table may then be refused
