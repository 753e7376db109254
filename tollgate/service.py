"""What every lifecycle's service does: find an entity's row and workflow, start both
together, signal the workflow, and report on it.

The order and message services (:mod:`tollgate.orders.service`,
:mod:`tollgate.messages.service`) differ in their business rules and outcomes, not in
how a lifecycle is reached: that is written once here, over a :class:`LifecycleKind`.
Postgres first, Temporal second: a row is committed only if its workflow started.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

import asyncpg
from opentelemetry.trace import Span
from pydantic import BaseModel, ConfigDict
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from tollgate.errors import AlreadyExists
from tollgate.gate import AuditRow, EntityT, Lifecycle, RowT, Store, get_row
from tollgate.ids import require_safe_id
from tollgate.lifecycle import StatusT
from tollgate.names import LifecycleNames
from tollgate.postgres import Connection
from tollgate.tracing import joined

ProgressT = TypeVar("ProgressT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class LifecycleStart(Generic[ResultT]):
    """An entity's first row and the workflow that runs its lifecycle, to be started
    together (:func:`start_lifecycle`)."""

    lifecycle: Lifecycle
    entity_id: str
    #: Writes the first row, and whatever else must commit with it.
    insert: Callable[[Connection], Awaitable[object]]
    workflow: str
    arg: object
    workflow_id: str
    task_queue: str
    result_type: type[ResultT]
    search_attributes: Sequence[SearchAttributePair[str]]
    summary: str

    def options(self) -> dict[str, Any]:
        """What the start sends. An id names one lifecycle forever, even after it
        ended."""
        return {
            "id": self.workflow_id,
            "task_queue": self.task_queue,
            "result_type": self.result_type,
            "id_conflict_policy": WorkflowIDConflictPolicy.FAIL,
            "id_reuse_policy": WorkflowIDReusePolicy.REJECT_DUPLICATE,
            "search_attributes": TypedSearchAttributes(self.search_attributes),
            "static_summary": self.summary,
        }


@asynccontextmanager
async def _first_row(pool: asyncpg.Pool, start: LifecycleStart[Any]) -> AsyncIterator[None]:
    """The entity's first row, inserted in a transaction that commits only if the block
    (the workflow's start) succeeds; a start Temporal refuses is ``AlreadyExists``."""
    kind, entity_id = start.lifecycle.kind, start.entity_id
    async with pool.acquire() as conn, conn.transaction():
        existing = await get_row(conn, start.lifecycle, entity_id)
        if existing is not None:
            raise AlreadyExists(f"{kind} {entity_id} already exists ({existing['status']})")
        await start.insert(conn)
        try:
            yield
        except WorkflowAlreadyStartedError:
            raise AlreadyExists(
                f"{kind} {entity_id} already has a lifecycle ({start.workflow_id}); "
                f"{kind} ids cannot be reused"
            ) from None


async def start_lifecycle(
    client: Client, pool: asyncpg.Pool, start: LifecycleStart[ResultT]
) -> WorkflowHandle[Any, ResultT]:
    """Insert an entity's first row and start its workflow: both, or neither.

    The insert and the start share one database transaction: if Temporal refuses the
    start (the id already has a lifecycle) or cannot be reached, the insert rolls back.
    If the commit itself fails after the start, the workflow's first activity inserts
    the identical row, so the entity is still recorded.
    """
    async with _first_row(pool, start):
        return await client.start_workflow(start.workflow, start.arg, **start.options())


async def signal_if_running(handle: WorkflowHandle[Any, Any], signal: str, arg: object) -> bool:
    """Send ``signal``; False when Temporal does not know the workflow (long gone)."""
    try:
        await handle.signal(signal, arg)
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        return False
    return True


async def inspect_workflow(
    handle: WorkflowHandle[Any, Any], query: str, progress_type: type[ProgressT]
) -> tuple[str | None, ProgressT | None]:
    """The workflow's execution status, and its live progress while it runs.

    ``(None, None)`` when Temporal does not know the workflow (never started, or its
    history was removed after the retention period).
    """
    try:
        description = await handle.describe()
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        return None, None
    status = description.status.name if description.status is not None else None
    progress = None
    if description.status == WorkflowExecutionStatus.RUNNING:
        progress = await handle.query(query, result_type=progress_type)
    return status, progress


#: More writes for the transaction that inserts an entity's row (an API idempotency key).
AlsoWrite = Callable[[Connection], Awaitable[object]]


class StopAsked(Protocol):
    """A person's cancel or recall: a :class:`tollgate.models.StopRequest` with its
    area's ``reason``."""

    @property
    def reason(self) -> str: ...

    @property
    def requested_by(self) -> str: ...


@dataclass(frozen=True)
class Stopped(Generic[RowT]):
    """What a person's cancel or recall did."""

    #: The row as it stands.
    row: RowT
    #: False when the row was past stopping (ended, or read): nothing was written.
    recorded: bool
    #: False when nothing was recorded, or Temporal no longer knows the workflow.
    signalled: bool


class StopOutcome(BaseModel, Generic[StatusT]):
    """What a person's cancel or recall did, as the CLI and the API report it; each
    area adds the entity's id and whether the stop was recorded, in its own words."""

    model_config = ConfigDict(frozen=True)

    #: The row's status after the request.
    status: StatusT
    #: False when nothing was recorded, or Temporal no longer knows the workflow.
    signalled: bool
    #: What happened, in one sentence for people.
    message: str


@dataclass(frozen=True)
class LifecycleKind(Generic[EntityT, RowT, ResultT, ProgressT]):
    """How a service reaches one kind of lifecycle: its rows, and its workflow."""

    store: Store[EntityT, RowT, Any]
    names: LifecycleNames
    result_type: type[ResultT]
    #: What the workflow's status query answers.
    progress_type: type[ProgressT]


class LifecycleReport(BaseModel, Generic[StatusT, ProgressT]):
    """What every lifecycle's status report shows besides its rows: the audited
    transitions, and the workflow as Temporal had it at ``checked_at``."""

    model_config = ConfigDict(frozen=True)

    transitions: list[AuditRow[StatusT]]
    workflow_id: str
    workflow_status: str | None
    workflow_progress: ProgressT | None
    checked_at: datetime


class LifecycleService(Generic[EntityT, RowT, ResultT, ProgressT]):
    """Operations on one kind of lifecycle over one Temporal client and one Postgres
    pool. A subclass names its :class:`LifecycleKind` in ``_kind``."""

    _kind: LifecycleKind[EntityT, RowT, ResultT, ProgressT]

    def __init__(self, client: Client, pool: asyncpg.Pool, task_queue: str) -> None:
        self._client = client
        self._pool = pool
        self._task_queue = task_queue

    def handle(self, entity_id: str) -> WorkflowHandle[Any, ResultT]:
        """The workflow handle of an entity's lifecycle."""
        return self._client.get_workflow_handle(
            self._kind.names.workflow_id(entity_id), result_type=self._kind.result_type
        )

    async def row(self, entity_id: str) -> RowT:
        """The entity's row in Postgres, or the lifecycle's ``NotFound``."""
        row = await self._kind.store.get(self._pool, entity_id)
        if row is None:
            raise self._kind.store.lifecycle.not_found(entity_id)
        return row

    async def _named_row(self, entity_id: str) -> RowT:
        """:meth:`row` for an id a caller typed: one that no entity can have is an
        ``InputError``, not a lookup."""
        require_safe_id(f"{self._kind.store.lifecycle.kind} id", entity_id)
        return await self.row(entity_id)

    def _joined(
        self, operation: str, row: RowT, attributes: Mapping[str, str] | None = None
    ) -> AbstractContextManager[Span]:
        """A span ``<kind>.<operation>`` on the row's entity, in its lifecycle's trace
        (:func:`tollgate.tracing.joined`), with ``attributes`` besides the entity's id."""
        kind = self._kind.store.lifecycle.kind
        return joined(
            f"{kind}.{operation}",
            row.trace_parent,
            attributes={f"tollgate.{kind}_id": row.id, **(attributes or {})},
        )

    async def _stop(
        self, operation: str, entity_id: str, request: StopAsked, actor: str | None, signal: str
    ) -> Stopped[RowT]:
        """Record a person's cancel or recall in Postgres (version-checked), then send the
        workflow ``signal`` with the request, in the lifecycle's trace. The audit names
        ``actor`` (default ``cli:<requested_by>``)."""
        lifecycle = self._kind.store.lifecycle
        existing = await self._named_row(entity_id)
        with self._joined(operation, existing):
            row = await self._kind.store.stop(
                self._pool,
                entity_id,
                reason=request.reason,
                actor=actor or f"cli:{request.requested_by}",
            )
            # A stop the row was already past (ended, or read) wrote nothing: no signal.
            recorded = row.status == lifecycle.stop_status
            signalled = recorded and await self._signal(entity_id, signal, request)
        return Stopped(row, recorded, signalled)

    def _search_attribute(self, entity: EntityT) -> SearchAttributePair[str]:
        """What the lifecycle is searchable by besides its status (its customer, its
        recipient)."""
        raise NotImplementedError

    def _summary(self, entity: EntityT) -> str:
        """The workflow's one-line summary in Temporal's UI."""
        raise NotImplementedError

    def _start(
        self, entity: EntityT, entity_id: str, *, actor: str, also: AlsoWrite | None
    ) -> LifecycleStart[ResultT]:
        """The entity's first row (written after ``also``, in the same transaction) and
        its workflow."""
        kind, names = self._kind, self._kind.names
        workflow_id = names.workflow_id(entity_id)

        async def insert(conn: Connection) -> None:
            # ``also`` first: a concurrent request that holds the same API key waits on
            # it here and fails, instead of racing for the row and the workflow id.
            if also is not None:
                await also(conn)
            await kind.store.insert(conn, entity, workflow_id=workflow_id, actor=actor)

        return LifecycleStart(
            lifecycle=kind.store.lifecycle,
            entity_id=entity_id,
            insert=insert,
            workflow=names.workflow,
            arg=entity,
            workflow_id=workflow_id,
            task_queue=self._task_queue,
            result_type=kind.result_type,
            search_attributes=[
                SearchAttributePair(names.status_attr, kind.store.lifecycle.initial),
                self._search_attribute(entity),
            ],
            summary=self._summary(entity),
        )

    async def _signal(self, entity_id: str, signal: str, arg: object) -> bool:
        """Send ``signal`` to the entity's workflow; False when Temporal no longer knows it."""
        return await signal_if_running(self.handle(entity_id), signal, arg)

    async def _history(self, row: RowT) -> dict[str, Any]:
        """The fields of the entity's :class:`LifecycleReport`: its audit trail, and its
        workflow's status and live progress, as they are now."""
        kind = self._kind
        transitions = await kind.store.audit_trail(self._pool, row.id)
        status, progress = await inspect_workflow(
            self.handle(row.id), kind.names.status_query, kind.progress_type
        )
        return {
            "transitions": transitions,
            "workflow_id": row.workflow_id,
            "workflow_status": status,
            "workflow_progress": progress,
            "checked_at": datetime.now().astimezone(),
        }
