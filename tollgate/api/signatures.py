"""Signed webhooks: how a device receipt proves it comes from whoever holds the secret.

The sender signs the timestamp and the exact body bytes::

    Tollgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

The timestamp is inside the signature, so an old request cannot be replayed with a
fresh one; a request whose ``t`` is further than the tolerance (default 300 s) from now
is refused. Several ``v1=`` entries may be sent (a sender rotating its secret signs
with both); one that verifies suffices. The receiver keeps old secrets for the same
reason (``RECEIPT_WEBHOOK_OLD_SECRETS``). Within the window a resent receipt verifies
again; its ``receipt_id`` is what makes it count once.

No secret, no receipts: the API refuses to start without one (fail closed).
"""

from __future__ import annotations

import hashlib
import hmac
import string
from collections.abc import Sequence

from tollgate.settings import Settings, read_secret

SIGNATURE_HEADER = "Tollgate-Signature"
#: Shorter secrets are refused: they could be guessed.
MIN_SECRET_LENGTH = 32
_SECRET_ALPHABET = frozenset(string.ascii_letters + string.digits + "-._~+/=")


class SignatureError(Exception):
    """The signature header is missing, malformed or does not verify."""


class SignatureExpired(SignatureError):
    """The signed timestamp is outside the tolerance."""


def check_secret(secret: str, source: str) -> str:
    """``secret`` if it can sign webhooks; a ``ValueError`` naming ``source`` (never the
    secret) if not."""
    if len(secret) < MIN_SECRET_LENGTH or not set(secret) <= _SECRET_ALPHABET:
        raise ValueError(
            f"{source}: a webhook secret must be at least {MIN_SECRET_LENGTH} characters of "
            "A-Z a-z 0-9 - . _ ~ + / =, e.g. from: openssl rand -hex 32"
        )
    return secret


def load_webhook_secrets(settings: Settings) -> list[str]:
    """The current webhook secret (``RECEIPT_WEBHOOK_SECRET``, else the file) first, then
    the old ones; empty when there is none. Malformed ones raise ``ValueError``."""
    current = read_secret(
        settings.receipt_webhook_secret,
        settings.webhook_secret_path,
        setting="RECEIPT_WEBHOOK_SECRET",
        file_setting="RECEIPT_WEBHOOK_SECRET_FILE",
        parse=check_secret,
    )
    if current is None:
        return []
    old = [
        check_secret(s.strip(), "RECEIPT_WEBHOOK_OLD_SECRETS")
        for s in (settings.receipt_webhook_old_secrets or "").split(",")
        if s.strip()
    ]
    return [current, *old]


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``Tollgate-Signature`` value for ``body`` sent at ``timestamp``."""
    return f"t={timestamp},v1={_digest(secret, timestamp, body)}"


def verify(
    header: str | None, body: bytes, secrets: Sequence[str], *, now: float, tolerance: int
) -> int:
    """The signed timestamp if ``header`` signs ``body`` with one of ``secrets`` within
    ``tolerance`` seconds of ``now``; else :class:`SignatureExpired` or
    :class:`SignatureError`. Every candidate is compared in constant time."""
    if not header:
        raise SignatureError(f"the {SIGNATURE_HEADER} header is missing")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit() and len(value) <= 12:
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise SignatureError(f"the {SIGNATURE_HEADER} header must be t=<unix seconds>,v1=<hex>")
    matched = False
    for secret in secrets:
        expected = _digest(secret, timestamp, body).encode()
        for candidate in candidates:
            # No early exit: as long for a near miss as for a wild guess.
            matched |= hmac.compare_digest(expected, candidate.encode("utf-8", "replace"))
    if not matched:
        raise SignatureError("the signature does not match the body")
    if abs(now - timestamp) > tolerance:
        raise SignatureExpired(
            f"the signed timestamp is {abs(now - timestamp):.0f} s from now; "
            f"at most {tolerance} s is accepted"
        )
    return timestamp
