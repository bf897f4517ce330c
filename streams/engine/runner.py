"""The hot path: one consumer, one pass per event, one commit path.

Every input and internal topic has the same partition count and is read by one consumer group
with the range assignor, so partition p of every topic belongs to one worker: the visitor join
runs on `clicks`/p and `orders`/p themselves (producers key both by visitor_id), a code's uses
meet in `code-events`/p, an order's ledger lives in `ledger-events`/p beside `refunds`/p and
`reviews`/p. Only an event in the wrong partition takes a hop (to `visitor-events` or
`ledger-events`, keyed right).

One batch, in `Engine.process`, is: decode and validate -> decide (the pure stages) -> effects
in this order: ClickHouse rows, records to Kafka (forwards, dead letters, flags; all
acknowledged), changelogs (acknowledged), RocksDB, then the offsets. A crash anywhere replays the
batch; every effect is idempotent (deterministic row ids, first decision wins, dedup by id).

**Orders wait locally** (Kafka Streams' stream-time synchronisation, KIP-353): an order is
decided once this worker has read its own `clicks` partition, and its `visitor-events`
partition, up to the end offsets they had just after the order was read. Nothing else is
waited for, so no backlog shape can deadlock the worker. Orders waiting are not committed; the
`orders` partition is paused while too many wait.

**Rebalances are structural**: the rebalance listener takes the same lock as a batch, so a
batch runs to its commit before partitions are revoked; a batch fetched before a rebalance is
dropped unprocessed (its records are read again from the committed offsets). Revoked partitions'
stages, waiting orders and stores are closed; assigned ones are restored from their changelogs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import time
from datetime import datetime, timedelta, timezone
from decimal import InvalidOperation
from functools import lru_cache
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError, KafkaTimeoutError
from aiokafka.partitioner import murmur2
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from schemas.config import (
    ABUSE_FLAGS_TOPIC,
    CODE_EVENTS_TOPIC,
    DEAD_LETTERS_TOPIC,
    FORGET_TYPE,
    LEDGER_EVENTS_TOPIC,
    REVIEWS_TOPIC,
    STATE_TABLES,
    VISITOR_EVENTS_TOPIC,
    Config,
)
from schemas.events import Click, Order, Refund, Review, Share
from schemas.validation import (
    InvalidEvent,
    check_not_future,
    decode_event,
    decode_record,
    decode_review,
)
from sinks.clickhouse import RowSink
from streams.pii import scrub
from sinks.metrics import METRICS
from sinks.rows import TABLES, share_row

from .effects import ABUSE, CODE, DEAD, LEDGER, VISITOR, DeadLetter, Effects
from ..kafka_clients import aio_consumer, aio_producer
from ..rules.attribution import touch_horizon
from .stages import Approvals, CodeStage, LedgerStage, VisitorStage, progress_item
from .state import PartitionStore, Staged

log = logging.getLogger(__name__)

#: Store names (and their changelog topics `<app id>-<store>-changelog`).
TOUCHES, LEDGERS, CODES = STATE_TABLES
#: Pause an orders partition while this many of its orders wait for their clicks (memory bound),
#: resume below half of it.
MAX_WAITING_ORDERS = 20_000
#: Records per poll at most (ATTRIBUTION_BATCH_SIZE may lower it): one batch. Bigger batches cost
#: latency, smaller ones per-batch overhead (a ClickHouse insert, a produce round trip and a
#: commit per batch).
MAX_POLL_RECORDS = 2_000
#: Commit at most this often: nothing waits for commits (they only bound what a restart reads
#: again), and a commit is a round trip that every batch paid.
COMMIT_INTERVAL_SECONDS = 0.5
#: How long the broker may hold a fetch for more data (aiokafka's default 500 ms would be
#: added to every hop of an order's way).
FETCH_MAX_WAIT_MS = 10


@lru_cache(maxsize=262_144)  # one visitor's events come many at a time; murmur2 is pure Python
def partition_of(key: bytes, partitions: int) -> int:
    """Kafka's default partition for `key` (the Java client's murmur2, positive)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


@dataclass
class WaitingOrder:
    offset: int
    order: Order
    timestamp_ms: int | None
    #: (clicks end, visitor-events end) of the order's partition, read after the order was.
    clicks_end: int = -1
    visitor_end: int = -1
    orders_end: dict[int, int] = field(default_factory=dict)


@dataclass
class Decided:
    """A batch decided: what to do, the state to write, the offsets to commit after."""

    effects: Effects
    staged: dict[int, dict[str, Staged]]
    offsets: dict[TopicPartition, int]


@dataclass
class PartitionState:
    """Everything this worker holds for partition p of every topic while it owns it."""

    partition: int
    stores: dict[str, PartitionStore]
    code_stage: CodeStage
    waiting: dict[str, deque[WaitingOrder]] = field(
        default_factory=lambda: {"orders": deque(), "visitor": deque()})
    progress_sent: int | None = None

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


class Engine:
    def __init__(self, config: Config, reference: Any) -> None:
        self.config = config
        self.reference = reference
        self.n = config.partitions
        t = config.topic
        self.topics = {
            "clicks": t("clicks"), "shares": t("shares"), "orders": t("orders"),
            "refunds": t("refunds"), "reviews": t(REVIEWS_TOPIC),
            VISITOR: t(VISITOR_EVENTS_TOPIC), CODE: t(CODE_EVENTS_TOPIC),
            LEDGER: t(LEDGER_EVENTS_TOPIC),
        }
        self.kind_of = {name: kind for kind, name in self.topics.items()}
        self.out_topics = {VISITOR: t(VISITOR_EVENTS_TOPIC), CODE: t(CODE_EVENTS_TOPIC),
                           LEDGER: t(LEDGER_EVENTS_TOPIC), ABUSE: t(ABUSE_FLAGS_TOPIC),
                           DEAD: t(DEAD_LETTERS_TOPIC)}
        self.state_dir = Path(config.state_dir).resolve() / config.app_id
        self.lock = asyncio.Lock()
        self.generation = 0
        self.partitions: dict[int, PartitionState] = {}
        self.approvals = Approvals()
        self.sink = RowSink(config.clickhouse, TABLES)
        self._pii_key: bytes | None = config.pii_key
        self._no_programs_warned = -1e9
        self._kafka_warned = -1e9
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.restorer: AIOKafkaConsumer | None = None
        self._committed: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self.max_records = min(config.batch_size, MAX_POLL_RECORDS)
        self._to_open: set[int] = set()
        self._assignment_changed = False
        #: Per partition read this assignment: the offset after the last record read.
        self._read_up_to: dict[TopicPartition, int] = {}
        #: Offsets of batches whose effects are made, not committed yet, and when it last did.
        self._to_commit: dict[TopicPartition, int] = {}
        self._last_commit = 0.0
        #: Ledger items this worker forwarded and applied at once, until they come back.
        self._applied_here: set[tuple[str, str]] = set()

    # --- lifecycle ---------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        self.producer = aio_producer(
            self.config, acks="all", linger_ms=5,
            max_request_size=16 * 1024 * 1024, client_id=f"{self.config.app_id}-producer",
        )
        await self.producer.start()
        self.restorer = aio_consumer(
            self.config, group_id=None, enable_auto_commit=False,
            client_id=f"{self.config.app_id}-restore", fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        await self.restorer.start()
        self.consumer = aio_consumer(
            self.config, group_id=self.config.app_id,
            client_id=f"{self.config.app_id}-worker",
            enable_auto_commit=False, auto_offset_reset="earliest",
            partition_assignment_strategy=(RangePartitionAssignor,),
            max_poll_records=self.max_records, fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            # 10 s: after a crash the group waits this long for the dead member.
            session_timeout_ms=10_000, heartbeat_interval_ms=3_000,
            max_poll_interval_ms=600_000,
        )
        self.consumer.subscribe(list(self.topics.values()), listener=_Listener(self))
        await self.consumer.start()
        try:
            while not stopping.is_set():
                generation = self.generation
                polling = time.perf_counter()
                batch = await self.consumer.getmany(
                    timeout_ms=int(self.config.batch_seconds * 1000), max_records=self.max_records)
                METRICS.batch_phase_seconds.labels("poll").observe(time.perf_counter() - polling)
                async with self.lock:
                    if stopping.is_set():
                        break
                    if generation != self.generation:
                        await self._rewind(batch)
                        continue
                    if self._assignment_changed:
                        await self._open_assigned()
                    if not batch and self._idle():
                        await self._commit({})  # what the last batches left to commit
                        continue  # nothing to decide, nothing to report
                    # One batch at a time, to its commit: deciding the next batch while this
                    # one's effects are made gained no throughput (one thread does both) and
                    # cost every hop of an order a batch of latency.
                    await self.process(batch)
        except Exception:
            raise  # fatal: the caller exits at once, committing nothing; the batch is read again
        await self._stop()  # a graceful stop only

    async def _rewind(self, batch: dict[TopicPartition, list[Any]]) -> None:
        """A batch fetched across a rebalance is not processed: its partitions that are still
        ours go back to their committed offsets (the fetch may have moved them past records that
        nobody processed)."""
        assert self.consumer is not None
        owned = self.consumer.assignment()
        for tp in batch:
            if tp not in owned:
                continue
            committed = await self.consumer.committed(tp)
            if committed is None:
                await self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, committed)
        METRICS.batches_dropped.labels("engine").inc()
        log.info("a batch fetched across a rebalance was dropped; its partitions re-read from "
                 "their committed offsets")

    def _idle(self) -> bool:
        """Nothing waiting, every partition's progress reported."""
        return not any(
            any(st.waiting.values()) or st.code_stage.waiting or st.progress_sent is None
            for st in self.partitions.values())

    async def _stop(self) -> None:
        async with self.lock:
            await self._commit({}, now=True)
            self.generation += 1
            for state in self.partitions.values():
                state.close()
            self.partitions.clear()
        for client in (self.consumer, self.restorer):
            if client is not None:
                await client.stop()
        if self.producer is not None:
            await self.producer.stop()
        await asyncio.to_thread(self.sink.close)

    async def revoked(self, revoked: set[TopicPartition]) -> None:
        async with self.lock:  # after the batch in flight has made its effects
            await self._commit({}, now=True)
            self.generation += 1
            gone = {tp.partition for tp in revoked} & set(self.partitions)
            for p in gone:
                self.partitions.pop(p).close()
            self.approvals.forget(gone)
            self._committed = {tp: o for tp, o in self._committed.items() if tp.partition not in gone}
            self._read_up_to = {tp: o for tp, o in self._read_up_to.items() if tp.partition not in gone}
            self._paused -= {tp for tp in self._paused if tp.partition in gone}
            self._applied_here.clear()  # echoes now go to whoever owns their partition
            if gone:
                log.info("partitions %s revoked", sorted(gone))

    async def assigned(self, assigned: set[TopicPartition]) -> None:
        """Only note the partitions: they are restored by the main loop, outside the rebalance
        (the group waits for a member's listener, and heartbeats pause while it runs)."""
        async with self.lock:
            self.generation += 1
            self._to_open = {tp.partition for tp in assigned} - set(self.partitions)
            self._assignment_changed = True

    async def _open_assigned(self) -> None:
        """Restore the stores of newly assigned partitions from their changelogs, together."""
        new = sorted(self._to_open)
        self._to_open, self._assignment_changed = set(), False
        if new:
            stores = {(name, p): PartitionStore(self.state_dir / f"{name}-{p}")
                      for p in new for name in (TOUCHES, LEDGERS, CODES)}
            await self._restore(stores)
            for p in new:
                mine = {name: stores[(name, p)] for name in (TOUCHES, LEDGERS, CODES)}
                ledger = LedgerStage(p, Staged(mine[LEDGERS]), self.approvals)
                indexed = ledger.index_pending()
                if indexed:
                    log.info("ledger partition %d: %d pending orders indexed for approval", p, indexed)
                self.partitions[p] = PartitionState(p, mine, CodeStage(
                    Staged(mine[CODES]), self._pii_key or b""))
        # Tests and operators read this line: partition p of every topic is this worker's.
        log.info("assignment: partitions %s of every topic (%d restored)",
                 sorted(self.partitions), len(new))

    async def _restore(self, stores: dict[tuple[str, int], PartitionStore]) -> None:
        assert self.restorer is not None
        tps = {TopicPartition(self.config.changelog_topic(name), p): store
               for (name, p), store in stores.items()}
        starts = await self.restorer.beginning_offsets(list(tps))
        ends = await self.restorer.end_offsets(list(tps))
        positions: dict[TopicPartition, int] = {}
        for tp, store in tps.items():
            checkpoint = store.checkpoint()
            if checkpoint > ends[tp] or 0 < checkpoint < starts[tp]:
                log.warning("state %s is not from this changelog (checkpoint %d, log %d-%d): "
                            "rebuilding it", store.directory, checkpoint, starts[tp], ends[tp])
                store.wipe()
                checkpoint = 0
            if max(checkpoint, starts[tp]) < ends[tp]:
                positions[tp] = max(checkpoint, starts[tp])
        if not positions:
            return
        started = time.monotonic()
        self.restorer.assign(list(positions))
        for tp, position in positions.items():
            self.restorer.seek(tp, position)
        restored = 0
        remaining = set(positions)
        while remaining:
            batches = await self.restorer.getmany(*remaining, timeout_ms=500, max_records=20_000)
            for tp, records in batches.items():
                writes: dict[bytes, bytes | None] = {}
                for record in records:
                    if record.offset < ends[tp] and record.key is not None:
                        writes[record.key] = record.value
                restored += len(writes)
                tps[tp].write(writes)
            for tp in list(remaining):
                if await self.restorer.position(tp) >= ends[tp]:
                    tps[tp].write({}, ends[tp])
                    remaining.discard(tp)
        self.restorer.unsubscribe()
        log.info("restored %d state records of %d store partitions in %.1fs",
                 restored, len(positions), time.monotonic() - started)

    # --- one batch ------------------------------------------------------------------------

    async def process(self, batch: dict[TopicPartition, list[Any]]) -> None:
        """One batch, start to commit."""
        await self.make(await self.decide(batch))

    async def decide(self, batch: dict[TopicPartition, list[Any]]) -> "Decided":
        """Everything up to the effects: decode, decide, stage state writes; no effect made."""
        assert self.consumer is not None
        started = time.perf_counter()
        ref = self.reference.snapshot
        effects = Effects()
        owned = self.partitions
        staged = {p: {name: Staged(store) for name, store in state.stores.items()}
                  for p, state in owned.items()}
        horizon = touch_horizon(ref)
        visitors = {p: VisitorStage(staged[p][TOUCHES], horizon) for p in owned}
        ledgers = {p: LedgerStage(p, staged[p][LEDGERS], self.approvals, ref, self.topics[LEDGER])
                   for p in owned}
        # Contract v2 §2: no event more than max_future_seconds ahead of this machine's clock.
        self._not_after = datetime.now(timezone.utc) + timedelta(
            seconds=ref.settings.max_future_seconds)
        for p, state in owned.items():
            state.code_stage.begin_batch(staged[p][CODES])
        by_kind: dict[str, list[tuple[TopicPartition, list[Any]]]] = defaultdict(list)
        for tp, records in batch.items():
            if tp.partition in owned and records:
                by_kind[self.kind_of[tp.topic]].append((tp, records))
                METRICS.events_consumed.labels(self.kind_of[tp.topic]).inc(len(records))

        # Clicks first (raw, and those that hopped), so orders of this batch can see them.
        new_waiting: list[tuple[int, WaitingOrder]] = []
        for tp, records in by_kind["clicks"]:
            for record in records:
                for event, raw in self._decode_elements(record, tp, "click", effects):
                    assert isinstance(event, Click)
                    if not self._hopped(VISITOR, event.visitor_id, tp, raw, record, effects):
                        self._click(event, tp.partition, record, visitors, ref, effects)
        for tp, records in by_kind[VISITOR]:
            for record in records:
                for index, item, raw in self._internal_items(record, tp, effects):
                    if item.get("type") == FORGET_TYPE:
                        self._forget(item, raw, tp, record, index, visitors, effects)
                        continue
                    try:
                        event = decode_event(raw, not_after=self._not_after)
                    except InvalidEvent as exc:
                        self._dead_letter(record, tp, exc, index, raw, effects)
                        continue
                    if isinstance(event, Click):
                        self._click(event, tp.partition, record, visitors, ref, effects)
                    elif isinstance(event, Order):
                        waiting = WaitingOrder(record.offset, event, record.timestamp)
                        owned[tp.partition].waiting["visitor"].append(waiting)
                        new_waiting.append((tp.partition, waiting))
        for tp, records in by_kind["shares"]:
            for record in records:
                for event, _ in self._decode_elements(record, tp, "share", effects):
                    assert isinstance(event, Share)
                    effects.row("shares", share_row(event))
        for tp, records in by_kind["orders"]:
            for record in records:
                for event, raw in self._decode_elements(record, tp, "order", effects):
                    assert isinstance(event, Order)
                    if self._hopped(VISITOR, event.visitor_id, tp, raw, record, effects):
                        continue
                    waiting = WaitingOrder(record.offset, event, record.timestamp)
                    owned[tp.partition].waiting["orders"].append(waiting)
                    new_waiting.append((tp.partition, waiting))
        if new_waiting:
            await self._set_targets(new_waiting)
        decided_before = len(effects.forwards)
        await self._decide_orders(visitors, ref, effects)
        if not ref.programs and len(effects.forwards) > decided_before:
            self._warn_no_programs(len(effects.forwards) - decided_before)
        for visitor_stage in visitors.values():
            visitor_stage.finish()

        # Codes: progress reports and coded orders; decide what every partition has caught up on.
        for tp, records in by_kind[CODE]:
            code_stage = owned[tp.partition].code_stage
            for record in records:
                for index, item, raw in self._internal_items(record, tp, effects):
                    try:
                        code_stage.receive(item, record.offset, record.timestamp)
                    except _MALFORMED as exc:
                        self._malformed(record, tp, index, raw, exc, effects)
        for state in owned.values():
            state.code_stage.decide_ready(ref, effects)
            state.code_stage.finish(ref)

        # The ledger: decisions, refunds, reviews, then approvals.
        for tp, records in by_kind["refunds"]:
            for record in records:
                for refund, raw in self._decode_elements(record, tp, "refund", effects):
                    assert isinstance(refund, Refund)
                    if not self._hopped(LEDGER, refund.order_id, tp, raw, record, effects):
                        ledgers[tp.partition].receive(raw, effects, METRICS,
                                                      (tp.topic, tp.partition, record.offset))
        for tp, records in by_kind["reviews"]:
            for record in records:
                try:
                    review = decode_review(record.value or b"", not_after=self._not_after)
                except InvalidEvent as exc:
                    self._dead_letter(record, tp, exc, None, record.value or b"", effects)
                    continue
                METRICS.events_valid.labels("reviews").inc()
                if not self._hopped(LEDGER, review.order_id, tp, record.value, record, effects):
                    ledgers[tp.partition].receive(record.value, effects, METRICS,
                                                  (tp.topic, tp.partition, record.offset))
        for tp, records in by_kind[LEDGER]:
            for record in records:
                for index, item, raw in self._internal_items(record, tp, effects):
                    try:
                        echo = _ledger_item_id(item)
                        if echo in self._applied_here:
                            self._applied_here.discard(echo)  # applied here when forwarded
                            continue
                        ledgers[tp.partition].receive(raw, effects, METRICS,
                                                      (tp.topic, tp.partition, record.offset))
                    except _MALFORMED as exc:
                        self._malformed(record, tp, index, raw, exc, effects)
                        continue
                    if item.get("type") == "decided_order" and record.timestamp:
                        effects.latency_from.setdefault("commission_facts", []).append(
                            record.timestamp / 1000)
        # What this batch forwards to a ledger partition this worker owns is applied now, not a
        # batch later when it comes back (it is still forwarded: the topic is what a restart or
        # the partition's next owner reads, and the ledger applies each item once).
        for fwd in effects.forwards:
            if fwd.topic != LEDGER:
                continue
            q = partition_of(fwd.key, self.n)
            if q in ledgers:
                ledgers[q].receive(fwd.item, effects, METRICS)
                self._applied_here.add(_ledger_item_id(orjson.loads(fwd.item)))
                if fwd.timestamp_ms:
                    effects.latency_from.setdefault("commission_facts", []).append(
                        fwd.timestamp_ms / 1000)
        for order_id, p in list(self.approvals.due(set(owned))):
            ledgers[p].approve(order_id, effects, METRICS)
        for ledger_stage in ledgers.values():
            ledger_stage.finish()

        await self._progress(effects)
        METRICS.coded_orders_waiting.set(sum(len(st.code_stage.waiting) for st in owned.values()))
        offsets = self._offsets_to_commit(batch)
        self._flow_control()
        METRICS.batch_phase_seconds.labels("decide").observe(time.perf_counter() - started)
        return Decided(effects, staged, offsets)

    async def make(self, decided: "Decided") -> None:
        """The batch's effects, state and commit."""
        await self._make(decided.effects, decided.staged)
        committing = time.perf_counter()
        await self._commit(decided.offsets)
        METRICS.batch_phase_seconds.labels("commit").observe(time.perf_counter() - committing)

    def _hopped(self, topic: str, key: str, tp: TopicPartition, raw: bytes, record: Any,
                effects: Effects) -> bool:
        """Forward an event that came on a partition its key does not map to (Kafka's default
        partitioner) to `topic`, keyed right; False when it is on its own partition."""
        encoded = key.encode()
        if partition_of(encoded, self.n) == tp.partition:
            return False
        effects.forward(topic, encoded, self._hop_value(raw), record.timestamp)
        return True

    def _hop_value(self, raw: bytes) -> bytes:
        """What an event carries through an internal topic: its valid event's fields only (an
        unknown extra field may be nested deeper than orjson writes back, or just large), with
        ip and user_agent as their keyed hash (contract v2 §1)."""
        obj = orjson.loads(raw)
        if type(obj) is dict:
            obj = {k: v for k, v in obj.items() if k in _EVENT_FIELDS}
        return scrub(orjson.dumps(obj), self._pii_key)

    def _click(self, click: Click, p: int, record: Any, visitors: dict[int, VisitorStage],
               ref: Any, effects: Effects) -> None:
        if visitors[p].click(click, ref, effects):
            if record.timestamp:
                effects.latency_from.setdefault("clicks", []).append(record.timestamp / 1000)
        else:
            METRICS.events_duplicate.labels("clicks").inc()

    def _decode_elements(self, record: Any, tp: TopicPartition, expected: str,
                         effects: Effects) -> list[tuple[Any, bytes]]:
        valid = []
        for element in decode_record(record.value or b"", expected, not_after=self._not_after):
            if element.error is not None:
                self._dead_letter(record, tp, element.error, element.index, element.raw, effects)
            else:
                valid.append((element.event, element.raw))
        METRICS.events_valid.labels(self.kind_of[tp.topic]).inc(len(valid))
        return valid

    def _forget(self, item: dict[str, Any], raw: bytes, tp: TopicPartition, record: Any,
                index: int, visitors: dict[int, VisitorStage], effects: Effects) -> None:
        visitor_id = item.get("visitor_id")
        if not isinstance(visitor_id, str) or not visitor_id:
            self._malformed(record, tp, index, raw, ValueError("forget without visitor_id"), effects)
            return
        if self._hopped(VISITOR, visitor_id, tp, raw, record, effects):
            return
        visitors[tp.partition].forget(visitor_id)
        log.info("forgot visitor state on partition %d (attribution forget)", tp.partition)

    def _warn_no_programs(self, orders: int) -> None:
        """Orders decided with no program loaded are all unattributed: say so, loudly but not
        for every batch (an alert fires on the counter)."""
        METRICS.orders_without_programs.inc(orders)
        now = time.monotonic()
        if now - self._no_programs_warned >= 60:
            self._no_programs_warned = now
            log.warning("%d orders decided while no program is loaded: they are written "
                        "unattributed. Run `attribution load-reference` (topic %s is empty)",
                        orders, self.config.topic("ref-programs"))

    def _internal_items(self, record: Any, tp: TopicPartition,
                        effects: Effects) -> list[tuple[int, dict[str, Any], bytes]]:
        """The items of a record on an internal topic, each with its own JSON bytes: a JSON array
        of objects, each with a `ts` no later than the bound (contract v2 §2 holds for internal
        topics too). Anything else goes to dead-letters, never into a stage: only the worker
        should write these topics, but a poisoned record must not crash-loop it."""
        try:
            items = orjson.loads(record.value or b"")
        except orjson.JSONDecodeError as exc:
            self._dead_letter(record, tp, InvalidEvent("malformed_internal", f"not JSON: {exc}"),
                              None, record.value or b"", effects)
            return []
        if type(items) is not list:
            self._dead_letter(record, tp, InvalidEvent(
                "malformed_internal", "an internal record must be a JSON array of objects"),
                None, record.value or b"", effects)
            return []
        good = []
        for index, item in enumerate(items):
            try:
                raw = orjson.dumps(item)
            except orjson.JSONEncodeError:  # nested deeper than orjson writes (it reads deeper)
                raw = b'"<an item nested too deep to write>"'
                problem: InvalidEvent | None = InvalidEvent("malformed_internal", "nested too deep")
            else:
                problem = self._item_problem(item)
            if problem is not None:
                self._dead_letter(record, tp, problem, index, raw, effects)
            else:
                good.append((index, item, raw))
        return good

    def _item_problem(self, item: Any) -> InvalidEvent | None:
        if type(item) is not dict:
            return InvalidEvent("malformed_internal", "an item must be a JSON object")
        if isinstance(item.get("ts"), str):
            try:
                # Upper case: RFC 3339 allows 't' and 'z', fromisoformat does not.
                check_not_future(datetime.fromisoformat(item["ts"].upper()), self._not_after)
            except InvalidEvent as exc:
                return exc
            except ValueError as exc:
                return InvalidEvent("malformed_internal", f"bad ts: {exc}")
        return None

    def _malformed(self, record: Any, tp: TopicPartition, index: int, raw: bytes,
                   exc: BaseException, effects: Effects) -> None:
        log.error("malformed item %d of %s[%d]@%d sent to dead-letters: %r",
                  index, tp.topic, tp.partition, record.offset, exc)
        self._dead_letter(record, tp, InvalidEvent("malformed_internal", repr(exc)[:500]),
                          index, raw, effects)

    def _dead_letter(self, record: Any, tp: TopicPartition, exc: InvalidEvent, index: int | None,
                     raw: bytes, effects: Effects) -> None:
        effects.dead_letters.append(DeadLetter(
            record.key, raw, exc.reason, exc.detail, tp.topic, tp.partition, record.offset, index))
        METRICS.events_invalid.labels(self.kind_of[tp.topic], exc.reason).inc()
        METRICS.dead_letters.inc()

    async def _set_targets(self, new_waiting: list[tuple[int, WaitingOrder]]) -> None:
        """Read, once, the ends the new waiting orders must see first (after reading them)."""
        assert self.consumer is not None
        wanted = {TopicPartition(self.topics["clicks"], p) for p, _ in new_waiting}
        wanted |= {TopicPartition(self.topics[VISITOR], p) for p, _ in new_waiting}
        orders = [TopicPartition(self.topics["orders"], p) for p in range(self.n)]
        consumer = self.consumer
        ends = await self._until_delivered(
            "the end offsets", lambda: consumer.end_offsets(list(wanted) + orders))
        orders_end = {tp.partition: ends[tp] for tp in orders}
        for p, waiting in new_waiting:
            waiting.clicks_end = ends[TopicPartition(self.topics["clicks"], p)]
            waiting.visitor_end = ends[TopicPartition(self.topics[VISITOR], p)]
            waiting.orders_end = orders_end

    async def _decide_orders(self, visitors: dict[int, VisitorStage], ref: Any,
                             effects: Effects) -> None:
        assert self.consumer is not None
        waiting_now = 0
        for p, state in self.partitions.items():
            if not any(state.waiting.values()):
                continue
            clicks_at = await self.consumer.position(TopicPartition(self.topics["clicks"], p))
            visitor_at = await self.consumer.position(TopicPartition(self.topics[VISITOR], p))
            for queue in state.waiting.values():
                while queue and queue[0].clicks_end <= clicks_at and queue[0].visitor_end <= visitor_at:
                    waiting = queue.popleft()
                    visitors[p].order(waiting.order, ref, effects, waiting.orders_end or None,
                                      waiting.timestamp_ms)
                waiting_now += len(queue)
        METRICS.orders_waiting_for_clicks.set(waiting_now)

    async def _progress(self, effects: Effects) -> None:
        """Tell every code partition how far this worker's orders partitions are decided."""
        assert self.consumer is not None
        for p, state in self.partitions.items():
            tp = TopicPartition(self.topics["orders"], p)
            queue = state.waiting["orders"]
            decided_below = queue[0].offset if queue else await self.consumer.position(tp)
            if decided_below != state.progress_sent:
                for q in range(self.n):
                    effects.forward(CODE, b"", progress_item(p, decided_below), partition=q)
                state.progress_sent = decided_below

    async def _make(self, effects: Effects, staged: dict[int, dict[str, Staged]]) -> None:
        """The batch's effects, in the commit order; raises (and commits nothing) on failure.

        ClickHouse rows and records to Kafka go together (neither depends on the other); the
        changelogs only after both, because state says what was done: a click the touches know
        is a click whose row is in.
        """
        assert self.producer is not None
        started = time.perf_counter()
        await asyncio.gather(self._write_rows(effects), self._send_records(effects))
        _observe_latency(effects.latency_from)
        changelogged = time.perf_counter()
        METRICS.batch_phase_seconds.labels("effects").observe(changelogged - started)

        changelog_ends: dict[tuple[str, int], asyncio.Future[Any]] = {}
        for p, stores in staged.items():
            for name, store in stores.items():
                if store.writes:
                    topic = self.config.changelog_topic(name)
                    changelog_ends[(name, p)] = asyncio.ensure_future(self._until_delivered(
                        f"changelog {topic}[{p}]",
                        functools.partial(self._changelog_once, topic, p, store.writes)))
        for (name, p), delivery in changelog_ends.items():
            next_offset = await delivery
            state = self.partitions.get(p)
            if state is not None:
                state.stores[name].write(staged[p][name].writes, next_offset)
        METRICS.batch_phase_seconds.labels("changelog").observe(time.perf_counter() - changelogged)

    async def _write_rows(self, effects: Effects) -> None:
        if effects.rows:
            for table, rows in effects.rows.items():
                for row in rows:
                    self.sink.add(table, row)
            rejected = await asyncio.to_thread(self.sink.flush)
            if rejected:
                # Rows the server refused for their data (found by bisecting the insert): the
                # rest of the batch is written; these go to dead-letters, as the row itself.
                sends = []
                for bad in rejected:
                    log.error("ClickHouse rejected a row of %s, sent to dead-letters: %s",
                              bad.table, bad.error)
                    METRICS.dead_letters.inc()
                    dead = DeadLetter(None, orjson.dumps(list(bad.row), default=str),
                                      "rejected_by_clickhouse", bad.error[:1000],
                                      f"clickhouse:{bad.table}", -1, -1)
                    sends.append(self._dead_letter_record(dead))
                await self._deliver(sends)

    def _dead_letter_record(self, dead: DeadLetter) -> tuple[str, dict[str, Any]]:
        """A dead letter as sent: `ip`/`user_agent` only as their keyed hash, and at most
        DEAD_LETTER_MAX_BYTES of the value, with the original's length and sha256 in headers
        (a 1 MB record must not make a dead letter the broker refuses: that crash-looped)."""
        value = scrub(dead.value, self._pii_key)
        headers = dead.headers()
        if len(value) > DEAD_LETTER_MAX_BYTES:
            headers += [("truncated", b"true"),
                        ("original_length", str(len(dead.value)).encode()),
                        ("original_sha256", hashlib.sha256(dead.value).hexdigest().encode())]
            value = value[:DEAD_LETTER_MAX_BYTES]
        return self.out_topics[DEAD], dict(key=dead.key, value=value, headers=headers)

    async def _send_records(self, effects: Effects) -> None:
        """Forwards (as JSON-array records per partition), dead letters, flag messages."""
        sends: list[tuple[str, dict[str, Any]]] = []
        by_partition: dict[tuple[str, int], list[tuple[bytes, bytes, int | None]]] = defaultdict(list)
        for fwd in effects.forwards:
            p = fwd.partition if fwd.partition is not None else partition_of(fwd.key, self.n)
            by_partition[(self.out_topics[fwd.topic], p)].append((fwd.key, fwd.item, fwd.timestamp_ms))
        for (topic, p), items in by_partition.items():
            sends += _array_records(topic, p, items)
        sends += [self._dead_letter_record(dead) for dead in effects.dead_letters]
        sends += [(self.out_topics[ABUSE], dict(key=key, value=value)) for key, value in effects.flags]
        await self._deliver(sends)

    async def _deliver(self, sends: list[tuple[str, dict[str, Any]]]) -> None:
        """Send every (topic, producer.send arguments), in order, and wait until the broker has
        acknowledged each. Those that fail for a transient reason (the broker down or moving a
        leader: aiokafka gives up after request_timeout_ms) are sent again until they get
        through, as a ClickHouse outage is waited out; anything else is raised (fatal). A record
        sent twice is absorbed downstream (every stage deduplicates by event or order id; a dead
        letter or flag message may then appear twice: they are at least once)."""
        assert self.producer is not None
        pending, delay = sends, _RETRY_FIRST_SECONDS
        while pending:
            futures: list[Any] = []
            for topic, kwargs in pending:
                try:
                    futures.append(await self.producer.send(topic, **kwargs))
                except KafkaError as exc:  # e.g. no metadata for the topic within the timeout
                    futures.append(_failed(exc))
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            failed = []
            for send, outcome in zip(pending, outcomes):
                if isinstance(outcome, BaseException):
                    if not _transient(outcome):
                        raise outcome
                    failed.append((send, outcome))
            if failed:
                self._waiting_for_kafka(f"{len(failed)} records", failed[0][1], delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_SECONDS)
            pending = [send for send, _ in failed]

    async def _until_delivered(self, what: str, attempt: Callable[[], Awaitable[Any]]) -> Any:
        """`attempt()` again after a transient Kafka error, until it succeeds (see `_deliver`)."""
        delay = _RETRY_FIRST_SECONDS
        while True:
            try:
                return await attempt()
            except KafkaError as exc:
                if not _transient(exc):
                    raise
                self._waiting_for_kafka(what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_SECONDS)

    def _waiting_for_kafka(self, what: str, exc: BaseException, delay: float) -> None:
        METRICS.kafka_retries.inc()
        now = time.monotonic()
        if now - self._kafka_warned >= 10:  # an outage would log every few seconds otherwise
            self._kafka_warned = now
            log.warning("Kafka did not take %s (%r); retrying in %.1f s, nothing is committed "
                        "meanwhile", what, exc, delay)

    async def _changelog_once(self, topic: str, p: int, writes: dict[bytes, bytes | None]) -> int:
        return await (await self._send_changelog(topic, p, writes))

    async def _send_changelog(self, topic: str, p: int,
                              writes: dict[bytes, bytes | None]) -> asyncio.Future[Any]:
        """Every write of one store partition; resolves to the changelog's next offset."""
        assert self.producer is not None
        deliveries = []
        batch = self.producer.create_batch()
        count = 0
        for key, value in writes.items():
            while batch.append(key=key, value=value, timestamp=None) is None:
                if count == 0:
                    raise ValueError(f"a state value of {len(value or b'')} bytes does not fit a batch")
                deliveries.append((await self.producer.send_batch(batch, topic, partition=p), count))
                batch, count = self.producer.create_batch(), 0
            count += 1
        deliveries.append((await self.producer.send_batch(batch, topic, partition=p), count))

        async def last() -> int:
            next_offset = 0
            for delivery, n in deliveries:
                metadata = await delivery
                next_offset = max(next_offset, metadata.offset + n)
            return next_offset

        return asyncio.ensure_future(last())

    def _offsets_to_commit(self, batch: dict[TopicPartition, list[Any]]) -> dict[TopicPartition, int]:
        """Where each partition may commit: past every record read, but never past a record
        still waiting (an order for its clicks, a coded order for progress). A partition whose
        last waiting record was decided in a batch without records of its own commits too."""
        for tp, records in batch.items():
            if records and tp.partition in self.partitions:
                self._read_up_to[tp] = records[-1].offset + 1
        offsets = {tp: o for tp, o in self._read_up_to.items() if tp.partition in self.partitions}
        for p, state in self.partitions.items():
            for kind, queue in (("orders", state.waiting["orders"]), (VISITOR, state.waiting["visitor"])):
                if queue:
                    tp = TopicPartition(self.topics[kind], p)
                    offsets[tp] = min(offsets.get(tp, queue[0].offset), queue[0].offset)
            first = state.code_stage.first_waiting_offset()
            if first is not None:
                tp = TopicPartition(self.topics[CODE], p)
                offsets[tp] = min(offsets.get(tp, first), first)
        return offsets

    async def _commit(self, offsets: dict[TopicPartition, int], *, now: bool = False) -> None:
        """Commit `offsets` (a batch's, all of its effects made), or keep them for the next
        commit when the last one was less than COMMIT_INTERVAL_SECONDS ago. A rebalance and a
        graceful stop commit what is kept (`now`)."""
        assert self.consumer is not None
        self._to_commit.update(offsets)
        if not now and time.monotonic() - self._last_commit < COMMIT_INTERVAL_SECONDS:
            return
        offsets, self._to_commit = self._to_commit, {}
        self._last_commit = time.monotonic()
        offsets = {tp: o for tp, o in offsets.items()
                   if self._committed.get(tp) != o and tp.partition in self.partitions}
        if offsets:
            try:
                await self.consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError) as exc:
                # The group moved on (a rebalance): the partitions' owners read the batch again;
                # its effects are idempotent.
                log.warning("offsets not committed, the group is rebalancing: %r", exc)
                return
            except KafkaError as exc:
                if not _transient(exc):
                    raise
                # The broker or the group coordinator is away: commit these next time.
                self._to_commit = {**offsets, **self._to_commit}
                self._waiting_for_kafka("the offset commit", exc, 0)
                return
            self._committed.update(offsets)

    def _flow_control(self) -> None:
        """Pause an orders partition while too many of its orders wait (memory), resume after."""
        assert self.consumer is not None
        for p, state in self.partitions.items():
            tp = TopicPartition(self.topics["orders"], p)
            count = len(state.waiting["orders"])
            if count >= MAX_WAITING_ORDERS and tp not in self._paused:
                self.consumer.pause(tp)
                self._paused.add(tp)
            elif count < MAX_WAITING_ORDERS // 2 and tp in self._paused:
                self.consumer.resume(tp)
                self._paused.discard(tp)


#: The most of a rejected value a dead letter keeps (an event is at most 64 KiB: every valid-size
#: element is kept whole); a longer one keeps this prefix with its length and sha256.
DEAD_LETTER_MAX_BYTES = 64 * 1024

#: A send or offset read the broker could not serve is tried again after this, doubling up to
#: the maximum: an outage is waited out, never a reason to exit.
_RETRY_FIRST_SECONDS = 0.5
_RETRY_MAX_SECONDS = 10.0


def _transient(exc: BaseException) -> bool:
    """A Kafka error that waiting cures: the broker down, restarting or moving leaders. aiokafka
    marks those retriable; its timeout (a request or a batch that expired waiting for a broker)
    is not marked but is one too."""
    return isinstance(exc, KafkaError) and (exc.retriable or isinstance(exc, KafkaTimeoutError))


def _failed(exc: BaseException) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


def _array_records(topic: str, p: int, items: list[tuple[bytes, bytes, int | None]]
                   ) -> list[tuple[str, dict[str, Any]]]:
    """Items for one partition as JSON-array records of at most ~900 KB each."""
    records = []
    chunk: list[bytes] = []
    size = 0
    first_key = items[0][0]
    timestamp = max((t for _, _, t in items if t is not None), default=None)
    for key, item, _ in items:
        if chunk and size + len(item) > 900_000:
            records.append((topic, dict(key=first_key or None, value=b"[" + b",".join(chunk) + b"]",
                                        partition=p, timestamp_ms=timestamp)))
            chunk, size, first_key = [], 0, key
        chunk.append(item)
        size += len(item) + 1
    records.append((topic, dict(key=first_key or None, value=b"[" + b",".join(chunk) + b"]",
                                partition=p, timestamp_ms=timestamp)))
    return records


#: What a malformed internal item raises while a stage parses it: missing keys, wrong types,
#: bad numbers or dates. It goes to dead-letters (`malformed_internal`).
_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError, InvalidOperation,
              OverflowError)
#: The fields of every kind of event a hop carries (and of a forget item): anything else, which
#: validation ignored, is left behind.
_EVENT_FIELDS = frozenset(
    f.name for cls in (Click, Share, Order, Refund, Review) for f in dataclasses.fields(cls)
) | {"type", "visitor_id", "ts"}

#: Latency samples per table and batch: evenly spread over the batch, enough for quantiles.
LATENCY_SAMPLES = 100


def _ledger_item_id(item: dict[str, Any]) -> tuple[str, str]:
    """What identifies a `ledger-events` item: a decision by its order, a refund or review by
    its event."""
    if item.get("type") == "decided_order":
        return ("decided_order", str(item.get("order_id")))
    return (str(item.get("type")), str(item.get("event_id")))


def _observe_latency(record_times: dict[str, list[float]]) -> None:
    now = time.time()
    for table, times in record_times.items():
        histogram = METRICS.end_to_end_latency.labels(table)
        for record_time in times[::max(1, len(times) // LATENCY_SAMPLES)]:
            histogram.observe(max(0.0, now - record_time))


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.engine.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.engine.assigned(set(assigned))
