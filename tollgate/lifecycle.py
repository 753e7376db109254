"""What every lifecycle's row is made of, whatever its business: states and columns.

An order and a message differ in their graphs and their business columns, not in what
a state is (one the row may or may never leave) or in the columns the gate keeps on
every lifecycle table (``schema/001``, ``schema/002``). Those are written once here;
each area's ``states`` and ``store`` modules add their own.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import ClassVar, Generic, Self, TypeVar

from pydantic import BaseModel, ConfigDict

StatusT = TypeVar("StatusT", bound=StrEnum)


class LifecycleStatus(StrEnum):
    """A state of one lifecycle's row (``OrderStatus``, ``MessageStatus``).

    A subclass lists its states; the module that defines it then says, once, which of
    them end the lifecycle (:meth:`declare_terminal`), which is what :attr:`terminal`
    answers.
    """

    _terminal: ClassVar[frozenset[LifecycleStatus]]

    @classmethod
    def declare_terminal(cls, *states: Self) -> frozenset[Self]:
        """Make ``states`` the ones this lifecycle's row never leaves; returns them."""
        terminal = frozenset(states)
        cls._terminal = terminal
        return terminal

    @property
    def terminal(self) -> bool:
        """True for states the row never leaves."""
        return self in type(self)._terminal


class EntityRow(BaseModel, Generic[StatusT]):
    """The columns every lifecycle table has: the entity's id, the workflow that runs
    its lifecycle, and what the gate keeps (status, version, last transition).

    A subclass adds the business columns (``OrderRow``, ``MessageRow``).
    """

    model_config = ConfigDict(frozen=True)

    id: str
    workflow_id: str
    status: StatusT
    version: int
    last_transition_id: str | None
    failure_reason: str | None
    created_at: datetime
    updated_at: datetime
    #: The API client that created the entity; None for those the CLI created.
    client_id: str | None = None
    #: W3C traceparent of the span that created the entity: its lifecycle's trace.
    trace_parent: str | None = None


def entity_columns(entity_id: str, workflow_id: str, client_id: str | None) -> dict[str, object]:
    """The columns of an entity's first row that every lifecycle table has (the others
    of :class:`EntityRow` are the gate's to fill); each area adds its business columns."""
    return {"id": entity_id, "workflow_id": workflow_id, "client_id": client_id}
