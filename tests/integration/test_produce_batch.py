"""`attribution produce [--batch N]` against the real broker: what it reports is exactly what the
topics hold, batched records are grouped by partition, and what the broker refuses is counted.
Batched records then go through the worker event by event (contract §2 v2)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from streams.publish import MAX_BATCH_BYTES, partition_of
from tests_support import REFERENCE_FILE_TEXT

pytestmark = pytest.mark.integration

KEY_FIELD = {"clicks": "visitor_id", "orders": "visitor_id", "refunds": "order_id",
             "shares": "affiliate_id"}


def attribution(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "attribution", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def click(n: int, visitor: str, pad: int = 0) -> dict[str, Any]:
    event: dict[str, Any] = {"event_id": f"c{n}", "type": "click", "ts": "2026-11-02T10:00:00Z",
                             "visitor_id": visitor, "session_id": f"s{n}", "affiliate_id": "sally",
                             "channel": "email"}
    if pad:
        event["pad"] = "x" * pad
    return event


def order(n: int, visitor: str) -> dict[str, Any]:
    return {"event_id": f"o{n}", "type": "order", "ts": "2026-11-02T11:00:00Z", "order_id": f"o{n}",
            "visitor_id": visitor, "customer_id": f"cust{n}", "currency": "EUR", "total": "200.00"}


def refund(n: int) -> dict[str, Any]:
    return {"event_id": f"r{n}", "type": "refund", "ts": "2026-11-03T10:00:00Z",
            "order_id": f"o{n}", "amount": "10.00"}


def share(n: int) -> dict[str, Any]:
    return {"event_id": f"sh{n}", "type": "share", "ts": "2026-11-02T09:00:00Z",
            "affiliate_id": f"aff{n % 3}", "share_id": f"share-{n}", "channel": "blog"}


def read_topic(bootstrap: str, topic: str) -> tuple[list[Any], list[int]]:
    """Every record of `topic` (partition by partition, in offset order) and its partitions."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    try:
        ids = sorted(consumer.partitions_for_topic(topic))
        partitions = [TopicPartition(topic, p) for p in ids]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(partitions)
        records: list[Any] = []
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            for batch in consumer.poll(timeout_ms=1000).values():
                records.extend(batch)
        return sorted(records, key=lambda r: (r.partition, r.offset)), ids
    finally:
        consumer.close()


def sent_by_topic(stdout: str) -> dict[str, tuple[int, int | None]]:
    """{topic: (events, records)} from the lines `sent N to TOPIC [in R records]`."""
    found = re.findall(r"sent\s+(\d+) to \S+?\.(\w+)(?: in (\d+) records)?", stdout)
    return {topic: (int(events), int(records) if records else None)
            for events, topic, records in found}


def write_lines(path: Path, events: list[Any]) -> Path:
    path.write_bytes(b"".join((e if isinstance(e, bytes) else orjson.dumps(e)) + b"\n"
                              for e in events))
    return path


TRAFFIC: list[Any] = [
    *(click(n, f"v{n % 11}") for n in range(80)),
    *(order(n, f"v{n}") for n in range(6)),
    *(refund(n) for n in range(3)),
    *(share(n) for n in range(5)),
    b"not json",
    b'{"type": "teleport"}',
]


@pytest.mark.parametrize("batch", [None, 7], ids=["one-event-per-record", "batch-7"])
def test_produce_publishes_exactly_what_it_reports(isolated, tmp_path, batch):
    config = isolated.config
    events = write_lines(tmp_path / "events.jsonl", TRAFFIC)
    args = ["produce", str(events)] + (["--batch", str(batch)] if batch else [])
    produced = attribution(isolated.env, *args)
    assert produced.returncode == 0, produced.stderr
    assert "total sent 94" in produced.stdout and "skipped 2" in produced.stdout
    reported = sent_by_topic(produced.stdout)
    assert {t: n for t, (n, _) in reported.items()} == {
        "clicks": 80, "orders": 6, "refunds": 3, "shares": 5}

    lines = {topic: [orjson.dumps(e) for e in TRAFFIC
                     if isinstance(e, dict) and e["type"] + "s" == topic] for topic in KEY_FIELD}
    for topic, key_field in KEY_FIELD.items():
        records, partitions = read_topic(config.kafka_bootstrap, config.topic(topic))
        elements: list[bytes] = []
        for record in records:
            value = orjson.loads(record.value)
            batch_of = value if batch else [value]
            assert isinstance(value, list) == bool(batch)
            assert 1 <= len(batch_of) <= (batch or 1)
            assert record.key == batch_of[0][key_field].encode()
            for element in batch_of:  # every element on its key's partition
                assert partition_of(element[key_field].encode(), partitions) == record.partition
            elements += [orjson.dumps(e) for e in batch_of]
        assert Counter(elements) == Counter(lines[topic]), topic
        events_sent, records_sent = reported[topic]
        assert len(elements) == events_sent
        assert len(records) == (records_sent if batch else events_sent)
        # A key's events keep the file's order.
        by_key: dict[bytes, list[bytes]] = {}
        for element in elements:
            by_key.setdefault(orjson.loads(element)[key_field].encode(), []).append(element)
        for key, mine in by_key.items():
            assert mine == [line for line in lines[topic]
                            if orjson.loads(line)[key_field].encode() == key]


def test_batched_records_stay_under_the_broker_s_record_limit(isolated, tmp_path):
    config = isolated.config
    big = [click(n, "v1", pad=50_000) for n in range(45)]  # 2.2 MB, one partition
    events = write_lines(tmp_path / "big.jsonl", big)
    produced = attribution(isolated.env, "produce", str(events), "--batch", "10000")
    assert produced.returncode == 0, produced.stderr
    records, _ = read_topic(config.kafka_bootstrap, config.topic("clicks"))
    assert len(records) >= 3 and all(len(r.value) <= MAX_BATCH_BYTES for r in records)
    assert [orjson.loads(r.value)[i]["event_id"] for r in records
            for i in range(len(orjson.loads(r.value)))] == [f"c{n}" for n in range(45)]
    assert sent_by_topic(produced.stdout)["clicks"] == (45, len(records))


@pytest.fixture
def refusing_prefix(stack):
    """An environment whose `clicks` topic takes records of at most 1,000 bytes."""
    import os

    prefix = f"refuse{uuid.uuid4().hex[:8]}."
    admin = KafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(prefix + "clicks", 2, 1,
                                      topic_configs={"max.message.bytes": "1000"})])
    finally:
        admin.close()
    return dict(os.environ, KAFKA_BOOTSTRAP=stack.kafka_bootstrap, TOPIC_PREFIX=prefix,
                ATTRIBUTION_PARTITIONS="2")


@pytest.mark.parametrize(
    ("batch", "message"),
    [(None, "error: 2 of 10 records were not acknowledged by the broker"),
     ("2", "error: 2 of 5 records were not acknowledged by the broker (4 of 10 events)")],
    ids=["one-event-per-record", "batch-2"],
)
def test_records_the_broker_refuses_are_counted_and_the_rest_published(
    refusing_prefix, tmp_path, batch, message
):
    env = refusing_prefix
    # One visitor, so one partition: with --batch 2 the records are [0,1] [2,3] ... [8,9].
    lines = [click(n, "v1", pad=1500 if n in (0, 5) else 0) for n in range(10)]
    events = write_lines(tmp_path / "events.jsonl", lines)
    produced = attribution(env, "produce", str(events), *(["--batch", batch] if batch else []))
    assert produced.returncode == 1, produced.stdout + produced.stderr
    assert message in produced.stderr.replace("\n", "")
    assert "MessageSizeTooLargeError" in produced.stderr.replace("\n", "")
    published, _ = read_topic(env["KAFKA_BOOTSTRAP"], env["TOPIC_PREFIX"] + "clicks")
    ids = sorted(e["event_id"] for r in published
                 for e in (orjson.loads(r.value) if batch else [orjson.loads(r.value)]))
    kept = [n for n in range(10) if n not in ((0, 1, 4, 5) if batch else (0, 5))]
    assert ids == sorted(f"c{n}" for n in kept)


def test_batched_records_are_processed_event_by_event_by_the_worker(isolated, tmp_path):
    """Valid elements land like single events; each invalid element is one dead letter."""
    env, config = isolated.env, isolated.config
    reference = tmp_path / "reference.json"
    reference.write_text(REFERENCE_FILE_TEXT)
    assert attribution(env, "load-reference", str(reference)).returncode == 0
    traffic = [*(click(n, f"v{n % 4}") for n in range(40)), order(1, "v1"), order(2, "v2")]
    events = write_lines(tmp_path / "events.jsonl", traffic)
    produced = attribution(env, "produce", str(events), "--batch", "5")
    assert produced.returncode == 0, produced.stderr

    bad = [click(900, "v1"), {"type": "click", "event_id": "c901"}, 7, click(902, "v2")]
    producer = KafkaProducer(bootstrap_servers=config.kafka_bootstrap, acks="all")
    producer.send(config.topic("clicks"), key=b"v1", value=orjson.dumps(bad)).get(timeout=30)
    producer.close()

    isolated.worker().start()
    isolated.wait_for("SELECT count() FROM {db}.clicks FINAL", lambda n: n == 42)
    isolated.wait_for("SELECT count() FROM {db}.commission_facts FINAL", lambda n: n == 2)
    assert isolated.query("SELECT count(), uniqExact(event_id) FROM {db}.clicks") == [(42, 42)]

    deadline = time.monotonic() + 60
    dead: list[Any] = []
    while len(dead) < 2 and time.monotonic() < deadline:  # Faust sends dead letters on its own time
        time.sleep(0.5)
        dead, _ = read_topic(config.kafka_bootstrap, config.topic("dead-letters"))
    assert sorted((m.value, dict(m.headers)["element"], dict(m.headers)["reason"]) for m in dead) == [
        (b"7", b"2", b"not_object"),
        (orjson.dumps(bad[1]), b"1", b"missing_field"),
    ]
