"""Batched records (contract §2 v2): `schemas.validation.decode_record`."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.validation import (
    MAX_BATCH_ELEMENTS,
    MAX_EVENT_BYTES,
    MAX_RECORD_BYTES,
    REASONS,
    Decoded,
    InvalidEvent,
    decode_event,
    decode_record,
)

BASE: dict[str, dict[str, Any]] = {
    "click": {"event_id": "c-1", "type": "click", "ts": "2026-11-02T10:15:00Z",
              "visitor_id": "v-1", "session_id": "s-1", "affiliate_id": "sally"},
    "share": {"event_id": "sh-1", "type": "share", "ts": "2026-11-02T10:15:00Z",
              "affiliate_id": "sally", "share_id": "share-1", "channel": "instagram"},
    "order": {"event_id": "o-1", "type": "order", "ts": "2026-11-02T10:15:00Z",
              "order_id": "order-1", "visitor_id": "v-1", "customer_id": "cust-1",
              "currency": "EUR", "total": "129.90"},
    "refund": {"event_id": "r-1", "type": "refund", "ts": "2026-11-03T10:15:00Z",
               "order_id": "order-1", "amount": "10.00"},
}


def obj(event_type: str = "click", **changes: Any) -> dict[str, Any]:
    return {**BASE[event_type], **changes}


def array(*elements: Any) -> bytes:
    return orjson.dumps(list(elements))


def alone(raw: bytes, expected_type: str) -> tuple[str, object]:
    """What decode_event makes of `raw`: ("event", the event) or ("error", (reason, detail))."""
    try:
        return "event", decode_event(raw, expected_type)
    except InvalidEvent as error:
        return "error", (error.reason, error.detail)


def outcome(decoded: Decoded) -> tuple[str, object]:
    assert (decoded.event is None) != (decoded.error is None), decoded
    if decoded.error is not None:
        return "error", (decoded.error.reason, decoded.error.detail)
    return "event", decoded.event


# --- one object ---------------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", sorted(BASE))
def test_one_object_is_one_event_with_no_index_and_the_value_as_raw(event_type: str) -> None:
    raw = orjson.dumps(obj(event_type))
    assert decode_record(raw, event_type) == [Decoded(None, raw, decode_event(raw), None)]


def test_an_invalid_object_is_one_rejection_like_decode_event() -> None:
    raw = orjson.dumps(obj(visitor_id=None))
    [decoded] = decode_record(raw, "click")
    assert (decoded.index, decoded.raw, decoded.event) == (None, raw, None)
    assert outcome(decoded) == alone(raw, "click")


# --- values that are unusable as a whole: one Decoded, index None, raw = the value ---------------

PADDED_OBJECT = b"  " + orjson.dumps(obj(padding="x" * MAX_EVENT_BYTES))
ONE_TOO_MANY = array(*[obj(event_id=f"c-{n}") for n in range(MAX_BATCH_ELEMENTS + 1)])
HUGE_ARRAY = b"[" + b" " * MAX_RECORD_BYTES + b"]"

WHOLE_RECORD_REJECTIONS = [
    ("not json", b"{not json", "not_json", "JSON"),
    ("empty value", b"", "not_json", "JSON"),
    ("a truncated array", b'[{"type": "click"}', "not_json", "JSON"),
    ("a number", b"42", "not_object", "number"),
    ("a string", b'"click"', "not_object", "string"),
    ("null", b"null", "not_object", "null"),
    ("a boolean", b"true", "not_object", "boolean"),
    ("an object over 64 KiB", PADDED_OBJECT, "too_large", str(MAX_EVENT_BYTES)),
    ("an array of 10,001 events", ONE_TOO_MANY, "too_many_elements", str(MAX_BATCH_ELEMENTS)),
    ("a record over 16 MiB", HUGE_ARRAY, "too_large", str(MAX_RECORD_BYTES)),
]


@pytest.mark.parametrize(
    ("raw", "reason", "named"),
    [case[1:] for case in WHOLE_RECORD_REJECTIONS],
    ids=[case[0] for case in WHOLE_RECORD_REJECTIONS],
)
def test_a_value_unusable_as_a_whole_is_one_rejection_of_the_whole_value(
    raw: bytes, reason: str, named: str
) -> None:
    [decoded] = decode_record(raw, "click")
    assert (decoded.index, decoded.raw, decoded.event) == (None, raw, None)
    assert decoded.error is not None
    assert decoded.error.reason == reason
    assert named in decoded.error.detail


def test_a_value_that_is_neither_object_nor_array_is_rejected_like_decode_event_does() -> None:
    for raw in (b"{not json", b"42", PADDED_OBJECT):
        [decoded] = decode_record(raw, "click")
        assert decoded.error is not None
        assert decoded.error.reason == alone(raw, "click")[1][0]  # type: ignore[index]


def test_an_empty_array_has_no_events() -> None:
    assert decode_record(b"[]", "order") == []
    assert decode_record(b" \n[ ]\n", "order") == []


# --- arrays: every element on its own ------------------------------------------------------------

ELEMENT_CASES = [
    ("a valid click", obj(), None),
    ("a click without visitor", obj(visitor_id=None), "missing_field"),
    ("an order on the clicks topic", obj("order"), "type_mismatch"),
    ("an unknown type", obj(type="teleport"), "unknown_type"),
    ("a number", 7, "not_object"),
    ("a string", "click", "not_object"),
    ("null", None, "not_object"),
    ("a nested array", [obj()], "not_object"),
    ("a bad timestamp", obj(ts="yesterday"), "bad_timestamp"),
    ("an element over 64 KiB", obj(padding="x" * MAX_EVENT_BYTES), "too_large"),
]


def test_each_element_is_decoded_alone_with_its_index_and_own_bytes() -> None:
    elements = [element for _, element, _ in ELEMENT_CASES]
    decoded = decode_record(array(*elements), "click")
    assert [d.index for d in decoded] == list(range(len(ELEMENT_CASES)))
    for (name, element, reason), item in zip(ELEMENT_CASES, decoded):
        assert item.raw == orjson.dumps(element), name
        assert outcome(item) == alone(item.raw, "click"), name
        if reason is None:
            assert item.event is not None and item.error is None, name
        else:
            assert item.error is not None and item.error.reason == reason, name


def test_an_element_exactly_at_the_size_limit_is_decoded() -> None:
    padding = MAX_EVENT_BYTES - len(orjson.dumps(obj(padding="")))
    element = obj(padding="x" * padding)
    [decoded] = decode_record(array(element), "click")
    assert len(decoded.raw) == MAX_EVENT_BYTES
    assert decoded.event is not None


def test_the_size_limit_applies_to_the_element_not_to_its_array() -> None:
    elements = [obj(event_id=f"c-{n}", padding="x" * 1000) for n in range(200)]
    raw = array(*elements)
    assert len(raw) > 3 * MAX_EVENT_BYTES
    decoded = decode_record(raw, "click")
    assert [d.event.event_id for d in decoded if d.event] == [f"c-{n}" for n in range(200)]


def test_an_array_of_exactly_the_element_limit_is_decoded() -> None:
    elements = [obj(event_id=f"c-{n}") for n in range(MAX_BATCH_ELEMENTS)]
    decoded = decode_record(array(*elements), "click")
    assert len(decoded) == MAX_BATCH_ELEMENTS
    assert decoded[-1].index == MAX_BATCH_ELEMENTS - 1 and decoded[-1].event is not None


def test_element_bytes_are_compact_json_whatever_the_producer_wrote() -> None:
    raw = b'[ {"type": "click", "event_id": "c-1", "ts": "2026-11-02T10:15:00Z",\n'
    raw += b'   "visitor_id": "v-1", "session_id": "s-1", "affiliate_id": "sally"} ]'
    [decoded] = decode_record(raw, "click")
    assert decoded.raw == orjson.dumps(orjson.loads(raw)[0])
    assert decoded.event == decode_event(decoded.raw)


def test_numbers_beyond_64_bits_decode_in_an_array_as_alone() -> None:
    text = b'{"type": "order", "event_id": "o-1", "ts": "2026-11-02T10:15:00Z", "order_id": "o",'
    text += b' "visitor_id": "v", "customer_id": "c", "currency": "EUR", "total": %s}'
    for number in (b"18446744073709551616", b"-9223372036854775809", b"1e300"):
        raw = text % number
        [decoded] = decode_record(b"[" + raw + b"]", "order")
        assert outcome(decoded) == alone(raw, "order") == alone(decoded.raw, "order")


def test_too_many_elements_is_a_reason() -> None:
    assert "too_many_elements" in REASONS


# --- properties -----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["sku", "quantity", "price", "x"]), children, max_size=3),
    max_leaves=6,
)
FIELDS = ["event_id", "type", "ts", "visitor_id", "session_id", "affiliate_id", "channel",
          "order_id", "customer_id", "currency", "total", "amount", "items", "share_id"]
events_with_changes = st.builds(
    lambda event_type, changes: obj(event_type, **changes),
    st.sampled_from(sorted(BASE)),
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=2),
)
elements = st.one_of(events_with_changes, json_values)


@settings(max_examples=300)
@given(st.lists(elements, max_size=8), st.sampled_from(sorted(BASE)))
def test_an_array_decodes_element_by_element_as_each_element_alone(
    items: list[Any], expected_type: str
) -> None:
    decoded = decode_record(orjson.dumps(items), expected_type)
    assert [d.index for d in decoded] == list(range(len(items)))
    for item, element in zip(items, decoded):
        assert element.raw == orjson.dumps(item)
        assert outcome(element) == alone(orjson.dumps(item), expected_type)


@settings(max_examples=200)
@given(events_with_changes, st.sampled_from(sorted(BASE)))
def test_one_object_decodes_as_decode_event_decodes_it(item: dict[str, Any], expected_type: str) -> None:
    raw = orjson.dumps(item)
    [decoded] = decode_record(raw, expected_type)
    assert (decoded.index, decoded.raw) == (None, raw)
    assert outcome(decoded) == alone(raw, expected_type)


@given(st.binary(max_size=512))
def test_random_bytes_never_raise_and_every_rejection_has_a_reason(raw: bytes) -> None:
    for decoded in decode_record(raw, "click"):
        if decoded.error is not None:
            assert decoded.error.reason in REASONS


def test_an_element_nested_deeper_than_orjson_writes_is_rejected_alone() -> None:
    click = b'{"event_id":"c-1","type":"click","ts":"2026-11-02T10:15:00Z","visitor_id":"v",' \
            b'"session_id":"s","affiliate_id":"a"}'
    raw = b"[" + click + b"," + b"[" * 300 + b"]" * 300 + b"]"
    decoded = decode_record(raw, "click")
    assert decoded[0].error is None
    assert decoded[1].error is not None and decoded[1].error.reason == "too_deep"
    assert decoded[1].raw.startswith(b"[[[")
