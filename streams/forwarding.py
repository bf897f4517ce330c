"""Publishing a whole batch of records to an internal topic at once.

Faust's `topic.send` costs tens of microseconds per record (a future, sensors and serializers per
message): more than the rest of a click's processing. Stages forward thousands of records per
batch, so they hand them here instead: records are grouped by partition into aiokafka record
batches on the worker's own producer, and the call returns once the broker acknowledged every one
of them (acks=all). Only then may the stage update its tables and let its offsets advance.

Partitions are chosen like Kafka's default partitioner (murmur2 of the key), so a key always
lands in the same partition.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, NamedTuple

from aiokafka.partitioner import murmur2

from .offsets import check_fence


class Record(NamedTuple):
    key: bytes
    value: bytes
    timestamp: float | None = None  # seconds since the epoch (Kafka record time), None for now
    headers: Sequence[tuple[str, bytes]] = ()


def partition_of(key: bytes, partitions: int) -> int:
    """Kafka's default partition for `key` (the Java client's murmur2, positive)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class Forwarder:
    """Sends batches of records through the Faust app's aiokafka producer."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._partitions: dict[str, int] = {}

    async def send(self, topic: str, records: Sequence[Record]) -> None:
        """Publish `records` to `topic`; returns when all are acknowledged, raises if any failed."""
        if not records:
            return
        check_fence()
        producer = self.app.producer._ensure_producer()  # noqa: SLF001 - faust's aiokafka producer
        count = self._partitions.get(topic)
        if count is None:
            count = self._partitions[topic] = len(await producer.partitions_for(topic))
        by_partition: dict[int, list[Record]] = defaultdict(list)
        for record in records:
            by_partition[partition_of(record.key, count)].append(record)
        deliveries = []
        for partition, items in by_partition.items():
            batch = producer.create_batch()
            appended = 0
            for record in items:
                timestamp_ms = int(record.timestamp * 1000) if record.timestamp is not None else None
                while batch.append(key=record.key, value=record.value, timestamp=timestamp_ms,
                                   headers=list(record.headers)) is None:
                    if appended == 0:
                        raise ValueError(f"a record of {len(record.value)} bytes does not fit a batch")
                    deliveries.append(await producer.send_batch(batch, topic, partition=partition))
                    batch, appended = producer.create_batch(), 0
                appended += 1
            deliveries.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*deliveries)
