"""Publishing events and reference data to Kafka (the `produce`, `load-reference` and `review`
commands).

Routing is by the event's `type`; keys per contract §1: clicks and orders by `visitor_id`, refunds
by `order_id`, shares (which have no visitor) by `affiliate_id`. Lines that cannot be routed are
skipped and counted with a reason; lines that can be routed are sent as they are, byte for byte,
and validated by the worker (which dead-letters what is invalid), so `produce` never hides bad data.

With a batch size (contract §2, batched records), routable lines are grouped by topic and by the
partition Kafka's default partitioner gives their key, and each group goes out as JSON arrays of
up to that many events (and below the broker's default 1 MB per record), to that partition,
keyed by the first element's key. Whenever one group is full every group is sent, clicks first,
then shares, orders and refunds: an order is never published before a click the file had before
it, nor a refund before its order.

Nothing is lost silently (contract §1): every send's result is looked at. A record counts as
published only once the broker acknowledged it (acks=all); everything else, including a send that
fails at once (a topic the broker does not know, a record too large), is counted, and the
commands exit non-zero with that count.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.partitioner import murmur2

from schemas.config import Config
from schemas.config import REVIEWS_TOPIC
from schemas.events import TOPIC_OF_TYPE, Review
from schemas.reference import Affiliate, Program, Settings
from schemas.validation import (
    MAX_BATCH_ELEMENTS,
    affiliate_to_json,
    program_to_json,
    review_to_json,
    settings_to_json,
)

from . import kafka_clients

_log = logging.getLogger(__name__)

#: How long a send may wait for what it needs before it counts as failed: the metadata of its
#: topic (a topic the broker does not name within this time is missing, or not ours to write; the
#: broker runs with auto-create off) or room in the producer's buffer (a buffer that does not
#: drain for this long means the broker is not taking records). kafka-python's default is 60 s.
MAX_BLOCK_MS = 10_000

#: The longest `Delivery.wait` waits for acknowledgements: beyond the producer's delivery
#: timeout (120 s), by which every record has been acknowledged or failed.
FLUSH_SECONDS = 150.0
#: Closing a producer after the wait: nothing should be left to send.
CLOSE_SECONDS = 10.0

#: The largest value of a batched record: below the 1 MiB that both the broker (message.max.bytes)
#: and the producer (max_request_size) allow by default, with room for the key and the framing.
MAX_BATCH_BYTES = 900 * 1024

#: Topics in the order a flush of batched records sends them (what attribution depends on first).
SEND_ORDER = {"clicks": 0, "shares": 1, "orders": 2, "refunds": 3}

KEY_FIELD = {"click": "visitor_id", "order": "visitor_id", "refund": "order_id", "share": "affiliate_id"}


@dataclass
class ProduceSummary:
    sent: Counter[str] = field(default_factory=Counter)  # events by topic, as handed to the producer
    skipped: Counter[str] = field(default_factory=Counter)  # lines by reason
    records: Counter[str] = field(default_factory=Counter)  # records by topic (= events unbatched)
    unacknowledged: int = 0  # records the broker did not acknowledge
    unacknowledged_events: int = 0  # the events in them
    first_error: str = ""  # why the first of them failed

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def total_records(self) -> int:
        return sum(self.records.values())


class Delivery:
    """Every record sent through one producer, until the broker acknowledged it or failed it.

    `send` never raises for a Kafka error: a send that fails at once counts as unacknowledged,
    like one whose acknowledgement never comes. `wait` flushes the producer and returns how many
    records were not acknowledged. A topic whose metadata cannot be had (missing, not authorized)
    is asked about once; later sends to it fail at once instead of waiting `max_block_ms` each.
    """

    def __init__(self, producer: KafkaProducer) -> None:
        self.producer = producer
        self.records = 0
        self.events = 0
        self.first_error = ""
        self._acknowledged = 0
        self._acknowledged_events = 0
        self._lock = threading.Lock()  # callbacks run in the producer's I/O thread (or this one)
        self._partitions: dict[str, list[int] | None] = {}

    def partitions(self, topic: str) -> list[int] | None:
        """The topic's partitions, sorted; None when the broker would not say (the error noted)."""
        try:
            return self._partitions[topic]
        except KeyError:
            pass
        known: list[int] | None
        try:
            known = sorted(self.producer.partitions_for(topic))
        except KafkaError as exc:
            self._note(exc, topic)
            known = None
        self._partitions[topic] = known
        return known

    def send(self, topic: str, value: bytes, key: bytes, partition: int | None = None,
             events: int = 1) -> None:
        """Hand one record to the producer; its fate is counted (see `wait`)."""
        self.records += 1
        self.events += events
        if self.partitions(topic) is None:
            return  # the broker will not take it: never acknowledged
        try:
            future = self.producer.send(topic, value=value, key=key, partition=partition)
        except KafkaError as exc:
            self._note(exc, topic)
            return
        future.add_callback(self._acknowledged_records, events)
        future.add_errback(self._failed, topic)

    def wait(self) -> int:
        """Flush; the number of records sent so far that the broker did not acknowledge.

        When there are any, the first error is logged (a warning: on stderr even where logging is
        not set up), so that no caller loses records without a word.
        """
        deadline = time.monotonic() + FLUSH_SECONDS
        while True:
            try:
                self.producer.flush(timeout=max(deadline - time.monotonic(), 0.1))
                break
            except KafkaError as exc:
                # kafka-python 3.0 fails a flush that was waiting for a batch the broker found too
                # large and that it split to send again ("Future not done"): wait for the halves.
                if time.monotonic() >= deadline:
                    self._note(exc, "")  # what is still on its way was not acknowledged
                    break
        unacknowledged = self.records - self._acknowledged
        if unacknowledged:
            _log.warning("%d of %d records were not acknowledged by the broker; the first error: %s",
                         unacknowledged, self.records, self.first_error or "none reported")
        return unacknowledged

    def close(self) -> None:
        """Close the producer; anything still unsent is dropped (and was counted by `wait`)."""
        try:
            self.producer.close(timeout=CLOSE_SECONDS)
        except KafkaError as exc:
            _log.warning("closing the Kafka producer: %s", exc)

    @property
    def unacknowledged_events(self) -> int:
        return self.events - self._acknowledged_events

    def _acknowledged_records(self, events: int, _metadata: object) -> None:
        with self._lock:
            self._acknowledged += 1
            self._acknowledged_events += events

    def _failed(self, topic: str, exc: BaseException) -> None:
        self._note(exc, topic)

    def _note(self, exc: BaseException, topic: str) -> None:
        with self._lock:
            if not self.first_error:
                self.first_error = _describe(exc, topic)


def _describe(exc: BaseException, topic: str) -> str:
    """One line: the error's name, the topic, and what it means ('[Error 10] X: None' is not)."""
    name = type(exc).__name__
    text = _KAFKA_ERROR_PREFIX.sub("", str(exc), count=1).strip()
    if text in ("", "None", name):
        text = getattr(exc, "description", "") or "no detail"
    return f"{name} ({topic}): {text}" if topic else f"{name}: {text}"


_KAFKA_ERROR_PREFIX = re.compile(r"^(?:\[Error -?[0-9]+\] )?[A-Za-z]+Error(?:: |$)")


def route(line: bytes) -> tuple[str, bytes] | str:
    """(topic before prefix, key) for a JSONL line, or the reason it cannot be routed."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "not_json"
    if not isinstance(obj, dict):
        return "not_object"
    event_type = obj.get("type")
    if event_type not in TOPIC_OF_TYPE:
        return "unknown_type"
    key = obj.get(KEY_FIELD[event_type])
    if not isinstance(key, str) or not key:
        return f"missing_{KEY_FIELD[event_type]}"
    return TOPIC_OF_TYPE[event_type], key.encode()


def make_producer(config: Config, max_block_ms: int = MAX_BLOCK_MS) -> KafkaProducer:
    return kafka_clients.producer(
        config,
        acks="all",
        linger_ms=20,
        batch_size=256 * 1024,
        max_in_flight_requests_per_connection=1,  # keep per-key order across retries
        retries=10,
        max_block_ms=max_block_ms,
        # kafka-python 3.0 turns idempotence on by default; then one record the broker refuses
        # as too large (its batch split until it stands alone) fails the records sent after it
        # to its partition as well (seen: 33 of 40 failed for 8 too large). Without it only the
        # refused records fail. A retry may then write a record twice: events are deduplicated
        # by event_id (orders by order_id) and reference topics are compacted by key.
        enable_idempotence=False,
    )


def partition_of(key: bytes, partitions: list[int]) -> int:
    """The partition Kafka's default partitioner gives `key` (murmur2, as kafka-python's
    DefaultPartitioner computes it) among the topic's sorted partition ids."""
    return partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]


class _Batches:
    """Routable lines waiting to go out as batched records, by (topic, partition)."""

    def __init__(self, config: Config, delivery: Delivery, summary: ProduceSummary,
                 size: int) -> None:
        self.config = config
        self.delivery = delivery
        self.summary = summary
        self.size = size
        self.groups: dict[tuple[str, int], list[bytes]] = {}
        self.keys: dict[tuple[str, int], bytes] = {}  # each group's first key
        self.bytes: dict[tuple[str, int], int] = {}

    def add(self, topic: str, key: bytes, line: bytes) -> None:
        partitions = self.delivery.partitions(self.config.topic(topic))
        # A topic the broker does not know: one group, whose send fails (and is counted).
        group = (topic, partition_of(key, partitions) if partitions else 0)
        lines = self.groups.get(group)
        if lines is not None and self.bytes[group] + 1 + len(line) > MAX_BATCH_BYTES:
            self.flush()
            lines = None
        if lines is None:
            lines = self.groups[group] = []
            self.keys[group] = key
            self.bytes[group] = 1
        lines.append(line)
        self.bytes[group] += len(line) + 1
        if len(lines) >= self.size:
            self.flush()

    def flush(self) -> None:
        """Send every group, clicks first, then shares, orders and refunds (see the module)."""
        for topic, partition in sorted(self.groups, key=lambda g: (SEND_ORDER.get(g[0], 9), g)):
            lines = self.groups[topic, partition]
            self.delivery.send(self.config.topic(topic), b"[" + b",".join(lines) + b"]",
                               self.keys[topic, partition], partition, events=len(lines))
            self.summary.sent[topic] += len(lines)
            self.summary.records[topic] += 1
        self.groups.clear()
        self.keys.clear()
        self.bytes.clear()


def produce_lines(
    config: Config,
    lines: Iterable[bytes],
    on_line: Callable[[int], None] = lambda _: None,
    producer: KafkaProducer | None = None,
    batch: int | None = None,
) -> ProduceSummary:
    """Send every routable line; blocks until the broker acknowledged or failed all of them.

    `batch`: send batched records of up to that many events (see the module). What the broker did
    not acknowledge is counted in `unacknowledged`; this never raises for it.
    """
    if batch is not None and not 1 <= batch <= MAX_BATCH_ELEMENTS:
        raise ValueError(f"batch must be between 1 and {MAX_BATCH_ELEMENTS}, got {batch}")
    summary = ProduceSummary()
    owned = producer is None
    producer = producer or make_producer(config)
    delivery = Delivery(producer)
    batches = _Batches(config, delivery, summary, batch) if batch is not None else None
    try:
        for line in lines:
            line = line.strip()
            on_line(1)
            if not line:
                continue
            routed = route(line)
            if isinstance(routed, str):
                summary.skipped[routed] += 1
                continue
            topic, key = routed
            if batches is not None:
                batches.add(topic, key, line)
                continue
            delivery.send(config.topic(topic), line, key)
            summary.sent[topic] += 1
            summary.records[topic] += 1
        if batches is not None:
            batches.flush()
        summary.unacknowledged = delivery.wait()
        summary.unacknowledged_events = delivery.unacknowledged_events
        summary.first_error = delivery.first_error
    finally:
        if owned:
            delivery.close()
    return summary


def publish_reference(
    config: Config, programs: list[Program], affiliates: list[Affiliate], settings: Settings | None
) -> dict[str, int]:
    """Counts of what was sent, by kind, and under "unacknowledged" how many of those records the
    broker did not acknowledge; waits for the broker."""
    delivery = Delivery(make_producer(config))
    try:
        for program in programs:
            delivery.send(config.topic("ref-programs"), program_to_json(program),
                          program.program_id.encode())
        for affiliate in affiliates:
            delivery.send(config.topic("ref-affiliates"), affiliate_to_json(affiliate),
                          affiliate.affiliate_id.encode())
        if settings is not None:
            delivery.send(config.topic("ref-settings"), settings_to_json(settings), b"settings")
        unacknowledged = delivery.wait()
    finally:
        delivery.close()
    return {"programs": len(programs), "affiliates": len(affiliates),
            "settings": int(settings is not None), "unacknowledged": unacknowledged}


def publish_review(config: Config, review: Review) -> int:
    """One reviewer decision to the `reviews` topic, keyed by order_id; waits for the broker.

    Returns 1 when the broker did not acknowledge it, else 0.
    """
    delivery = Delivery(make_producer(config))
    try:
        delivery.send(config.topic(REVIEWS_TOPIC), review_to_json(review), review.order_id.encode())
        return delivery.wait()
    finally:
        delivery.close()
