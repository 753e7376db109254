"""The gate every state change passes, for every lifecycle.

Orders and messages differ in their tables and graphs, not in how a row moves, so the
moving is written once here, over a :class:`Lifecycle` that describes the table:

* :func:`transition`: ``UPDATE ... WHERE id = $1 AND version = $2``. Zero rows means the
  row moved: our own earlier attempt (same transition id: success, nothing written
  twice), a person stopping it (``lifecycle.stopped_error``), or another writer
  (``VersionConflict``). The database's trigger refuses edges outside the graph
  (SQLSTATE TG001, here ``IllegalTransition``) whoever writes.
* :func:`stop`: a person's cancel or recall, recorded version-checked, retried on a
  lost race, and refused where the row can no longer be stopped.
* :func:`insert_or_match`: the first row of an entity, or the recognition that an
  identical one is already there (the service inserts before it starts the workflow,
  and the workflow's first activity inserts again).
* :func:`describe_writer`: who writes and why, in transaction-local settings the audit
  trigger copies into the audit table.

Latency and outcome of every transition go to the ``tollgate.transition.*`` metrics.
Nothing here knows Temporal: activities turn what it returns into their own types.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar

import asyncpg
from opentelemetry import metrics
from pydantic import BaseModel, ConfigDict

from tollgate.errors import IllegalTransition, NotFound, VersionConflict
from tollgate.ids import NOTE_MAX, one_line
from tollgate.lifecycle import EntityRow
from tollgate.postgres import Connection, Executor
from tollgate.tracing import current_trace_id, current_traceparent

#: SQLSTATE raised by the transition trigger for an edge not in the graph.
ILLEGAL_TRANSITION_SQLSTATE = "TG001"
IMMUTABLE_COLUMN_SQLSTATE = "TG002"
AUDIT_APPEND_ONLY_SQLSTATE = "TG003"

#: Bound of the audit's actor column (schema/005_safe_input.sql).
ACTOR_MAX = 300
#: Lost races a stop rides out before it gives up.
_STOP_ATTEMPTS = 20


@dataclass(frozen=True)
class Lifecycle:
    """A table guarded by the transition trigger, and what its states mean to a writer."""

    #: What the entity is called in messages and in the schema: ``order``, ``message``.
    kind: str
    #: The status every row is created in.
    initial: str
    #: Statuses that mean "a person stopped this entity": a writer that finds one yields.
    stopped: frozenset[str]
    #: Where :func:`stop` moves a row...
    stop_status: str
    #: ...unless it is in one of these (ended, or stopped already): then nothing is written.
    stop_refused: frozenset[str]
    #: What :func:`stop` records of the person's reason, column by column.
    stop_columns: Callable[[str], Mapping[str, str]]
    #: Columns an inserted row must match for an existing one to be "the same entity".
    identity: tuple[str, ...]
    stopped_error: type[VersionConflict]
    not_found: type[NotFound]

    #: The entity's table. By default named after the kind, as the schema names a
    #: lifecycle's tables (``orders``, ``order_transitions``, ``order_id``); the gate
    #: benchmark points it at a copy without the trigger.
    table: str = ""

    def __post_init__(self) -> None:
        if not self.table:
            object.__setattr__(self, "table", f"{self.kind}s")

    @property
    def audit_table(self) -> str:
        """The audit table the trigger appends to: ``order_transitions``."""
        return f"{self.kind}_transitions"

    @property
    def audit_key(self) -> str:
        """The audit table's column naming the entity: ``order_id``."""
        return f"{self.kind}_id"


@dataclass(frozen=True)
class Writer:
    """Who writes and why, as the audit records it. Without a ``trace_id``, the audit
    records the trace the write runs in (:func:`tollgate.tracing.current_trace_id`)."""

    actor: str
    trace_id: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Move:
    """One version-checked step of a row along its graph."""

    entity_id: str
    expected_version: int
    to_status: str
    #: Deterministic id of this step (see :func:`tollgate.names.transition_id`): a retried
    #: write that finds it on the row knows its earlier attempt committed.
    transition_id: str
    failure_reason: str | None = None


@dataclass(frozen=True)
class Moved:
    """Where a :class:`Move` left the row."""

    version: int
    #: True when an earlier attempt of this very move had already committed.
    already_applied: bool = False


StatusT = TypeVar("StatusT", bound=StrEnum)


class AuditRow(BaseModel, Generic[StatusT]):
    """One row of a lifecycle's audit table (``order_transitions``, ...)."""

    model_config = ConfigDict(frozen=True)

    from_status: StatusT | None
    to_status: StatusT
    from_version: int | None
    to_version: int
    transition_id: str | None
    actor: str
    trace_id: str | None
    reason: str | None
    at: datetime


_meter = metrics.get_meter("tollgate.gate")
_TRANSITION_SECONDS = _meter.create_histogram(
    "tollgate.transition.duration",
    unit="s",
    description="Time to apply one version-checked transition (write, or read back on a miss)",
)
_TRANSITION_OUTCOMES = _meter.create_counter(
    "tollgate.transition.outcomes",
    description="Transitions by outcome: applied, already_applied, illegal, conflict, stopped",
)


def _described(writer: Writer) -> tuple[str, str, str]:
    """The writer as the audit's settings hold it: one printable line each, cut to the
    audit columns' bounds (schema/005_safe_input.sql), since a reason built from an
    error can be long or odd."""
    return (
        one_line(writer.actor, limit=ACTOR_MAX),
        writer.trace_id or current_trace_id() or "",
        one_line(writer.reason, limit=NOTE_MAX) if writer.reason else "",
    )


#: Tells the audit trigger who writes and why, in transaction-local settings; takes
#: :func:`_described`'s three values as ``$1``-``$3``.
_SET_WRITER = """
SELECT set_config('tollgate.actor', $1, true),
       set_config('tollgate.trace_id', $2, true),
       set_config('tollgate.reason', $3, true)
"""
#: The same as the first part of a single statement: an InitPlan sets the settings before
#: the statement touches any row (so the audit trigger sees them), and the statement is
#: its own transaction: one round trip instead of two. The statement must refer to it
#: (``WHERE EXISTS (SELECT FROM writer)``) for it to run.
_AS_WRITER = f"WITH writer AS MATERIALIZED ({_SET_WRITER})"


async def describe_writer(conn: Connection, writer: Writer) -> None:
    """Tell the audit trigger who writes and why (transaction-local settings)."""
    await conn.execute(_SET_WRITER, *_described(writer))


async def get_row(conn: Executor, lifecycle: Lifecycle, entity_id: str) -> asyncpg.Record | None:
    """The entity's row, or None."""
    return await conn.fetchrow(f"SELECT * FROM {lifecycle.table} WHERE id = $1", entity_id)


async def transition(pool: asyncpg.Pool, lifecycle: Lifecycle, move: Move, writer: Writer) -> Moved:
    """Move a row to ``move.to_status`` if it is still at ``move.expected_version``.

    Moving to the status the row already has is allowed: it writes nothing but the
    version and the transition id, which is how a recovery *claims* a row it found
    CANCELLING or COMPENSATING before it undoes anything.
    """
    started = time.perf_counter()
    outcome = "error"
    try:
        moved = await _transition(pool, lifecycle, move, writer)
        outcome = "already_applied" if moved.already_applied else "applied"
        return moved
    except IllegalTransition:
        outcome = "illegal"
        raise
    except lifecycle.stopped_error:
        outcome = "stopped"
        raise
    except VersionConflict:
        outcome = "conflict"
        raise
    finally:
        attributes = {"entity": lifecycle.kind, "to_status": move.to_status, "outcome": outcome}
        _TRANSITION_SECONDS.record(time.perf_counter() - started, attributes)
        _TRANSITION_OUTCOMES.add(1, attributes)


async def _transition(
    pool: asyncpg.Pool, lifecycle: Lifecycle, move: Move, writer: Writer
) -> Moved:
    # One statement, one round trip (see _AS_WRITER): only a miss costs a second read.
    reason = writer.reason or move.failure_reason
    try:
        version = await pool.fetchval(
            f"""
            {_AS_WRITER}
            UPDATE {lifecycle.table}
               SET status = $6, last_transition_id = $7,
                   failure_reason = coalesce($8, failure_reason)
             WHERE id = $4 AND version = $5 AND EXISTS (SELECT FROM writer)
            RETURNING version
            """,
            *_described(Writer(writer.actor, writer.trace_id, reason)),
            move.entity_id,
            move.expected_version,
            move.to_status,
            move.transition_id,
            one_line(move.failure_reason, limit=NOTE_MAX) if move.failure_reason else None,
        )
    except asyncpg.PostgresError as exc:
        if exc.sqlstate == ILLEGAL_TRANSITION_SQLSTATE:
            raise IllegalTransition(move.entity_id, str(exc)) from exc
        raise
    if version is not None:
        return Moved(version=version)
    current = await pool.fetchrow(
        f"SELECT status, version, last_transition_id FROM {lifecycle.table} WHERE id = $1",
        move.entity_id,
    )
    if current is None:
        raise lifecycle.not_found(move.entity_id)
    stopped_since = current["status"] in lifecycle.stopped and current["status"] != move.to_status
    if current["last_transition_id"] == move.transition_id and not stopped_since:
        # An earlier attempt of this activity committed and its reply was lost.
        return Moved(version=current["version"], already_applied=True)
    # A stop keeps the row's last transition id, so a row stopped after this very move
    # applied still shows its id: the stop wins all the same, and the writer is told
    # that its move had applied (a step after it may have run).
    error = lifecycle.stopped_error if current["status"] in lifecycle.stopped else VersionConflict
    raise error(
        move.entity_id,
        move.expected_version,
        current["status"],
        current["version"],
        kind=lifecycle.kind,
    )


async def stop(
    pool: asyncpg.Pool,
    lifecycle: Lifecycle,
    entity_id: str,
    *,
    reason: str,
    writer: Writer,
    transition_id: str | None = None,
) -> asyncpg.Record:
    """Record a person's cancel or recall unless the row is past it; return the row.

    The row comes back as it stands: moved to ``lifecycle.stop_status`` now, or found
    in one of ``lifecycle.stop_refused`` (stopped earlier, or ended), in which case
    nothing was written and the caller reports what it found. Concurrent writers are
    ridden out by reading again and retrying on a version miss.
    """
    columns = dict(lifecycle.stop_columns(reason))
    assignments = ", ".join(f"{name} = ${n}" for n, name in enumerate(columns, start=5))
    for _ in range(_STOP_ATTEMPTS):
        row = await get_row(pool, lifecycle, entity_id)
        if row is None:
            raise lifecycle.not_found(entity_id)
        if row["status"] in lifecycle.stop_refused:
            return row
        try:
            async with pool.acquire() as conn, conn.transaction():
                await describe_writer(conn, writer)
                stopped = await conn.fetchrow(
                    f"""
                    UPDATE {lifecycle.table}
                       SET status = $3, last_transition_id = coalesce($4, last_transition_id),
                           {assignments}
                     WHERE id = $1 AND version = $2
                    RETURNING *
                    """,
                    entity_id,
                    row["version"],
                    lifecycle.stop_status,
                    transition_id,
                    *columns.values(),
                )
        except asyncpg.PostgresError as exc:
            if exc.sqlstate != ILLEGAL_TRANSITION_SQLSTATE:
                raise
            continue  # it reached an end under us: read again and report that
        if stopped is not None:
            return stopped
    raise VersionConflict(entity_id, -1, "unknown", -1, kind=lifecycle.kind)


async def insert_or_match(
    conn: Connection, lifecycle: Lifecycle, values: Mapping[str, Any], writer: Writer
) -> asyncpg.Record:
    """Insert an entity's first row, or recognise an identical one already there.

    Whichever of the service and the workflow's first activity comes second finds the
    row; if it differs in an identity column, someone else's entity holds the id. The
    row records the span that inserts it (``trace_parent``): the lifecycle's trace
    begins there, and later operations on the entity join it (:mod:`tollgate.tracing`).
    """
    values = {**values, "trace_parent": current_traceparent()}
    names = list(values)
    placeholders = ", ".join(f"${n}" for n in range(4, len(names) + 4))
    id_placeholder = f"${names.index('id') + 4}"
    # One round trip, as in transition() (see _AS_WRITER): the row inserted, or else the
    # one there. A row whose insert committed while this statement waited on the
    # conflict is not in the statement's snapshot; only then is it read again.
    row = await conn.fetchrow(
        f"""
        {_AS_WRITER},
        inserted AS (
            INSERT INTO {lifecycle.table} ({", ".join(names)})
            SELECT {placeholders} WHERE EXISTS (SELECT FROM writer)
            ON CONFLICT (id) DO NOTHING
            RETURNING *
        )
        SELECT * FROM inserted
        UNION ALL
        SELECT * FROM {lifecycle.table}
         WHERE id = {id_placeholder} AND NOT EXISTS (SELECT FROM inserted)
        """,
        *_described(writer),
        *values.values(),
    )
    if row is None:
        row = await get_row(conn, lifecycle, values["id"])
    assert row is not None
    if any(row[column] != values[column] for column in lifecycle.identity):
        raise VersionConflict(values["id"], 1, row["status"], row["version"], kind=lifecycle.kind)
    return row


async def applied(conn: Executor, lifecycle: Lifecycle, entity_id: str, transition_id: str) -> bool:
    """Whether the transition with this id was ever applied to the entity's row (its audit
    holds it), whatever the row went through since."""
    found: bool = await conn.fetchval(
        f"""
        SELECT EXISTS (SELECT FROM {lifecycle.audit_table}
                        WHERE {lifecycle.audit_key} = $1 AND transition_id = $2)
        """,
        entity_id,
        transition_id,
    )
    return found


async def audit_trail(
    conn: Executor, lifecycle: Lifecycle, entity_id: str, status: type[StatusT]
) -> list[AuditRow[StatusT]]:
    """The entity's audited transitions, oldest first."""
    rows = await conn.fetch(
        f"""
        SELECT from_status, to_status, from_version, to_version, transition_id, actor,
               trace_id, reason, at
          FROM {lifecycle.audit_table} WHERE {lifecycle.audit_key} = $1 ORDER BY id
        """,
        entity_id,
    )
    row_type = AuditRow[status]  # type: ignore[valid-type]
    return [row_type.model_validate(dict(r)) for r in rows]


EntityT = TypeVar("EntityT")
#: A lifecycle's row model (``OrderRow``, ``MessageRow``).
RowT = TypeVar("RowT", bound=EntityRow[Any])


@dataclass(frozen=True)
class Store(Generic[EntityT, RowT, StatusT]):
    """The gate over one lifecycle, in its business area's types: what the area's store
    module offers (``insert_order = ORDER_STORE.insert``) besides its own tables."""

    lifecycle: Lifecycle
    #: The row's model, from the table's columns (``OrderRow.model_validate``).
    parse_row: Callable[[dict[str, Any]], RowT]
    #: The status enum the audit trail is read back in.
    status_type: type[StatusT]
    #: The columns of an entity's first row, from the entity and its workflow id.
    columns: Callable[[EntityT, str], Mapping[str, Any]]

    def _row(self, record: asyncpg.Record) -> RowT:
        return self.parse_row(dict(record))

    async def get(self, conn: Executor, entity_id: str) -> RowT | None:
        """The entity's row, or None."""
        record = await get_row(conn, self.lifecycle, entity_id)
        return None if record is None else self._row(record)

    async def insert(
        self,
        conn: Connection,
        entity: EntityT,
        /,
        *,
        workflow_id: str,
        actor: str,
    ) -> RowT:
        """Insert the entity's first row, or recognise an identical one already there
        (:func:`insert_or_match`)."""
        writer = Writer(actor, reason=f"{self.lifecycle.kind} created")
        columns = self.columns(entity, workflow_id)
        return self._row(await insert_or_match(conn, self.lifecycle, columns, writer))

    async def stop(
        self,
        pool: asyncpg.Pool,
        entity_id: str,
        *,
        reason: str,
        actor: str,
        transition_id: str | None = None,
    ) -> RowT:
        """Record a person's cancel or recall unless the row is past it (:func:`stop`);
        the row as it stands."""
        writer = Writer(actor, reason=reason)
        record = await stop(
            pool,
            self.lifecycle,
            entity_id,
            reason=reason,
            writer=writer,
            transition_id=transition_id,
        )
        return self._row(record)

    async def audit_trail(self, conn: Executor, entity_id: str) -> list[AuditRow[StatusT]]:
        """The entity's audited transitions, oldest first."""
        return await audit_trail(conn, self.lifecycle, entity_id, self.status_type)
