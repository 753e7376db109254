"""Tollgate's error taxonomy.

Errors are classified where they happen. Activities raise the domain errors below;
``activities.to_application_error`` turns them into Temporal ``ApplicationError``s whose
``type`` is the class name, so workflows and retry policies name them without importing
activity code. This module itself knows nothing of Temporal. Transient errors are retried by Temporal with backoff; permanent ones
are non-retryable and end the step.

    TollgateError
    ├── InputError                      bad input at an edge (CLI, workflow input); nothing written
    │   └── AlreadyExists               the id already names an entity or a lifecycle
    ├── ConfigError                     a setting is missing or malformed; the process refuses to run
    ├── LimitReached                    a per-user limit (active devices) is full      [permanent]
    ├── NotRunning                      the lifecycle already ended; a signal cannot reach it
    ├── StoreUnavailable                Postgres unreachable for a step's move       [transient]
    ├── NotFound                        no such row                                  [permanent]
    │   ├── OrderNotFound
    │   ├── MessageNotFound
    │   └── DeviceNotFound
    ├── TransitionError
    │   ├── IllegalTransition           the trigger refused an edge (SQLSTATE TG001) [permanent]
    │   └── VersionConflict             someone else moved the row first             [permanent]
    │       ├── OrderCancelled          ...and what they did was cancel the order
    │       └── MessageRecalled         ...and what they did was recall the message
    └── ProviderError                   a call to payment / inventory went wrong
        ├── ProviderUnavailable         timeout, connection error, 5xx, 429          [transient]
        ├── MalformedProviderResponse   2xx whose body is not what the API promises  [transient]
        └── ProviderRejected            a business answer: the provider said no      [permanent]
            ├── PaymentDeclined         card_declined, insufficient_funds
            ├── OutOfStock
            ├── UnknownSku
            ├── InvalidProviderRequest  the provider found our request malformed (400)
            ├── IdempotencyConflict     same key, different body (409)
            ├── StepVoided              a compensation for this key ran first (409 voided)
            ├── TokenUnregistered       the push provider no longer knows a device (410)
            └── EmailBounced            the address cannot receive mail
"""

from __future__ import annotations

from typing import Any


class TollgateError(Exception):
    """Base of every error Tollgate raises on purpose."""

    retryable = False

    def details(self) -> dict[str, Any]:
        """Structured details carried into the ``ApplicationError``."""
        return {}


class InputError(TollgateError, ValueError):
    """Input at an edge is malformed; the message names the problem."""


class AlreadyExists(InputError):
    """The id already names an entity (its row) or a lifecycle (its workflow id): ids are
    never reused. Nothing was written."""


class ConfigError(TollgateError):
    """A setting is missing or malformed (a payload key, a credential); the message names
    the setting, never its value."""


class LimitReached(TollgateError):
    """A per-user limit is full (active devices); the message says how to make room."""


class NotRunning(TollgateError):
    """The entity exists but its workflow has ended, so it can no longer be told anything."""


class StoreUnavailable(TollgateError):
    """Postgres could not be reached for the move a step's activity makes before (or
    after) its provider call. Retried with the step; if every attempt fails so, the
    workflow makes the move as a local activity, which waits the outage out."""

    retryable = True


class NotFound(TollgateError):
    """No row with this id exists in Postgres."""

    kind = "row"

    def __init__(self, entity_id: str) -> None:
        super().__init__(f"{self.kind} {entity_id!r} does not exist")
        self.entity_id = entity_id


class OrderNotFound(NotFound):
    """No order with this id."""

    kind = "order"


class MessageNotFound(NotFound):
    """No message with this id."""

    kind = "message"


class DeviceNotFound(NotFound):
    """No device with this id."""

    kind = "device"


class TransitionError(TollgateError):
    """A status change could not be applied."""


class IllegalTransition(TransitionError):
    """The transition trigger refused the edge."""

    def __init__(self, entity_id: str, message: str) -> None:
        super().__init__(message)
        self.entity_id = entity_id


class VersionConflict(TransitionError):
    """The row's version moved since it was read: another writer got there first."""

    def __init__(
        self, entity_id: str, expected: int, status: str, version: int, *, kind: str = "order"
    ) -> None:
        super().__init__(
            f"{kind} {entity_id}: expected version {expected}, found version {version} ({status})"
        )
        self.entity_id, self.expected, self.status, self.version = (
            entity_id,
            expected,
            status,
            version,
        )
        #: Whether the step this move was to begin may have run anyway: True unless the
        #: writer checked that no attempt of the move ever applied (see
        #: ``activities.StepActivities``), so nothing after it can have run.
        self.step_may_have_run = True

    def details(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "version": self.version,
            "step_may_have_run": self.step_may_have_run,
        }


class OrderCancelled(VersionConflict):
    """The row moved because a cancellation was recorded; cancellation wins."""


class MessageRecalled(VersionConflict):
    """The row moved because the sender recalled the message; the recall wins."""


class ProviderError(TollgateError):
    """A provider call failed."""

    def __init__(self, provider: str, message: str, *, code: str | None = None) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider, self.code = provider, code

    def details(self) -> dict[str, Any]:
        return {"provider": self.provider, "code": self.code}


class ProviderUnavailable(ProviderError):
    """Timeout, connection failure, 5xx or 429: worth retrying later."""

    retryable = True


class MalformedProviderResponse(ProviderError):
    """A success status with a body we cannot use. Retried: the request is idempotent."""

    retryable = True


class ProviderRejected(ProviderError):
    """The provider answered and the answer is no."""


class PaymentDeclined(ProviderRejected):
    """The card was declined (``card_declined``, ``insufficient_funds``)."""


class OutOfStock(ProviderRejected):
    """Not enough stock for an item."""


class UnknownSku(ProviderRejected):
    """The inventory does not know an item."""


class InvalidProviderRequest(ProviderRejected):
    """The provider found our request malformed."""


class IdempotencyConflict(ProviderRejected):
    """The idempotency key was already used with a different body."""


class StepVoided(ProviderRejected):
    """A compensation for this idempotency key ran before the step itself."""


class TokenUnregistered(ProviderRejected):
    """The push provider says the device token is gone (uninstalled app, expired token)."""


class EmailBounced(ProviderRejected):
    """The email provider cannot deliver to the address."""


#: Types no retry policy should retry. Workflows list them in ``non_retryable_error_types``.
PERMANENT_ERROR_TYPES: tuple[str, ...] = tuple(
    cls.__name__
    for cls in (
        InputError,
        NotFound,
        OrderNotFound,
        MessageNotFound,
        DeviceNotFound,
        IllegalTransition,
        VersionConflict,
        OrderCancelled,
        MessageRecalled,
        ProviderRejected,
        PaymentDeclined,
        OutOfStock,
        UnknownSku,
        InvalidProviderRequest,
        IdempotencyConflict,
        StepVoided,
        TokenUnregistered,
        EmailBounced,
    )
)
