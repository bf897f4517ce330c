"""Partition metadata for group-less aiokafka consumers (the reference reader and the barrier)."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Every partition of `topic`; raises if the topic does not exist.

    aiokafka's `topics()` fetches fresh metadata but does not keep it in the consumer's cluster
    view, so `partitions_for_topic` would answer None for topics it was never assigned.
    """
    cluster = await consumer._client.fetch_all_metadata()  # noqa: SLF001 - see docstring
    partitions = cluster.partitions_for_topic(topic)
    if not partitions:
        raise RuntimeError(f"topic {topic!r} does not exist (the worker creates it at start-up)")
    return [TopicPartition(topic, p) for p in sorted(partitions)]
