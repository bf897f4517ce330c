"""The state half of `attribution forget`: ask the worker to drop what it keeps of some visitors.

The worker keeps each visitor's clicks in its state, keyed by visitor_id, on the partition of
`visitor-events` the visitor's key maps to. A forget request is an item on that topic, in the
topic's framing (a record is a JSON array of items), keyed and placed exactly as `produce` places
the visitor's events (Kafka's default murmur2 partitioner), so it is read by the worker that owns
the visitor, after every event of the visitor published before it:

    [{"type": "forget", "visitor_id": "<id>", "ts": "<now, RFC 3339>"}]

The worker erases the visitor's state when it reads the item. This module only publishes, and
counts what the broker did not acknowledge (`streams.publish.Delivery`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone

import orjson
from kafka import KafkaProducer

from schemas.config import FORGET_TYPE, VISITOR_EVENTS_TOPIC, Config

from .publish import Delivery, make_producer, partition_of


def forget_item(visitor_id: str, at: datetime) -> bytes:
    """One forget request, as an item of a `visitor-events` record."""
    ts = at.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    return orjson.dumps({"type": FORGET_TYPE, "visitor_id": visitor_id, "ts": ts})


def publish_forget(config: Config, visitor_ids: Iterable[str], *, at: datetime | None = None,
                   producer: KafkaProducer | None = None) -> int:
    """One forget record per visitor to `visitor-events`; waits for the broker and returns how
    many records it did not acknowledge (0: every one is durable)."""
    at = at or datetime.now(timezone.utc)
    topic = config.topic(VISITOR_EVENTS_TOPIC)
    delivery = Delivery(producer or make_producer(config))
    try:
        partitions = delivery.partitions(topic)
        for visitor_id in visitor_ids:
            key = visitor_id.encode()
            delivery.send(topic, b"[" + forget_item(visitor_id, at) + b"]", key,
                          partition_of(key, partitions) if partitions else None)
        return delivery.wait()
    finally:
        if producer is None:
            delivery.close()
