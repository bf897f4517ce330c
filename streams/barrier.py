"""The click barrier: an order is forwarded only after every click published before it.

Contract §4 demands that every click of the visitor published before the order counts, whatever
the consumer lag. Clicks and orders arrive on different topics, read at different speeds, and go
through the click ingest stage into `visitor-events`. So, for a batch of orders just read, we take
the clicks topic's end offsets *now* (every click published before those orders is below them),
then wait until the consumer group's committed offsets on the clicks topic reach them. Faust
flushes the producer before it commits, so a committed click offset means that click's forward is
already in `visitor-events`, ahead of the order we forward next. Committed offsets are the group's,
so this holds with any number of workers.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from .kafka_meta import partitions_of

log = logging.getLogger(__name__)

#: How often to re-read the committed offsets while waiting: well below the 0.5 s commit interval.
POLL_SECONDS = 0.05
#: Log (not fail) when a batch waits this long: clicks are lagging far behind orders.
SLOW_WAIT_SECONDS = 30.0


class ClickBarrier:
    def __init__(self, bootstrap: str, group_id: str, clicks_topic: str) -> None:
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.clicks_topic = clicks_topic
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._partitions: list[TopicPartition] = []

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
            client_id=f"{self.group_id}-barrier",
        )
        await self._consumer.start()
        self._partitions = await partitions_of(self._consumer, self.clicks_topic)
        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await self._admin.start()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self._admin is not None:
            await self._admin.close()

    async def wait_for_earlier_clicks(self) -> float:
        """Return once every click published before this call has been forwarded; seconds waited."""
        if self._consumer is None:
            await self.start()  # lazily: the clicks topic exists by the time orders flow
        assert self._consumer is not None and self._admin is not None
        started = time.monotonic()
        targets = await self._consumer.end_offsets(self._partitions)
        targets = {tp: end for tp, end in targets.items() if end > 0}
        warned = False
        while targets:
            committed = await self._admin.list_consumer_group_offsets(
                self.group_id, partitions=list(targets)
            )
            for tp, meta in committed.items():
                if tp in targets and meta is not None and meta.offset >= targets[tp]:
                    del targets[tp]
            if not targets:
                break
            waited = time.monotonic() - started
            if waited > SLOW_WAIT_SECONDS and not warned:
                log.warning("orders waiting %.0fs for clicks to catch up: %s", waited, targets)
                warned = True
            await asyncio.sleep(POLL_SECONDS)
        return time.monotonic() - started
