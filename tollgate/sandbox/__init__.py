"""Provider sandbox: a fake payment gateway and inventory service with fault injection.

``create_app`` builds the Starlette app, ``python -m tollgate.sandbox`` serves it, and
``SandboxAdmin`` scripts it (faults, stock, declines) and reads its ledger.
"""

from tollgate.sandbox.admin import SandboxAdmin, SandboxAdminError
from tollgate.sandbox.app import SandboxState, create_app
from tollgate.sandbox.models import (
    PROVIDERS,
    Charge,
    ChargeRequest,
    ChargeResponse,
    ErrorResponse,
    FaultSpec,
    Ledger,
    Refund,
    RefundRequest,
    RefundResponse,
    Release,
    ReleaseRequest,
    ReleaseResponse,
    Reservation,
    ReservationItem,
    ReservationRequest,
    ReservationResponse,
    SandboxConfig,
    SkuResponse,
    StockUpdate,
    Void,
)

__all__ = [
    "PROVIDERS",
    "Charge",
    "ChargeRequest",
    "ChargeResponse",
    "ErrorResponse",
    "FaultSpec",
    "Ledger",
    "Refund",
    "RefundRequest",
    "RefundResponse",
    "Release",
    "ReleaseRequest",
    "ReleaseResponse",
    "Reservation",
    "ReservationItem",
    "ReservationRequest",
    "ReservationResponse",
    "SandboxAdmin",
    "SandboxAdminError",
    "SandboxConfig",
    "SandboxState",
    "SkuResponse",
    "StockUpdate",
    "Void",
    "create_app",
]
