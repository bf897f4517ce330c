"""The poison cases of issue 12, through the real broker, worker and ClickHouse: each once
stalled the worker, crash-looped it or moved money it should not have. Now each goes to
`dead-letters` (or is written exactly), and the worker stays up and keeps processing.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from schemas.validation import parse_reference_document
from streams.publish import publish_reference

pytestmark = pytest.mark.integration

#: A month ago, a whole hour: far enough back that every offset below is in the past.
T = (datetime.now(timezone.utc) - timedelta(days=45)).replace(minute=0, second=0, microsecond=0)
H, D = timedelta(hours=1), timedelta(days=1)
FAR_FUTURE = "2095-01-01T00:00:00Z"

REFERENCE = {
    "programs": [
        {"program_id": "aff", "kind": "affiliate", "lock_days": 30,
         "commission": {"type": "percent", "rate": "0.10"}},
        {"program_id": "flat", "kind": "referral", "lock_days": 30,
         "commission": {"type": "fixed", "amount": "5.00", "currency": "EUR"}},
    ],
    "affiliates": [
        {"affiliate_id": "sally", "program_id": "aff", "codes": ["SALLY20"]},
        {"affiliate_id": "rita", "program_id": "flat", "codes": ["RITA"]},
    ],
    "settings": {"reviewers": ["ann"]},
}


def ts(delta: timedelta) -> str:
    return (T + delta).isoformat().replace("+00:00", "Z")


def click(event_id: str, visitor: str, at: timedelta, **extra: Any) -> dict[str, Any]:
    return {"event_id": event_id, "type": "click", "ts": ts(at), "visitor_id": visitor,
            "session_id": f"s-{visitor}", "affiliate_id": "sally", **extra}


def order(order_id: str, visitor: str, at: timedelta, total: str, currency: str = "EUR",
          **extra: Any) -> dict[str, Any]:
    return {"event_id": f"e-{order_id}", "type": "order", "ts": ts(at), "order_id": order_id,
            "visitor_id": visitor, "customer_id": f"cust-{visitor}", "currency": currency,
            "total": total, **extra}


def refund(event_id: str, order_id: str, at: timedelta | str, amount: str, **extra: Any) -> dict:
    return {"event_id": event_id, "type": "refund", "order_id": order_id, "amount": amount,
            "ts": at if isinstance(at, str) else ts(at), **extra}


def dead_letters(config: Any, expected: int, timeout_ms: int = 30_000) -> list[Any]:
    consumer = KafkaConsumer(bootstrap_servers=config.kafka_bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=timeout_ms, max_partition_fetch_bytes=4 << 20)
    topic = config.topic("dead-letters")
    consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)])
    consumer.seek_to_beginning()
    messages = []
    for message in consumer:
        messages.append(message)
        if len(messages) >= expected:
            break
    consumer.close()
    return messages


def test_poison_goes_to_dead_letters_and_money_stays_exact(isolated: Any) -> None:
    config = isolated.config
    publish_reference(config, *parse_reference_document(orjson.dumps(REFERENCE)))
    producer = KafkaProducer(bootstrap_servers=config.kafka_bootstrap, acks="all",
                             max_request_size=2 << 20)

    def send(topic: str, value: bytes, key: bytes | None = None) -> None:
        producer.send(config.topic(topic), key=key, value=value)

    # An order pending approval: one future-dated event must not approve it.
    send("clicks", orjson.dumps(click("c-p", "v-p", 0 * H)), b"v-p")
    send("orders", orjson.dumps(order("o-pending", "v-p", 1 * H, "100.00")), b"v-p")
    # Future-dated: a refund of an order that does not exist, a click, an order.
    send("refunds", orjson.dumps(refund("r-future", "o-none", FAR_FUTURE, "1")), b"o-none")
    send("clicks", orjson.dumps(click("c-future", "v-p", 0 * H) | {"ts": FAR_FUTURE}), b"v-p")
    send("orders", orjson.dumps(order("o-future", "v-p", 0 * H, "10") | {"ts": FAR_FUTURE}), b"v-p")
    # A record just under the broker's limit but over the event limit: too_large, bounded.
    huge = orjson.dumps(click("c-huge", "v-h", 0 * H, landing_url="x" * 1_040_000))
    send("clicks", huge, b"v-h")
    # Malformed records on every internal topic.
    for topic in ("visitor-events", "ledger-events", "code-events"):
        send(topic, b"{broken", b"k")
        send(topic, b'[{"type": "decided_order", "order_id": "x"}, 7]', b"k")
    # 101 clicks over 101 months in one batch (the server refuses such an insert in one block).
    months = [click(f"c-m{i}", f"v-m{i}", -timedelta(days=31 * i)) for i in range(101)]
    send("clicks", orjson.dumps(months), b"v-m0")
    # 20 refunds of ~60 KB each for an order that arrives only at the end.
    for i in range(20):
        send("refunds", orjson.dumps(refund(f"r-big{i}", "o-big", 2 * H, "1.00",
                                            reason="r" * 60_000)), b"o-big")
    # Money: a refund in another currency; three refunds of 10 on a 30 order; a fixed
    # commission in EUR on an order in USD.
    send("clicks", orjson.dumps(click("c-m", "v-money", 0 * H)), b"v-money")
    send("orders", orjson.dumps(order("o-jpy", "v-money", 1 * H, "100.00")), b"v-money")
    send("refunds", orjson.dumps(refund("r-jpy", "o-jpy", 2 * H, "100", currency="JPY")), b"o-jpy")
    send("orders", orjson.dumps(order("o-30", "v-money", 2 * H, "30.00")), b"v-money")
    for i in range(3):
        send("refunds", orjson.dumps(refund(f"r-30-{i}", "o-30", 3 * H + i * H, "10")), b"o-30")
    send("orders", orjson.dumps(order("o-usd", "v-usd", 1 * H, "50.00", currency="USD",
                                      discount_code="RITA")), b"v-usd")
    send("clicks", orjson.dumps(click("c-big", "v-big", 0 * H)), b"v-big")
    send("orders", orjson.dumps(order("o-big", "v-big", 1 * H, "100.00")), b"v-big")
    # Personal data: an invalid click (dead letter) and a mis-keyed one (a hop through
    # visitor-events) keep ip and user_agent only as their keyed hash.
    pii = {"ip": "203.0.113.7", "user_agent": "Mozilla/5.0 (X11; Linux x86_64)"}
    send("clicks", orjson.dumps(click("c-pii-bad", "v-pii", 0 * H, **pii) | {"ts": "soon"}),
         b"v-pii")
    send("clicks", orjson.dumps(click("c-pii-hop", "v-pii", 0 * H, **pii)), b"not-v-pii")
    producer.flush()

    worker = isolated.worker(PII_KEY="a-test-key-of-at-least-16-chars").start()

    isolated.wait_for("SELECT count() FROM {db}.clicks FINAL", lambda n: n == 101 + 3 + 1)
    isolated.wait_for("SELECT count() FROM {db}.attributed_orders FINAL", lambda n: n == 5)
    isolated.wait_for(
        "SELECT sum(amount) FROM {db}.commission_facts FINAL WHERE order_id = 'o-big'",
        lambda net: net == Decimal("8.00"), 90)
    isolated.wait_for(
        "SELECT count() FROM {db}.commission_facts FINAL WHERE order_id = 'o-30'",
        lambda n: n == 4, 30)
    facts = dict(isolated.query(
        "SELECT order_id, toString(sum(amount)) FROM {db}.commission_facts FINAL GROUP BY order_id"))
    assert Decimal(facts["o-pending"]) == Decimal("10.00")
    assert Decimal(facts["o-jpy"]) == Decimal("10.00")  # the JPY refund reversed nothing
    assert Decimal(facts["o-30"]) == Decimal("0.00")  # cumulative: 3 x 10 reverses exactly 3.00
    assert Decimal(facts["o-usd"]) == Decimal("0.00")
    assert Decimal(facts["o-big"]) == Decimal("8.00")  # 20 refunds of 1.00 reverse 2.00 of 10.00
    statuses = dict(isolated.query(
        "SELECT order_id, status FROM {db}.attributed_orders FINAL"))
    flags = dict(isolated.query("SELECT order_id, flags FROM {db}.attributed_orders FINAL"))
    assert statuses["o-usd"] == "held" and "currency_mismatch" in flags["o-usd"]
    # Nothing was approved: the pipeline's event time is bounded by the clock.
    assert isolated.query(
        "SELECT count() FROM {db}.commission_facts FINAL WHERE kind = 'approval'") == [(0,)]

    # 3 future + 1 huge + 3 x 3 internal (the broken record, the non-object item, and the
    # decided_order without its fields: malformed on ledger- and code-events, an event of an
    # unknown type on visitor-events) + 1 JPY refund + 1 bad timestamp.
    expected = 3 + 1 + 9 + 1 + 1
    dead = dead_letters(config, expected)
    reasons = sorted(dict(m.headers)["reason"].decode() for m in dead)
    assert reasons.count("ts_in_future") == 3
    assert reasons.count("too_large") == 1
    assert reasons.count("malformed_internal") == 8
    assert reasons.count("unknown_type") == 1
    assert reasons.count("currency_mismatch") == 1
    assert len(dead) == expected
    [big] = [m for m in dead if dict(m.headers)["reason"] == b"too_large"]
    headers = dict(big.headers)
    assert len(big.value) <= 64 * 1024 and big.value == huge[: len(big.value)]
    assert int(headers["original_length"]) == len(huge)
    assert headers["original_sha256"].decode() == hashlib.sha256(huge).hexdigest()
    [bad] = [m for m in dead if dict(m.headers)["reason"] == b"bad_timestamp"]
    hops = _read_topic(config, config.topic("visitor-events"))
    for raw in [bad.value, *hops]:
        assert b"203.0.113.7" not in raw and b"Mozilla" not in raw, raw
    assert orjson.loads(bad.value)["ip"].startswith("h1:")
    assert any(b"c-pii-hop" in raw for raw in hops)
    assert worker.alive()


def _read_topic(config: Any, topic: str) -> list[bytes]:
    consumer = KafkaConsumer(bootstrap_servers=config.kafka_bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=3_000)
    consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)])
    consumer.seek_to_beginning()
    values = [m.value for m in consumer]
    consumer.close()
    return values
