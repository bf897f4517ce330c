"""The edge's durable delivery on a broker of this module's own (contract §8): batched records
partitioned as `produce` places them; the broker killed -9 → events spooled and the caller
answered, replayed in order when it is back; an edge killed -9 after deliver() returned with the
broker down → the next edge replays its spool on start.

Never touches the shared broker on 9092: other tests use it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from edge.delivery import Delivery, EdgeEvent
from schemas.config import Config
from streams.publish import partition_of
from deploy.stack import private_broker

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PARTITIONS = 4
TOPICS = ("clicks", "refunds")


@pytest.fixture(scope="module")
def broker(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with private_broker(stack, tmp_path_factory.mktemp("edge-broker")) as own:
        yield own


def make_config(broker: Any, spool: Path) -> Config:
    prefix = f"edge{uuid.uuid4().hex[:8]}."
    admin = KafkaAdminClient(bootstrap_servers=broker.kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(prefix + name, PARTITIONS, 1) for name in TOPICS])
    finally:
        admin.close()
    return Config(**{"KAFKA_BOOTSTRAP": broker.kafka_bootstrap, "TOPIC_PREFIX": prefix,
                     "EDGE_SPOOL_DIR": str(spool)})


def batch(tag: str, count: int) -> list[EdgeEvent]:
    """Clicks of a few visitors and a refund now and then, each with an event_id of its own."""
    events = []
    for n in range(count):
        if n % 7 == 3:
            key = f"order-{n % 5}".encode()
            value = {"type": "refund", "event_id": f"{tag}-{n}", "order_id": key.decode()}
            events.append(EdgeEvent("refunds", key, orjson.dumps(value)))
        else:
            key = f"visitor-{n % 11}".encode()
            value = {"type": "click", "event_id": f"{tag}-{n}", "visitor_id": key.decode()}
            events.append(EdgeEvent("clicks", key, orjson.dumps(value)))
    return events


def on_kafka(config: Config, expected: int, timeout: float = 60.0) -> dict[tuple[str, int], list[Any]]:
    """Every event on the test's topics, per (topic, partition) in log order, with its record's key;
    waits until `expected` distinct event_ids are there."""
    consumer = KafkaConsumer(bootstrap_servers=config.kafka_bootstrap, enable_auto_commit=False)
    parts = [TopicPartition(config.topic(name), p) for name in TOPICS for p in range(PARTITIONS)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    found: dict[tuple[str, int], list[Any]] = {}
    ids: set[str] = set()
    deadline = time.monotonic() + timeout
    try:
        while len(ids) < expected and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=500).items():
                for record in records:
                    array = orjson.loads(record.value)
                    assert isinstance(array, list), "not a batched record"
                    assert 0 < len(array) <= 10_000 and len(record.value) < 900_000
                    for element in array:
                        found.setdefault((tp.topic, tp.partition), []).append(
                            (record.key, element))
                        ids.add(element["event_id"])
    finally:
        consumer.close()
    assert len(ids) == expected, f"{len(ids)} of {expected} events on Kafka"
    return found


def assert_as_delivered(config: Config, delivered: list[EdgeEvent],
                        found: dict[tuple[str, int], list[Any]]) -> None:
    """Each event on its key's partition, in the order delivered (first copies: a replay may
    repeat an event, which the pipeline deduplicates)."""
    expected: dict[tuple[str, int], list[str]] = {}
    for event in delivered:
        place = (config.topic(event.topic), partition_of(event.key, list(range(PARTITIONS))))
        expected.setdefault(place, []).append(orjson.loads(event.value)["event_id"])
    for place, records in found.items():
        for key, element in records:  # the record's key and each event's key: this partition
            event_key = (element.get("visitor_id") or element.get("order_id")).encode()
            assert partition_of(key, list(range(PARTITIONS))) == place[1]
            assert partition_of(event_key, list(range(PARTITIONS))) == place[1]
    firsts: dict[tuple[str, int], list[str]] = {}
    for place, records in found.items():
        seen: set[str] = set()
        for _, element in records:
            if element["event_id"] not in seen:
                seen.add(element["event_id"])
                firsts.setdefault(place, []).append(element["event_id"])
    assert firsts == expected


async def deliver_concurrently(delivery: Delivery, tag: str, calls: int, size: int) -> list[EdgeEvent]:
    """`calls` requests at once, each of `size` events; returns them in the order of the calls."""
    batches = [batch(f"{tag}{call}", size) for call in range(calls)]
    await asyncio.gather(*(delivery.deliver(events) for events in batches))
    return [event for events in batches for event in events]


def test_events_are_acknowledged_as_batched_records_on_their_keys_partitions(
    broker: Any, tmp_path: Path,
) -> None:
    config = make_config(broker, tmp_path / "spool")

    async def run() -> list[EdgeEvent]:
        delivery = Delivery(config)
        await delivery.start()
        try:
            assert delivery.ready and not delivery.spooling
            return await deliver_concurrently(delivery, "a", calls=200, size=25)
        finally:
            await delivery.stop()

    delivered = asyncio.run(run())
    found = on_kafka(config, len(delivered))
    assert_as_delivered(config, delivered, found)
    assert sum(len(r) for r in found.values()) == len(delivered)  # the broker was up: no copies


def test_a_broker_killed_spools_and_the_spool_is_replayed_in_order_when_it_is_back(
    broker: Any, tmp_path: Path,
) -> None:
    config = make_config(broker, tmp_path / "spool")

    async def run() -> list[EdgeEvent]:
        delivery = Delivery(config)
        await delivery.start()
        try:
            delivered = await deliver_concurrently(delivery, "up", calls=20, size=50)
            assert broker.kill_kafka() is not None
            started = time.monotonic()
            delivered += await deliver_concurrently(delivery, "down", calls=20, size=50)
            assert time.monotonic() - started < 20, "deliver() waited too long for the broker"
            assert delivery.spooling and delivery.spool_events >= 1000
            assert delivery.ready  # the spool has room
            for n in range(5):  # requests keep coming during the outage: all spooled, in order
                delivered += await deliver_concurrently(delivery, f"later{n}-", calls=5, size=20)
            assert delivery.spool_bytes > 0 and delivery.spool_oldest_age_seconds > 0
            await asyncio.to_thread(broker.start_kafka, lambda line: None)
            delivered += await deliver_concurrently(delivery, "back", calls=5, size=20)
            deadline = time.monotonic() + 60
            while delivery.spooling:
                assert time.monotonic() < deadline, "the spool was not replayed"
                await asyncio.sleep(0.2)
            assert delivery.spool_events == 0
            delivered += await deliver_concurrently(delivery, "direct", calls=10, size=20)
            return delivered
        finally:
            await delivery.stop()

    delivered = asyncio.run(run())
    assert_as_delivered(config, delivered, on_kafka(config, len(delivered)))
    assert not list((tmp_path / "spool").glob("*.seg"))


EDGE_THEN_KILLED = textwrap.dedent("""
    import asyncio, sys, orjson
    from edge.delivery import Delivery, EdgeEvent
    from schemas.config import Config

    async def main():
        delivery = Delivery(Config.from_env())
        await delivery.start()
        events = [EdgeEvent("clicks", b"visitor-%d" % (n % 9),
                            orjson.dumps({"type": "click", "event_id": "killed-%d" % n}))
                  for n in range(int(sys.argv[1]))]
        await asyncio.gather(*(delivery.deliver(events[i:i + 10])
                               for i in range(0, len(events), 10)))
        print("delivered", delivery.spool_events, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


def test_an_edge_killed_after_deliver_returned_with_the_broker_down_is_replayed_by_the_next(
    broker: Any, tmp_path: Path,
) -> None:
    config = make_config(broker, tmp_path / "spool")
    count = 300
    assert broker.kill_kafka() is not None
    try:
        env = dict(os.environ, KAFKA_BOOTSTRAP=config.kafka_bootstrap,
                   TOPIC_PREFIX=config.topic_prefix, EDGE_SPOOL_DIR=str(tmp_path / "spool"))
        edge = subprocess.Popen([sys.executable, "-c", EDGE_THEN_KILLED, str(count)], env=env,
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert edge.stdout is not None
            line = edge.stdout.readline().decode()
            assert line.startswith("delivered"), edge.stderr.read().decode() if edge.stderr else ""
            assert int(line.split()[1]) == count  # all in the spool
            edge.send_signal(signal.SIGKILL)
        finally:
            edge.kill()
            edge.wait()
    finally:
        broker.start_kafka(lambda line: None)

    async def next_edge() -> None:
        delivery = Delivery(config)
        await delivery.start()
        try:
            deadline = time.monotonic() + 60
            while delivery.spooling:
                assert time.monotonic() < deadline, "the spool was not replayed"
                await asyncio.sleep(0.2)
        finally:
            await delivery.stop()

    asyncio.run(next_edge())
    delivered = [EdgeEvent("clicks", b"visitor-%d" % (n % 9),
                           orjson.dumps({"type": "click", "event_id": "killed-%d" % n}))
                 for n in range(count)]
    found = on_kafka(config, count)
    expected: dict[int, list[str]] = {}
    for event in delivered:
        expected.setdefault(partition_of(event.key, list(range(PARTITIONS))), []).append(
            orjson.loads(event.value)["event_id"])
    assert {p: [e["event_id"] for _, e in records] for (_, p), records in found.items()} == expected
