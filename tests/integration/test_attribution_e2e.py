"""Every rule of contract §4-5 in one scenario, through the real broker, worker and ClickHouse."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import orjson
import pytest

from streams.publish import produce_lines, publish_reference
from schemas.validation import parse_reference_document

pytestmark = pytest.mark.integration

T = datetime(2026, 6, 1, 10, 0, tzinfo=timezone.utc)

REFERENCE = {
    "programs": [
        {"program_id": "aff", "kind": "affiliate", "attribution_window_days": 30, "lock_days": 30,
         "commission": {"type": "percent", "rate": "0.10"}, "tier_rates": {"macro": "0.20"},
         "category_rates": {"gift-cards": "0.02"}},
        {"program_id": "ref", "kind": "referral", "attribution_window_days": 7, "lock_days": 14,
         "commission": {"type": "fixed", "amount": "5.00", "currency": "EUR"}},
    ],
    "affiliates": [
        {"affiliate_id": "sally", "program_id": "aff", "tier": "macro", "customer_id": "cust-sally",
         "codes": ["SALLY20"], "status": "active"},
        {"affiliate_id": "bob", "program_id": "aff", "codes": ["BOB10"], "status": "active"},
        {"affiliate_id": "rita", "program_id": "ref", "codes": ["RITA"], "status": "active"},
        {"affiliate_id": "ina", "program_id": "aff", "codes": ["INA"], "status": "paused"},
    ],
    "settings": {"coupon_sites": ["retailmenot.com"], "fast_conversion_seconds": 5},
}


def ts(delta: timedelta = timedelta()) -> str:
    return (T + delta).isoformat().replace("+00:00", "Z")


def click(event_id: str, visitor: str, affiliate: str, at: timedelta, **extra: str) -> dict:
    return {"event_id": event_id, "type": "click", "ts": ts(at), "visitor_id": visitor,
            "session_id": f"s-{visitor}", "affiliate_id": affiliate, "channel": "blog", **extra}


def order(order_id: str, visitor: str, at: timedelta, total: str, **extra: object) -> dict:
    return {"event_id": f"e-{order_id}", "type": "order", "ts": ts(at), "order_id": order_id,
            "visitor_id": visitor, "customer_id": f"cust-{visitor}", "currency": "EUR",
            "total": total, **extra}


def refund(event_id: str, order_id: str, at: timedelta, amount: str) -> dict:
    return {"event_id": event_id, "type": "refund", "ts": ts(at), "order_id": order_id,
            "amount": amount}


H, D = timedelta(hours=1), timedelta(days=1)

CLICKS = [
    click("c1", "v1", "bob", 0 * H),
    click("c2-a", "v2", "sally", 0 * H),
    click("c2-b", "v2", "bob", 0 * H),  # same ts: the greater event_id wins
    click("c3-a", "v3", "sally", 0 * H),
    click("c3-b", "v3", "bob", timedelta(minutes=10)),
    click("c5", "v5", "rita", -8 * D),  # outside rita's 7-day window
    click("c6", "v6", "bob", -1 * D),
    click("c7", "v7", "sally", 0 * H),
    click("c8", "v8", "rita", 0 * H),
    click("c9", "v9", "bob", 0 * H),
    click("c10", "v10", "sally", 0 * H),
    click("c11", "v11", "bob", 0 * H),
    click("c12", "v12", "sally", 0 * H, referrer="https://www.retailmenot.com/view/shop"),
]
EARLY_REFUNDS = [refund("r9", "o-late", 2 * D, "10.00")]  # published before its order
ORDERS = [
    order("o-last", "v1", 1 * H, "100.00"),
    order("o-tie", "v2", 2 * H, "80.00"),
    order("o-cc", "v3", 1 * H, "50.00", discount_code=" sally20 "),
    order("o-code", "v4", 3 * H, "33.35", discount_code="BOB10"),
    order("o-window", "v5", 0 * H, "70.00"),
    order("o-inactive", "v6", 4 * H, "20.00", discount_code="INA"),
    order("o-cat", "v7", 5 * H, "90.00", items=[
        {"sku": "gc", "category": "gift-cards", "quantity": 2, "price": "25.00"},
        {"sku": "sh", "category": "shoes", "quantity": 1, "price": "50.00"}]),
    order("o-fixed", "v8", 3 * D, "60.00"),
    order("o-late", "v9", 1 * D, "50.00"),
    {**order("o-self", "v10", 1 * H, "40.00"), "customer_id": "cust-sally"},
    order("o-fast", "v11", timedelta(seconds=2), "10.00"),
    order("o-coupon", "v12", 1 * H, "40.00", discount_code="SALLY20"),
    {**order("o-last", "v1", 2 * H, "999.00"), "event_id": "e-o-last-dup"},  # first one wins
]
LATE_EVENTS = [
    refund("r1", "o-last", 1 * D, "40.00"),
    refund("r1", "o-last", 1 * D, "40.00"),  # repeated event_id: once
    refund("r4", "o-code", 3 * H + 31 * D, "33.35"),  # after the lock end: clawback
    refund("r8a", "o-fixed", 4 * D, "60.00"),
    refund("r8b", "o-fixed", 5 * D, "60.00"),  # nothing left to reverse
    order("o-tick", "v99", 60 * D, "1.00"),  # moves event time past every lock end
]

# order_id: (affiliate, method, click_event_id, channel, commission, status, flags)
EXPECTED_ORDERS = {
    "o-last": ("bob", "last_click", "c1", "blog", "10.00", "pending", []),
    "o-tie": ("bob", "last_click", "c2-b", "blog", "8.00", "pending", []),
    "o-cc": ("sally", "code+click", "c3-a", "blog", "10.00", "pending", []),
    "o-code": ("bob", "code", "", "", "3.34", "pending", []),
    "o-window": ("", "none", "", "", "0.00", "unattributed", []),
    "o-inactive": ("bob", "last_click", "c6", "blog", "2.00", "pending", []),
    "o-cat": ("sally", "last_click", "c7", "blog", "9.90", "pending", []),
    "o-fixed": ("rita", "last_click", "c8", "blog", "5.00", "pending", []),
    "o-late": ("bob", "last_click", "c9", "blog", "5.00", "pending", []),
    "o-self": ("sally", "last_click", "c10", "blog", "0.00", "rejected", ["self_referral"]),
    "o-fast": ("bob", "last_click", "c11", "blog", "1.00", "held", ["fast_conversion"]),
    "o-coupon": ("sally", "code+click", "c12", "blog", "8.00", "held", ["coupon_site_referrer"]),
    "o-tick": ("", "none", "", "", "0.00", "unattributed", []),
}

# fact_id: (kind, amount, status)
EXPECTED_FACTS = {
    "o-last:accrual": ("accrual", "10.00", "pending"),
    "o-last:reversal:r1": ("reversal", "-4.00", "reversed"),
    "o-last:approval": ("approval", "0.00", "approved"),
    "o-tie:accrual": ("accrual", "8.00", "pending"),
    "o-tie:approval": ("approval", "0.00", "approved"),
    "o-cc:accrual": ("accrual", "10.00", "pending"),
    "o-cc:approval": ("approval", "0.00", "approved"),
    "o-code:accrual": ("accrual", "3.34", "pending"),
    "o-code:approval": ("approval", "0.00", "approved"),
    "o-code:reversal:r4": ("reversal", "-3.34", "clawback"),
    "o-inactive:accrual": ("accrual", "2.00", "pending"),
    "o-inactive:approval": ("approval", "0.00", "approved"),
    "o-cat:accrual": ("accrual", "9.90", "pending"),
    "o-cat:approval": ("approval", "0.00", "approved"),
    "o-fixed:accrual": ("accrual", "5.00", "pending"),
    "o-fixed:reversal:r8a": ("reversal", "-5.00", "reversed"),
    "o-fixed:approval": ("approval", "0.00", "approved"),
    "o-late:accrual": ("accrual", "5.00", "pending"),
    "o-late:reversal:r9": ("reversal", "-1.00", "reversed"),
    "o-late:approval": ("approval", "0.00", "approved"),
    "o-self:accrual": ("accrual", "0.00", "rejected"),
    "o-fast:accrual": ("accrual", "1.00", "held"),
    "o-coupon:accrual": ("accrual", "8.00", "held"),
}


def lines(events: list[dict]) -> list[bytes]:
    return [orjson.dumps(e) for e in events]


def publish_scenario(config) -> None:
    publish_reference(config, *parse_reference_document(orjson.dumps(REFERENCE)))
    for group in (CLICKS, EARLY_REFUNDS, ORDERS, LATE_EVENTS):
        produce_lines(config, lines(group))


def orders_in_clickhouse(isolated) -> dict:
    rows = isolated.query(
        "SELECT order_id, affiliate_id, method, click_event_id, channel, toString(commission),"
        " status, flags FROM {db}.attributed_orders FINAL"
    )
    return {r[0]: (r[1], r[2], r[3], r[4], r[5], r[6], list(r[7])) for r in rows}


def facts_in_clickhouse(isolated) -> dict:
    rows = isolated.query(
        "SELECT fact_id, kind, toString(amount), status FROM {db}.commission_facts FINAL"
    )
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def wait_until_complete(isolated, timeout: float = 120.0) -> None:
    isolated.wait_for("SELECT count() FROM {db}.attributed_orders FINAL",
                      lambda n: n == len(EXPECTED_ORDERS), timeout)
    isolated.wait_for("SELECT count() FROM {db}.commission_facts FINAL",
                      lambda n: n >= len(EXPECTED_FACTS), timeout)


def test_every_attribution_and_ledger_rule_lands_in_clickhouse_as_the_rules_say(isolated):
    publish_scenario(isolated.config)
    isolated.worker().start()
    wait_until_complete(isolated)

    assert orders_in_clickhouse(isolated) == EXPECTED_ORDERS
    assert facts_in_clickhouse(isolated) == EXPECTED_FACTS
    flags = isolated.query("SELECT order_id, reason, severity, detail FROM {db}.abuse_flags FINAL")
    assert sorted((o, r, s) for o, r, s, _ in flags) == [
        ("o-coupon", "coupon_site_referrer", "hold"),
        ("o-fast", "fast_conversion", "hold"),
        ("o-self", "self_referral", "reject"),
    ]
    assert all(detail for *_, detail in flags)
    # net commission per order never below zero, and the view adds up to the ledger
    nets = isolated.query(
        "SELECT order_id, sum(amount) FROM {db}.commission_facts FINAL GROUP BY order_id"
    )
    assert all(Decimal(net) >= 0 for _, net in nets)
    view_total = isolated.query("SELECT sum(net_commission) FROM {db}.affiliate_channel_daily")[0][0]
    assert Decimal(view_total) == sum(Decimal(a) for _, a, _ in EXPECTED_FACTS.values())


def test_once_the_work_is_done_the_group_has_committed_every_partition_to_its_end(isolated):
    """Consumer lag reaches 0: a partition whose last waiting record was decided later, an
    idle worker's last batches, and ledger items applied in the batch that forwarded them (their
    echoes) are all committed (the lag alert would fire forever otherwise)."""
    import time

    from kafka import KafkaConsumer, TopicPartition

    publish_scenario(isolated.config)
    isolated.worker().start()
    wait_until_complete(isolated)

    config = isolated.config
    topics = [config.topic(t) for t in ("clicks", "orders", "refunds", "shares", "reviews",
                                         "visitor-events", "code-events", "ledger-events")]
    consumer = KafkaConsumer(bootstrap_servers=config.kafka_bootstrap, group_id=config.app_id,
                             enable_auto_commit=False)
    try:
        partitions = [TopicPartition(t, p) for t in topics for p in range(config.partitions)]
        deadline = time.monotonic() + 30
        while True:
            ends = consumer.end_offsets(partitions)
            behind = {f"{tp.topic}/{tp.partition}": (consumer.committed(tp) or 0, end)
                      for tp, end in ends.items() if (consumer.committed(tp) or 0) < end}
            if not behind or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        consumer.close()
    assert behind == {}, f"committed < end offset after 30 s: {behind}"
