"""The edge's delivery without a broker: batched records within §2's limits, and a Kafka that
cannot be reached (a closed port) → events spooled, SpoolFull once the spool is full, and the
next Delivery finds them. The Kafka side is tests/integration/test_edge_delivery.py."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import orjson
import pytest

from edge.delivery import (
    MAX_EVENT_BYTES, MAX_RECORD_BYTES, MAX_RECORD_EVENTS, Delivery, EdgeEvent, SpoolFull,
)
from schemas.config import Config
from streams.publish import partition_of


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # nothing listens once the probe is closed


def config(tmp_path: Path, max_bytes: int = 1 << 20) -> Config:
    settings: dict[str, Any] = {
        "KAFKA_BOOTSTRAP": f"127.0.0.1:{closed_port()}", "TOPIC_PREFIX": "t.",
        "EDGE_SPOOL_DIR": str(tmp_path / "spool"), "EDGE_SPOOL_MAX_BYTES": max_bytes}
    return Config(**settings)


def click(n: int, padding: int = 0) -> EdgeEvent:
    value = {"type": "click", "event_id": f"e{n}", "visitor_id": f"v{n % 13}", "pad": "x" * padding}
    return EdgeEvent("clicks", f"v{n % 13}".encode(), orjson.dumps(value))


def test_records_hold_one_partitions_events_in_order_within_the_size_and_count_limits(
    tmp_path: Path,
) -> None:
    delivery = Delivery(config(tmp_path))
    delivery._partitions["t.clicks"] = tuple(range(4))  # noqa: SLF001 - no broker to ask
    small = [click(n) for n in range(25_000)]
    large = [click(n, padding=100_000) for n in range(25_000, 25_040)]

    records = asyncio.run(delivery._records([(0, small), (1, large)]))  # noqa: SLF001

    by_partition: dict[int, list[bytes]] = {}
    for record in records:
        array = b"[" + b",".join(record.values) + b"]"
        assert len(array) < MAX_RECORD_BYTES and len(record.values) <= MAX_RECORD_EVENTS
        assert record.topic == "t.clicks"
        assert partition_of(record.key, [0, 1, 2, 3]) == record.partition
        for value in record.values:
            key = orjson.loads(value)["visitor_id"].encode()
            assert partition_of(key, [0, 1, 2, 3]) == record.partition
        by_partition.setdefault(record.partition, []).extend(record.values)
    for partition, values in by_partition.items():
        expected = [e.value for e in small + large
                    if partition_of(e.key, [0, 1, 2, 3]) == partition]
        assert values == expected
    assert {len(r.calls) for r in records} <= {1, 2}


def test_an_event_too_large_for_a_record_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    async def run() -> None:
        delivery = Delivery(config(tmp_path))
        await delivery.start()
        try:
            with pytest.raises(ValueError, match="over the"):
                await delivery.deliver([click(1, padding=MAX_EVENT_BYTES)])
            assert delivery.spool_events == 0
        finally:
            await delivery.stop()

    asyncio.run(run())


def test_without_kafka_events_are_spooled_until_full_then_spool_full_and_the_next_edge_finds_them(
    tmp_path: Path,
) -> None:
    settings = config(tmp_path, max_bytes=1 << 20)

    async def first() -> int:
        delivery = Delivery(settings)
        await delivery.start()
        try:
            assert delivery.spooling and delivery.ready
            await asyncio.gather(*(delivery.deliver([click(n)]) for n in range(100)))
            assert delivery.spool_events == 100
            delivered = 100
            with pytest.raises(SpoolFull) as full:
                for n in range(100, 200):
                    await delivery.deliver([click(n, padding=50_000)])
                    delivered += 1
            assert full.value.retry_after > 0
            assert not delivery.ready  # Kafka unreachable and no room: /readyz says 503
            assert delivery.spool_events == delivered
            return delivered
        finally:
            await delivery.stop()

    async def second() -> int:
        delivery = Delivery(settings)
        await delivery.start()
        try:
            return delivery.spool_events
        finally:
            await delivery.stop()

    delivered = asyncio.run(first())
    assert asyncio.run(second()) == delivered
