"""Publishing (`streams.publish`): every send's fate is counted; batched records are grouped by
topic and partition. A fake producer stands in for kafka-python's (the real broker is in
tests/integration/test_produce_batch.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, UnknownError
from kafka.future import Future
from kafka.partitioner import DefaultPartitioner

from schemas.config import Config
from streams import publish
from streams.engine.runner import partition_of as worker_partition_of
from streams.publish import Delivery, partition_of, produce_lines, publish_reference, publish_review

CONFIG = Config(KAFKA_BOOTSTRAP="localhost:1", TOPIC_PREFIX="p.")  # type: ignore[call-arg]


class FakeProducer:
    """Records sends; resolves their futures on flush as `outcome(topic, value)` says."""

    def __init__(self, partitions: int = 4, missing: tuple[str, ...] = (),
                 outcome: Any = lambda topic, value: None, at_once: Any = lambda topic, value: None,
                 flush_failures: int = 0) -> None:
        self.partitions = partitions
        self.missing = missing
        self.outcome = outcome  # None: acknowledged; an exception: failed by the broker
        self.at_once = at_once  # an exception raised by send itself
        self.flush_failures = flush_failures
        self.sent: list[tuple[str, bytes, bytes, int | None]] = []
        self.pending: list[tuple[Future, BaseException | None]] = []
        self.asked: list[str] = []
        self.closed = False

    def partitions_for(self, topic: str) -> set[int]:
        self.asked.append(topic)
        if topic in self.missing:
            raise KafkaTimeoutError("Failed to update metadata after 10.0 secs.")
        return set(range(self.partitions))

    def send(self, topic: str, value: bytes, key: bytes, partition: int | None = None) -> Future:
        error = self.at_once(topic, value)
        if error is not None:
            raise error
        self.sent.append((topic, key, value, partition))
        future = Future()
        self.pending.append((future, self.outcome(topic, value)))
        return future

    def flush(self, timeout: float | None = None) -> None:
        if self.flush_failures:
            self.flush_failures -= 1
            raise UnknownError("Future not done")
        for future, error in self.pending:
            if error is None:
                future.success(SimpleNamespace(offset=0))
            else:
                future.failure(error)
        self.pending.clear()

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


def click(n: int, visitor: str | None = None, pad: int = 0) -> bytes:
    event = {"event_id": f"c{n}", "type": "click", "ts": "2026-11-02T10:00:00Z",
             "visitor_id": visitor or f"v{n}", "session_id": "s", "affiliate_id": "sally"}
    if pad:
        event["pad"] = "x" * pad
    return orjson.dumps(event)


def order(n: int, visitor: str) -> bytes:
    return orjson.dumps({"event_id": f"o{n}", "type": "order", "ts": "2026-11-02T11:00:00Z",
                         "order_id": f"o{n}", "visitor_id": visitor, "customer_id": "c",
                         "currency": "EUR", "total": "10.00"})


def refund(n: int) -> bytes:
    return orjson.dumps({"event_id": f"r{n}", "type": "refund", "ts": "2026-11-03T10:00:00Z",
                         "order_id": f"o{n}", "amount": "1.00"})


def share(n: int) -> bytes:
    return orjson.dumps({"event_id": f"sh{n}", "type": "share", "ts": "2026-11-02T09:00:00Z",
                         "affiliate_id": "sally", "share_id": f"s{n}", "channel": "blog"})


# --- partitions ---------------------------------------------------------------------------------


@given(st.binary(min_size=0, max_size=40), st.integers(min_value=1, max_value=64))
def test_the_partition_of_a_key_is_kafka_python_s_default_and_the_worker_s(
    key: bytes, count: int
) -> None:
    cluster = SimpleNamespace(topics=lambda: {"t"}, partitions_for_topic=lambda t: set(range(count)),
                              available_partitions_for_topic=lambda t: set(range(count)))
    expected = DefaultPartitioner().partition("t", key, key, None, None, cluster)
    assert partition_of(key, list(range(count))) == expected == worker_partition_of(key, count)


# --- Delivery: every record acknowledged, or counted -----------------------------------------------


def test_acknowledged_records_are_not_counted() -> None:
    producer = FakeProducer()
    delivery = Delivery(producer)  # type: ignore[arg-type]
    for n in range(5):
        delivery.send("p.clicks", click(n), b"k")
    assert delivery.wait() == 0
    assert delivery.first_error == ""


def test_records_the_broker_fails_are_counted_with_the_first_error() -> None:
    producer = FakeProducer(outcome=lambda topic, value: MessageSizeTooLargeError()
                            if b"pad" in value else None)
    delivery = Delivery(producer)  # type: ignore[arg-type]
    for n in range(10):
        delivery.send("p.clicks", click(n, pad=10 if n % 3 == 0 else 0), b"k")
    assert delivery.wait() == 4
    assert delivery.first_error.startswith("MessageSizeTooLargeError (p.clicks): The server has")


def test_a_send_that_fails_at_once_is_counted_and_the_rest_still_go() -> None:
    producer = FakeProducer(at_once=lambda topic, value: KafkaTimeoutError("buffer full")
                            if value == click(1) else None)
    delivery = Delivery(producer)  # type: ignore[arg-type]
    for n in range(3):
        delivery.send("p.clicks", click(n), b"k")
    assert delivery.wait() == 1
    assert len(producer.sent) == 2
    assert delivery.first_error == "KafkaTimeoutError (p.clicks): buffer full"


def test_a_missing_topic_is_asked_about_once_and_its_records_are_counted() -> None:
    producer = FakeProducer(missing=("p.orders",))
    delivery = Delivery(producer)  # type: ignore[arg-type]
    for n in range(3):
        delivery.send("p.orders", order(n, "v"), b"v", events=2)
        delivery.send("p.clicks", click(n), b"v")
    assert delivery.wait() == 3
    assert delivery.unacknowledged_events == 6
    assert producer.asked == ["p.orders", "p.clicks"]
    assert {topic for topic, *_ in producer.sent} == {"p.clicks"}
    assert "Failed to update metadata" in delivery.first_error


def test_a_flush_failed_by_a_split_batch_is_flushed_again() -> None:
    producer = FakeProducer(flush_failures=2)
    delivery = Delivery(producer)  # type: ignore[arg-type]
    delivery.send("p.clicks", click(1), b"k")
    assert delivery.wait() == 0


def test_records_still_unresolved_at_the_deadline_are_counted(monkeypatch: Any) -> None:
    monkeypatch.setattr(publish, "FLUSH_SECONDS", 0.0)
    producer = FakeProducer(flush_failures=1000)
    delivery = Delivery(producer)  # type: ignore[arg-type]
    delivery.send("p.clicks", click(1), b"k")
    assert delivery.wait() == 1
    assert delivery.first_error == "UnknownError: Future not done"


# --- produce_lines --------------------------------------------------------------------------------


def test_without_batch_every_routable_line_is_one_record_keyed_per_contract() -> None:
    lines = [click(1, "v1"), order(1, "v1"), refund(1), share(1), b"not json", b"", b'{"type":"x"}']
    producer = FakeProducer()
    summary = produce_lines(CONFIG, lines, producer=producer)  # type: ignore[arg-type]
    assert producer.sent == [("p.clicks", b"v1", click(1, "v1"), None),
                             ("p.orders", b"v1", order(1, "v1"), None),
                             ("p.refunds", b"o1", refund(1), None),
                             ("p.shares", b"sally", share(1), None)]
    assert summary.sent == summary.records == {"clicks": 1, "orders": 1, "refunds": 1, "shares": 1}
    assert summary.skipped == {"not_json": 1, "unknown_type": 1}
    assert (summary.unacknowledged, summary.unacknowledged_events) == (0, 0)
    assert not producer.closed  # the caller's producer is the caller's to close


def test_with_batch_lines_go_as_arrays_grouped_by_topic_and_partition() -> None:
    lines = [click(n, f"v{n % 6}") for n in range(50)]
    producer = FakeProducer(partitions=3)
    summary = produce_lines(CONFIG, lines, producer=producer, batch=4)  # type: ignore[arg-type]
    elements: list[bytes] = []
    for topic, key, value, partition in producer.sent:
        batch = orjson.loads(value)
        assert topic == "p.clicks" and 1 <= len(batch) <= 4
        assert key == batch[0]["visitor_id"].encode()
        assert partition is not None
        assert {partition_of(e["visitor_id"].encode(), [0, 1, 2]) for e in batch} == {partition}
        elements += [orjson.dumps(e) for e in batch]
    assert sorted(elements) == sorted(lines)
    assert summary.sent == {"clicks": 50} and summary.records == {"clicks": len(producer.sent)}
    # Each visitor's clicks keep the file's order.
    for visitor in {f"v{n % 6}" for n in range(50)}:
        mine = [e for e in elements if orjson.loads(e)["visitor_id"] == visitor]
        assert mine == [line for line in lines if orjson.loads(line)["visitor_id"] == visitor]


def test_batched_lines_are_sent_byte_for_byte_inside_the_array() -> None:
    line = b'{"type": "click",  "visitor_id": "v1", "event_id": "c1"}'
    producer = FakeProducer()
    produce_lines(CONFIG, [line, b"  " + line + b"\n"], producer=producer, batch=10)  # type: ignore[arg-type]
    [(_, _, value, _)] = producer.sent
    assert value == b"[" + line + b"," + line + b"]"


def test_a_full_group_sends_every_group_clicks_before_orders_before_refunds() -> None:
    # One partition: the orders' group is full first, yet the clicks before them go first.
    lines = [click(1, "v1"), refund(1), order(1, "v1"), order(2, "v1"), click(2, "v1")]
    producer = FakeProducer(partitions=1)
    produce_lines(CONFIG, lines, producer=producer, batch=2)  # type: ignore[arg-type]
    sent = [(topic, [e["event_id"] for e in orjson.loads(value)]) for topic, _, value, _ in producer.sent]
    assert sent == [("p.clicks", ["c1"]), ("p.orders", ["o1", "o2"]), ("p.refunds", ["r1"]),
                    ("p.clicks", ["c2"])]


def test_a_batched_record_stays_under_the_byte_limit(monkeypatch: Any) -> None:
    monkeypatch.setattr(publish, "MAX_BATCH_BYTES", 2_000)
    lines = [click(n, "v1", pad=300) for n in range(20)]
    producer = FakeProducer(partitions=1)
    summary = produce_lines(CONFIG, lines, producer=producer, batch=1000)  # type: ignore[arg-type]
    assert all(len(value) <= 2_000 for _, _, value, _ in producer.sent)
    assert sum(len(orjson.loads(value)) for _, _, value, _ in producer.sent) == 20
    assert summary.records["clicks"] == len(producer.sent) > 1


def test_unacknowledged_batched_records_count_records_and_their_events() -> None:
    lines = [click(n, "v1") for n in range(10)] + [order(1, "v1")]
    producer = FakeProducer(partitions=1, missing=("p.orders",),
                            outcome=lambda topic, value: MessageSizeTooLargeError()
                            if value.count(b"event_id") == 4 else None)
    summary = produce_lines(CONFIG, lines, producer=producer, batch=4)  # type: ignore[arg-type]
    # clicks: 4 + 4 (both failed) + 2 (acknowledged); orders: 1 record, never sent.
    assert summary.total_records == 4 and summary.total_sent == 11
    assert (summary.unacknowledged, summary.unacknowledged_events) == (3, 9)
    assert summary.first_error.startswith("KafkaTimeoutError (p.orders)")


@pytest.mark.parametrize("batch", [0, -1, 10_001])
def test_a_batch_size_outside_1_to_10000_is_refused(batch: int) -> None:
    with pytest.raises(ValueError, match="between 1 and 10000"):
        produce_lines(CONFIG, [], producer=FakeProducer(), batch=batch)  # type: ignore[arg-type]


def test_reference_data_and_reviews_report_what_was_not_acknowledged(monkeypatch: Any) -> None:
    from datetime import datetime, timezone

    from schemas.events import Review
    from schemas.validation import parse_reference_document
    from tests_support import REFERENCE_FILE_TEXT

    producer = FakeProducer(missing=("p.ref-affiliates", "p.reviews"))
    monkeypatch.setattr(publish, "make_producer", lambda config: producer)
    counts = publish_reference(CONFIG, *parse_reference_document(REFERENCE_FILE_TEXT.encode()))
    assert counts == {"programs": 1, "affiliates": 1, "settings": 0, "unacknowledged": 1}
    review = Review(event_id="rv1", ts=datetime(2026, 11, 2, tzinfo=timezone.utc), order_id="o1",
                    decision="release", reviewer="ann", note="")
    assert publish_review(CONFIG, review) == 1
    assert producer.closed
