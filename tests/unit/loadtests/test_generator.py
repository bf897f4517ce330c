"""The traffic generator (`loadtests.generator`): valid, ordered, reproducible traffic that looks
like a shop's day and carries the planted abuse."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from loadtests.generator import (
    INSTANT_CONVERSIONS,
    LEAK_ORDERS,
    LEAKED_CODE_AFFILIATE,
    SELF_REFERRING_AFFILIATE,
    TrafficProfile,
    count_by_type,
    generate,
    sample_reference,
    write_jsonl,
)
from schemas.events import Click, Order, Refund, Share
from schemas.validation import decode_event, parse_reference_document

UTC = timezone.utc
VISITORS = 4000
Events = list[dict[str, Any]]


def make(visitors: int = VISITORS, **profile: Any) -> Events:
    return list(generate(sample_reference(), TrafficProfile(visitors=visitors, **profile)))


@pytest.fixture(scope="module")
def day() -> Events:
    return make()


def parsed_ts(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["ts"])


def distinct(events: Events) -> Events:
    """The events without the re-sent duplicates."""
    seen: set[str] = set()
    kept = []
    for event in events:
        if event["event_id"] not in seen:
            seen.add(event["event_id"])
            kept.append(event)
    return kept


def of_type(events: Events, kind: str) -> Events:
    return [e for e in distinct(events) if e["type"] == kind]


# --- reference -----------------------------------------------------------------------------------


def test_sample_reference_is_a_loadable_reference_document() -> None:
    programs, affiliates, settings = parse_reference_document(orjson.dumps(sample_reference()))
    by_id = {p.program_id: p for p in programs}
    assert set(by_id) == {"ambassadors", "friends"}
    ambassadors, friends = by_id["ambassadors"], by_id["friends"]
    assert (ambassadors.kind, ambassadors.commission.type) == ("affiliate", "percent")
    assert ambassadors.commission.rate == Decimal("0.10")
    assert ambassadors.tier_rates == {"macro": Decimal("0.15"), "mega": Decimal("0.20")}
    assert ambassadors.category_rates == {"gift-cards": Decimal("0.02")}
    assert (ambassadors.attribution_window_days, ambassadors.lock_days) == (30, 30)
    assert (friends.kind, friends.commission.type) == ("referral", "fixed")
    assert friends.commission.amount == Decimal("5.00")
    assert (friends.attribution_window_days, friends.lock_days) == (7, 14)
    assert settings is not None
    assert settings.coupon_sites == ("retailmenot.com", "joinhoney.com", "slickdeals.net")
    assert settings.fast_conversion_seconds == 5

    assert [a.affiliate_id for a in affiliates] == [f"aff-{n:03d}" for n in range(1, 51)]
    first = affiliates[0]
    assert (first.customer_id, first.codes) == ("cust-aff-001", ("AFF001SAVE",))
    assert len([a for a in affiliates if not a.active]) == 1
    assert {a.tier for a in affiliates if a.program_id == "ambassadors"} == {
        "mega", "macro", "micro"
    }
    planted = {a.affiliate_id: a for a in affiliates[:3]}
    assert all(a.active and a.program_id == "ambassadors" for a in planted.values())


def test_sample_reference_is_deterministic_and_scales() -> None:
    assert sample_reference(seed=3) == sample_reference(seed=3)
    assert len(sample_reference(n_affiliates=500)["affiliates"]) == 500
    with pytest.raises(ValueError):
        sample_reference(n_affiliates=3)


# --- the stream ----------------------------------------------------------------------------------


def test_every_generated_event_decodes_as_a_valid_contract_event(day: Events) -> None:
    decoded = [decode_event(orjson.dumps(event)) for event in day]
    assert {type(e) for e in decoded} == {Click, Share, Order, Refund}
    assert all(event["ts"].endswith("Z") for event in day)


def test_events_come_in_non_decreasing_ts_order(day: Events) -> None:
    timestamps = [parsed_ts(e) for e in day]
    assert all(a <= b for a, b in itertools.pairwise(timestamps))


def test_the_same_seed_gives_the_same_events_and_another_seed_does_not() -> None:
    assert make(visitors=500, seed=3) == make(visitors=500, seed=3)
    assert make(visitors=500, seed=3) != make(visitors=500, seed=4)


def test_about_conversion_rate_of_the_visitors_place_an_order(day: Events) -> None:
    buyers = {e["visitor_id"] for e in of_type(day, "order") if e["visitor_id"].startswith("v-")}
    assert 0.02 <= len(buyers) / VISITORS <= 0.04


def test_clicks_shares_and_orders_fall_within_the_profile_and_refunds_within_two_days(
    day: Events,
) -> None:
    profile = TrafficProfile()
    end = profile.start + profile.duration
    assert all(
        profile.start <= parsed_ts(e) < end for e in distinct(day) if e["type"] != "refund"
    )
    orders = {e["order_id"]: e for e in of_type(day, "order")}
    for refund in of_type(day, "refund"):
        order = orders[refund["order_id"]]
        assert timedelta(0) < parsed_ts(refund) - parsed_ts(order) <= timedelta(days=2)
        assert Decimal(refund["amount"]) <= Decimal(order["total"])


def test_order_totals_are_the_sum_of_their_items_and_order_ids_are_unique(day: Events) -> None:
    orders = of_type(day, "order")
    assert len({o["order_id"] for o in orders}) == len(orders)
    for order in orders:
        assert Decimal(order["total"]) == sum(
            Decimal(item["price"]) * item["quantity"] for item in order["items"]
        )
    categories = {item["category"] for order in orders for item in order["items"]}
    assert "gift-cards" in categories


def test_traffic_has_the_mix_of_a_real_day(day: Events) -> None:
    clicks = of_type(day, "click")
    orders = of_type(day, "order")
    assert {c["channel"] for c in clicks} == {
        "facebook", "instagram", "tiktok", "youtube", "email", "blog", "twitter", "other"
    }
    hosts = {urlsplit(c["referrer"]).hostname for c in clicks if "referrer" in c}
    assert {"t.co", "www.youtube.com"} <= hosts
    assert any(host and host.endswith("instagram.com") for host in hosts)
    # Zipf: the most popular affiliate gets far more clicks than the median one.
    per_affiliate = Counter(c["affiliate_id"] for c in clicks).most_common()
    assert per_affiliate[0][1] > 5 * per_affiliate[len(per_affiliate) // 2][1]
    # Some orders carry the code of the affiliate the visitor clicked, some come without a click.
    clickers = {c["visitor_id"] for c in clicks}
    regular = [o for o in orders if o["visitor_id"].startswith("v-")]
    assert any("discount_code" in o and o["visitor_id"] in clickers for o in regular)
    assert any(o["visitor_id"] not in clickers for o in regular)
    assert of_type(day, "refund")


def test_clicks_through_a_share_follow_that_share_of_the_same_affiliate(day: Events) -> None:
    shares = {s["share_id"]: s for s in of_type(day, "share")}
    shared_clicks = [c for c in of_type(day, "click") if "share_id" in c]
    assert shared_clicks
    for click in shared_clicks:
        share = shares[click["share_id"]]
        assert share["affiliate_id"] == click["affiliate_id"]
        assert parsed_ts(share) <= parsed_ts(click)


def test_event_ids_repeat_only_as_exact_resent_duplicates(day: Events) -> None:
    first_seen: dict[str, dict[str, Any]] = {}
    repeats = 0
    for event in day:
        if event["event_id"] in first_seen:
            assert first_seen[event["event_id"]] == event
            repeats += 1
        else:
            first_seen[event["event_id"]] = event
    assert 0 < repeats <= 0.01 * len(day)
    assert count_by_type(make(visitors=300, duplicate_rate=0.0)) == count_by_type(
        distinct(make(visitors=300, duplicate_rate=0.0))
    )


# --- planted abuse -------------------------------------------------------------------------------


def test_a_leaked_code_is_redeemed_in_a_burst_from_a_coupon_site_without_a_click(
    day: Events,
) -> None:
    code = f"AFF{LEAKED_CODE_AFFILIATE[-3:]}SAVE"
    burst = [
        o for o in of_type(day, "order")
        if o.get("discount_code") == code
        and urlsplit(o.get("referrer", "")).hostname == "www.retailmenot.com"
    ]
    assert len(burst) == LEAK_ORDERS
    assert len({o["customer_id"] for o in burst}) == LEAK_ORDERS
    times = sorted(parsed_ts(o) for o in burst)
    assert times[-1] - times[0] <= timedelta(minutes=30)
    burst_visitors = {o["visitor_id"] for o in burst}
    assert not any(
        c["visitor_id"] in burst_visitors and c["affiliate_id"] == LEAKED_CODE_AFFILIATE
        for c in of_type(day, "click")
    )


def test_an_affiliate_orders_through_its_own_link_as_its_own_customer(day: Events) -> None:
    own = [o for o in of_type(day, "order") if o["customer_id"] == "cust-aff-003"]
    assert len(own) == 1
    clicks = [c for c in of_type(day, "click") if c["visitor_id"] == own[0]["visitor_id"]]
    assert [c["affiliate_id"] for c in clicks] == [SELF_REFERRING_AFFILIATE]
    assert parsed_ts(clicks[0]) < parsed_ts(own[0])


def instant_orders(events: Events) -> list[dict[str, Any]]:
    """Orders placed less than 5 s after the visitor's latest click."""
    latest_click: dict[str, datetime] = {}
    found = []
    for event in distinct(events):
        if event["type"] == "click":
            latest_click[event["visitor_id"]] = parsed_ts(event)
        elif event["type"] == "order" and event["visitor_id"] in latest_click:
            if parsed_ts(event) - latest_click[event["visitor_id"]] < timedelta(seconds=5):
                found.append(event)
    return found


def test_only_the_planted_orders_convert_within_seconds_of_their_click(day: Events) -> None:
    instant = instant_orders(day)
    assert len(instant) == INSTANT_CONVERSIONS
    assert all(o["visitor_id"].startswith("p-") for o in instant)


def test_planted_abuse_can_be_turned_off() -> None:
    quiet = make(
        visitors=0,
        share_rate=0,
        plant_code_leak=False,
        plant_self_referral=False,
        plant_instant_conversions=False,
    )
    assert quiet == []
    planted_only = make(visitors=0, share_rate=0, duplicate_rate=0)
    assert count_by_type(planted_only) == {
        "click": 1 + INSTANT_CONVERSIONS,
        "share": 0,
        "order": LEAK_ORDERS + 1 + INSTANT_CONVERSIONS,
        "refund": 0,
    }


def test_planting_needs_the_planted_affiliates_in_the_reference() -> None:
    reference = sample_reference()
    reference["affiliates"] = [
        a for a in reference["affiliates"] if a["affiliate_id"] != LEAKED_CODE_AFFILIATE
    ]
    with pytest.raises(ValueError, match="plant_code_leak"):
        generate(reference, TrafficProfile(visitors=10))
    events = list(generate(reference, TrafficProfile(visitors=10, plant_code_leak=False)))
    assert events


# --- streaming, files, profile -------------------------------------------------------------------


def test_generation_is_lazy_even_for_millions_of_visitors() -> None:
    began = time.perf_counter()
    stream = generate(sample_reference(), TrafficProfile(visitors=5_000_000))
    first = list(itertools.islice(stream, 1000))
    assert len(first) == 1000
    assert time.perf_counter() - began < 2.0


def test_write_jsonl_writes_one_event_a_line(tmp_path: Path) -> None:
    events = make(visitors=200)
    path = tmp_path / "traffic.jsonl"
    assert write_jsonl(iter(events), path) == len(events)
    assert [orjson.loads(line) for line in path.read_bytes().splitlines()] == events


def test_count_by_type_counts_every_contract_type() -> None:
    assert count_by_type([]) == {"click": 0, "share": 0, "order": 0, "refund": 0}
    assert count_by_type([{"type": "click"}, {"type": "click"}, {"type": "refund"}]) == {
        "click": 2, "share": 0, "order": 0, "refund": 1
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"visitors": -1},
        {"start": datetime(2026, 11, 2)},
        {"duration": timedelta(minutes=30)},
        {"conversion_rate": 1.5},
        {"share_rate": -1.0},
    ],
)
def test_profile_rejects_impossible_settings(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TrafficProfile(**bad)


def test_start_may_be_given_in_any_offset_and_output_is_utc() -> None:
    start = datetime(2026, 11, 2, 1, 0, tzinfo=timezone(timedelta(hours=1)))
    events = make(visitors=50, start=start)
    assert min(parsed_ts(e) for e in events) >= datetime(2026, 11, 2, tzinfo=UTC)
