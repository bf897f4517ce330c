"""Signed postbacks from a store's back end (contract §8): HMAC-SHA256 over `"<timestamp>.<body>"`.

A store signs each `POST /v1/orders` / `/v1/refunds` with the shared `EDGE_SECRET`; the edge
records nothing whose signature is missing or wrong, or whose timestamp is more than
`MAX_SKEW_SECONDS` away from its clock (a captured request cannot be replayed later). The
signature is compared in constant time. This module never logs a secret, a body or a signature.
"""

from __future__ import annotations

import hashlib
import hmac

#: 300 s either way (contract §8): room for clock drift and a retry, not for a replay next week.
MAX_SKEW_SECONDS = 300
TIMESTAMP_HEADER = "X-Attribution-Timestamp"
SIGNATURE_HEADER = "X-Attribution-Signature"
_SCHEME = "sha256="


def signature(secret: bytes, timestamp: str | int, body: bytes) -> str:
    """The `X-Attribution-Signature` value for `body` sent at `timestamp` (Unix seconds)."""
    digest = hmac.new(secret, f"{timestamp}.".encode("ascii") + body, hashlib.sha256).hexdigest()
    return _SCHEME + digest


def signature_problem(
    secret: bytes, timestamp: str | None, signed: str | None, body: bytes, now: float
) -> str | None:
    """None when the request is signed with `secret` and fresh; else why not (for the answer)."""
    if not timestamp or not signed:
        return "missing signature"
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        return "bad timestamp"
    if abs(now - int(timestamp)) > MAX_SKEW_SECONDS:
        return "timestamp too far from the edge's clock"
    expected = signature(secret, timestamp, body)
    if not hmac.compare_digest(expected.encode(), signed.strip().lower().encode("utf-8", "replace")):
        return "wrong signature"
    return None
