"""The keyed hash that stands in for personal data wherever the project stores it (contract §1).

`ip` and `user_agent` never leave the input topics as they came: the edge, dead letters and the
worker's internal topics carry `keyed_hash(value, PII_KEY)` instead, and `attribution forget`
replaces a customer's ids by a tombstone built on it. It lives here, on the bottom floor, because
the edge, the engine and the ClickHouse side of `forget` all need the same one.

HMAC-SHA256 and not a plain hash: an IPv4 address has 2^32 values, so an unkeyed digest of one is
undone by trying them all. Without the key the hash says nothing; with it, equal values still
hash equal (distinct visitors stay countable, a repeat offender stays recognisable).
This module never logs, prints or keeps a value or a key.
"""

from __future__ import annotations

import hashlib
import hmac
import re

#: Marks a keyed hash (and its scheme, should it ever change): `h1:` + 64 lower-case hex digits.
KEYED_HASH_PREFIX = "h1:"
_KEYED_HASH = re.compile(r"h1:[0-9a-f]{64}")


def keyed_hash(value: str, key: bytes) -> str:
    """`h1:` + the hex HMAC-SHA256 of `value` (UTF-8) under `key`; the same for the same pair."""
    # surrogatepass: a str decoded from odd JSON may hold a lone surrogate; hash it, never raise.
    return keyed_digest(value.encode("utf-8", "surrogatepass"), key)


def keyed_digest(data: bytes, key: bytes) -> str:
    """`keyed_hash` of raw bytes: `h1:` + hex HMAC-SHA256 (`openssl dgst -sha256 -hmac` agrees)."""
    if not key:
        raise ValueError("a keyed hash needs a non-empty key")
    return KEYED_HASH_PREFIX + hmac.new(key, data, hashlib.sha256).hexdigest()


def is_keyed_hash(value: object) -> bool:
    """Whether `value` already is what `keyed_hash` returns (so hashing again is not needed)."""
    return isinstance(value, str) and _KEYED_HASH.fullmatch(value) is not None
