"""Provider sandbox: a fake payment gateway, inventory service, push service (APNs / FCM)
and email provider, with fault injection.

``create_app`` builds the Starlette app, ``python -m tollgate_dev.sandbox`` serves it, and
``SandboxAdmin`` scripts it (faults, stock, declines, unregistered tokens, bounces) and
reads its ledger. The request, response and ledger models every provider speaks are in
:mod:`tollgate_dev.sandbox.models`; this package exports what scripting a sandbox needs.
"""

from tollgate_dev.sandbox.admin import SandboxAdmin, SandboxAdminError
from tollgate_dev.sandbox.app import SandboxState, create_app
from tollgate_dev.sandbox.models import (
    PROVIDERS,
    UNLIMITED_SKU,
    ErrorResponse,
    FaultSpec,
    Ledger,
    SandboxConfig,
)

__all__ = [
    "PROVIDERS",
    "UNLIMITED_SKU",
    "ErrorResponse",
    "FaultSpec",
    "Ledger",
    "SandboxAdmin",
    "SandboxAdminError",
    "SandboxConfig",
    "SandboxState",
    "create_app",
]
