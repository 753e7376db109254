"""Every error the API answers, as RFC 9457 problem details (``application/problem+json``).

Each problem has a stable ``type``, ``urn:tollgate:problem:<slug>``, that clients may
switch on; ``title`` is fixed per type, ``detail`` says what happened this time.
Two families:

* **Tollgate's taxonomy** (:mod:`tollgate.errors`): every class there has a type, its
  name in kebab case (``OrderNotFound`` -> ``order-not-found``), and a status
  (:data:`TAXONOMY_STATUS`; a subclass inherits its parent's unless it has its own).
* **The HTTP edge** (:data:`EDGE`): missing or bad credentials, rate limits, bodies too
  large, signatures, unreachable dependencies.

The detail of a taxonomy error is its message, which can quote the caller's own input
back to it; it is never logged (see :mod:`tollgate.api.app`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from starlette.responses import Response

from tollgate import errors
from tollgate.errors import TollgateError

PROBLEM_MEDIA_TYPE = "application/problem+json"
_TYPE_PREFIX = "urn:tollgate:problem:"


def problem_type(slug: str) -> str:
    """The ``type`` URI of a problem slug."""
    return _TYPE_PREFIX + slug


def slug_of(cls: type[BaseException]) -> str:
    """``OrderNotFound`` -> ``order-not-found``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "-", cls.__name__).lower()


@dataclass(frozen=True)
class Kind:
    """One problem type: its slug, HTTP status and fixed title."""

    slug: str
    status: int
    title: str

    @property
    def type(self) -> str:
        """The ``type`` URI."""
        return problem_type(self.slug)


#: Problems of the HTTP edge, by slug.
EDGE: dict[str, Kind] = {
    k.slug: k
    for k in (
        Kind("unauthenticated", 401, "A valid API key is required"),
        Kind("invalid-signature", 401, "The receipt's signature does not verify"),
        Kind("signature-expired", 401, "The receipt's signed timestamp is outside the window"),
        Kind("route-not-found", 404, "No such route"),
        Kind("method-not-allowed", 405, "Method not allowed on this route"),
        Kind("malformed-request", 400, "The request could not be read"),
        Kind("idempotency-key-required", 400, "An Idempotency-Key header is required"),
        Kind("idempotency-key-conflict", 409, "The Idempotency-Key was used for another request"),
        Kind("body-too-large", 413, "The request body is too large"),
        Kind("unsupported-media-type", 415, "The body must be application/json"),
        Kind("rate-limited", 429, "Too many requests from this client"),
        Kind("overloaded", 429, "At capacity: too many creates or lifecycles in flight"),
        Kind("unavailable", 503, "A dependency (Temporal or Postgres) is unreachable"),
        Kind("still-starting", 503, "An earlier attempt with this key is still being recorded"),
        Kind("internal-error", 500, "Internal error"),
    )
}

#: HTTP status of each class of the taxonomy that sets one; subclasses inherit.
TAXONOMY_STATUS: dict[type[TollgateError], int] = {
    errors.TollgateError: 500,
    errors.InputError: 422,
    errors.AlreadyExists: 409,
    errors.ConfigError: 500,
    errors.LimitReached: 409,
    errors.NotRunning: 409,
    errors.NotFound: 404,
    errors.TransitionError: 409,
    # A provider the API asked (the inventory, to check SKUs) failed us.
    errors.ProviderError: 502,
    errors.ProviderUnavailable: 503,
    errors.ProviderRejected: 422,
}


def taxonomy() -> list[type[TollgateError]]:
    """Every class of :mod:`tollgate.errors`' tree, root first."""
    found: list[type[TollgateError]] = []
    pending: list[type[TollgateError]] = [TollgateError]
    while pending:
        cls = pending.pop(0)
        if cls.__module__ == errors.__name__ and cls not in found:
            found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def kind_of(cls: type[TollgateError]) -> Kind:
    """The problem type of a taxonomy class: its own slug, its nearest status."""
    status = next(TAXONOMY_STATUS[c] for c in cls.__mro__ if c in TAXONOMY_STATUS)
    doc = (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip(".")
    return Kind(slug_of(cls), status, doc)


def all_kinds() -> list[Kind]:
    """Every problem type the API may answer: the edge's, then the taxonomy's."""
    return [*EDGE.values(), *(kind_of(c) for c in taxonomy())]


@dataclass(eq=False)
class Problem(Exception):
    """An answer that is a problem; raise it from a handler."""

    kind: Kind
    detail: str
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def edge(cls, slug: str, detail: str, *, retry_after: int | None = None) -> Problem:
        """A problem of the HTTP edge (``retry_after`` seconds: a ``Retry-After``)."""
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        return cls(EDGE[slug], detail, headers)

    @classmethod
    def of(cls, exc: TollgateError) -> Problem:
        """The problem a taxonomy error is."""
        return cls(kind_of(type(exc)), str(exc))

    def response(self) -> Response:
        """The ``application/problem+json`` response."""
        body = {
            "type": self.kind.type,
            "title": self.kind.title,
            "status": self.kind.status,
            "detail": self.detail,
        }
        return Response(
            json.dumps(body),
            status_code=self.kind.status,
            headers=self.headers,
            media_type=PROBLEM_MEDIA_TYPE,
        )
