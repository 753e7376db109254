"""The model kit every business area shares: the frozen base, edge validation, retries.

Workflow and activity inputs and results are pydantic models (one per call, so a field
can be added without breaking running workflows). They cross Temporal through the
pydantic data converter and are validated on the way in.
"""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tollgate.errors import InputError
from tollgate.ids import SAFE_ID_PATTERN, SAFE_ID_RULE, Requester

ModelT = TypeVar("ModelT", bound=BaseModel)
StatusT = TypeVar("StatusT", bound=StrEnum)


def parse_input(model: type[ModelT], fields: dict[str, object]) -> ModelT:
    """Validate input at an edge; the first problem becomes one line naming the field."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or model.__name__
        message = first["msg"]
        if first.get("ctx", {}).get("pattern") == SAFE_ID_PATTERN:
            message = f"not a valid id: {SAFE_ID_RULE}"
        raise InputError(f"{where}: {message}") from None


class Model(BaseModel):
    """Base of every input and result: immutable, and unknown fields are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class RetrySettings(Model):
    """Retry and timeout knobs of a lifecycle's activities. Inputs, so tests run them short."""

    activity_timeout: timedelta = timedelta(seconds=10)
    initial_interval: timedelta = timedelta(seconds=1)
    maximum_interval: timedelta = timedelta(seconds=30)
    backoff_coefficient: float = Field(default=2.0, ge=1.0)
    #: Attempts for a forward step before the lifecycle gives up and compensates.
    maximum_attempts: int = Field(default=8, ge=1)
    #: Compensations never give up; after this many failed attempts the lifecycle
    #: raises an alert (search attribute ``TollgateAlert``, a warning, a metric).
    compensation_alert_attempts: int = Field(default=10, ge=1)


class TransitionResult(Model):
    """What a version-checked transition activity answers (orders and messages alike)."""

    version: int
    #: True when an earlier attempt of this very transition had already committed.
    already_applied: bool = False


class TransitionRequest(Model, Generic[StatusT]):
    """What a lifecycle's transition activity is asked: one version-checked move.

    Each area adds the entity's id under its own name (``order_id``, ``message_id``).
    """

    expected_version: int
    to_status: StatusT
    #: Deterministic id of this transition (see :func:`tollgate.names.transition_id`).
    transition_id: str
    actor: str
    reason: str | None = None
    failure_reason: str | None = None


class StopRequest(Model):
    """A person's cancel or recall: each area adds its ``reason`` (with its default)."""

    requested_by: Requester = "unknown"
