"""Publishing events and reference data to Kafka (the `produce` and `load-reference` commands).

Routing is by the event's `type`; keys per contract §1: clicks and orders by `visitor_id`, refunds
by `order_id`, shares (which have no visitor) by `affiliate_id`. Lines that cannot be routed are
skipped and counted with a reason; lines that can be routed are sent as they are, byte for byte,
and validated by the worker (which dead-letters what is invalid), so `produce` never hides bad data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import orjson
from kafka import KafkaProducer

from schemas.config import Config
from schemas.config import REVIEWS_TOPIC
from schemas.events import TOPIC_OF_TYPE, Review
from schemas.reference import Affiliate, Program, Settings
from schemas.validation import (
    affiliate_to_json,
    program_to_json,
    review_to_json,
    settings_to_json,
)

KEY_FIELD = {"click": "visitor_id", "order": "visitor_id", "refund": "order_id", "share": "affiliate_id"}


@dataclass
class ProduceSummary:
    sent: Counter[str] = field(default_factory=Counter)  # by topic
    skipped: Counter[str] = field(default_factory=Counter)  # by reason

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())


def route(line: bytes) -> tuple[str, bytes] | str:
    """(topic before prefix, key) for a JSONL line, or the reason it cannot be routed."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "not_json"
    if not isinstance(obj, dict):
        return "not_object"
    event_type = obj.get("type")
    if event_type not in TOPIC_OF_TYPE:
        return "unknown_type"
    key = obj.get(KEY_FIELD[event_type])
    if not isinstance(key, str) or not key:
        return f"missing_{KEY_FIELD[event_type]}"
    return TOPIC_OF_TYPE[event_type], key.encode()


def make_producer(config: Config) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=config.kafka_bootstrap.split(","),
        acks="all",
        linger_ms=20,
        batch_size=256 * 1024,
        max_in_flight_requests_per_connection=1,  # keep per-key order across retries
        retries=10,
    )


def produce_lines(
    config: Config,
    lines: Iterable[bytes],
    on_line: Callable[[int], None] = lambda _: None,
    producer: KafkaProducer | None = None,
) -> ProduceSummary:
    """Send every routable line; blocks until the broker acknowledged all of them."""
    summary = ProduceSummary()
    owned = producer is None
    producer = producer or make_producer(config)
    try:
        for line in lines:
            line = line.strip()
            on_line(1)
            if not line:
                continue
            routed = route(line)
            if isinstance(routed, str):
                summary.skipped[routed] += 1
                continue
            topic, key = routed
            producer.send(config.topic(topic), key=key, value=line)
            summary.sent[topic] += 1
        producer.flush()
    finally:
        if owned:
            producer.close()
    return summary


def publish_reference(
    config: Config, programs: list[Program], affiliates: list[Affiliate], settings: Settings | None
) -> dict[str, int]:
    producer = make_producer(config)
    try:
        for program in programs:
            producer.send(config.topic("ref-programs"), key=program.program_id.encode(),
                          value=program_to_json(program))
        for affiliate in affiliates:
            producer.send(config.topic("ref-affiliates"), key=affiliate.affiliate_id.encode(),
                          value=affiliate_to_json(affiliate))
        if settings is not None:
            producer.send(config.topic("ref-settings"), key=b"settings",
                          value=settings_to_json(settings))
        producer.flush()
    finally:
        producer.close()
    return {"programs": len(programs), "affiliates": len(affiliates),
            "settings": int(settings is not None)}


def publish_review(config: Config, review: Review) -> None:
    """One reviewer decision to the `reviews` topic, keyed by order_id; waits for the broker."""
    producer = make_producer(config)
    try:
        producer.send(config.topic(REVIEWS_TOPIC), key=review.order_id.encode(),
                      value=review_to_json(review))
        producer.flush()
    finally:
        producer.close()
