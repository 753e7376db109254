"""Schemathesis against the served OpenAPI document: every route, generated inputs.

For each operation of ``GET /v1/openapi.json``, Hypothesis draws requests from the
document's schemas (schema-valid ones, then schema-invalid ones) and sends them to the
real API (uvicorn on a socket, the test session's Temporal, Postgres, sandbox and a
worker). Every answer must be below 500 and conform to the document: a documented
status, its media type, its required headers, its body schema. Requests carry a valid
API key, and receipts a valid signature over the body actually sent, so the generated
bodies get past the door and reach the handlers.

Bounded in time: ``MAX_EXAMPLES`` per operation and mode. Measured on the 2-core
development machine: about 500 requests in 10 to 20 s, depending on what else runs.

Schemathesis is synchronous (``requests``), so it runs in a thread while the API
serves on the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api_support import WEBHOOK_SECRET, serve_api
from tests.conftest import Harness
from tollgate.api.signatures import SIGNATURE_HEADER, sign

pytestmark = [
    pytest.mark.e2e,
    # Schemathesis's own strategies use `random`; not ours to fix.
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
]

#: Examples per operation and generation mode.
MAX_EXAMPLES = 25

CHECKS = [
    schemathesis.checks.not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def _examples(
    strategy: Any,
    session: requests.Session,
    base_url: str,
    key: str,
    sent: dict[str, int],
    label: str,
    statuses: dict[str, int],
) -> Any:
    """A Hypothesis test sending ``strategy``'s cases and checking each answer."""

    @given(case=strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case[schemathesis.APIOperation[Any, Any, Any, Any]]) -> None:
        kwargs = case.as_transport_kwargs(base_url=base_url)
        headers = dict(kwargs.pop("headers", {}))
        receipts = case.operation.path == "/v1/receipts"
        # Whatever was generated for it: the key is what gets a request past the door.
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        if not receipts:
            headers["Authorization"] = f"Bearer {key}"
        if "json" in kwargs:
            # Send exact bytes, so a receipt's signature covers what arrives.
            kwargs["data"] = json.dumps(kwargs.pop("json")).encode()
        if receipts and isinstance(kwargs.get("data"), bytes):
            headers[SIGNATURE_HEADER] = sign(WEBHOOK_SECRET, kwargs["data"], int(time.time()))
        try:
            response = session.request(**kwargs, headers=headers, timeout=30)
        except (requests.exceptions.InvalidHeader, UnicodeEncodeError, ValueError):
            return  # a request no HTTP client can send (a header with a newline)
        sent[label] += 1
        seen = f"{label} {response.status_code}"
        statuses[seen] = statuses.get(seen, 0) + 1
        case.validate_response(response, checks=CHECKS)

    return run


def _fuzz(
    document: dict[str, Any], base_url: str, key: str
) -> tuple[dict[str, int], dict[str, int]]:
    """Run every operation; requests sent per operation, and answers per status."""
    schema = schemathesis.openapi.from_dict(document)
    sent: dict[str, int] = {}
    statuses: dict[str, int] = {}
    session = requests.Session()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"an operation the schema cannot give: {result.err()}"
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        sent[label] = 0
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            test = _examples(
                operation.as_strategy(generation_mode=mode),
                session,
                base_url,
                key,
                sent,
                label,
                statuses,
            )
            try:
                test()
            except Unsatisfiable:
                # Nothing to make invalid (no parameters, no body): positive cases only.
                assert mode is GenerationMode.NEGATIVE, label
    return sent, statuses


async def test_every_route_answers_generated_requests_without_5xx_and_as_documented(
    h: Harness,
) -> None:
    async with serve_api(h, api_client_rate=10_000, api_client_burst=10_000) as api:
        document = (await api.http.get("/v1/openapi.json")).json()
        started = time.monotonic()
        sent, statuses = await asyncio.to_thread(_fuzz, document, api.url, api.key)
        elapsed = time.monotonic() - started
        assert len(sent) == 14, sent
        assert all(n > 0 for n in sent.values()), sent
        # Generated input got past the door too: not every answer is a refusal.
        codes = {int(seen.rsplit(" ", 1)[1]) for seen in statuses}
        assert {200, 202, 404, 422} <= codes, statuses
        print(f"schemathesis: {sum(sent.values())} requests in {elapsed:.1f} s: {statuses}")
