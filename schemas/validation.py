"""Decoding and validation of raw Kafka bytes into the records of `schemas.events` and
`schemas.reference`, and the JSON encoding of records the pipeline publishes.

It runs once for every event, so it is written for speed: one orjson parse, then hand-written
checks of exactly the fields of contract §2 (no generic validation framework). Every rejection is
an `InvalidEvent` whose `reason` is a short stable code (the dead-letter reason and metrics label)
and whose `detail` names the field. So that the code is predictable, every field follows the same
rules:

- absent or null required field, or a required id that is empty after trimming: `missing_field`;
- a JSON type the field does not take: `wrong_type` (a boolean is never a number, a number is never
  an id, a string that is not a decimal is not money);
- the right type with unreadable content: `bad_timestamp`, `bad_currency`;
- readable but outside its range (negative total, timestamp outside what ClickHouse stores,
  absurd magnitude): `out_of_range`;
- an optional field that is null is absent; unknown extra fields are ignored.

A record value on an input topic is one event object or a JSON array of them (contract §2):
`decode_record` parses it once and decodes every element exactly as `decode_event` decodes that
element's own bytes, so an invalid element is rejected alone.

Strings are trimmed. Money is exact: a decimal string is read by `Decimal`; a JSON number arrives
from orjson as an int (exact) or a float, which is read as `Decimal(repr(x))`: `repr` is the
shortest text that reads back as the same float, i.e. the literal the producer wrote whenever it
has at most 15 significant digits (`129.9` -> `Decimal('129.9')`, never
`129.900000000000005684...`). Producers needing more digits must send strings.

This module must never import Kafka or ClickHouse, nor do any I/O.
"""

from __future__ import annotations

import json
import math
import re
from urllib.parse import urlsplit
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any, Literal, NoReturn, cast, get_args

import orjson

from .events import (
    REVIEW_DECISIONS,
    Click,
    Event,
    Order,
    OrderItem,
    Refund,
    Review,
    ReviewDecision,
    Share,
    normalise_channel,
)
from .reference import (
    DEFAULT_ATTRIBUTION_WINDOW_DAYS,
    DEFAULT_COUPON_SITES,
    DEFAULT_FAST_CONVERSION_SECONDS,
    DEFAULT_MAX_FUTURE_SECONDS,
    DEFAULT_LOCK_DAYS,
    DEFAULT_VELOCITY_MAX_CUSTOMERS,
    DEFAULT_VELOCITY_WINDOW_MINUTES,
    Affiliate,
    Commission,
    Link,
    Program,
    Settings,
    Velocity,
    normalise_code,
)

#: 64 KiB: a real order with a few hundred items is a few KB. The cap bounds the parse time and
#: memory one message can cost the worker, and keeps a dead letter (raw bytes plus metadata) far
#: below Kafka's default 1 MB message limit, so rejecting an event can never fail in turn.
MAX_EVENT_BYTES = 64 * 1024
#: The longest identifier (event, visitor, session, order, customer, affiliate, share, code,
#: reviewer): ids are Kafka keys and live in the worker's state, whose values must stay well
#: under a Kafka record's 1 MB (a visitor keeps up to 200 clicks). Real ids are UUIDs or shorter.
MAX_ID_CHARS = 256
#: Contract §2: a record on an input topic may carry a JSON array of up to this many events.
MAX_BATCH_ELEMENTS = 10_000
#: 16 MiB: far above what Kafka delivers by default (1 MB per record) and what 10,000 events of a
#: typical size take; the cap bounds the parse of one record, whatever the broker allows.
MAX_RECORD_BYTES = 16 * 1024 * 1024

#: 10^15: `total` and amounts are stored as Decimal(18, 2) (< 10^16); no single order or price
#: comes near a quadrillion, so a larger value is a unit error, and the head-room keeps sums of
#: many such values in range.
MAX_AMOUNT = Decimal(10) ** 15
#: 18 decimal places: no currency has more than 3 minor digits; the bound stops a value like
#: '1e-999999999' from costing a billion characters when printed.
MAX_DECIMAL_PLACES = 18

#: ClickHouse DateTime holds 1970-01-01 to 2106-02-07. Events before the Unix epoch are rejected;
#: the upper bound leaves room for `lock_end` = ts + up to MAX_PROGRAM_DAYS days of lock.
EARLIEST_TS = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST_TS = datetime(2096, 1, 1, tzinfo=timezone.utc)

#: 10 years: an attribution window or lock longer than that is a typo (days for minutes), and the
#: bound keeps `ts + lock_days` inside what datetime and ClickHouse can hold.
MAX_PROGRAM_DAYS = 3650
#: One day: a conversion slower than that is not "fast"; a larger value would hold every order.
MAX_FAST_CONVERSION_SECONDS = 86_400

Reason = Literal[
    "too_large",
    "too_many_elements",
    "not_json",
    "not_object",
    "unknown_type",
    "type_mismatch",
    "missing_field",
    "wrong_type",
    "bad_timestamp",
    "out_of_range",
    "bad_currency",
    "ts_in_future",
    "too_deep",
    # Decided by the worker beyond a single event's shape (contract v2 §5, §6), or its own
    # safety limits (README, Failure modes).
    "currency_mismatch",
    "unauthorized_review",
    "malformed_internal",
    "order_state_full",
    "rejected_by_clickhouse",
]
#: Every reason code, e.g. to pre-register metric labels.
REASONS: tuple[Reason, ...] = get_args(Reason)


class InvalidEvent(ValueError):
    """An event that is not processed: it goes to the dead letters with `reason`."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: Reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.detail))


class InvalidReference(ValueError):
    """Reference data that is not loaded; `path` names the offending value."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.problem))


# --- shared readers ------------------------------------------------------------------------------

#: The usual way to write an amount; anything else matching _DECIMAL_TEXT takes the slow path.
_PLAIN_DECIMAL = re.compile(r"[+-]?(?:[0-9]{1,20}(?:\.[0-9]{0,18})?|\.[0-9]{1,18})")
_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})?"  # the offset; its absence is reported as such
)
_CURRENCY = re.compile(r"[A-Za-z]{3}")
_ONE = Decimal(1)
_UTC = timezone.utc


class _OutOfBounds(Exception):
    """A decimal too large or too precise to be an amount; carries the problem's wording."""


def _as_decimal(value: object) -> Decimal | None:
    """The exact decimal a JSON money value denotes, or None if it is not a finite decimal.

    Raises `_OutOfBounds` when it is one, but beyond `MAX_AMOUNT` or `MAX_DECIMAL_PLACES`.
    """
    if type(value) is int:  # never a bool: type(True) is bool
        number = Decimal(value)
    else:
        if type(value) is str:
            text = value.strip()
        elif type(value) is float and math.isfinite(value):
            text = repr(value)
        else:
            return None
        if _PLAIN_DECIMAL.fullmatch(text) is not None:
            number = Decimal(text)  # the pattern bounds the decimal places: no as_tuple() needed
            if not number:
                number = number.copy_abs()  # '-0.00' is 0.00
        elif _DECIMAL_TEXT.fullmatch(text) is not None:
            return _bounded(Decimal(text))
        else:
            return None
    if not -MAX_AMOUNT < number < MAX_AMOUNT:
        raise _OutOfBounds("must be less than 10^15 in absolute value")
    return number


def _bounded(number: Decimal) -> Decimal:
    """Bounds check and plain form of a decimal written with an exponent or many digits."""
    if not -MAX_AMOUNT < number < MAX_AMOUNT:
        raise _OutOfBounds("must be less than 10^15 in absolute value")
    exponent = number.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -MAX_DECIMAL_PLACES:
        raise _OutOfBounds(f"must have at most {MAX_DECIMAL_PLACES} decimal places")
    if not number:
        number = number.copy_abs()
    if isinstance(exponent, int) and exponent > 0:
        number = number.quantize(_ONE)  # '1E+2' is 100
    return number


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _brief(value: object) -> str:
    """A value for an error message, bounded: never a 64 KiB string nor a deep repr."""
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, list):
        return f"of {len(value)} items"
    if isinstance(value, dict):
        return f"with {len(value)} keys"
    if isinstance(value, int) and not -(10**60) < value < 10**60:
        return "with more than 60 digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _show(value: object) -> str:
    """A value for an error message: its JSON type and a bounded rendering."""
    return f"{_json_type(value)} {_brief(value)}"


# --- events --------------------------------------------------------------------------------------


def _missing(obj: Mapping[str, object], label: str, key: str) -> NoReturn:
    got = ", got null" if key in obj else ""
    raise InvalidEvent("missing_field", f"field {label!r} is required{got}")


def _wrong_type(label: str, expected: str, value: object) -> NoReturn:
    raise InvalidEvent("wrong_type", f"field {label!r} must be {expected}, got {_show(value)}")


def _out_of_range(label: str, problem: str, value: object) -> NoReturn:
    raise InvalidEvent("out_of_range", f"field {label!r} {problem}, got {_brief(value)}")


def _required_str(obj: Mapping[str, object], key: str, prefix: str = "") -> str:
    value = obj.get(key)
    if type(value) is str:
        text = value.strip()
        if text:
            return text
        raise InvalidEvent("missing_field", f"field {prefix + key!r} must not be empty")
    if value is None:
        _missing(obj, prefix + key, key)
    _wrong_type(prefix + key, "a string", value)


def _id(obj: Mapping[str, object], key: str) -> str:
    """A required identifier: at most MAX_ID_CHARS characters (they are Kafka keys and state)."""
    text = _required_str(obj, key)
    if len(text) > MAX_ID_CHARS:
        raise InvalidEvent(
            "out_of_range", f"field {key!r} is {len(text)} characters long, the limit is {MAX_ID_CHARS}"
        )
    return text


def _optional_id(obj: Mapping[str, object], key: str) -> str:
    text = _optional_str(obj, key)
    if len(text) > MAX_ID_CHARS:
        raise InvalidEvent(
            "out_of_range", f"field {key!r} is {len(text)} characters long, the limit is {MAX_ID_CHARS}"
        )
    return text


def _personal_str(obj: Mapping[str, object], key: str) -> str:
    """An optional `ip` or `user_agent`: its value never appears in an error (dead-letter
    headers are beyond the input topics, where personal data is only kept hashed)."""
    value = obj.get(key)
    if type(value) is str:
        return value.strip()
    if value is None:
        return ""
    raise InvalidEvent("wrong_type", f"field {key!r} must be a string, got {_json_type(value)}")


def _optional_str(obj: Mapping[str, object], key: str, prefix: str = "") -> str:
    value = obj.get(key)
    if type(value) is str:
        return value.strip()
    if value is None:
        return ""
    _wrong_type(prefix + key, "a string", value)


def _timestamp(obj: Mapping[str, object], key: str = "ts") -> datetime:
    value = obj.get(key)
    if type(value) is not str:
        if value is None:
            _missing(obj, key, key)
        _wrong_type(key, "an RFC 3339 string", value)
    text = value.strip()
    shape = _RFC3339.fullmatch(text)
    if shape is None:
        raise InvalidEvent(
            "bad_timestamp",
            f"field {key!r} must be RFC 3339 like '2026-11-02T10:15:00Z', got {text[:60]!r}",
        )
    if shape.group(1) is None:
        raise InvalidEvent(
            "bad_timestamp",
            f"field {key!r} has no UTC offset (add 'Z' or '+hh:mm'), got {text[:60]!r}",
        )
    try:
        ts = datetime.fromisoformat(text.upper())
        if ts.tzinfo is not _UTC:
            ts = ts.astimezone(_UTC)
    except (ValueError, OverflowError) as exc:
        raise InvalidEvent(
            "bad_timestamp",
            f"field {key!r} is not a valid date and time ({exc}), got {text[:60]!r}",
        ) from None
    if not EARLIEST_TS <= ts < LATEST_TS:
        raise InvalidEvent(
            "out_of_range",
            f"field {key!r} must be between 1970-01-01 and 2096-01-01 UTC, got {text[:60]!r}",
        )
    return ts


def _decimal(obj: Mapping[str, object], key: str, *, positive: bool, prefix: str = "") -> Decimal:
    value = obj.get(key)
    try:
        number = _as_decimal(value)
    except _OutOfBounds as exc:
        _out_of_range(prefix + key, str(exc), value)
    if number is None:
        if value is None:
            _missing(obj, prefix + key, key)
        if type(value) is float:
            _out_of_range(prefix + key, "must be finite", value)
        _wrong_type(prefix + key, "a decimal string like '129.90' or a number", value)
    if positive:
        if number <= 0:
            _out_of_range(prefix + key, "must be > 0", value)
    elif number < 0:
        _out_of_range(prefix + key, "must be >= 0", value)
    return number


def _optional_decimal(obj: Mapping[str, object], key: str) -> Decimal:
    """An optional amount >= 0; absent or null is 0."""
    if obj.get(key) is None:
        return Decimal("0")
    return _decimal(obj, key, positive=False)


def _currency(obj: Mapping[str, object], *, required: bool) -> str:
    value = obj.get("currency")
    if type(value) is str:
        text = value.strip()
        if _CURRENCY.fullmatch(text) is not None:
            return text.upper()
        if not text and not required:
            return ""
        raise InvalidEvent(
            "bad_currency",
            f"field 'currency' must be a 3-letter ISO 4217 code, got {_brief(value)}",
        )
    if value is None:
        if required:
            _missing(obj, "currency", "currency")
        return ""
    _wrong_type("currency", "a string", value)


def _items(obj: Mapping[str, object]) -> tuple[OrderItem, ...]:
    value = obj.get("items")
    if value is None:
        return ()
    if type(value) is not list:
        _wrong_type("items", "an array", value)
    items = []
    for index, item in enumerate(value):
        prefix = f"items[{index}]."
        if type(item) is not dict:
            _wrong_type(f"items[{index}]", "an object", item)
        items.append(
            OrderItem(
                sku=_required_str(item, "sku", prefix),
                category=_optional_str(item, "category", prefix),
                quantity=_decimal(item, "quantity", positive=True, prefix=prefix),
                price=_decimal(item, "price", positive=False, prefix=prefix),
            )
        )
    return tuple(items)


def _click(obj: Mapping[str, object], event_id: str, ts: datetime) -> Click:
    return Click(
        event_id=event_id,
        ts=ts,
        visitor_id=_id(obj, "visitor_id"),
        session_id=_id(obj, "session_id"),
        affiliate_id=_id(obj, "affiliate_id"),
        channel=normalise_channel(_optional_str(obj, "channel")),
        share_id=_optional_id(obj, "share_id"),
        landing_url=_optional_str(obj, "landing_url"),
        referrer=_optional_str(obj, "referrer"),
        ip=_personal_str(obj, "ip"),
        user_agent=_personal_str(obj, "user_agent"),
    )


def _share(obj: Mapping[str, object], event_id: str, ts: datetime) -> Share:
    return Share(
        event_id=event_id,
        ts=ts,
        affiliate_id=_id(obj, "affiliate_id"),
        share_id=_id(obj, "share_id"),
        channel=normalise_channel(_required_str(obj, "channel")),
        url=_optional_str(obj, "url"),
    )


def _order(obj: Mapping[str, object], event_id: str, ts: datetime) -> Order:
    return Order(
        event_id=event_id,
        ts=ts,
        order_id=_id(obj, "order_id"),
        visitor_id=_id(obj, "visitor_id"),
        customer_id=_id(obj, "customer_id"),
        currency=_currency(obj, required=True),
        total=_decimal(obj, "total", positive=False),
        session_id=_optional_str(obj, "session_id"),
        discount_code=_optional_id(obj, "discount_code"),
        referrer=_optional_str(obj, "referrer"),
        ip=_personal_str(obj, "ip"),
        user_agent=_personal_str(obj, "user_agent"),
        items=_items(obj),
        discount_amount=_optional_decimal(obj, "discount_amount"),
    )


def _refund(obj: Mapping[str, object], event_id: str, ts: datetime) -> Refund:
    return Refund(
        event_id=event_id,
        ts=ts,
        order_id=_id(obj, "order_id"),
        amount=_decimal(obj, "amount", positive=True),
        currency=_currency(obj, required=False),
        reason=_optional_str(obj, "reason"),
    )


_DECODERS: dict[str, Callable[[Mapping[str, object], str, datetime], Event]] = {
    "click": _click,
    "share": _share,
    "order": _order,
    "refund": _refund,
}


def _json_object(raw: bytes, noun: str) -> dict[str, Any]:
    """`raw` parsed as one JSON object of at most MAX_EVENT_BYTES, or `InvalidEvent`."""
    if len(raw) > MAX_EVENT_BYTES:
        raise _too_large(noun, len(raw))
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent("not_json", f"not valid UTF-8 JSON: {exc}") from None
    if type(obj) is not dict:
        article = "an" if noun[0] in "aeiou" else "a"
        raise InvalidEvent(
            "not_object", f"{article} {noun} must be a JSON object, got {_json_type(obj)}"
        )
    return obj


def _too_large(noun: str, size: int, limit: int = MAX_EVENT_BYTES) -> InvalidEvent:
    return InvalidEvent("too_large", f"{noun} is {size} bytes, the limit is {limit}")


def _decode_object(
    obj: dict[str, Any], expected_type: str | None, not_after: datetime | None = None
) -> Event:
    """The event in one parsed JSON object, or `InvalidEvent` (see `decode_event`)."""
    event_type = obj.get("type")
    if type(event_type) is not str:
        if event_type is None:
            _missing(obj, "type", "type")
        _wrong_type("type", "a string", event_type)
    decoder = _DECODERS.get(event_type)
    if decoder is None:
        raise InvalidEvent(
            "unknown_type",
            f"field 'type' must be one of click, share, order, refund, got {event_type[:60]!r}",
        )
    if expected_type is not None and event_type != expected_type:
        raise InvalidEvent(
            "type_mismatch",
            f"a {event_type!r} event on the topic of {expected_type!r} events",
        )
    event = decoder(obj, _id(obj, "event_id"), _timestamp(obj))
    if not_after is not None:
        check_not_future(event.ts, not_after)
    return event


def check_not_future(ts: datetime, not_after: datetime) -> None:
    """`ts_in_future` (contract v2 §2) when `ts` is later than `not_after`: the processing
    machine's clock plus `settings.max_future_seconds`."""
    if ts > not_after:
        raise InvalidEvent(
            "ts_in_future",
            f"field 'ts' is {_rfc3339_utc(ts)}, more than the allowed skew ahead of the "
            f"processing clock (latest accepted now: {_rfc3339_utc(not_after)})",
        )


def decode_event(
    raw: bytes, expected_type: str | None = None, *, not_after: datetime | None = None
) -> Event:
    """The event in `raw`, or `InvalidEvent` saying why not.

    `expected_type` is the type the source topic carries; an event of another type was published
    to the wrong topic and is rejected (`type_mismatch`) rather than processed out of its stream.
    A JSON array is not an event (`not_object`): records that may be batched go through
    `decode_record`. With `not_after`, an event whose `ts` is later is `ts_in_future`.
    """
    return _decode_object(_json_object(raw, "event"), expected_type, not_after)


@dataclass(frozen=True, slots=True)
class Decoded:
    """One event of a record value, decoded or rejected (exactly one of `event`, `error`).

    `raw` is this element's own JSON bytes: `orjson.dumps` of the element for an array, the record
    value itself otherwise.
    """

    index: int | None  # position in a batched (array) record; None when the value was one object
    raw: bytes
    event: Event | None  # the valid event, else None
    error: InvalidEvent | None  # why it is invalid, else None


#: A value whose first non-blank byte opens a JSON array (blanks as JSON defines them).
_ARRAY_START = re.compile(rb"[ \t\n\r]*\[")


def decode_record(
    raw: bytes, expected_type: str, *, not_after: datetime | None = None
) -> list[Decoded]:
    """Every event of one record value: one object, or a JSON array of objects (parsed once).

    Contract §2: each element of an array is decoded exactly as `decode_event` decodes its own
    bytes (`orjson.dumps` of the element: the 64 KiB limit applies to them), and is rejected alone.
    What makes the whole value unusable is one `Decoded` with index None and the value as `raw`:
    not JSON, neither an object nor an array, more than MAX_BATCH_ELEMENTS elements, more than
    MAX_RECORD_BYTES, or (not an array) more than MAX_EVENT_BYTES. An empty array has no events.
    """
    size = len(raw)
    if size > MAX_EVENT_BYTES and (size > MAX_RECORD_BYTES or _ARRAY_START.match(raw) is None):
        # Rejected unparsed, like decode_event: the size bounds what a record can cost.
        noun = "event" if size <= MAX_RECORD_BYTES else "record"
        limit = MAX_EVENT_BYTES if size <= MAX_RECORD_BYTES else MAX_RECORD_BYTES
        return [Decoded(None, raw, None, _too_large(noun, size, limit))]
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return [Decoded(None, raw, None, InvalidEvent("not_json", f"not valid UTF-8 JSON: {exc}"))]
    if type(value) is dict:
        try:
            return [Decoded(None, raw, _decode_object(value, expected_type, not_after), None)]
        except InvalidEvent as exc:
            return [Decoded(None, raw, None, exc)]
    if type(value) is not list:
        return [Decoded(None, raw, None, InvalidEvent(
            "not_object",
            f"a record must be an event object or an array of them, got {_json_type(value)}",
        ))]
    if len(value) > MAX_BATCH_ELEMENTS:
        return [Decoded(None, raw, None, InvalidEvent(
            "too_many_elements",
            f"the array has {len(value)} elements, the limit is {MAX_BATCH_ELEMENTS}",
        ))]
    decoded: list[Decoded] = []
    append = decoded.append
    dumps = orjson.dumps
    for index, element in enumerate(value):
        try:
            element_raw = dumps(element)
        except orjson.JSONEncodeError:
            # orjson reads 1,024 levels of nesting but writes 255: such an element is no event.
            append(Decoded(index, _too_deep_raw(element), None, InvalidEvent(
                "too_deep", "the element is nested more than 255 levels deep")))
            continue
        try:
            if len(element_raw) > MAX_EVENT_BYTES:
                raise _too_large("event", len(element_raw))
            if type(element) is not dict:
                raise InvalidEvent(
                    "not_object", f"an event must be a JSON object, got {_json_type(element)}"
                )
            append(Decoded(index, element_raw, _decode_object(element, expected_type, not_after),
                           None))
        except InvalidEvent as exc:
            append(Decoded(index, element_raw, None, exc))
    return decoded


def _too_deep_raw(element: object) -> bytes:
    """What a dead letter keeps of an element orjson cannot write: the standard library's JSON
    when it can (it writes up to Python's recursion limit), else a marker."""
    try:
        return json.dumps(element, separators=(",", ":")).encode()
    except (RecursionError, ValueError, TypeError):
        return b'"<an element nested too deep to write>"'


def decode_review(raw: bytes, *, not_after: datetime | None = None) -> Review:
    """A reviewer's decision on a held order (the `reviews` topic), or `InvalidEvent`."""
    obj = _json_object(raw, "review")
    if obj.get("type") != "review":
        raise InvalidEvent("type_mismatch", f"expected type 'review', got {_brief(obj.get('type'))}")
    decision = _required_str(obj, "decision")
    if decision not in REVIEW_DECISIONS:
        raise InvalidEvent(
            "out_of_range", f"field 'decision' must be release or reject, got {decision[:60]!r}"
        )
    ts = _timestamp(obj)
    if not_after is not None:
        check_not_future(ts, not_after)
    return Review(
        event_id=_id(obj, "event_id"),
        ts=ts,
        order_id=_id(obj, "order_id"),
        decision=cast(ReviewDecision, decision),
        reviewer=_id(obj, "reviewer"),
        note=_optional_str(obj, "note"),
    )


def review_to_json(review: Review) -> bytes:
    return orjson.dumps(
        {"type": "review", "event_id": review.event_id, "ts": _rfc3339_utc(review.ts),
         "order_id": review.order_id, "decision": review.decision, "reviewer": review.reviewer,
         "note": review.note}
    )


# --- JSON encoding -------------------------------------------------------------------------------


def _rfc3339_utc(value: datetime) -> str:
    if value.tzinfo is None or value.utcoffset() is None:
        raise TypeError(f"cannot encode naive datetime {value!r}: the pipeline's times are UTC")
    return value.astimezone(_UTC).isoformat()[:-6] + "Z"


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime):
        return _rfc3339_utc(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def encode_json(obj: object) -> bytes:
    """JSON bytes with Decimals as plain decimal strings and datetimes as RFC 3339 UTC ('...Z').

    Dataclasses, dicts, lists and tuples are encoded by orjson; a naive datetime is a TypeError.
    """
    return orjson.dumps(obj, default=_json_default, option=orjson.OPT_PASSTHROUGH_DATETIME)


# --- reference data ------------------------------------------------------------------------------


def _join(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key


def _ref_object(value: object, at: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise InvalidReference(at, f"must be an object, got {_show(value)}")
    return value


def _ref_list(value: object, at: str) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidReference(at, f"must be an array, got {_show(value)}")
    return value


def _ref_str(record: Mapping[str, object], key: str, at: str, *, required: bool) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise InvalidReference(_join(at, key), "is required")
        return ""
    if not isinstance(value, str):
        raise InvalidReference(_join(at, key), f"must be a string, got {_show(value)}")
    text = value.strip()
    if required and not text:
        raise InvalidReference(_join(at, key), "must not be empty")
    return text


def _ref_choice(record: Mapping[str, object], key: str, at: str, choices: tuple[str, ...]) -> str:
    text = _ref_str(record, key, at, required=True).lower()
    if text not in choices:
        raise InvalidReference(
            _join(at, key), f"must be one of {', '.join(choices)}, got {_brief(record.get(key))}"
        )
    return text


def _ref_int(
    record: Mapping[str, object], key: str, at: str, *, default: int, minimum: int, maximum: int
) -> int:
    value = record.get(key)
    if value is None:
        return default
    if type(value) is not int or not minimum <= value <= maximum:
        raise InvalidReference(
            _join(at, key), f"must be an integer from {minimum} to {maximum}, got {_show(value)}"
        )
    return value


def _ref_decimal(value: object, path: str, *, maximum: Decimal | None = None) -> Decimal:
    try:
        number = _as_decimal(value)
    except _OutOfBounds as exc:
        raise InvalidReference(path, f"{exc}, got {_show(value)}") from None
    if number is None or number < 0 or (maximum is not None and number > maximum):
        expected = "a decimal >= 0" if maximum is None else f"a decimal from 0 to {maximum}"
        raise InvalidReference(path, f"must be {expected}, got {_show(value)}")
    return number


def _ref_rate(value: object, path: str) -> Decimal:
    # A rate is a fraction of the order total: above 1 it would pay more than the order
    # brought, which is always a typo ('10' meant as 10 %).
    return _ref_decimal(value, path, maximum=_ONE)


def _ref_rates(value: object, at: str) -> dict[str, Decimal]:
    if value is None:
        return {}
    table = _ref_object(value, at)
    rates: dict[str, Decimal] = {}
    for name, rate in table.items():
        key = name.strip() if isinstance(name, str) else ""
        if not key:
            raise InvalidReference(at, f"has an empty key {_brief(name)}")
        if key in rates:
            raise InvalidReference(_join(at, key), "is given twice (keys are trimmed)")
        rates[key] = _ref_rate(rate, _join(at, key))
    return rates


def _commission(value: object, at: str) -> Commission:
    if value is None:
        raise InvalidReference(at, "is required")
    record = _ref_object(value, at)
    kind = _ref_choice(record, "type", at, ("percent", "fixed"))
    if kind == "percent":
        if record.get("rate") is None:
            raise InvalidReference(_join(at, "rate"), "is required for a percent commission")
        return Commission(type="percent", rate=_ref_rate(record["rate"], _join(at, "rate")))
    if record.get("amount") is None:
        raise InvalidReference(_join(at, "amount"), "is required for a fixed commission")
    currency = record.get("currency")
    if currency is None:
        raise InvalidReference(
            _join(at, "currency"),
            "is required for a fixed commission (contract v2: it is paid only on orders in it)",
        )
    if not isinstance(currency, str) or _CURRENCY.fullmatch(currency.strip()) is None:
        raise InvalidReference(
            _join(at, "currency"), f"must be a 3-letter ISO 4217 code, got {_show(currency)}"
        )
    return Commission(type="fixed", amount=_ref_decimal(record["amount"], _join(at, "amount")),
                      currency=currency.strip().upper())


def _velocity(value: object, at: str) -> Velocity:
    if value is None:
        return Velocity()
    record = _ref_object(value, at)
    return Velocity(
        max_customers=_ref_int(
            record, "max_customers", at,
            # A million distinct customers per window is no limit at all; more is a typo.
            default=DEFAULT_VELOCITY_MAX_CUSTOMERS, minimum=1, maximum=1_000_000,
        ),
        window_minutes=_ref_int(
            record, "window_minutes", at,
            default=DEFAULT_VELOCITY_WINDOW_MINUTES, minimum=1, maximum=MAX_PROGRAM_DAYS * 24 * 60,
        ),
    )


def _program(value: object, at: str) -> Program:
    record = _ref_object(value, at)
    program_id = _ref_str(record, "program_id", at, required=True)
    kind = _ref_choice(record, "kind", at, ("referral", "affiliate"))
    commission = _commission(record.get("commission"), _join(at, "commission"))
    tier_rates = _ref_rates(record.get("tier_rates"), _join(at, "tier_rates"))
    category_rates = _ref_rates(record.get("category_rates"), _join(at, "category_rates"))
    if commission.type == "fixed":
        # Tier and category rates replace a percentage; a fixed commission has none to replace,
        # so giving them is a misunderstanding that must not load silently.
        for key, rates in (("tier_rates", tier_rates), ("category_rates", category_rates)):
            if rates:
                raise InvalidReference(_join(at, key), "is only allowed with a percent commission")
    return Program(
        program_id=program_id,
        kind=kind,  # type: ignore[arg-type]
        commission=commission,
        attribution_window_days=_ref_int(
            record, "attribution_window_days", at,
            default=DEFAULT_ATTRIBUTION_WINDOW_DAYS, minimum=1, maximum=MAX_PROGRAM_DAYS,
        ),
        lock_days=_ref_int(
            record, "lock_days", at,
            default=DEFAULT_LOCK_DAYS, minimum=0, maximum=MAX_PROGRAM_DAYS,
        ),
        tier_rates=tier_rates,
        category_rates=category_rates,
        velocity=_velocity(record.get("velocity"), _join(at, "velocity")),
    )


def _affiliate(value: object, at: str) -> Affiliate:
    record = _ref_object(value, at)
    codes: list[str] = []
    codes_at = _join(at, "codes")
    for index, code in enumerate(_ref_list(record.get("codes"), codes_at)):
        if not isinstance(code, str) or not normalise_code(code):
            raise InvalidReference(
                f"{codes_at}[{index}]", f"must be a non-empty string, got {_show(code)}"
            )
        normalised = normalise_code(code)
        if normalised not in codes:
            codes.append(normalised)
    status = "active"
    if record.get("status") is not None:
        status = _ref_str(record, "status", at, required=True).lower()
    return Affiliate(
        affiliate_id=_ref_str(record, "affiliate_id", at, required=True),
        program_id=_ref_str(record, "program_id", at, required=True),
        tier=_ref_str(record, "tier", at, required=False),
        customer_id=_ref_str(record, "customer_id", at, required=False),
        codes=tuple(codes),
        status=status,
        payout_email=_ref_str(record, "payout_email", at, required=False).strip(),
    )


def _ref_hosts(value: object, at: str) -> tuple[str, ...]:
    """Host names (lower case, no scheme, port or path); a subdomain of one matches it."""
    hosts: list[str] = []
    for index, host in enumerate(_ref_list(value, at)):
        name = host.strip().lower().rstrip(".") if isinstance(host, str) else ""
        if not name or name.startswith(".") or any(c in name for c in "/:@?# \t"):
            raise InvalidReference(f"{at}[{index}]", f"must be a host name like 'shop.example', got {_show(host)}")
        if name not in hosts:
            hosts.append(name)
    return tuple(hosts)


def _settings(value: object, at: str) -> Settings:
    record = _ref_object(value, at)
    sites_value = record.get("coupon_sites")
    coupon_sites = DEFAULT_COUPON_SITES
    if sites_value is not None:
        sites: list[str] = []
        sites_at = _join(at, "coupon_sites")
        for index, site in enumerate(_ref_list(sites_value, sites_at)):
            host = site.strip().lower().rstrip(".") if isinstance(site, str) else ""
            if not host or host.startswith(".") or any(c in host for c in "/:@?# \t"):
                raise InvalidReference(
                    f"{sites_at}[{index}]",
                    f"must be a host name like 'retailmenot.com', got {_show(site)}",
                )
            if host not in sites:
                sites.append(host)
        coupon_sites = tuple(sites)
    links: list[Link] = []
    links_at = _join(at, "links")
    for index, value in enumerate(_ref_list(record.get("links"), links_at)):
        link_at = f"{links_at}[{index}]"
        link_record = _ref_object(value, link_at)
        url = _ref_str(link_record, "url", link_at, required=True)
        parsed = urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise InvalidReference(_join(link_at, "url"), f"must be an http(s) URL, got {_show(url)}")
        link = Link(
            link_id=_ref_str(link_record, "link_id", link_at, required=True),
            affiliate_id=_ref_str(link_record, "affiliate_id", link_at, required=True),
            url=url,
            channel=normalise_channel(_ref_str(link_record, "channel", link_at, required=False)),
        )
        if any(known.link_id == link.link_id for known in links):
            raise InvalidReference(_join(link_at, "link_id"), f"duplicate link_id {link.link_id!r}")
        links.append(link)
    reviewers: list[str] = []
    reviewers_at = _join(at, "reviewers")
    for index, name in enumerate(_ref_list(record.get("reviewers"), reviewers_at)):
        if not isinstance(name, str) or not name.strip():
            raise InvalidReference(
                f"{reviewers_at}[{index}]", f"must be a non-empty string, got {_show(name)}"
            )
        if name.strip() not in reviewers:
            reviewers.append(name.strip())
    return Settings(
        coupon_sites=coupon_sites,
        fast_conversion_seconds=_ref_int(
            record, "fast_conversion_seconds", at,
            default=DEFAULT_FAST_CONVERSION_SECONDS,
            minimum=0,
            maximum=MAX_FAST_CONVERSION_SECONDS,
        ),
        reviewers=tuple(reviewers),
        links=tuple(links),
        allowed_redirect_hosts=_ref_hosts(record.get("allowed_redirect_hosts"),
                                          _join(at, "allowed_redirect_hosts")),
        allowed_origins=_ref_hosts(record.get("allowed_origins"), _join(at, "allowed_origins")),
        max_future_seconds=_ref_int(
            record, "max_future_seconds", at,
            # A day of clock skew is already absurd; more would let one event approve a month.
            default=DEFAULT_MAX_FUTURE_SECONDS, minimum=0, maximum=86_400,
        ),
    )


def parse_program(obj: dict[str, Any]) -> Program:
    """A program from its JSON object (contract §3), defaults applied; paths start 'program.'."""
    return _program(obj, "program")


def parse_affiliate(obj: dict[str, Any]) -> Affiliate:
    """An affiliate from its JSON object, codes normalised; paths start 'affiliate.'."""
    return _affiliate(obj, "affiliate")


def parse_settings(obj: dict[str, Any]) -> Settings:
    """Settings from their JSON object, coupon sites as lower-case host names."""
    return _settings(obj, "settings")


_DOCUMENT_SECTIONS = ("programs", "affiliates", "settings")


def parse_reference_document(raw: bytes) -> tuple[list[Program], list[Affiliate], Settings | None]:
    """Every record of a reference file (contract §3), checked as a whole, or `InvalidReference`.

    Beyond each record's own checks: program and affiliate ids are unique, every affiliate's
    program is defined in the same file, and no code is owned by two affiliates. Settings are
    None when the file has none. Unknown top-level keys are rejected: a misspelt section name
    would otherwise load nothing without a word.
    """
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidReference("", f"not valid UTF-8 JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidReference("", f"must be a JSON object, got {_json_type(document)}")
    for key in document:
        if key not in _DOCUMENT_SECTIONS:
            raise InvalidReference(
                key, f"unknown section; expected {', '.join(_DOCUMENT_SECTIONS)}"
            )

    programs: list[Program] = []
    program_at: dict[str, str] = {}
    for index, value in enumerate(_ref_list(document.get("programs"), "programs")):
        at = f"programs[{index}]"
        program = _program(value, at)
        if program.program_id in program_at:
            raise InvalidReference(
                _join(at, "program_id"),
                f"duplicate program_id {program.program_id!r} "
                f"(first at {program_at[program.program_id]})",
            )
        program_at[program.program_id] = at
        programs.append(program)

    affiliates: list[Affiliate] = []
    affiliate_at: dict[str, str] = {}
    code_owner: dict[str, tuple[str, str]] = {}
    for index, value in enumerate(_ref_list(document.get("affiliates"), "affiliates")):
        at = f"affiliates[{index}]"
        affiliate = _affiliate(value, at)
        if affiliate.affiliate_id in affiliate_at:
            raise InvalidReference(
                _join(at, "affiliate_id"),
                f"duplicate affiliate_id {affiliate.affiliate_id!r} "
                f"(first at {affiliate_at[affiliate.affiliate_id]})",
            )
        if affiliate.program_id not in program_at:
            raise InvalidReference(
                _join(at, "program_id"),
                f"unknown program {affiliate.program_id!r}: not among this file's programs",
            )
        for code in affiliate.codes:
            if code in code_owner:
                owner, owner_at = code_owner[code]
                raise InvalidReference(
                    _join(at, "codes"),
                    f"code {code!r} is already owned by affiliate {owner!r} ({owner_at})",
                )
            code_owner[code] = (affiliate.affiliate_id, at)
        affiliate_at[affiliate.affiliate_id] = at
        affiliates.append(affiliate)

    settings_value = document.get("settings")
    settings = None if settings_value is None else _settings(settings_value, "settings")
    return programs, affiliates, settings


def program_to_json(program: Program) -> bytes:
    """The JSON `parse_program` reads back as an equal Program."""
    commission: dict[str, object] = {"type": program.commission.type}
    if program.commission.type == "percent":
        commission["rate"] = program.commission.rate
    else:
        commission["amount"] = program.commission.amount
        commission["currency"] = program.commission.currency
    return encode_json(
        {
            "program_id": program.program_id,
            "kind": program.kind,
            "attribution_window_days": program.attribution_window_days,
            "lock_days": program.lock_days,
            "commission": commission,
            "tier_rates": dict(program.tier_rates),
            "category_rates": dict(program.category_rates),
            "velocity": {
                "max_customers": program.velocity.max_customers,
                "window_minutes": program.velocity.window_minutes,
            },
        }
    )


def affiliate_to_json(affiliate: Affiliate) -> bytes:
    """The JSON `parse_affiliate` reads back as an equal Affiliate."""
    return encode_json(
        {
            "affiliate_id": affiliate.affiliate_id,
            "program_id": affiliate.program_id,
            "tier": affiliate.tier,
            "customer_id": affiliate.customer_id,
            "codes": list(affiliate.codes),
            "status": affiliate.status,
            "payout_email": affiliate.payout_email,
        }
    )


def settings_to_json(settings: Settings) -> bytes:
    """The JSON `parse_settings` reads back as equal Settings."""
    return encode_json(
        {
            "coupon_sites": list(settings.coupon_sites),
            "fast_conversion_seconds": settings.fast_conversion_seconds,
            "reviewers": list(settings.reviewers),
            "links": [{"link_id": link.link_id, "affiliate_id": link.affiliate_id, "url": link.url,
                       "channel": link.channel} for link in settings.links],
            "allowed_redirect_hosts": list(settings.allowed_redirect_hosts),
            "allowed_origins": list(settings.allowed_origins),
            "max_future_seconds": settings.max_future_seconds,
        }
    )
