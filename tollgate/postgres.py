"""Connections to Postgres, the same way for the worker, the CLI and the tests."""

from __future__ import annotations

import json

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from opentelemetry.instrumentation.utils import suppress_instrumentation

#: What asyncpg raises when Postgres cannot be reached (down, restarting, refusing
#: connections, or the connection dropped), as opposed to refusing a statement.
UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.OperatorInterventionError,
)

#: One connection, taken from the pool or made directly.
Connection = asyncpg.Connection | PoolConnectionProxy
#: Anything that runs a statement: a connection, a pooled connection, or the pool.
Executor = asyncpg.Connection | PoolConnectionProxy | asyncpg.Pool


async def create_pool(dsn: str, *, max_size: int = 10) -> asyncpg.Pool:
    """A connection pool; jsonb columns come back as Python objects."""

    async def _init(conn: asyncpg.Connection) -> None:
        await conn.set_type_codec(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )

    async def _reset(conn: asyncpg.Connection) -> None:
        # What the pool runs on every release (unlock, close cursors, RESET ALL) is
        # housekeeping, not a statement of the caller's: no span for it.
        with suppress_instrumentation():
            await conn.reset()

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, init=_init, reset=_reset)
    assert pool is not None
    return pool
