"""Tollgate's HTTP front door: ``python -m tollgate.api`` (``make up`` runs it too).

Routes, versioned under ``/v1`` (the OpenAPI document is ``GET /v1/openapi.json``)::

    POST   /v1/orders                  create (Idempotency-Key; ?wait=charged)   202
    GET    /v1/orders/{id}             row, version, transitions, workflow        200
    POST   /v1/orders/{id}/cancel      record CANCELLING, then signal             202
    POST   /v1/messages                send (Idempotency-Key)                     202
    GET    /v1/messages/{id}           status, per-device facts, transitions      200
    POST   /v1/messages/{id}/recall    record CANCELLED, then signal              202
    POST   /v1/devices                 register a device                          201
    GET    /v1/devices/{id}                                                        200
    DELETE /v1/devices/{id}            stop pushing to it                         200
    POST   /v1/receipts                signed delivery/read receipt, applied once 200
    GET    /healthz  /readyz  /metrics

Modules: :mod:`~tollgate.api.app` (handlers and rules), :mod:`~tollgate.api.spec`
(operations as data, the OpenAPI document), :mod:`~tollgate.api.models` (bodies),
:mod:`~tollgate.api.problems` (RFC 9457 errors), :mod:`~tollgate.api.auth` (keys),
:mod:`~tollgate.api.limits` (token buckets, starts in flight),
:mod:`~tollgate.api.signatures` (webhook signatures), :mod:`~tollgate.api.store`
(idempotency keys and receipts), :mod:`~tollgate.api.metrics` (Prometheus),
:mod:`~tollgate.api.server` (the process).
"""
