"""Partition metadata for group-less aiokafka consumers (reference reader, barriers, lag reporter)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

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


class GroupOffsets:
    """Where the consumer group stands, read from the broker (the commit ledger's `OffsetSource`).

    Its own group-less clients: they never join the group, so asking them never rebalances it.
    """

    #: Per probe: how long to wait for the broker to return a record that its end offset says exists.
    PROBE_TIMEOUT_MS = 2000

    def __init__(self, bootstrap: str, group_id: str) -> None:
        self.bootstrap = bootstrap
        self.group_id = group_id
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: Any = None
        # Every agent asks through these clients; one question at a time (a probe assigns and
        # seeks the consumer, and the clients are created on first use).
        self._lock = asyncio.Lock()

    async def _clients(self) -> tuple[AIOKafkaConsumer, Any]:
        if self._consumer is None:
            from aiokafka.admin import AIOKafkaAdminClient

            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                client_id=f"{self.group_id}-offsets",
            )
            await consumer.start()
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            await admin.start()
            self._consumer, self._admin = consumer, admin
        assert self._consumer is not None
        return self._consumer, self._admin

    async def starting_offsets(self, tps: Sequence[Any]) -> dict[Any, int]:
        async with self._lock:
            return await self._starting_offsets(tps)

    async def _starting_offsets(self, tps: Sequence[Any]) -> dict[Any, int]:
        consumer, admin = await self._clients()
        wanted = [TopicPartition(tp.topic, tp.partition) for tp in tps]
        committed = await admin.list_consumer_group_offsets(self.group_id, partitions=wanted)
        starts: dict[Any, int] = {}
        missing = []
        for tp in wanted:
            meta = committed.get(tp)
            if meta is not None and meta.offset >= 0:
                starts[tp] = meta.offset
            else:
                missing.append(tp)
        if missing:  # never committed: the worker reads from the earliest record (auto_offset_reset)
            starts.update(await consumer.beginning_offsets(missing))
        return {tp: starts[TopicPartition(tp.topic, tp.partition)] for tp in tps}

    async def first_offset_from(self, tp: Any, offset: int) -> int | None:
        async with self._lock:
            return await self._first_offset_from(tp, offset)

    async def _first_offset_from(self, tp: Any, offset: int) -> int | None:
        consumer, _ = await self._clients()
        partition = TopicPartition(tp.topic, tp.partition)
        consumer.assign([partition])
        consumer.seek(partition, offset)
        for _ in range(3):
            batches = await consumer.getmany(partition, timeout_ms=self.PROBE_TIMEOUT_MS, max_records=1)
            for record in batches.get(partition, []):
                return int(record.offset)
            end = (await consumer.end_offsets([partition]))[partition]
            if end <= offset:
                return None
        # The broker did not answer in time: say the record is there, so the caller reads the
        # partition again from `offset` rather than skip what may exist.
        return offset

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self._admin is not None:
            await self._admin.close()
