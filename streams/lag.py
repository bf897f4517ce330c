"""Consumer lag of the worker's consumer group, as the `attribution_consumer_lag` gauge.

Lag per partition = the partition's end offset minus the group's committed offset (the worker commits
the next offset to read), or minus the partition's beginning offset while the group has committed
nothing there yet (the worker reads from the earliest offset). The committed offsets are the
*group's*, so every worker reports the lag of all partitions, not just of the ones it owns:
aggregate with `max by (topic, partition)`, never `sum`, across workers.

Uses its own group-less consumer and admin client, so it never joins
the group or moves its offsets. It must never stop the worker: errors are logged and retried.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas.config import Config
from sinks.metrics import METRICS

from .kafka_clients import aio_admin, aio_consumer
from .kafka_meta import partitions_of

log = logging.getLogger(__name__)

#: 5 s: a quarter of Prometheus' usual 15 s scrape interval is fresh enough for lag alerts, and
#: two cheap metadata/offset requests per interval are nothing for the broker.
INTERVAL_SECONDS = 5.0


class LagReporter:
    """Reads end and committed offsets of `topics` for `group_id` and sets the lag gauge."""

    def __init__(self, config: Config, group_id: str, topics: list[str]) -> None:
        self.config = config
        self.group_id = group_id
        self.topics = list(topics)
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._reported: set[TopicPartition] = set()

    async def start(self) -> None:
        self._consumer = aio_consumer(
            self.config, group_id=None, enable_auto_commit=False,
            client_id=f"{self.group_id}-lag",
        )
        await self._consumer.start()
        self._admin = aio_admin(self.config, client_id=f"{self.group_id}-lag")
        await self._admin.start()

    async def stop(self) -> None:
        consumer, admin = self._consumer, self._admin
        self._consumer = self._admin = None
        if consumer is not None:
            await consumer.stop()
        if admin is not None:
            await admin.close()

    async def report(self) -> dict[TopicPartition, int]:
        """Read the offsets once, set the gauge, and return the lag per partition."""
        if self._consumer is None or self._admin is None:
            await self.start()
        assert self._consumer is not None and self._admin is not None
        partitions: list[TopicPartition] = []
        for topic in self.topics:  # from the client's cached metadata (refreshed every 5 min)
            partitions += await partitions_of(self._consumer, topic)
        ends = await self._consumer.end_offsets(partitions)
        committed = await self._admin.list_consumer_group_offsets(
            self.group_id, partitions=partitions
        )
        never_committed = [
            tp for tp in partitions if tp not in committed or committed[tp].offset < 0
        ]
        beginnings = (
            await self._consumer.beginning_offsets(never_committed) if never_committed else {}
        )
        lags: dict[TopicPartition, int] = {}
        for tp in partitions:
            position = beginnings[tp] if tp in beginnings else committed[tp].offset
            lags[tp] = max(0, ends[tp] - position)
            METRICS.consumer_lag.labels(tp.topic, str(tp.partition)).set(lags[tp])
        for gone in self._reported - set(lags):  # a topic deleted and re-created smaller
            METRICS.consumer_lag.remove(gone.topic, str(gone.partition))
        self._reported = set(lags)
        return lags


async def run_lag_reporter(
    config: Config, topics: list[str], interval: float = INTERVAL_SECONDS
) -> None:
    """Report the lag of `config.app_id` on `topics` every `interval` seconds, forever.

    Only cancellation ends it. Any other error (broker unreachable, a topic not created yet) is
    logged, the Kafka clients are reopened, and the next round tries again.
    """
    reporter = LagReporter(config, config.app_id, topics)
    failing = False
    try:
        while True:
            try:
                await reporter.report()
                if failing:
                    log.info("consumer lag reporting recovered")
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - telemetry must never stop the worker
                # One line per outage, not one per round: a broker down for an hour is one event.
                log.log(logging.DEBUG if failing else logging.WARNING,
                        "cannot read consumer lag (retrying every %.0fs): %r", interval, exc)
                failing = True
                await _stop_quietly(reporter)
            await asyncio.sleep(interval)
    finally:
        await _stop_quietly(reporter)


async def _stop_quietly(reporter: LagReporter) -> None:
    try:
        await reporter.stop()
    except Exception as exc:  # noqa: BLE001 - closing a broken connection may fail too
        log.debug("closing the lag reporter's Kafka clients failed: %r", exc)
