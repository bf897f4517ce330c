"""Raw events through the real broker and worker into ClickHouse, rejects into dead-letters."""

from __future__ import annotations

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

pytestmark = pytest.mark.integration


def click(n: int, **extra: object) -> dict[str, object]:
    return {"event_id": f"c{n}", "type": "click", "ts": "2026-11-02T10:00:00+01:00",
            "visitor_id": f"v{n % 7}", "session_id": f"s{n}", "affiliate_id": f"aff{n % 3}",
            "channel": "Instagram" if n % 2 else "myspace", "referrer": "https://t.co/x", **extra}


def share(n: int) -> dict[str, object]:
    return {"event_id": f"sh{n}", "type": "share", "ts": "2026-11-02T09:00:00Z",
            "affiliate_id": "aff1", "share_id": f"share-{n}", "channel": "tiktok"}


INVALID: list[tuple[str, bytes, str]] = [
    ("clicks", b"{not json", "not_json"),
    ("clicks", orjson.dumps({"event_id": "x1", "type": "click", "ts": "2026-11-02T10:00:00Z",
                             "session_id": "s", "affiliate_id": "a"}), "missing_field"),
    ("clicks", orjson.dumps(click(900, ts="yesterday")), "bad_timestamp"),
    ("orders", orjson.dumps({"event_id": "o1", "type": "order", "ts": "2026-11-02T10:00:00Z",
                             "order_id": "o1", "visitor_id": "v", "customer_id": "c",
                             "currency": "EUR", "total": "-1.00"}), "out_of_range"),
    ("shares", orjson.dumps(click(901)), "type_mismatch"),
    ("refunds", orjson.dumps({"event_id": "r1", "type": "refund", "ts": "2026-11-02T10:00:00Z",
                              "order_id": "o1", "amount": True}), "wrong_type"),
]
#: A batched record (contract §2 v2) whose two elements are not objects: one dead letter each,
#: holding the element's own bytes and its index in the header `element`.
ARRAY_OF_NON_OBJECTS = b"[1, 2]"


def test_valid_clicks_and_shares_land_once_and_invalid_events_go_to_dead_letters(isolated):
    config = isolated.config
    producer = KafkaProducer(bootstrap_servers=config.kafka_bootstrap, acks="all")
    clicks = [click(n) for n in range(40)]
    shares = [share(n) for n in range(10)]
    for event in clicks + clicks[:5]:  # five repeated event_ids: processed once
        producer.send(config.topic("clicks"), key=str(event["visitor_id"]).encode(),
                      value=orjson.dumps(event))
    for event in shares:
        producer.send(config.topic("shares"), key=b"aff1", value=orjson.dumps(event))
    for topic, raw, _ in INVALID:
        producer.send(config.topic(topic), key=b"k", value=raw)
    producer.send(config.topic("clicks"), key=b"k", value=ARRAY_OF_NON_OBJECTS)
    producer.flush()

    isolated.worker().start()

    isolated.wait_for("SELECT count() FROM {db}.clicks FINAL", lambda n: n == 40)
    isolated.wait_for("SELECT count() FROM {db}.shares FINAL", lambda n: n == 10)
    assert isolated.query("SELECT count(), uniqExact(event_id) FROM {db}.clicks") == [(40, 40)]
    rows = isolated.query(
        "SELECT channel, toString(ts), referrer_host FROM {db}.clicks FINAL WHERE event_id = 'c1'"
    )
    assert rows == [("instagram", "2026-11-02 09:00:00", "t.co")]
    assert isolated.query("SELECT channel FROM {db}.clicks FINAL WHERE event_id = 'c2'") == [("other",)]

    dead = read_all(config.kafka_bootstrap, config.topic("dead-letters"), len(INVALID) + 2)
    reasons = sorted(dict(m.headers)["reason"].decode() for m in dead)
    assert reasons == sorted([reason for _, _, reason in INVALID] + ["not_object"] * 2)
    elements = {m.value: dict(m.headers) for m in dead if "element" in dict(m.headers)}
    assert {value: h["element"] for value, h in elements.items()} == {b"1": b"0", b"2": b"1"}
    assert all(h["reason"] == b"not_object" for h in elements.values())
    by_value = {m.value: m for m in dead}
    for topic, raw, reason in INVALID:
        message = by_value[raw]  # raw bytes kept exactly
        headers = dict(message.headers)
        assert headers["reason"].decode() == reason
        assert headers["source_topic"].decode() == config.topic(topic)
        assert int(headers["source_offset"]) >= 0
        assert headers["detail"]


def read_all(bootstrap: str, topic: str, expected: int, timeout_ms: int = 30_000) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=timeout_ms)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    messages = []
    for message in consumer:
        messages.append(message)
        if len(messages) >= expected:
            break
    consumer.close()
    return messages
