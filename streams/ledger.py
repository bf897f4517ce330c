"""Stage 3: the commission ledger, keyed by order_id.

Reads `ledger-events`: decided orders from the join and code stages, valid refunds and reviews
from the ingest stage. Per order, the `order_ledgers` table remembers whether the order was
decided (the first decision wins; later ones are duplicates or replays), its `OrderLedger`, the
refunds and reviews applied, and refunds or reviews that arrived before their order (they wait in
the entry and are applied, in event-time order, when it comes).

Each newly recorded order's flags are also published to `abuse-flags` (keyed by order_id) for
alerting systems: after its rows are in ClickHouse, before the batch's offsets are committed, so a
crash can publish a flag twice (at least once; consumers dedupe by order_id + reason).

Approvals: the stage's event time (the largest `ts` it has processed, across its partitions) is
compared with each pending order's lock end after every batch. An in-memory index of pending
orders is rebuilt from the table whenever the stage sees a partition it has not indexed yet.

Every batch writes its rows to ClickHouse *before* the table is updated; a crash in between
replays the batch, which rewrites the same rows (same ids) and then updates the table.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import orjson
from faust.types import EventT, TableT, TopicT


from schemas.events import Refund, Review
from schemas.facts import CommissionFact, OrderLedger
from schemas.internal import DECIDED_ORDER_TYPE, DecidedOrder
from schemas.validation import decode_event, decode_review
from sinks.clickhouse import RowSink
from sinks.metrics import METRICS
from sinks.rows import fact_row, flag_message, flag_rows, order_row, review_row

from .context import in_partition
from .offsets import check_fence
from .rules.ledger import apply_refund, apply_review, approve_if_due

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """One order's stored state (JSON in the table)."""

    partition: int
    decided: bool = False
    channel: str = ""
    ledger: OrderLedger | None = None
    refunds: list[str] = field(default_factory=list)  # event_ids of refunds and reviews applied
    waiting: list[str] = field(default_factory=list)  # raw refunds/reviews waiting for the order
    dirty: bool = False

    @classmethod
    def load(cls, raw: bytes | None, partition: int) -> "Entry":
        if not raw:
            return cls(partition)
        obj = orjson.loads(raw)
        return cls(
            partition=obj.get("partition", partition),
            decided=obj["decided"],
            channel=obj["channel"],
            ledger=OrderLedger.from_dict(obj["ledger"]) if obj["ledger"] else None,
            refunds=obj["refunds"],
            waiting=obj["waiting"],
        )

    def dump(self) -> bytes:
        return orjson.dumps(
            {
                "partition": self.partition,
                "decided": self.decided,
                "channel": self.channel,
                "ledger": self.ledger.to_dict() if self.ledger else None,
                "refunds": self.refunds,
                "waiting": self.waiting,
            }
        )

    def awaits_approval(self) -> bool:
        return self.ledger is not None and self.ledger.status == "pending" and not self.ledger.approved


def _decode_waiting(raw: str) -> Refund | Review:
    data = raw.encode()
    if orjson.loads(data).get("type") == "review":
        return decode_review(data)
    refund = decode_event(data, "refund")
    assert isinstance(refund, Refund)
    return refund


@dataclass
class LedgerStage:
    topic_name: str
    table: TableT
    sink: RowSink
    abuse_flags: TopicT | None = None
    _flush: Callable[[RowSink], Any] = field(default=lambda sink: sink.flush())
    #: The partitions of the stage's topic this worker owns now (None: do not track).
    assigned: Callable[[], set[int]] | None = None
    _flag_messages: list[tuple[bytes, bytes]] = field(default_factory=list)
    watermark: datetime = datetime.min.replace(tzinfo=timezone.utc)
    _due: list[tuple[datetime, str, int]] = field(default_factory=list)  # (lock_end, order, partition)
    _indexed_partitions: set[int] = field(default_factory=set)

    async def process(self, events: Sequence[EventT]) -> None:
        entries: dict[str, Entry] = {}
        self._flag_messages.clear()  # left over only by a batch a rebalance dropped
        if self.assigned is not None:
            # A partition that left this worker may come back with orders another worker
            # recorded meanwhile: index it again then.
            self._indexed_partitions &= self.assigned()
        self._index_new_partitions({e.message.partition for e in events})

        def entry_of(order_id: str, partition: int) -> Entry:
            entry = entries.get(order_id)
            if entry is None:
                with in_partition(self.topic_name, partition):
                    entry = Entry.load(self.table.get(order_id.encode()), partition)
                entries[order_id] = entry
            return entry

        for event in events:
            message = event.message
            raw: bytes = message.value or b""
            obj = orjson.loads(raw)
            kind = obj.get("type")
            if kind == DECIDED_ORDER_TYPE:
                order = DecidedOrder.from_dict(obj)
                self.watermark = max(self.watermark, order.ts)
                self._record_order(order, entry_of(order.order_id, message.partition))
            elif kind == "review":
                # A reviewer's decision is not pipeline event time: it does not move the watermark.
                review = decode_review(raw)
                self._record_later(review, raw, entry_of(review.order_id, message.partition))
            else:
                refund = decode_event(raw, "refund")
                assert isinstance(refund, Refund)
                self.watermark = max(self.watermark, refund.ts)
                self._record_later(refund, raw, entry_of(refund.order_id, message.partition))

        self._approve_due(entry_of)
        await self._flush(self.sink)
        check_fence()
        if self.abuse_flags is not None:
            for key, value in self._flag_messages:
                await self.abuse_flags.send(
                    key=key, value=value, key_serializer="raw", value_serializer="raw"
                )
        self._flag_messages.clear()
        check_fence()
        for order_id, entry in entries.items():
            if entry.dirty:
                with in_partition(self.topic_name, entry.partition):
                    self.table[order_id.encode()] = entry.dump()

    def _record_order(self, order: DecidedOrder, entry: Entry) -> None:
        if entry.decided:
            METRICS.events_duplicate.labels("orders").inc()
            return
        entry.decided = True
        entry.dirty = True
        entry.channel = order.channel
        entry.ledger = order.ledger
        self.sink.add("attributed_orders", order_row(order))
        METRICS.orders_attributed.labels(order.method).inc()
        for row in flag_rows(order):
            self.sink.add("abuse_flags", row)
        for flag in order.flags:
            METRICS.abuse_flags.labels(flag.reason).inc()
            self._flag_messages.append((order.order_id.encode(), flag_message(order, flag)))
        if order.accrual is not None:
            self._write_fact(order.accrual, entry)
        if entry.awaits_approval():
            assert entry.ledger is not None
            heapq.heappush(self._due, (entry.ledger.lock_end, order.order_id, entry.partition))
        waiting = sorted(
            (_decode_waiting(raw) for raw in entry.waiting), key=lambda r: (r.ts, r.event_id)
        )
        entry.waiting = []
        for later in waiting:
            self._apply_later(later, entry)

    def _record_later(self, later: Refund | Review, raw: bytes, entry: Entry) -> None:
        """A refund or review: applied now, or kept until its order is decided."""
        waiting_ids = {orjson.loads(w)["event_id"] for w in entry.waiting}
        if later.event_id in entry.refunds or later.event_id in waiting_ids:
            METRICS.events_duplicate.labels("reviews" if isinstance(later, Review) else "refunds").inc()
            return
        entry.dirty = True
        if not entry.decided:
            entry.waiting.append(raw.decode())
            return
        self._apply_later(later, entry)

    def _apply_later(self, later: Refund | Review, entry: Entry) -> None:
        if isinstance(later, Review):
            self._apply_review(later, entry)
        else:
            self._apply_refund(later, entry)

    def _apply_review(self, review: Review, entry: Entry) -> None:
        entry.refunds.append(review.event_id)
        if entry.ledger is None:
            self.sink.add("reviews", review_row(review, "", "ignored: order is unattributed"))
            return
        entry.ledger, fact, outcome = apply_review(entry.ledger, review)
        self.sink.add("reviews", review_row(review, entry.ledger.affiliate_id, outcome))
        METRICS.reviews.labels(outcome.split(":")[0]).inc()
        if fact is not None:
            self._write_fact(fact, entry)
        if entry.awaits_approval():  # released: approved at its lock end like any pending order
            heapq.heappush(self._due, (entry.ledger.lock_end, review.order_id, entry.partition))

    def _apply_refund(self, refund: Refund, entry: Entry) -> None:
        entry.refunds.append(refund.event_id)
        if entry.ledger is None:
            return  # unattributed order: nothing to reverse
        entry.ledger, fact = apply_refund(entry.ledger, refund)
        if fact is not None:
            self._write_fact(fact, entry)

    def _approve_due(self, entry_of: Callable[[str, int], Entry]) -> None:
        while self._due and self._due[0][0] <= self.watermark:
            _, order_id, partition = heapq.heappop(self._due)
            entry = entry_of(order_id, partition)
            if entry.ledger is None or not entry.awaits_approval():
                continue
            entry.ledger, fact = approve_if_due(entry.ledger, self.watermark)
            if fact is not None:
                entry.dirty = True
                self._write_fact(fact, entry)

    def _write_fact(self, fact: CommissionFact, entry: Entry) -> None:
        assert entry.ledger is not None
        self.sink.add("commission_facts", fact_row(fact, entry.channel, entry.ledger.order_ts))
        METRICS.facts_written.labels(fact.kind).inc()

    def _index_new_partitions(self, partitions: set[int]) -> None:
        """Put the pending orders of newly seen partitions (after a start or rebalance) on the index."""
        new = partitions - self._indexed_partitions
        if not new:
            return
        # items() walks every local partition; entries carry their own partition number.
        # An order queued twice is harmless: the second pop finds it approved already.
        for key, raw in self.table.items():
            entry = Entry.load(raw, -1)
            if entry.partition in new and entry.awaits_approval():
                assert entry.ledger is not None
                heapq.heappush(self._due, (entry.ledger.lock_end, key.decode(), entry.partition))
        self._indexed_partitions |= new
        log.info("ledger: indexed pending approvals of partitions %s", sorted(new))
