"""Scrubbing personal data out of a record before it goes anywhere but its input topic.

Contract §1: `ip` and `user_agent` are stored nowhere beyond the input topics except as their
keyed hash (`PII_KEY`). Whatever copies an input record's bytes elsewhere (a dead letter, an
event hopping to an internal topic) passes them through `scrub` first.

What `scrub(raw, key)` returns:

- `raw` is JSON (one object, an array of objects, anything): every member named `ip` or
  `user_agent` of every object in it, at any depth, is replaced by `keyed_hash` of its value
  (a string is hashed stripped, like validation strips it; any other non-null value is hashed as
  its JSON). Without a key such members are removed. A null, an empty string or a value that
  already is a keyed hash is left alone, so scrubbing twice changes nothing. When nothing had to
  change, `raw` comes back byte for byte; otherwise the value is written again by orjson (compact;
  numbers as orjson reads them, the way the worker reads them anyway); a value nested deeper
  than orjson writes (255 levels) is redacted as below instead.
- `raw` is not JSON (invalid JSON or UTF-8, a BOM, a truncated record): nobody can say where its
  fields are. It comes back byte for byte only when nothing in it looks like personal data (see
  `_looks_personal`: no `ip`/user-agent name, no IP address, no browser user agent, no `\\u`
  escape that could spell one), else it is replaced by a small JSON marker:
  `{"redacted":"pii","reason":…,"bytes":<its length>,"digest":"h1:<HMAC-SHA256 of raw>"}`
  (`"sha256:<hex>"` without a key). The original stays findable in its input topic, while Kafka
  keeps it, from the dead letter's source topic, partition and offset; the digest confirms a match.

Never raises on any bytes; never logs what it scrubs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from typing import Any

import orjson

from schemas.pii import is_keyed_hash, keyed_digest, keyed_hash

__all__ = ["PII_FIELDS", "REDACTED", "is_keyed_hash", "keyed_hash", "scrub"]

#: The personal fields of input events (contract §2), as member names of a JSON object.
PII_FIELDS = ("ip", "user_agent")

#: The `redacted` member of what replaces an unparseable value that may hold personal data.
REDACTED = "pii"

_KEEP = object()
_REMOVE = object()


def scrub(raw: bytes, key: bytes | None) -> bytes:
    """`raw` without raw `ip`/`user_agent` values (see the module); `key`: the PII key, or None."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _redacted(raw, key) if _looks_personal(raw) else raw
    if not _scrub_tree(value, key):
        return raw
    try:
        return orjson.dumps(value)
    except TypeError:  # nested deeper than orjson writes (255 levels; it reads 1024)
        return _redacted(raw, key)


def _scrub_tree(root: Any, key: bytes | None) -> bool:
    """Replace or remove the personal members of every object in `root`, in place; any changed?

    A loop, not recursion: orjson parses nesting deeper than Python's recursion limit.
    """
    changed = False
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for name in PII_FIELDS:
                if name not in node:
                    continue
                replacement = _replacement(node[name], key)
                if replacement is _KEEP:
                    continue
                changed = True
                if replacement is _REMOVE:
                    del node[name]
                else:
                    node[name] = replacement
            stack.extend(v for k, v in node.items()
                         if k not in PII_FIELDS and isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
    return changed


def _replacement(value: Any, key: bytes | None) -> Any:
    """What a personal member's value becomes: a keyed hash, _REMOVE, or _KEEP (nothing in it)."""
    if value is None or is_keyed_hash(value):
        return _KEEP
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return _KEEP
        return keyed_hash(text, key) if key else _REMOVE
    # A number (an IPv4 address as an integer), an object, an array: personal all the same.
    return keyed_hash(orjson.dumps(value).decode(), key) if key else _REMOVE


def _redacted(raw: bytes, key: bytes | None) -> bytes:
    """The marker that stands in for a value that cannot be scrubbed member by member."""
    digest = keyed_digest(raw, key) if key else "sha256:" + hashlib.sha256(raw).hexdigest()
    return orjson.dumps({"redacted": REDACTED,
                         "reason": "cannot be scrubbed field by field, may hold ip or user_agent",
                         "bytes": len(raw), "digest": digest})


#: The name of a personal field in any spelling (`ip`, `client_ip`, `IP`, `User-Agent`,
#: `userAgent`), a browser user agent (`Mozilla/5.0 …` starts nearly all of them), or a JSON
#: `\u` escape (which can spell any of these).
_PERSONAL_WORDS = re.compile(
    rb"(?i)(?<![a-z0-9])ip(?![a-z0-9])|user[ _-]?agent|mozilla/|\\u"
)
#: Candidates for an IP address: dotted quads, and runs of hex digits, dots and colons with a
#: colon in them (IPv6); `ipaddress` decides ("10:15:00" of a timestamp is none).
_IPV4_LIKE = re.compile(rb"(?<![0-9])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![0-9])")
_IPV6_LIKE = re.compile(rb"[0-9A-Fa-f.]*:[0-9A-Fa-f:.]+")


def _looks_personal(raw: bytes) -> bool:
    """Whether an unparseable value may hold an ip or user agent. False positives only cost the
    raw bytes of an invalid record (still in its input topic); false negatives would leak."""
    text = raw.replace(b"\x00", b"")  # UTF-16 and UTF-32 text: the ASCII letters remain
    if _PERSONAL_WORDS.search(text):
        return True
    candidates = [m.group() for m in _IPV4_LIKE.finditer(text)]
    candidates += [m.group().strip(b".") for m in _IPV6_LIKE.finditer(text)]
    return any(_is_address(candidate) for candidate in candidates)


def _is_address(candidate: bytes) -> bool:
    try:
        ipaddress.ip_address(candidate.decode("ascii"))
    except ValueError:
        return False
    return True
