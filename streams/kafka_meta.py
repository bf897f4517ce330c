"""Partition metadata for group-less aiokafka consumers (reference reader, lag reporter).

The one place the worker reaches into a private aiokafka attribute (the consumer's client, for
per-topic metadata): keep it that way.
"""

from __future__ import annotations


from aiokafka import AIOKafkaConsumer, TopicPartition


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Every partition of `topic`; raises if the topic does not exist.

    Asks the broker about this topic only (the client adds it to the topics it tracks): metadata
    of the whole cluster is megabytes once it has hundreds of topics, and decoding it cost a busy
    worker several per cent of its CPU every few seconds.
    """
    client = consumer._client  # noqa: SLF001 - aiokafka keeps per-topic metadata on its client
    partitions = client.cluster.partitions_for_topic(topic)
    if partitions is None:
        client.add_topic(topic)
        await client.force_metadata_update()
        partitions = client.cluster.partitions_for_topic(topic)
    if not partitions:
        raise RuntimeError(f"topic {topic!r} does not exist (the worker creates it at start-up)")
    return [TopicPartition(topic, p) for p in sorted(partitions)]
