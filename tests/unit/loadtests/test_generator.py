"""The traffic generator makes valid, ordered, reproducible traffic with the planted abuse in it."""

from __future__ import annotations

import orjson

from loadtests.generator import LEAKED_AFFILIATE, TrafficProfile, generate, sample_reference
from schemas.validation import decode_event, parse_reference_document


def events(visitors: int = 2000, seed: int = 1) -> list[dict]:
    return list(generate(sample_reference(n_affiliates=20), TrafficProfile(visitors=visitors, seed=seed)))


def test_sample_reference_is_valid_reference_data():
    programs, affiliates, settings = parse_reference_document(orjson.dumps(sample_reference()))
    assert len(programs) == 2 and len(affiliates) == 50 and settings is not None


def test_every_generated_event_is_valid_and_time_ordered():
    decoded = [decode_event(orjson.dumps(e)) for e in events()]
    timestamps = [e.ts for e in decoded]
    assert timestamps == sorted(timestamps)


def test_same_seed_gives_the_same_traffic_and_another_seed_does_not():
    assert events(seed=3) == events(seed=3)
    assert events(seed=3) != events(seed=4)


def test_about_three_percent_of_visitors_convert():
    generated = events(visitors=5000)
    organic = {e["visitor_id"] for e in generated if e["type"] == "order"
               and not e["visitor_id"].startswith(("v-leak", "v-self", "v-fast"))}
    assert 0.02 <= len(organic) / 5000 <= 0.045


def test_the_leaked_code_is_redeemed_in_a_burst_from_a_coupon_site():
    code = next(a for a in sample_reference()["affiliates"]
                if a["affiliate_id"] == LEAKED_AFFILIATE)["codes"][0]
    burst = [e for e in events() if e["type"] == "order" and e.get("discount_code") == code
             and "retailmenot" in e.get("referrer", "")]
    assert len(burst) == 40
    assert len({e["customer_id"] for e in burst}) == 40


def test_event_ids_repeat_only_as_exact_duplicates():
    seen: dict[str, dict] = {}
    for event in events():
        if event["event_id"] in seen:
            assert seen[event["event_id"]] == event
        seen[event["event_id"]] = event
