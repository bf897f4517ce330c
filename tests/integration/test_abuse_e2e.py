"""Every abuse signal of contract §6 (and the project's own) end to end: planted abuse goes through
the real broker and worker, and ClickHouse, the `abuse-flags` topic, reviewer decisions and the
per-code leak report hold exactly what the rules say."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition

from schemas.events import Review
from schemas.validation import parse_reference_document
from sinks.clickhouse import connect
from sinks.code_report import code_evidence
from streams.publish import produce_lines, publish_reference, publish_review

pytestmark = pytest.mark.integration

T = datetime(2026, 6, 1, 10, 0, tzinfo=timezone.utc)  # a whole hour: the burst fills one hour
M, H, D = timedelta(minutes=1), timedelta(hours=1), timedelta(days=1)

REFERENCE = {
    "programs": [
        {"program_id": "aff", "kind": "affiliate", "attribution_window_days": 30, "lock_days": 30,
         "commission": {"type": "percent", "rate": "0.10"},
         "velocity": {"max_customers": 3, "window_minutes": 60}},
    ],
    "affiliates": [
        {"affiliate_id": "sally", "program_id": "aff", "customer_id": "cust-sally",
         "codes": ["SALLY"], "status": "active"},
        {"affiliate_id": "bob", "program_id": "aff", "codes": ["BOB10"], "status": "active"},
        {"affiliate_id": "vera", "program_id": "aff", "codes": ["VIRAL"], "status": "active"},
        {"affiliate_id": "fred", "program_id": "aff", "status": "active"},
        {"affiliate_id": "paula", "program_id": "aff", "status": "active"},
        {"affiliate_id": "cleo", "program_id": "aff", "status": "active"},
    ],
    "settings": {"coupon_sites": ["retailmenot.com"], "fast_conversion_seconds": 5,
                 "reviewers": ["ann"]},
}


def ts(delta: timedelta = timedelta()) -> str:
    return (T + delta).isoformat().replace("+00:00", "Z")


def click(event_id: str, visitor: str, affiliate: str, at: timedelta, **extra: str) -> dict:
    return {"event_id": event_id, "type": "click", "ts": ts(at), "visitor_id": visitor,
            "session_id": f"s-{visitor}", "affiliate_id": affiliate, "channel": "blog", **extra}


def order(order_id: str, visitor: str, at: timedelta, **extra: object) -> dict:
    return {"event_id": f"e-{order_id}", "type": "order", "ts": ts(at), "order_id": order_id,
            "visitor_id": visitor, "customer_id": f"cust-{visitor}", "currency": "EUR",
            "total": "100.00", **extra}


CLICKS = [
    click("c-self", "v-self", "sally", 0 * H),
    click("c-look", "v-look", "sally", 0 * H),
    click("c-fast", "v-fast", "fred", 0 * H),
    click("c-paid", "v-paid", "paula", 0 * H, landing_url="https://shop.example.com/?gclid=abc"),
    click("c-clean", "v-clean", "cleo", 0 * H),
]

# 8 distinct customers use VIRAL within 28 minutes (no clicks), then a 9th two hours later.
BURST = [f"o-burst-{i}" for i in range(1, 9)]
ORDERS = sorted(
    [
        {**order("o-self", "v-self", 1 * H), "customer_id": "cust-sally"},
        {**order("o-look", "v-look", 1 * H), "customer_id": "Cust.Sally"},
        order("o-coupon", "v-coupon", 1 * H, discount_code="bob10",
              referrer="https://www.retailmenot.com/view/shop.example.com"),
        order("o-fast", "v-fast", timedelta(seconds=2)),
        order("o-paid", "v-paid", 1 * H),
        order("o-clean", "v-clean", 1 * H),
        *(order(o, f"v-burst-{i}", i * 4 * M - 4 * M, discount_code="VIRAL")
          for i, o in enumerate(BURST, start=1)),
        order("o-burst-late", "v-burst-late", 2 * H + 27 * M, discount_code="VIRAL"),
    ],
    key=lambda o: o["ts"],
)
TIME_MOVER = order("o-tick", "v-tick", 40 * D)  # unattributed; passes every lock end

# order_id: (affiliate, method, click_event_id, commission, status, flags)
EXPECTED_ORDERS = {
    "o-self": ("sally", "last_click", "c-self", "0.00", "rejected", ["self_referral"]),
    "o-look": ("sally", "last_click", "c-look", "10.00", "held", ["customer_lookalike"]),
    "o-coupon": ("bob", "code", "", "10.00", "held", ["coupon_site_referrer"]),
    "o-fast": ("fred", "last_click", "c-fast", "10.00", "held", ["fast_conversion"]),
    "o-paid": ("paula", "last_click", "c-paid", "10.00", "held", ["paid_search_click"]),
    "o-clean": ("cleo", "last_click", "c-clean", "10.00", "pending", []),
    **{o: ("vera", "code", "", "10.00", "pending", []) for o in BURST[:3]},
    **{o: ("vera", "code", "", "10.00", "held", ["code_velocity"]) for o in BURST[3:]},
    "o-burst-late": ("vera", "code", "", "10.00", "pending", []),
    "o-tick": ("", "none", "", "0.00", "unattributed", []),
}

# order_id, reason, severity, detail
EXPECTED_FLAGS = {
    ("o-self", "self_referral", "reject",
     "customer cust-sally is affiliate sally's own customer account"),
    ("o-look", "customer_lookalike", "hold",
     "customer Cust.Sally looks like affiliate sally's own account cust-sally"),
    ("o-coupon", "coupon_site_referrer", "hold",
     "code BOB10: order referrer www.retailmenot.com is coupon site retailmenot.com"),
    ("o-fast", "fast_conversion", "hold", "order 2 s after click c-fast, minimum 5 s"),
    ("o-paid", "paid_search_click", "hold", "click c-paid landed with paid-search id gclid"),
    *((o, "code_velocity", "hold", f"{n} distinct customers in 60 min, limit 3")
      for n, o in enumerate(BURST[3:], start=4)),
}

REVIEW_TS = T + 1 * D
REVIEWS = [
    Review("rv-release", REVIEW_TS, "o-look", "release", "ann", "same name, different person"),
    Review("rv-reject", REVIEW_TS, "o-paid", "reject", "ann", "bids on our brand"),
    Review("rv-pending", REVIEW_TS, "o-clean", "reject", "ann", "not held: nothing to decide"),
    # Contract v2 §6: only a name on settings.reviewers decides; this one changes nothing.
    Review("rv-mallory", REVIEW_TS, "o-fast", "release", "mallory", "let me have it"),
]
# review_id: (order_id, decision, reviewer, outcome)
EXPECTED_REVIEWS = {
    "rv-release": ("o-look", "release", "ann", "released"),
    "rv-reject": ("o-paid", "reject", "ann", "rejected"),
    "rv-pending": ("o-clean", "reject", "ann", "ignored: order is pending, not held"),
    "rv-mallory": ("o-fast", "release", "mallory",
                   "unauthorized: reviewer 'mallory' is not in settings.reviewers"),
}

# fact_id: (kind, amount, status)
EXPECTED_FACTS = {
    "o-self:accrual": ("accrual", "0.00", "rejected"),
    "o-look:accrual": ("accrual", "10.00", "held"),
    "o-look:approval": ("approval", "0.00", "approved"),  # released, then its lock end passed
    "o-coupon:accrual": ("accrual", "10.00", "held"),
    "o-fast:accrual": ("accrual", "10.00", "held"),
    "o-paid:accrual": ("accrual", "10.00", "held"),
    "o-paid:review:rv-reject": ("reversal", "-10.00", "rejected"),
    "o-clean:accrual": ("accrual", "10.00", "pending"),
    "o-clean:approval": ("approval", "0.00", "approved"),
    **{f"{o}:accrual": ("accrual", "10.00", "pending") for o in BURST[:3]},
    **{f"{o}:approval": ("approval", "0.00", "approved") for o in BURST[:3]},
    **{f"{o}:accrual": ("accrual", "10.00", "held") for o in BURST[3:]},
    "o-burst-late:accrual": ("accrual", "10.00", "pending"),
    "o-burst-late:approval": ("approval", "0.00", "approved"),
}


def lines(events: list[dict]) -> list[bytes]:
    return [orjson.dumps(e) for e in events]


def orders_in_clickhouse(isolated) -> dict:
    rows = isolated.query(
        "SELECT order_id, affiliate_id, method, click_event_id, toString(commission), status,"
        " flags FROM {db}.attributed_orders FINAL"
    )
    return {r[0]: (r[1], r[2], r[3], r[4], r[5], list(r[6])) for r in rows}


def facts_in_clickhouse(isolated) -> dict:
    rows = isolated.query(
        "SELECT fact_id, kind, toString(amount), status FROM {db}.commission_facts FINAL"
    )
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def flags_in_clickhouse(isolated) -> set:
    return set(isolated.query(
        "SELECT order_id, reason, severity, detail FROM {db}.abuse_flags FINAL"
    ))


def read_topic(config, topic: str) -> list[dict]:
    """Every message of `topic`, from the beginning up to the end offsets read at the start."""
    consumer = KafkaConsumer(
        bootstrap_servers=config.kafka_bootstrap.split(","), group_id=None,
        enable_auto_commit=False, auto_offset_reset="earliest", consumer_timeout_ms=1000,
    )
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        messages: list[dict] = []
        deadline = time.monotonic() + 20
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            assert time.monotonic() < deadline, f"could not read {topic} up to {end}"
            for records in consumer.poll(timeout_ms=500).values():
                messages.extend(orjson.loads(r.value) for r in records)
        return messages
    finally:
        consumer.close()


def flags_on_topic(isolated, expected: set, timeout: float = 20.0) -> set:
    """(order_id, reason, severity, detail) on `abuse-flags`; waits for them to be flushed."""
    deadline = time.monotonic() + timeout
    while True:
        messages = read_topic(isolated.config, isolated.config.topic("abuse-flags"))
        found = {(m["order_id"], m["reason"], m["severity"], m["detail"]) for m in messages}
        if found >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_planted_abuse_is_flagged_held_rejected_reviewed_and_reported(isolated):
    config = isolated.config
    publish_reference(config, *parse_reference_document(orjson.dumps(REFERENCE)))
    produce_lines(config, lines(CLICKS))
    produce_lines(config, lines(ORDERS))  # in ts order: the burst builds up as it happened
    isolated.worker().start()

    # Phase 1: every order decided; nothing can be approved yet (event time < every lock end).
    isolated.wait_for("SELECT count() FROM {db}.attributed_orders FINAL",
                      lambda n: n == len(ORDERS), 60)
    isolated.wait_for("SELECT count() FROM {db}.commission_facts FINAL",
                      lambda n: n >= len(ORDERS), 30)
    before = orders_in_clickhouse(isolated)
    assert before == {o: e for o, e in EXPECTED_ORDERS.items() if o != "o-tick"}
    assert not [f for f, (kind, *_) in facts_in_clickhouse(isolated).items() if kind == "approval"]

    # Phase 2: reviewer decisions, applied before the event time moves.
    for review in REVIEWS:
        publish_review(config, review)
    isolated.wait_for("SELECT count() FROM {db}.reviews FINAL", lambda n: n == len(REVIEWS), 30)
    reviews = isolated.query(
        "SELECT review_id, order_id, decision, reviewer, outcome FROM {db}.reviews FINAL"
    )
    assert {r[0]: tuple(r[1:]) for r in reviews} == EXPECTED_REVIEWS

    # Phase 3: an unrelated order 40 days later moves the ledger's event time past every lock end.
    produce_lines(config, lines([TIME_MOVER]))
    isolated.wait_for("SELECT count() FROM {db}.attributed_orders FINAL",
                      lambda n: n == len(EXPECTED_ORDERS), 30)
    isolated.wait_for("SELECT count() FROM {db}.commission_facts FINAL WHERE kind = 'approval'",
                      lambda n: n >= 6, 30)

    assert orders_in_clickhouse(isolated) == EXPECTED_ORDERS
    facts = facts_in_clickhouse(isolated)
    assert facts == EXPECTED_FACTS
    for held_or_rejected in ("o-self", "o-coupon", "o-fast", "o-paid", *BURST[3:]):
        assert f"{held_or_rejected}:approval" not in facts
    nets = dict(isolated.query(
        "SELECT order_id, sum(amount) FROM {db}.commission_facts FINAL GROUP BY order_id"
    ))
    assert Decimal(nets["o-paid"]) == 0 and Decimal(nets["o-self"]) == 0
    assert Decimal(nets["o-look"]) == Decimal("10.00")

    # abuse_flags: exactly the planted abuse, with the rules' details.
    assert flags_in_clickhouse(isolated) == EXPECTED_FLAGS
    assert isolated.query(
        "SELECT discount_code, affiliate_id FROM {db}.abuse_flags FINAL WHERE order_id = 'o-coupon'"
    ) == [("BOB10", "bob")]

    # The abuse-flags topic carries every flag (at least once).
    assert flags_on_topic(isolated, EXPECTED_FLAGS) == EXPECTED_FLAGS

    # Leak view: per code and hour, then the per-code evidence, worst first.
    hourly = isolated.query(
        "SELECT discount_code, toString(hour), redemptions, distinct_customers,"
        " attributed_by_code, without_owner_click, from_coupon_sites, velocity_flagged"
        " FROM {db}.code_usage_hourly ORDER BY discount_code, hour"
    )
    assert hourly == [
        ("BOB10", "2026-06-01 11:00:00", 1, 1, 1, 1, 1, 0),
        ("VIRAL", "2026-06-01 10:00:00", 8, 8, 8, 8, 0, 5),
        ("VIRAL", "2026-06-01 12:00:00", 1, 1, 1, 1, 0, 0),
    ]
    assert isolated.query(
        "SELECT coupon_site FROM {db}.attributed_orders FINAL WHERE order_id = 'o-coupon'"
    ) == [("retailmenot.com",)]
    client = connect(config.clickhouse)
    try:
        evidence = code_evidence(client, config.clickhouse.database, T.date(), T.date())
    finally:
        client.disconnect()
    assert [e.discount_code for e in evidence] == ["VIRAL", "BOB10"]
    viral, bob = evidence
    assert (viral.affiliate_id, viral.redemptions, viral.distinct_customers,
            viral.peak_customers_per_hour, viral.velocity_flagged, viral.from_coupon_sites,
            viral.without_owner_click) == ("vera", 9, 9, 8, 5, 0, 9)
    assert viral.leak_score == Decimal("5.9")
    assert (bob.affiliate_id, bob.redemptions, bob.from_coupon_sites, bob.coupon_sites,
            bob.velocity_flagged) == ("bob", 1, 1, ("retailmenot.com",), 0)
    assert bob.leak_score == Decimal("1.1")
