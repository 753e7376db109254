"""Operations as data: each route's method, path, parameters, body and answers, from
which both the Starlette routes and the OpenAPI 3.1 document are made.

Keeping one table means the document cannot drift from the server: a handler answers
only what its :class:`Operation` lists (``tests/test_api_fuzz.py`` checks every response
against the document), and schemas come from the pydantic models the handlers parse
and answer with.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response

from tollgate.api.models import ProblemView
from tollgate.api.problems import PROBLEM_MEDIA_TYPE, all_kinds

Handler = Callable[[Request], Awaitable[Response]]
Auth = Literal["key", "signature", "none"]

_REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Param:
    """A path, query or header parameter."""

    name: str
    location: Literal["path", "query", "header"]
    schema: dict[str, Any]
    description: str
    required: bool = True


@dataclass(frozen=True)
class Answer:
    """One response an operation gives."""

    status: int
    description: str
    model: type[BaseModel] | None = None
    media_type: str = "application/json"
    #: Headers always sent with it.
    headers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Operation:
    """One route of the API."""

    method: str
    path: str
    operation_id: str
    summary: str
    handler: Handler
    auth: Auth = "key"
    params: tuple[Param, ...] = ()
    body: type[BaseModel] | None = None
    answers: tuple[Answer, ...] = ()
    tags: tuple[str, ...] = field(default=())

    def all_answers(self) -> list[Answer]:
        """Its own answers, plus the problems every operation of its kind may give."""
        problems: dict[int, str] = {}
        if self.auth == "key":
            problems[401] = "No valid API key"
            problems[429] = "Refused: rate limit (or creates in flight); see Retry-After"
        if self.auth == "signature":
            problems[401] = "Missing, invalid or expired signature"
        if self.body is not None:
            problems[400] = "Malformed request (JSON, headers)"
            problems[413] = "Body larger than API_MAX_BODY_BYTES"
            problems[415] = "Body is not application/json"
            problems[422] = "The request does not validate"
        if any(p.location == "path" for p in self.params):
            problems[404] = "Not found (or not this client's)"
        if self.auth != "none":
            problems[503] = "Temporal or Postgres unreachable; nothing was written"
        answers = list(self.answers)
        taken = {a.status for a in answers}
        for status, description in sorted(problems.items()):
            if status not in taken:
                answers.append(problem(status, description, retry_after=status in (429, 503)))
        return sorted(answers, key=lambda a: a.status)


def problem(status: int, description: str, *, retry_after: bool = False) -> Answer:
    """An answer that is a problem document."""
    return Answer(
        status,
        description,
        ProblemView,
        PROBLEM_MEDIA_TYPE,
        ("Retry-After",) if retry_after else (),
    )


_HEADER_SCHEMAS: dict[str, dict[str, Any]] = {
    "Location": {"type": "string", "description": "Where the entity can be read"},
    "Retry-After": {"type": "integer", "minimum": 1, "description": "Seconds to wait"},
}


def openapi_document(operations: list[Operation], *, title: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``operations``."""
    models: set[tuple[type[BaseModel], Literal["validation", "serialization"]]] = set()
    for op in operations:
        if op.body is not None:
            models.add((op.body, "validation"))
        for answer in op.all_answers():
            if answer.model is not None:
                models.add((answer.model, "serialization"))
    keyed, definitions = models_json_schema(
        sorted(models, key=lambda m: (m[0].__name__, m[1])), ref_template=_REF
    )
    schemas = dict(definitions.get("$defs", {}))

    def ref(model: type[BaseModel], mode: Literal["validation", "serialization"]) -> Any:
        return keyed[(model, mode)]

    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        entry: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "responses": {},
        }
        if op.tags:
            entry["tags"] = list(op.tags)
        entry["security"] = [{"apiKey": []}] if op.auth == "key" else []
        params = list(op.params)
        if op.auth == "signature":
            params.append(
                Param(
                    "Tollgate-Signature",
                    "header",
                    {"type": "string", "pattern": r"^[ -~]{1,1000}$"},
                    "t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.' + body>",
                )
            )
        if params:
            entry["parameters"] = [
                {
                    "name": p.name,
                    "in": p.location,
                    "required": p.required or p.location == "path",
                    "description": p.description,
                    "schema": p.schema,
                }
                for p in params
            ]
        if op.body is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(op.body, "validation")}},
            }
        for answer in op.all_answers():
            response: dict[str, Any] = {"description": answer.description}
            if answer.model is not None:
                response["content"] = {
                    answer.media_type: {"schema": ref(answer.model, "serialization")}
                }
            elif answer.media_type != "application/json":
                response["content"] = {answer.media_type: {"schema": {"type": "string"}}}
            if answer.headers:
                response["headers"] = {
                    h: {"required": True, "schema": _HEADER_SCHEMAS[h]} for h in answer.headers
                }
            entry["responses"][str(answer.status)] = response
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": (
                "Tollgate's HTTP API. Errors are RFC 9457 problem details whose `type` is "
                "one of: " + ", ".join(f"`{k.type}` ({k.status})" for k in all_kinds())
            ),
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A key from `starter.py apikey create --client NAME`",
                }
            },
        },
    }
