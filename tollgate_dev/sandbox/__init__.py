"""Provider sandbox: a fake payment gateway, inventory service, push service (APNs / FCM)
and email provider, with fault injection.

``create_app`` builds the Starlette app, ``python -m tollgate_dev.sandbox`` serves it, and
``SandboxAdmin`` scripts it (faults, stock, declines, unregistered tokens, bounces) and
reads its ledger.
"""

from tollgate_dev.sandbox.admin import SandboxAdmin, SandboxAdminError
from tollgate_dev.sandbox.app import SandboxState, create_app
from tollgate_dev.sandbox.models import (
    PROVIDERS,
    AddressList,
    Charge,
    ChargeRequest,
    ChargeResponse,
    Email,
    EmailRequest,
    EmailResponse,
    ErrorResponse,
    FaultSpec,
    Ledger,
    Push,
    PushKind,
    PushRequest,
    PushResponse,
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
    TokenList,
    Void,
)

__all__ = [
    "PROVIDERS",
    "AddressList",
    "Charge",
    "ChargeRequest",
    "ChargeResponse",
    "Email",
    "EmailRequest",
    "EmailResponse",
    "ErrorResponse",
    "FaultSpec",
    "Ledger",
    "Push",
    "PushKind",
    "PushRequest",
    "PushResponse",
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
    "TokenList",
    "Void",
    "create_app",
]
