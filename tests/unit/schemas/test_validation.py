"""Decoding of raw event bytes and of reference data (`schemas.validation`)."""

from __future__ import annotations

import pickle
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import CHANNELS, Click, Order, OrderItem, Refund, Share
from schemas.reference import (
    DEFAULT_COUPON_SITES,
    Affiliate,
    Commission,
    Program,
    Settings,
    Velocity,
)
from schemas.validation import (
    MAX_EVENT_BYTES,
    REASONS,
    InvalidEvent,
    InvalidReference,
    affiliate_to_json,
    decode_event,
    decode_record,
    decode_review,
    encode_json,
    parse_affiliate,
    parse_program,
    parse_reference_document,
    parse_settings,
    program_to_json,
    settings_to_json,
)

UTC = timezone.utc
DROP = object()  # marks a field to remove from a base event

BASE: dict[str, dict[str, Any]] = {
    "click": {
        "event_id": "c-1",
        "type": "click",
        "ts": "2026-11-02T10:15:00Z",
        "visitor_id": "v-1",
        "session_id": "s-1",
        "affiliate_id": "sally",
    },
    "share": {
        "event_id": "sh-1",
        "type": "share",
        "ts": "2026-11-02T10:15:00Z",
        "affiliate_id": "sally",
        "share_id": "share-1",
        "channel": "instagram",
    },
    "order": {
        "event_id": "o-1",
        "type": "order",
        "ts": "2026-11-02T10:15:00Z",
        "order_id": "order-1",
        "visitor_id": "v-1",
        "customer_id": "cust-1",
        "currency": "EUR",
        "total": "129.90",
    },
    "refund": {
        "event_id": "r-1",
        "type": "refund",
        "ts": "2026-11-03T10:15:00Z",
        "order_id": "order-1",
        "amount": "10.00",
    },
}


def event(event_type: str, **changes: Any) -> bytes:
    """A valid event of `event_type` as bytes, with `changes` applied (DROP removes a field)."""
    fields = {**BASE[event_type], **changes}
    return orjson.dumps({k: v for k, v in fields.items() if v is not DROP})


def decode_click(raw: bytes) -> Click:
    decoded = decode_event(raw, "click")
    assert isinstance(decoded, Click)
    return decoded


def decode_order(raw: bytes) -> Order:
    decoded = decode_event(raw, "order")
    assert isinstance(decoded, Order)
    return decoded


def rejection(raw: bytes, expected_type: str | None = None) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        decode_event(raw, expected_type)
    return caught.value


# --- valid events --------------------------------------------------------------------------------


def test_a_minimal_click_decodes_with_defaults() -> None:
    assert decode_event(event("click"), "click") == Click(
        event_id="c-1",
        ts=datetime(2026, 11, 2, 10, 15, tzinfo=UTC),
        visitor_id="v-1",
        session_id="s-1",
        affiliate_id="sally",
        channel="other",
    )


def test_a_full_click_keeps_every_optional_field_trimmed() -> None:
    click = decode_event(
        event(
            "click",
            visitor_id="  v-1 ",
            channel=" Instagram ",
            share_id="share-1",
            landing_url="https://shop.example.com/p/1",
            referrer="https://instagram.com/",
            ip="203.0.113.7",
            user_agent="Mozilla/5.0 ",
        )
    )
    assert click == Click(
        event_id="c-1",
        ts=datetime(2026, 11, 2, 10, 15, tzinfo=UTC),
        visitor_id="v-1",
        session_id="s-1",
        affiliate_id="sally",
        channel="instagram",
        share_id="share-1",
        landing_url="https://shop.example.com/p/1",
        referrer="https://instagram.com/",
        ip="203.0.113.7",
        user_agent="Mozilla/5.0",
    )


@pytest.mark.parametrize(
    ("given_channel", "stored"),
    [("facebook", "facebook"), ("TikTok", "tiktok"), ("myspace", "other"), ("", "other")],
)
def test_channel_is_lower_cased_and_unknown_channels_are_stored_as_other(
    given_channel: str, stored: str
) -> None:
    assert decode_click(event("click", channel=given_channel)).channel == stored


def test_a_share_decodes_with_its_channel_normalised() -> None:
    share = decode_event(event("share", channel="LinkedIn", url="https://x.example/s"), "share")
    assert share == Share(
        event_id="sh-1",
        ts=datetime(2026, 11, 2, 10, 15, tzinfo=UTC),
        affiliate_id="sally",
        share_id="share-1",
        channel="linkedin",
        url="https://x.example/s",
    )


def test_an_order_with_items_decodes_to_exact_decimals() -> None:
    order = decode_event(
        event(
            "order",
            currency="eur",
            discount_code="  sally20 ",
            session_id="s-1",
            items=[
                {"sku": "shoe-1", "category": "shoes", "quantity": 2, "price": "50.00"},
                {"sku": "card-1", "quantity": "1", "price": 29.9},
            ],
        ),
        "order",
    )
    assert order == Order(
        event_id="o-1",
        ts=datetime(2026, 11, 2, 10, 15, tzinfo=UTC),
        order_id="order-1",
        visitor_id="v-1",
        customer_id="cust-1",
        currency="EUR",
        total=Decimal("129.90"),
        session_id="s-1",
        discount_code="sally20",
        items=(
            OrderItem("shoe-1", "shoes", Decimal(2), Decimal("50.00")),
            OrderItem("card-1", "", Decimal(1), Decimal("29.9")),
        ),
    )


def test_discount_code_is_trimmed_but_keeps_its_case() -> None:
    assert decode_order(event("order", discount_code=" SaLLy20\t")).discount_code == "SaLLy20"


def test_a_refund_decodes_with_its_optional_fields() -> None:
    refund = decode_event(event("refund", currency=" usd", reason="damaged"), "refund")
    assert refund == Refund(
        event_id="r-1",
        ts=datetime(2026, 11, 3, 10, 15, tzinfo=UTC),
        order_id="order-1",
        amount=Decimal("10.00"),
        currency="USD",
        reason="damaged",
    )


def test_a_refund_without_currency_has_an_empty_currency() -> None:
    refund = decode_event(event("refund"))
    assert isinstance(refund, Refund)
    assert refund.currency == ""


def test_an_order_of_zero_total_is_valid() -> None:
    assert decode_order(event("order", total=0)).total == 0


@pytest.mark.parametrize(
    ("written", "utc"),
    [
        ("2026-11-02T10:15:00Z", datetime(2026, 11, 2, 10, 15, tzinfo=UTC)),
        ("2026-11-02T10:15:00+00:00", datetime(2026, 11, 2, 10, 15, tzinfo=UTC)),
        ("2026-11-02T10:15:00-00:00", datetime(2026, 11, 2, 10, 15, tzinfo=UTC)),
        ("2026-11-02T11:15:00+01:00", datetime(2026, 11, 2, 10, 15, tzinfo=UTC)),
        ("2026-11-02T04:45:00-05:30", datetime(2026, 11, 2, 10, 15, tzinfo=UTC)),
        ("2026-11-03T00:15:00+14:00", datetime(2026, 11, 2, 10, 15, tzinfo=UTC)),
        ("2026-11-02t10:15:00z", datetime(2026, 11, 2, 10, 15, tzinfo=UTC)),
        ("2026-11-02 10:15:00Z", datetime(2026, 11, 2, 10, 15, tzinfo=UTC)),
        ("2026-11-02T10:15:00.25Z", datetime(2026, 11, 2, 10, 15, 0, 250000, tzinfo=UTC)),
        ("2026-11-02T10:15:00.123456789Z", datetime(2026, 11, 2, 10, 15, 0, 123456, tzinfo=UTC)),
        ("2027-01-01T00:30:00+01:00", datetime(2026, 12, 31, 23, 30, tzinfo=UTC)),
    ],
)
def test_timestamps_with_any_offset_are_converted_to_utc(written: str, utc: datetime) -> None:
    ts = decode_click(event("click", ts=written)).ts
    assert ts == utc
    assert ts.tzinfo is UTC


@pytest.mark.parametrize("money", ["129.90", "129.9", 129.9, 129.90, " 129.90 ", "+129.90"])
def test_string_and_number_money_give_the_same_decimal(money: Any) -> None:
    total = decode_order(event("order", total=money)).total
    assert isinstance(total, Decimal)
    assert total == Decimal("129.90")


@pytest.mark.parametrize(
    ("money", "exact"),
    [
        (0.1, "0.1"),
        (129.9, "129.9"),
        (19.99, "19.99"),
        (1234567.89, "1234567.89"),
        (12345678901234, "12345678901234"),
        (1e2, "100.0"),
        ("1E+2", "100"),
        ("-0.00", "0.00"),
    ],
)
def test_money_never_carries_binary_float_artifacts(money: Any, exact: str) -> None:
    total = decode_order(event("order", total=money)).total
    assert str(total) == exact


def test_unknown_fields_are_ignored() -> None:
    raw = event("click", campaign={"nested": [1, 2, 3]}, score=0.5, flag=True, extra=None)
    assert decode_event(raw) == decode_event(event("click"))


def test_null_optional_fields_take_their_defaults() -> None:
    click = decode_click(event("click", channel=None, referrer=None, share_id=None))
    assert (click.channel, click.referrer, click.share_id) == ("other", "", "")
    order = decode_order(event("order", items=None, discount_code=None))
    assert (order.items, order.discount_code) == ((), "")


def test_an_event_exactly_at_the_size_limit_is_not_too_large() -> None:
    padding = MAX_EVENT_BYTES - len(event("click", padding=""))
    raw = event("click", padding="x" * padding)
    assert len(raw) == MAX_EVENT_BYTES
    assert isinstance(decode_event(raw), Click)


def test_an_event_one_byte_over_the_size_limit_is_too_large() -> None:
    padding = MAX_EVENT_BYTES + 1 - len(event("click", padding=""))
    error = rejection(event("click", padding="x" * padding))
    assert error.reason == "too_large"
    assert str(MAX_EVENT_BYTES) in error.detail


def test_an_event_of_the_expected_type_is_accepted_for_each_type() -> None:
    for event_type in BASE:
        assert decode_event(event(event_type), event_type).type == event_type


def test_an_event_on_the_topic_of_another_type_is_a_type_mismatch() -> None:
    error = rejection(event("order"), "click")
    assert error.reason == "type_mismatch"
    assert "'order'" in error.detail and "'click'" in error.detail


# --- invalid events ------------------------------------------------------------------------------

INVALID: list[tuple[str, bytes, str, str]] = [
    # (case, raw, reason, text the detail must contain)
    ("garbage", b"not json", "not_json", "JSON"),
    ("empty bytes", b"", "not_json", "JSON"),
    ("truncated", b'{"type": "click"', "not_json", "JSON"),
    ("invalid utf-8", b'{"type": "\xff"}', "not_json", "JSON"),
    ("json array", b"[1, 2]", "not_object", "array"),
    ("json string", b'"click"', "not_object", "string"),
    ("json null", b"null", "not_object", "null"),
    ("no type", event("click", type=DROP), "missing_field", "'type'"),
    ("null type", event("click", type=None), "missing_field", "'type'"),
    ("numeric type", event("click", type=1), "wrong_type", "'type'"),
    ("unknown type", event("click", type="view"), "unknown_type", "'view'"),
    ("type in upper case", event("click", type="CLICK"), "unknown_type", "'CLICK'"),
    ("no event_id", event("click", event_id=DROP), "missing_field", "'event_id'"),
    ("order without event_id", event("order", event_id=DROP), "missing_field", "'event_id'"),
    ("blank event_id", event("share", event_id="   "), "missing_field", "'event_id'"),
    ("numeric event_id", event("click", event_id=42), "wrong_type", "'event_id'"),
    ("no ts", event("click", ts=DROP), "missing_field", "'ts'"),
    ("epoch ts", event("click", ts=1793614500), "wrong_type", "'ts'"),
    ("naive ts", event("click", ts="2026-11-02T10:15:00"), "bad_timestamp", "offset"),
    ("date only", event("click", ts="2026-11-02"), "bad_timestamp", "'ts'"),
    ("basic format", event("click", ts="20261102T101500Z"), "bad_timestamp", "'ts'"),
    ("no seconds", event("click", ts="2026-11-02T10:15Z"), "bad_timestamp", "'ts'"),
    ("offset without colon", event("click", ts="2026-11-02T10:15:00+0100"), "bad_timestamp", "ts"),
    ("day 30 of february", event("click", ts="2026-02-30T10:15:00Z"), "bad_timestamp", "day"),
    ("hour 24", event("click", ts="2026-11-02T24:00:00Z"), "bad_timestamp", "'ts'"),
    ("offset of 24 hours", event("click", ts="2026-11-02T10:15:00+24:00"), "bad_timestamp", "ts"),
    ("words", event("click", ts="yesterday"), "bad_timestamp", "'ts'"),
    ("before 1970", event("click", ts="1969-12-31T23:59:59Z"), "out_of_range", "'ts'"),
    ("far future", event("click", ts="9999-12-31T23:59:59Z"), "out_of_range", "'ts'"),
    ("year 1 east of utc", event("click", ts="0001-01-01T00:30:00+01:00"), "bad_timestamp", "ts"),
    ("click without visitor", event("click", visitor_id=DROP), "missing_field", "'visitor_id'"),
    ("click null session", event("click", session_id=None), "missing_field", "'session_id'"),
    ("click empty affiliate", event("click", affiliate_id=""), "missing_field", "'affiliate_id'"),
    ("click numeric visitor", event("click", visitor_id=7), "wrong_type", "'visitor_id'"),
    ("click channel list", event("click", channel=["x"]), "wrong_type", "'channel'"),
    ("click referrer number", event("click", referrer=1), "wrong_type", "'referrer'"),
    ("share without channel", event("share", channel=DROP), "missing_field", "'channel'"),
    ("share without share_id", event("share", share_id=DROP), "missing_field", "'share_id'"),
    ("share url object", event("share", url={}), "wrong_type", "'url'"),
    ("order without order_id", event("order", order_id=DROP), "missing_field", "'order_id'"),
    ("order no customer", event("order", customer_id=DROP), "missing_field", "'customer_id'"),
    ("order no currency", event("order", currency=DROP), "missing_field", "'currency'"),
    ("order no total", event("order", total=DROP), "missing_field", "'total'"),
    ("negative total", event("order", total="-3.00"), "out_of_range", "'total' must be >= 0"),
    ("negative number total", event("order", total=-0.01), "out_of_range", "'total'"),
    ("boolean total", event("order", total=True), "wrong_type", "'total'"),
    ("null total", event("order", total=None), "missing_field", "'total'"),
    ("words for total", event("order", total="ten"), "wrong_type", "'total'"),
    ("comma total", event("order", total="1,299.00"), "wrong_type", "'total'"),
    ("nan total", event("order", total="NaN"), "wrong_type", "'total'"),
    ("infinite total", event("order", total="Infinity"), "wrong_type", "'total'"),
    ("total with currency", event("order", total="129.90 EUR"), "wrong_type", "'total'"),
    ("array total", event("order", total=[1]), "wrong_type", "'total'"),
    ("huge total", event("order", total="1e20"), "out_of_range", "10^15"),
    ("huge integer total", event("order", total=10**18), "out_of_range", "10^15"),
    ("overlong integer", b'{"type":"order","total":123456789012345678901234567890'
     b',"event_id":"o","ts":"2026-11-02T10:15:00Z","order_id":"o","visitor_id":"v",'
     b'"customer_id":"c","currency":"EUR"}', "out_of_range", "'total'"),
    ("too precise total", event("order", total="1e-30"), "out_of_range", "decimal places"),
    ("short currency", event("order", currency="EU"), "bad_currency", "'EU'"),
    ("digit currency", event("order", currency="978"), "bad_currency", "'978'"),
    ("symbol currency", event("order", currency="€"), "bad_currency", "currency"),
    ("empty currency", event("order", currency=""), "bad_currency", "currency"),
    ("numeric currency", event("order", currency=978), "wrong_type", "'currency'"),
    ("items not a list", event("order", items={"sku": "a"}), "wrong_type", "'items'"),
    ("item not an object", event("order", items=["a"]), "wrong_type", "'items[0]'"),
    (
        "item without sku",
        event("order", items=[{"quantity": 1, "price": "1"}]),
        "missing_field",
        "'items[0].sku'",
    ),
    (
        "item without price",
        event(
            "order",
            items=[{"sku": "a", "quantity": 1, "price": "1"}, {"sku": "b", "quantity": 1}],
        ),
        "missing_field",
        "'items[1].price'",
    ),
    (
        "item without quantity",
        event("order", items=[{"sku": "a", "price": "1"}]),
        "missing_field",
        "'items[0].quantity'",
    ),
    (
        "zero quantity",
        event("order", items=[{"sku": "a", "quantity": 0, "price": "1"}]),
        "out_of_range",
        "'items[0].quantity' must be > 0",
    ),
    (
        "negative price",
        event("order", items=[{"sku": "a", "quantity": 1, "price": "-1"}]),
        "out_of_range",
        "'items[0].price' must be >= 0",
    ),
    (
        "numeric category",
        event("order", items=[{"sku": "a", "category": 3, "quantity": 1, "price": "1"}]),
        "wrong_type",
        "'items[0].category'",
    ),
    ("refund without amount", event("refund", amount=DROP), "missing_field", "'amount'"),
    ("zero refund", event("refund", amount="0.00"), "out_of_range", "'amount' must be > 0"),
    ("negative refund", event("refund", amount=-5), "out_of_range", "'amount' must be > 0"),
    ("refund without order", event("refund", order_id=DROP), "missing_field", "'order_id'"),
    ("refund bad currency", event("refund", currency="dollars"), "bad_currency", "currency"),
]


@pytest.mark.parametrize(
    ("raw", "reason", "named"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_an_invalid_event_is_rejected_with_its_reason(raw: bytes, reason: str, named: str) -> None:
    error = rejection(raw)
    assert error.reason == reason
    assert named in error.detail
    assert reason in REASONS


def test_the_message_of_a_rejection_is_reason_then_detail() -> None:
    error = rejection(event("order", total="-3.00"))
    assert error.detail == "field 'total' must be >= 0, got '-3.00'"
    assert str(error) == "out_of_range: field 'total' must be >= 0, got '-3.00'"
    assert isinstance(error, ValueError)


def test_a_rejection_survives_pickling_with_its_reason_and_detail() -> None:
    error = rejection(event("click", visitor_id=DROP))
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.detail, str(copy)) == (error.reason, error.detail, str(error))


def test_a_rejection_detail_stays_short_whatever_the_value() -> None:
    error = rejection(event("order", currency="X" * 50_000))
    assert error.reason == "bad_currency"
    assert len(error.detail) < 200


def test_the_first_invalid_field_in_contract_order_is_reported() -> None:
    error = rejection(event("click", event_id=DROP, ts="bad", visitor_id=DROP))
    assert error.detail == "field 'event_id' is required"


# --- encode_json ---------------------------------------------------------------------------------


def test_encode_json_writes_decimals_as_plain_strings() -> None:
    encoded = encode_json(
        {"total": Decimal("129.90"), "big": Decimal("1E+2"), "tiny": Decimal("1E-7")}
    )
    assert orjson.loads(encoded) == {"total": "129.90", "big": "100", "tiny": "0.0000001"}


def test_encode_json_writes_datetimes_in_utc_with_z() -> None:
    paris = timezone(timedelta(hours=1))
    encoded = encode_json(
        {
            "a": datetime(2026, 11, 2, 11, 15, tzinfo=paris),
            "b": datetime(2026, 11, 2, 10, 15, 0, 500, tzinfo=UTC),
        }
    )
    assert orjson.loads(encoded) == {
        "a": "2026-11-02T10:15:00Z",
        "b": "2026-11-02T10:15:00.000500Z",
    }


def test_encode_json_refuses_a_naive_datetime() -> None:
    with pytest.raises(TypeError):
        encode_json({"ts": datetime(2026, 11, 2, 10, 15)})


def test_an_encoded_order_decodes_to_the_same_order() -> None:
    order = decode_event(
        event("order", items=[{"sku": "a", "category": "c", "quantity": "1.5", "price": 9.99}])
    )
    assert decode_event(encode_json(order), "order") == order


# --- reference data ------------------------------------------------------------------------------

CONTRACT_EXAMPLE = {
    "programs": [
        {
            "program_id": "ambassadors",
            "kind": "affiliate",
            "attribution_window_days": 30,
            "lock_days": 30,
            "commission": {"type": "percent", "rate": "0.10"},
            "tier_rates": {"macro": "0.20", "mega": "0.30"},
            "category_rates": {"gift-cards": "0.02"},
            "velocity": {"max_customers": 20, "window_minutes": 60},
        }
    ],
    "affiliates": [
        {
            "affiliate_id": "sally",
            "program_id": "ambassadors",
            "tier": "macro",
            "customer_id": "cust-981",
            "codes": ["SALLY20"],
            "status": "active",
        }
    ],
    "settings": {
        "coupon_sites": ["retailmenot.com", "joinhoney.com"],
        "fast_conversion_seconds": 5,
    },
}


def document(**sections: Any) -> bytes:
    """The contract example with `sections` replaced; DROP removes a field anywhere."""
    return orjson.dumps(_drop_marked({**CONTRACT_EXAMPLE, **sections}))


def _drop_marked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_marked(v) for k, v in value.items() if v is not DROP}
    if isinstance(value, list):
        return [_drop_marked(v) for v in value]
    return value


def test_the_contract_example_parses_into_records() -> None:
    programs, affiliates, settings_ = parse_reference_document(orjson.dumps(CONTRACT_EXAMPLE))
    assert programs == [
        Program(
            program_id="ambassadors",
            kind="affiliate",
            commission=Commission(type="percent", rate=Decimal("0.10")),
            tier_rates={"macro": Decimal("0.20"), "mega": Decimal("0.30")},
            category_rates={"gift-cards": Decimal("0.02")},
        )
    ]
    assert affiliates == [
        Affiliate("sally", "ambassadors", tier="macro", customer_id="cust-981", codes=("SALLY20",))
    ]
    assert settings_ == Settings(coupon_sites=("retailmenot.com", "joinhoney.com"))


def test_a_program_takes_the_contract_defaults() -> None:
    program = parse_program(
        {"program_id": "friends", "kind": "referral",
         "commission": {"type": "fixed", "amount": 5, "currency": " eur"}}
    )
    assert program == Program(
        program_id="friends",
        kind="referral",
        commission=Commission(type="fixed", amount=Decimal(5), currency="EUR"),
        attribution_window_days=30,
        lock_days=30,
        velocity=Velocity(max_customers=20, window_minutes=60),
    )


def test_an_affiliate_takes_defaults_and_normalises_its_codes() -> None:
    affiliate = parse_affiliate(
        {"affiliate_id": "bob", "program_id": "p", "codes": [" bob10 ", "BOB10", "Spring"]}
    )
    assert affiliate == Affiliate("bob", "p", codes=("BOB10", "SPRING"), status="active")
    assert affiliate.active


def test_an_affiliate_status_is_lower_cased() -> None:
    affiliate = parse_affiliate({"affiliate_id": "a", "program_id": "p", "status": "Suspended"})
    assert affiliate.status == "suspended"
    assert not affiliate.active


def test_settings_without_coupon_sites_use_the_built_in_list() -> None:
    assert parse_settings({}) == Settings(
        coupon_sites=DEFAULT_COUPON_SITES, fast_conversion_seconds=5
    )


def test_coupon_sites_are_lower_cased_host_names() -> None:
    parsed = parse_settings(
        {"coupon_sites": [" RetailMeNot.com ", "deals.example.", "retailmenot.com"]}
    )
    assert parsed.coupon_sites == ("retailmenot.com", "deals.example")


def test_an_empty_coupon_site_list_disables_the_list() -> None:
    assert parse_settings({"coupon_sites": []}).coupon_sites == ()


def test_a_file_without_settings_has_none() -> None:
    assert parse_reference_document(b'{"programs": [], "affiliates": []}') == ([], [], None)


def _program(**changes: Any) -> dict[str, Any]:
    return {**CONTRACT_EXAMPLE["programs"][0], **changes}  # type: ignore[index]


def _affiliate(**changes: Any) -> dict[str, Any]:
    return {**CONTRACT_EXAMPLE["affiliates"][0], **changes}  # type: ignore[index]


INVALID_REFERENCE: list[tuple[str, bytes, str]] = [
    # (case, raw document, text the message must contain)
    ("not json", b"{", "JSON"),
    ("not an object", b"[]", "must be a JSON object"),
    ("misspelt section", document(affiliate=[]), "affiliate: unknown section"),
    ("programs not a list", document(programs={}), "programs: must be an array"),
    ("program not an object", document(programs=[1]), "programs[0]: must be an object"),
    ("no program_id", document(programs=[_program(program_id=None)]), "programs[0].program_id"),
    ("unknown kind", document(programs=[_program(kind="mlm")]), "programs[0].kind: must be one of"),
    (
        "unknown commission type",
        document(programs=[_program(commission={"type": "tiered", "rate": "0.1"})]),
        "programs[0].commission.type: must be one of percent, fixed",
    ),
    (
        "negative rate",
        document(programs=[_program(commission={"type": "percent", "rate": "-0.10"})]),
        "programs[0].commission.rate: must be a decimal",
    ),
    (
        "rate above one",
        document(programs=[_program(commission={"type": "percent", "rate": "10"})]),
        "programs[0].commission.rate: must be a decimal from 0 to 1",
    ),
    (
        "percent without rate",
        document(programs=[_program(commission={"type": "percent"})]),
        "programs[0].commission.rate: is required",
    ),
    (
        "fixed without amount",
        document(programs=[_program(commission={"type": "fixed"}, tier_rates={})]),
        "programs[0].commission.amount: is required",
    ),
    (
        "negative fixed amount",
        document(programs=[_program(commission={"type": "fixed", "amount": -5, "currency": "EUR"},
                                    tier_rates={})]),
        "programs[0].commission.amount: must be a decimal >= 0",
    ),
    (
        "fixed without currency",
        document(programs=[_program(commission={"type": "fixed", "amount": 5}, tier_rates={})]),
        "programs[0].commission.currency: is required for a fixed commission",
    ),
    (
        "fixed with a bad currency",
        document(programs=[_program(commission={"type": "fixed", "amount": 5, "currency": "EURO"},
                                    tier_rates={})]),
        "programs[0].commission.currency: must be a 3-letter ISO 4217 code",
    ),
    (
        "reviewers not strings",
        document(settings={"reviewers": ["ann", 7]}),
        "settings.reviewers[1]: must be a non-empty string",
    ),
    (
        "max_future_seconds too large",
        document(settings={"max_future_seconds": 10**6}),
        "settings.max_future_seconds",
    ),
    (
        "tier rates on a fixed program",
        document(programs=[_program(commission={"type": "fixed", "amount": 5, "currency": "EUR"},
                                    category_rates={})]),
        "programs[0].tier_rates: is only allowed with a percent commission",
    ),
    (
        "no commission",
        document(programs=[_program(commission=None)]),
        "programs[0].commission: is required",
    ),
    (
        "negative tier rate",
        document(programs=[_program(tier_rates={"macro": "-0.2"})]),
        "programs[0].tier_rates.macro: must be a decimal",
    ),
    (
        "boolean category rate",
        document(programs=[_program(category_rates={"books": True})]),
        "programs[0].category_rates.books",
    ),
    (
        "fractional window",
        document(programs=[_program(attribution_window_days=1.5)]),
        "programs[0].attribution_window_days: must be an integer",
    ),
    (
        "zero window",
        document(programs=[_program(attribution_window_days=0)]),
        "programs[0].attribution_window_days",
    ),
    ("negative lock", document(programs=[_program(lock_days=-1)]), "programs[0].lock_days"),
    (
        "velocity of zero customers",
        document(programs=[_program(velocity={"max_customers": 0})]),
        "programs[0].velocity.max_customers",
    ),
    (
        "duplicate program",
        document(programs=[_program(), _program()]),
        "programs[1].program_id: duplicate program_id 'ambassadors' (first at programs[0])",
    ),
    (
        "affiliate of an unknown program",
        document(affiliates=[_affiliate(program_id="ghosts")]),
        "affiliates[0].program_id: unknown program 'ghosts'",
    ),
    (
        "duplicate affiliate",
        document(affiliates=[_affiliate(), _affiliate(codes=[])]),
        "affiliates[1].affiliate_id: duplicate affiliate_id 'sally'",
    ),
    (
        "code owned twice",
        document(affiliates=[_affiliate(), _affiliate(affiliate_id="bob", codes=[" sally20 "])]),
        "affiliates[1].codes: code 'SALLY20' is already owned by affiliate 'sally'",
    ),
    ("empty code", document(affiliates=[_affiliate(codes=["  "])]), "affiliates[0].codes[0]"),
    ("numeric code", document(affiliates=[_affiliate(codes=[20])]), "affiliates[0].codes[0]"),
    ("empty status", document(affiliates=[_affiliate(status="")]), "affiliates[0].status"),
    ("no affiliate_id", document(affiliates=[_affiliate(affiliate_id=DROP)]), "affiliate_id"),
    (
        "coupon site url",
        document(settings={"coupon_sites": ["https://retailmenot.com/"]}),
        "settings.coupon_sites[0]: must be a host name",
    ),
    ("coupon sites string", document(settings={"coupon_sites": "a.com"}), "settings.coupon_sites"),
    (
        "negative fast conversion",
        document(settings={"fast_conversion_seconds": -1}),
        "settings.fast_conversion_seconds",
    ),
    ("settings not an object", document(settings=[]), "settings: must be an object"),
]


@pytest.mark.parametrize(
    ("raw", "named"),
    [case[1:] for case in INVALID_REFERENCE],
    ids=[case[0] for case in INVALID_REFERENCE],
)
def test_an_invalid_reference_document_is_rejected_naming_the_path(raw: bytes, named: str) -> None:
    with pytest.raises(InvalidReference) as caught:
        parse_reference_document(raw)
    assert named in str(caught.value)


def test_a_standalone_program_error_names_its_path() -> None:
    with pytest.raises(InvalidReference) as caught:
        parse_program(_program(commission={"type": "percent", "rate": "-1"}))
    assert caught.value.path == "program.commission.rate"
    assert str(caught.value).startswith("program.commission.rate: must be a decimal")


def test_examples_of_reference_records_round_trip_through_json() -> None:
    programs, affiliates, settings_ = parse_reference_document(orjson.dumps(CONTRACT_EXAMPLE))
    assert settings_ is not None
    assert parse_program(orjson.loads(program_to_json(programs[0]))) == programs[0]
    assert parse_affiliate(orjson.loads(affiliate_to_json(affiliates[0]))) == affiliates[0]
    assert parse_settings(orjson.loads(settings_to_json(settings_))) == settings_
    assert parse_settings(orjson.loads(settings_to_json(Settings()))) == Settings()


# --- properties ----------------------------------------------------------------------------------

ids = (
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)
    .map(str.strip)
    .filter(bool)
)
optional_texts = st.text(st.characters(codec="utf-8"), max_size=30).map(str.strip)
utc_times = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(2095, 12, 30), timezones=st.just(UTC)
)
offsets = st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
money = st.decimals(
    min_value=0,
    max_value=Decimal("999999999999.99"),
    places=2,
    allow_nan=False,
    allow_infinity=False,
)

clicks = st.builds(
    Click,
    event_id=ids,
    ts=utc_times,
    visitor_id=ids,
    session_id=ids,
    affiliate_id=ids,
    channel=st.sampled_from(sorted(CHANNELS)),
    share_id=optional_texts,
    landing_url=optional_texts,
    referrer=optional_texts,
    ip=optional_texts,
    user_agent=optional_texts,
)


@given(clicks)
def test_any_valid_click_round_trips_through_json(click: Click) -> None:
    assert decode_event(encode_json(click), "click") == click


@given(clicks, offsets)
def test_a_click_written_in_any_offset_decodes_to_the_same_utc_instant(
    click: Click, offset: timezone
) -> None:
    local = orjson.loads(encode_json(click))
    local["ts"] = click.ts.astimezone(offset).isoformat()
    assert decode_event(orjson.dumps(local)) == click


@given(
    st.builds(
        Order,
        event_id=ids,
        ts=utc_times,
        order_id=ids,
        visitor_id=ids,
        customer_id=ids,
        currency=st.sampled_from(["EUR", "USD", "GBP", "JPY"]),
        total=money,
        discount_code=optional_texts,
        items=st.lists(
            st.builds(
                OrderItem,
                sku=ids,
                category=optional_texts,
                quantity=st.integers(min_value=1, max_value=1000).map(Decimal),
                price=money,
            ),
            max_size=5,
        ).map(tuple),
    )
)
def test_any_valid_order_round_trips_through_json(order: Order) -> None:
    assert decode_event(encode_json(order), "order") == order


@given(money)
def test_money_as_a_json_number_equals_money_as_a_string(amount: Decimal) -> None:
    as_number = decode_order(event("order", total=float(amount))).total
    as_string = decode_order(event("order", total=str(amount))).total
    assert as_number == as_string == amount


@given(st.binary(max_size=512))
def test_random_bytes_never_raise_anything_but_invalid_event(raw: bytes) -> None:
    try:
        decode_event(raw)
    except InvalidEvent as error:
        assert error.reason in REASONS


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


@settings(max_examples=300)
@given(
    st.sampled_from(sorted(BASE)),
    st.dictionaries(
        st.sampled_from(
            ["event_id", "type", "ts", "visitor_id", "session_id", "affiliate_id", "channel",
             "share_id", "order_id", "customer_id", "currency", "total", "amount", "items",
             "discount_code", "url", "reason"]
        ),
        json_values,
        max_size=3,
    ),
)
def test_any_json_object_decodes_or_is_rejected_with_a_reason(
    event_type: str, changes: dict[str, Any]
) -> None:
    try:
        decoded = decode_event(event(event_type, **changes))
    except InvalidEvent as error:
        assert error.reason in REASONS
    else:
        assert decoded.type in BASE


printable_ascii = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
reference_ids = st.text(printable_ascii, min_size=1, max_size=12).map(str.strip).filter(bool)
rates = st.decimals(min_value=0, max_value=1, places=4)


@st.composite
def programs(draw: st.DrawFn) -> Program:
    percent = draw(st.booleans())
    return Program(
        program_id=draw(reference_ids),
        kind=draw(st.sampled_from(["referral", "affiliate"])),
        commission=(
            Commission(type="percent", rate=draw(rates))
            if percent
            else Commission(type="fixed", amount=draw(money),
                            currency=draw(st.sampled_from(["EUR", "USD", "JPY"])))
        ),
        attribution_window_days=draw(st.integers(min_value=1, max_value=3650)),
        lock_days=draw(st.integers(min_value=0, max_value=3650)),
        tier_rates=draw(st.dictionaries(reference_ids, rates, max_size=3)) if percent else {},
        category_rates=draw(st.dictionaries(reference_ids, rates, max_size=3)) if percent else {},
        velocity=Velocity(
            max_customers=draw(st.integers(min_value=1, max_value=10_000)),
            window_minutes=draw(st.integers(min_value=1, max_value=10_000)),
        ),
    )


@given(programs())
def test_any_program_round_trips_through_json(program: Program) -> None:
    assert parse_program(orjson.loads(program_to_json(program))) == program


@given(
    st.builds(
        Affiliate,
        affiliate_id=reference_ids,
        program_id=reference_ids,
        tier=optional_texts,
        customer_id=optional_texts,
        codes=st.lists(reference_ids.map(str.upper), unique=True, max_size=4).map(tuple),
        status=st.sampled_from(["active", "suspended", "terminated"]),
    )
)
def test_any_affiliate_round_trips_through_json(affiliate: Affiliate) -> None:
    assert parse_affiliate(orjson.loads(affiliate_to_json(affiliate))) == affiliate


@given(
    st.builds(
        Settings,
        coupon_sites=st.lists(
            st.from_regex(r"[a-z0-9-]{1,10}\.[a-z]{2,6}", fullmatch=True), unique=True, max_size=5
        ).map(tuple),
        fast_conversion_seconds=st.integers(min_value=0, max_value=86_400),
    )
)
def test_any_settings_round_trip_through_json(settings_: Settings) -> None:
    assert parse_settings(orjson.loads(settings_to_json(settings_))) == settings_



@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(["programs", "affiliates", "settings"]),
        st.lists(
            st.dictionaries(
                st.sampled_from(
                    ["program_id", "affiliate_id", "kind", "commission", "tier_rates", "codes",
                     "coupon_sites", "velocity", "lock_days", "status", "type", "rate"]
                ),
                json_values,
                max_size=4,
            ),
            max_size=2,
        )
        | json_values,
        max_size=3,
    )
)
def test_any_reference_document_parses_or_is_rejected_with_a_path(doc: dict[str, Any]) -> None:
    try:
        parse_reference_document(orjson.dumps(doc))
    except InvalidReference as error:
        assert str(error)


# contract v2 §2: event time is bounded by the processing clock

NOT_AFTER = datetime(2026, 11, 2, 10, 20, tzinfo=UTC)


@pytest.mark.parametrize("event_type", ["click", "share", "order", "refund"])
def test_an_event_later_than_the_bound_is_ts_in_future(event_type: str) -> None:
    on_time = orjson.dumps(BASE[event_type] | {"ts": "2026-11-02T10:20:00Z"})
    late = orjson.dumps(BASE[event_type] | {"ts": "2026-11-02T10:20:00.000001Z"})
    assert decode_event(on_time, not_after=NOT_AFTER).ts == NOT_AFTER
    with pytest.raises(InvalidEvent) as caught:
        decode_event(late, not_after=NOT_AFTER)
    assert caught.value.reason == "ts_in_future"


def test_one_future_element_of_a_batched_record_is_rejected_alone() -> None:
    raw = orjson.dumps([BASE["click"], BASE["click"] | {"event_id": "c-2", "ts": "2095-01-01T00:00:00Z"}])
    decoded = decode_record(raw, "click", not_after=NOT_AFTER)
    assert [d.error.reason if d.error else "ok" for d in decoded] == ["ok", "ts_in_future"]


def test_a_future_review_is_ts_in_future() -> None:
    raw = orjson.dumps({"type": "review", "event_id": "v-1", "ts": "2095-01-01T00:00:00Z",
                        "order_id": "o-1", "decision": "release", "reviewer": "ann"})
    with pytest.raises(InvalidEvent) as caught:
        decode_review(raw, not_after=NOT_AFTER)
    assert caught.value.reason == "ts_in_future"


@pytest.mark.parametrize("field", ["event_id", "visitor_id", "session_id", "affiliate_id"])
def test_an_id_longer_than_256_characters_is_out_of_range(field: str) -> None:
    assert decode_event(orjson.dumps(BASE["click"] | {field: "x" * 256}))
    with pytest.raises(InvalidEvent) as caught:
        decode_event(orjson.dumps(BASE["click"] | {field: "x" * 257}))
    assert caught.value.reason == "out_of_range"


@pytest.mark.parametrize("field", ["ip", "user_agent"])
def test_a_wrong_typed_personal_field_is_not_repeated_in_the_error(field: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        decode_event(orjson.dumps(BASE["click"] | {field: 3405803783}))
    assert caught.value.reason == "wrong_type" and "3405803783" not in caught.value.detail


def test_edge_settings_parse_and_round_trip() -> None:
    settings_ = parse_settings({
        "links": [{"link_id": "sally-ig", "affiliate_id": "sally", "url": "https://shop.example/p?x=1",
                   "channel": "Instagram"}],
        "allowed_redirect_hosts": ["Shop.Example"], "allowed_origins": ["shop.example."]})
    assert settings_.link("sally-ig") is not None and settings_.link("sally-ig").channel == "instagram"
    assert settings_.link("nope") is None
    assert settings_.allowed_redirect_hosts == ("shop.example",)
    assert settings_.allowed_origins == ("shop.example",)
    assert parse_settings(orjson.loads(settings_to_json(settings_))) == settings_


@pytest.mark.parametrize("settings_, message", [
    ({"links": [{"link_id": "a", "affiliate_id": "s", "url": "javascript:alert(1)"}]}, "links[0].url"),
    ({"links": [{"link_id": "a", "affiliate_id": "s", "url": "https://x.example"},
                {"link_id": "a", "affiliate_id": "s", "url": "https://x.example"}]}, "duplicate link_id"),
    ({"allowed_redirect_hosts": ["https://x.example/"]}, "allowed_redirect_hosts[0]"),
])
def test_bad_edge_settings_are_refused(settings_: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidReference, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_settings(settings_)
