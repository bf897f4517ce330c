"""Forwarding barriers: wait until everything published before now has passed a stage.

A stage of this worker forwards what it reads (clicks to `visitor-events`, orders to
`visitor-events` and on to `code-events`). A record counts as forwarded once its offset is below
either the consumer group's *committed* offset (Faust flushes the producer before it commits;
committed offsets are the group's, so this covers partitions other workers own) or this worker's
own `Progress` (a stage marks a batch done once its forwards were acknowledged by the broker,
which is a commit interval sooner). A barrier waits until every partition of a topic is forwarded up to
the end offset read at some moment: then every record published before that moment has been.

- The click barrier (contract §4: every click published before the order counts, whatever the
  lag): for a batch of orders just read, wait until `clicks` is committed up to its end offsets
  read *now*; only then are the orders forwarded, behind every earlier click.
- The order barrier (code velocity, an event-time window over every use of a code): for a batch
  of orders with a code, wait until `orders` is committed up to its end now, then `visitor-events`
  up to its end after that: every order published before the batch has been decided by the join
  stage and is in `code-events`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from .kafka_meta import partitions_of
from .offsets import check_fence

log = logging.getLogger(__name__)

#: How often to re-read the committed offsets while waiting: well below the 0.5 s commit interval.
POLL_SECONDS = 0.05
#: Log (not fail) when a batch waits this long: an upstream stage is lagging far behind.
SLOW_WAIT_SECONDS = 30.0


class Progress(Protocol):
    """This worker's own progress: its stages are done below `next_offset(tp)`
    (`streams.offsets.OffsetLedger`: a batch counts once its effects are all made)."""

    def next_offset(self, tp: Any) -> int: ...


class _Nothing:
    def next_offset(self, tp: Any) -> int:
        return 0


class ForwardBarrier:
    """Waits until a chain of topics is forwarded up to their current ends."""

    def __init__(
        self, bootstrap: str, group_id: str, chain: Sequence[str], name: str,
        progress: Progress | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.chain = tuple(chain)
        self.name = name
        self.progress: Progress = progress or _Nothing()
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._partitions: dict[str, list[TopicPartition]] = {}

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
            client_id=f"{self.group_id}-{self.name}-barrier",
        )
        await self._consumer.start()
        for topic in self.chain:
            self._partitions[topic] = await partitions_of(self._consumer, topic)
        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await self._admin.start()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self._admin is not None:
            await self._admin.close()

    async def wait(self) -> float:
        """Return once every record published to the chain before this call has been forwarded
        through all of it; seconds waited."""
        if self._consumer is None:
            await self.start()  # lazily: the topics exist by the time data flows
        started = time.monotonic()
        for topic in self.chain:
            await self._wait_for(topic, started)
        return time.monotonic() - started

    async def _wait_for(self, topic: str, started: float) -> None:
        assert self._consumer is not None and self._admin is not None
        targets = await self._consumer.end_offsets(self._partitions[topic])
        targets = {tp: end for tp, end in targets.items() if end > 0}
        warned = False
        while targets:
            check_fence()  # a rebalance stops the stages this waits for: drop the batch instead
            for tp in [tp for tp, end in targets.items() if self.progress.next_offset(tp) >= end]:
                del targets[tp]
            if not targets:
                return
            committed = await self._admin.list_consumer_group_offsets(
                self.group_id, partitions=list(targets)
            )
            for tp, meta in committed.items():
                if tp in targets and meta is not None and meta.offset >= targets[tp]:
                    del targets[tp]
            if not targets:
                return
            waited = time.monotonic() - started
            if waited > SLOW_WAIT_SECONDS and not warned:
                log.warning("%s barrier waiting %.0fs for %s to catch up: %s",
                            self.name, waited, topic, targets)
                warned = True
            await asyncio.sleep(POLL_SECONDS)

    async def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        if self._consumer is None:
            await self.start()
        assert self._consumer is not None
        return await self._consumer.end_offsets(list(partitions))  # type: ignore[no-any-return]


def click_barrier(
    bootstrap: str, group_id: str, clicks_topic: str, progress: Progress
) -> ForwardBarrier:
    return ForwardBarrier(bootstrap, group_id, [clicks_topic], "click", progress)


def order_barrier(
    bootstrap: str, group_id: str, orders_topic: str, visitor_events_topic: str,
    progress: Progress,
) -> ForwardBarrier:
    return ForwardBarrier(bootstrap, group_id, [orders_topic, visitor_events_topic], "order",
                          progress)
