"""Activities: every side effect of Tollgate (Postgres writes, provider calls).

One class per business area or provider; the worker builds each once with its clients
and registers the bound methods. Activities speak Temporal's language (the input and
result models, ``ApplicationError``); the stores and providers they call do not.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, ParamSpec, Protocol, TypeVar

import asyncpg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from tollgate import gate
from tollgate.errors import StoreUnavailable, TollgateError, VersionConflict
from tollgate.gate import Lifecycle, Store, Writer
from tollgate.lifecycle import EntityRow
from tollgate.models import TransitionRequest, TransitionResult
from tollgate.names import transition_id
from tollgate.orders.models import CompensationResult
from tollgate.postgres import UNREACHABLE
from tollgate.providers.client import UndoAnswer

P = ParamSpec("P")
R = TypeVar("R")
E = TypeVar("E")
#: A lifecycle's row model (``OrderRow``, ``MessageRow``).
RowT = TypeVar("RowT", bound=EntityRow[Any])


class StoreActivities:
    """Base of the activities that read and write one area's tables through the gate."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool


ProviderT = TypeVar("ProviderT")


class ProviderActivities(Generic[ProviderT]):
    """Base of the activities that call one provider (:mod:`tollgate.providers`)."""

    def __init__(self, provider: ProviderT) -> None:
        self._provider = provider


class StepActivities(ProviderActivities[ProviderT]):
    """Base of the provider activities that are a lifecycle's forward steps: each first
    moves its row through the gate (when its input carries the move), then calls the
    provider. One activity, so one round trip through Temporal, and the row has moved
    before the provider is called. (Validation's call is a read, the catalog's: it may
    run while the row moves.)"""

    def __init__(self, provider: ProviderT, rows: LifecycleStoreActivities[Any, Any, Any]) -> None:
        super().__init__(provider)
        self._rows = rows

    async def _move_first(
        self, entity_id: str, move: TransitionRequest[Any] | None
    ) -> TransitionResult | None:
        if move is None:
            return None
        with reaching_the_store():
            return await self._rows.move_before_step(entity_id, move)


@contextmanager
def reaching_the_store() -> Iterator[None]:
    """Around a step activity's moves: Postgres out of reach becomes
    :class:`~tollgate.errors.StoreUnavailable`, which the workflow knows to wait out."""
    try:
        yield
    except UNREACHABLE as exc:
        raise StoreUnavailable(f"Postgres unreachable: {type(exc).__name__}") from exc


def compensation_result(answer: UndoAnswer) -> CompensationResult:
    """What an undo did, as the workflow records it: the provider's ``done`` status with
    its reference, or ``voided`` when the step it undoes never landed."""
    if answer.status == "voided":
        return CompensationResult(outcome="voided")
    # Validated: ``done`` is the provider's word, and must be an outcome workflows know.
    return CompensationResult.model_validate(
        {"outcome": answer.done, "reference": answer.reference}
    )


def to_application_error(exc: TollgateError) -> ApplicationError:
    """The Temporal form of a domain error: ``type`` = class name, retryable per class."""
    return ApplicationError(
        str(exc), exc.details(), type=type(exc).__name__, non_retryable=not exc.retryable
    )


def classified(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn domain errors raised by an activity into typed ``ApplicationError``s."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except TollgateError as exc:
            raise to_application_error(exc) from exc

    return wrapper


def defn(name: str) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """An activity named ``name`` whose domain errors reach Temporal classified: what
    every Tollgate activity is (``activity.defn`` over :func:`classified`)."""

    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        return activity.defn(name=name)(classified(fn))

    return decorate


def current_workflow_id() -> str:
    """Id of the workflow that scheduled the running activity."""
    workflow_id = activity.info().workflow_id
    if not workflow_id:
        raise RuntimeError("Tollgate activities only run on behalf of a workflow")
    return workflow_id


def current_actor() -> str:
    """Who is writing, as the audit table records it."""
    info = activity.info()
    return f"worker:{info.workflow_id}:{info.activity_type}"


def writer(actor: str | None = None, reason: str | None = None) -> Writer:
    """The audit's description of this activity as a writer (the gate adds the trace
    the activity runs in)."""
    return Writer(actor or current_actor(), reason=reason)


class _Standing(Protocol):
    @property
    def status(self) -> Any: ...

    @property
    def version(self) -> int: ...


SnapshotT = TypeVar("SnapshotT")


@dataclass(frozen=True)
class Rows(Generic[E, RowT, SnapshotT]):
    """One lifecycle's rows as its activities see them: the area's face of the gate
    (``ORDER_STORE``) and the snapshot activities return."""

    store: Store[E, RowT, Any]
    #: Built as ``snapshot(status=..., version=...)``.
    snapshot: Callable[..., SnapshotT]

    @property
    def lifecycle(self) -> Lifecycle:
        """The gate's description of the lifecycle's table."""
        return self.store.lifecycle


class LifecycleStoreActivities(StoreActivities, Generic[E, RowT, SnapshotT]):
    """Base of the store activities of one lifecycle: its first row, its moves, and a
    person's stop.

    A subclass names its :class:`Rows`; its activities (named for their lifecycle, as
    recorded histories know them) call the helpers here.
    """

    rows: Rows[E, RowT, SnapshotT]

    async def _insert(self, entity: E, workflow_id: str) -> RowT:
        """Insert the entity's first row, naming its workflow, or match the one there."""
        async with self._pool.acquire() as conn:
            return await self.rows.store.insert(
                conn, entity, workflow_id=workflow_id, actor=current_actor()
            )

    async def _stop(
        self, entity_id: str, *, reason: str, actor: str, transition_id: str | None = None
    ) -> RowT:
        """Record a person's cancel or recall unless the row is past it; the row as it
        stands then (:func:`tollgate.gate.stop`)."""
        return await self.rows.store.stop(
            self._pool, entity_id, reason=reason, actor=actor, transition_id=transition_id
        )

    async def _record(self, entity: E) -> SnapshotT:
        """Ensure the entity's first row exists, written by (and naming) this workflow, and
        say where it stands.

        The service usually inserted it already, in the transaction that started the
        workflow; this is the lifecycle's own first step in case that commit was lost.
        """
        row = await self._insert(entity, current_workflow_id())
        return self.rows.snapshot(status=row.status, version=row.version)

    async def _begin(self, entity: E, entity_id: str, first: StrEnum) -> SnapshotT:
        """Record the entity's first row (unless the service did) and take its first step,
        ``first``, as the workflow's own move would (same transition id and actor); say
        where the row stands then.

        A row found past its initial version (a retry, after this very move committed) or
        stopped (cancelled before its workflow ran) is reported as it is.
        """
        lifecycle, snapshot = self.rows.lifecycle, self.rows.snapshot
        row = await self._insert(entity, current_workflow_id())
        if row.status != lifecycle.initial or row.version != 1:
            return snapshot(status=row.status, version=row.version)
        return await self._move_as_workflow(entity_id, row, first)

    async def _move_as_workflow(self, entity_id: str, at: _Standing, to: StrEnum) -> SnapshotT:
        """Move the row from where ``at`` says it stands to ``to``, as the workflow's own
        move would (same transition id and actor), for an activity that makes several
        of a lifecycle's moves in one."""
        workflow_id = current_workflow_id()
        moved = await gate.transition(
            self._pool,
            self.rows.lifecycle,
            gate.Move(
                entity_id, at.version, to.value, transition_id(workflow_id, at.version, to.value)
            ),
            Writer(f"workflow:{workflow_id}"),
        )
        return self.rows.snapshot(status=to, version=moved.version)

    async def move_before_step(
        self, entity_id: str, req: TransitionRequest[Any]
    ) -> TransitionResult:
        """The move a step activity makes before it calls its provider.

        Refused because the row moved on (a cancellation was recorded, say), it tells the
        workflow whether the step may have run all the same. Only if an earlier attempt
        of this activity applied the move (the audit holds its transition id) can that
        attempt have gone on to call the provider; otherwise nothing of the step ran and
        there is nothing to undo.
        """
        try:
            return await self._move(entity_id, req)
        except VersionConflict as refused:
            refused.step_may_have_run = await gate.applied(
                self._pool, self.rows.lifecycle, entity_id, req.transition_id
            )
            raise

    async def move_after_step(
        self, entity_id: str, req: TransitionRequest[Any]
    ) -> TransitionResult:
        """The move a step activity makes once its provider call went through. Refused (a
        cancellation was recorded meanwhile), the step did run: its undo must stay."""
        return await self._move(entity_id, req)

    async def finished_by(
        self, entity_id: str, last: TransitionRequest[Any] | None
    ) -> TransitionResult | None:
        """On a retry of a step activity: where the row stands if the step's ``last`` move
        already applied (an earlier attempt finished and its reply was lost); None on a
        first attempt, or when it did not."""
        if last is None or activity.info().attempt == 1:
            return None
        row = await gate.get_row(self._pool, self.rows.lifecycle, entity_id)
        if row is None or row["last_transition_id"] != last.transition_id:
            return None
        return TransitionResult(version=row["version"], already_applied=True)

    async def _move(self, entity_id: str, req: TransitionRequest[Any]) -> TransitionResult:
        """One version-checked transition through the gate, logged with the entity's id."""
        lifecycle = self.rows.lifecycle
        to_status = str(req.to_status)
        moved = await gate.transition(
            self._pool,
            lifecycle,
            gate.Move(
                entity_id, req.expected_version, to_status, req.transition_id, req.failure_reason
            ),
            writer(req.actor, req.reason),
        )
        activity.logger.info(
            f"{lifecycle.kind} transition",
            extra={
                f"{lifecycle.kind}_id": entity_id,
                "to_status": to_status,
                "version": moved.version,
                "already_applied": moved.already_applied,
            },
        )
        return TransitionResult(version=moved.version, already_applied=moved.already_applied)
