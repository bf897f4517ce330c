"""Decoding of review decisions (`reviews` topic) and of the optional order `discount_amount`."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.events import Order, Review, ReviewDecision
from schemas.validation import (
    MAX_EVENT_BYTES,
    REASONS,
    InvalidEvent,
    decode_event,
    decode_review,
    encode_json,
    review_to_json,
)

UTC = timezone.utc
DROP = object()  # marks a field to remove from the base record

REVIEW: dict[str, Any] = {
    "type": "review",
    "event_id": "rv-1",
    "ts": "2026-11-20T09:00:00Z",
    "order_id": "order-1",
    "decision": "reject",
    "reviewer": "ann@shop.example",
    "note": "second account of the affiliate",
}

ORDER: dict[str, Any] = {
    "event_id": "o-1",
    "type": "order",
    "ts": "2026-11-02T10:15:00Z",
    "order_id": "order-1",
    "visitor_id": "v-1",
    "customer_id": "cust-1",
    "currency": "EUR",
    "total": "129.90",
    "discount_code": "SALLY20",
}


def _with(base: dict[str, Any], changes: dict[str, Any]) -> bytes:
    fields = {**base, **changes}
    return orjson.dumps({k: v for k, v in fields.items() if v is not DROP})


def review_event(**changes: Any) -> bytes:
    """A valid review as bytes, with `changes` applied (DROP removes a field)."""
    return _with(REVIEW, changes)


def order_event(**changes: Any) -> bytes:
    return _with(ORDER, changes)


def decoded_order(raw: bytes) -> Order:
    decoded = decode_event(raw, "order")
    assert isinstance(decoded, Order)
    return decoded


# --- reviews -------------------------------------------------------------------------------------


def test_a_review_decodes_into_its_record() -> None:
    assert decode_review(review_event()) == Review(
        event_id="rv-1",
        ts=datetime(2026, 11, 20, 9, 0, tzinfo=UTC),
        order_id="order-1",
        decision="reject",
        reviewer="ann@shop.example",
        note="second account of the affiliate",
    )


def test_a_review_without_a_note_has_an_empty_note() -> None:
    assert decode_review(review_event(note=DROP)).note == ""
    assert decode_review(review_event(note=None)).note == ""


def test_review_fields_are_trimmed() -> None:
    decoded = decode_review(review_event(decision=" release ", reviewer=" ann ", order_id=" o "))
    assert (decoded.decision, decoded.reviewer, decoded.order_id) == ("release", "ann", "o")


@pytest.mark.parametrize(
    "review",
    [
        Review("rv-1", datetime(2026, 11, 20, 9, tzinfo=UTC), "order-1", "release", "ann"),
        Review("rv-2", datetime(2026, 11, 20, 9, 0, 0, 123456, tzinfo=UTC), "order-1", "reject",
               "bob", note="coupon site leak, see ticket 42"),
        Review("rv-3", datetime(2026, 11, 20, 10, tzinfo=timezone(timedelta(hours=1))),
               "order-1", "reject", "ann"),
    ],
    ids=["release", "reject with note and microseconds", "ts with an offset"],
)
def test_an_encoded_review_decodes_to_the_same_review(review: Review) -> None:
    raw = review_to_json(review)
    assert decode_review(raw) == review
    obj = orjson.loads(raw)
    assert obj["type"] == "review" and obj["ts"].endswith("Z")


identifier = st.text(min_size=1, max_size=40).filter(lambda s: s.strip() == s and s != "")


@given(
    event_id=identifier,
    order_id=identifier,
    reviewer=identifier,
    note=st.text(max_size=80).filter(lambda s: s.strip() == s),
    decision=st.sampled_from(["release", "reject"]),
    ts=st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2095, 12, 31),
                    timezones=st.just(UTC)),
)
def test_any_review_survives_the_round_trip_through_json(
    event_id: str, order_id: str, reviewer: str, note: str, decision: ReviewDecision,
    ts: datetime,
) -> None:
    review = Review(event_id, ts, order_id, decision, reviewer, note)
    assert decode_review(review_to_json(review)) == review


def test_encoding_a_review_with_a_naive_time_is_refused() -> None:
    with pytest.raises(TypeError):
        review_to_json(Review("rv-1", datetime(2026, 11, 20, 9), "order-1", "reject", "ann"))


INVALID_REVIEWS: list[tuple[str, bytes, str, str]] = [
    # (case, raw, reason, text the detail must contain)
    ("garbage", b"not json", "not_json", "JSON"),
    ("empty bytes", b"", "not_json", "JSON"),
    ("truncated", b'{"type": "review"', "not_json", "JSON"),
    ("json array", b"[]", "not_object", "array"),
    ("an order", order_event(), "type_mismatch", "'order'"),
    ("no type", review_event(type=DROP), "type_mismatch", "review"),
    ("type in upper case", review_event(type="REVIEW"), "type_mismatch", "'REVIEW'"),
    ("unknown decision", review_event(decision="approve"), "out_of_range", "'approve'"),
    ("decision hold", review_event(decision="hold"), "out_of_range", "release or reject"),
    ("no decision", review_event(decision=DROP), "missing_field", "'decision'"),
    ("blank decision", review_event(decision="  "), "missing_field", "'decision'"),
    ("numeric decision", review_event(decision=1), "wrong_type", "'decision'"),
    ("no reviewer", review_event(reviewer=DROP), "missing_field", "'reviewer'"),
    ("null reviewer", review_event(reviewer=None), "missing_field", "'reviewer'"),
    ("blank reviewer", review_event(reviewer=" "), "missing_field", "'reviewer'"),
    ("reviewer object", review_event(reviewer={"name": "ann"}), "wrong_type", "'reviewer'"),
    ("no event_id", review_event(event_id=DROP), "missing_field", "'event_id'"),
    ("no order_id", review_event(order_id=DROP), "missing_field", "'order_id'"),
    ("naive ts", review_event(ts="2026-11-20T09:00:00"), "bad_timestamp", "offset"),
    ("epoch ts", review_event(ts=1795000000), "wrong_type", "'ts'"),
    ("note number", review_event(note=3), "wrong_type", "'note'"),
    ("too large", review_event(note="x" * MAX_EVENT_BYTES), "too_large", "limit"),
]


@pytest.mark.parametrize(
    ("raw", "reason", "named"),
    [case[1:] for case in INVALID_REVIEWS],
    ids=[case[0] for case in INVALID_REVIEWS],
)
def test_an_invalid_review_is_rejected_with_its_reason(raw: bytes, reason: str, named: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        decode_review(raw)
    assert caught.value.reason == reason
    assert named in caught.value.detail
    assert reason in REASONS


def test_a_review_is_not_an_input_event() -> None:
    with pytest.raises(InvalidEvent) as caught:
        decode_event(review_event())
    assert caught.value.reason == "unknown_type"


# --- order discount_amount -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "amount"),
    [
        pytest.param(DROP, "0", id="absent"),
        pytest.param(None, "0", id="null"),
        pytest.param("2.50", "2.50", id="decimal string"),
        pytest.param(" 2.50 ", "2.50", id="padded string"),
        pytest.param(2.5, "2.5", id="number"),
        pytest.param(3, "3", id="integer"),
        pytest.param("0", "0", id="zero"),
        pytest.param("-0.00", "0.00", id="negative zero"),
    ],
)
def test_an_orders_discount_amount_is_exact_and_zero_when_not_given(
    written: Any, amount: str
) -> None:
    decoded = decoded_order(order_event(discount_amount=written)).discount_amount
    assert decoded == Decimal(amount) and str(decoded) == amount


@pytest.mark.parametrize(
    ("written", "reason"),
    [
        pytest.param("-0.01", "out_of_range", id="negative string"),
        pytest.param(-2, "out_of_range", id="negative number"),
        pytest.param("1e20", "out_of_range", id="absurd magnitude"),
        pytest.param(True, "wrong_type", id="boolean"),
        pytest.param(False, "wrong_type", id="false"),
        pytest.param([2.5], "wrong_type", id="list"),
        pytest.param({"amount": "2.50"}, "wrong_type", id="object"),
        pytest.param("2,50", "wrong_type", id="comma decimal"),
        pytest.param("", "wrong_type", id="empty string"),
    ],
)
def test_an_invalid_discount_amount_rejects_the_order(written: Any, reason: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        decode_event(order_event(discount_amount=written), "order")
    assert caught.value.reason == reason
    assert "'discount_amount'" in caught.value.detail


def test_an_encoded_order_with_a_discount_decodes_to_the_same_order() -> None:
    placed = decoded_order(order_event(discount_amount="2.50"))
    assert decoded_order(encode_json(placed)) == placed
