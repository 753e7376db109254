"""Apply the numbered SQL files in ``schema/`` once each, in order.

Small on purpose (see DESIGN.md): a session-level advisory lock serialises concurrent
starters (two workers booting at once), a checksum table refuses to run against a
database whose applied migration was edited afterwards, and each file runs in its own
transaction so a failing migration leaves nothing half-applied.

Migrations run as the schema owner (``DATABASE_OWNER_URL``), not as the application role
of ``DATABASE_URL``, which may not create or alter anything (see
``schema/003_least_privilege.sql``). That role may still *check* the schema: with nothing
pending, and no applied file edited, :func:`apply_migrations` returns ``[]`` for it; with
something pending it fails with a :class:`MigrationError` that names the owner setting.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import asyncpg

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema"

# Any constant works; it only has to be the same for every Tollgate process.
_LOCK_KEY = 0x7011_6A7E

_log = logging.getLogger(__name__)


class MigrationError(RuntimeError):
    """A migration cannot be applied, or an applied one no longer matches its file."""


_OWNER_HINT = (
    "migrations must run as the schema owner: set DATABASE_OWNER_URL to its connection "
    "(DATABASE_URL is the application role, which may not change the schema)"
)


def _describe(exc: asyncpg.PostgresError) -> str:
    """The server's message with its detail and hint, and ours for a privilege error."""
    parts = [str(exc)]
    for field in ("detail", "hint"):
        value = getattr(exc, field, None)
        if value:
            parts.append(f"{field}: {value}")
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        parts.append(_OWNER_HINT)
    return "; ".join(parts)


def _checksum(sql: str) -> str:
    return hashlib.sha256(sql.encode()).hexdigest()


def migration_files(directory: Path = SCHEMA_DIR) -> list[Path]:
    """The migration files in application order (``NNN_name.sql``)."""
    files = sorted(directory.glob("[0-9][0-9][0-9]_*.sql"))
    if not files:
        raise MigrationError(f"no migrations found in {directory}")
    return files


async def apply_migrations(dsn: str, directory: Path = SCHEMA_DIR) -> list[str]:
    """Apply pending migrations to the database at ``dsn``; return the names applied."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            return await _apply_locked(conn, migration_files(directory))
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()


async def _apply_locked(conn: asyncpg.Connection, files: list[Path]) -> list[str]:
    try:
        # Not CREATE TABLE IF NOT EXISTS alone: that needs CREATE on the schema even when
        # the table exists, and a role without it may still check an up-to-date schema.
        if not await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
            await conn.execute(
                """
                CREATE TABLE IF NOT EXISTS schema_migrations (
                    name       text PRIMARY KEY,
                    checksum   text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )
                """
            )
        applied = {
            r["name"]: r["checksum"]
            for r in await conn.fetch("SELECT name, checksum FROM schema_migrations")
        }
    except asyncpg.InsufficientPrivilegeError as exc:
        role = await conn.fetchval("SELECT current_user")
        raise MigrationError(f"role {role!r} cannot apply migrations: {_describe(exc)}") from exc
    newly: list[str] = []
    for path in files:
        sql = path.read_text()
        checksum = _checksum(sql)
        if path.name in applied:
            if applied[path.name] != checksum:
                raise MigrationError(
                    f"migration {path.name} changed after it was applied "
                    "(add a new numbered file instead of editing an applied one)"
                )
            continue
        async with conn.transaction():
            try:
                await conn.execute(sql)
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"migration {path.name} failed: {_describe(exc)}") from exc
            await conn.execute(
                "INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)",
                path.name,
                checksum,
            )
        _log.info("applied migration", extra={"migration": path.name})
        newly.append(path.name)
    return newly
