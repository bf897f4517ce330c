"""Stage 2b: code velocity, keyed by the normalised discount code.

Reads `code-events`: the join stage's decided orders that used a discount code (any code, whoever
it attributed the order to: velocity counts every customer who used the code). Contract §6 counts
the distinct customers among *all* orders with the code whose ts lies in (O.ts - window, O.ts],
but one code's orders come from many visitor partitions, so they reach this stage in an order
that depends on how partitions were fetched, not on their ts. So before deciding a batch:

1. the order barrier waits until every order published before the batch has been decided by the
   join stage and forwarded here (`streams.barrier`);
2. the uses that are already in `code-events` beyond the batch are read ahead with a group-less
   consumer (each record once: they are cached until the stage reaches them);
3. each order is checked against every known use of its code: the stored ones (the
   `code-redemptions` table), the batch's and the read-ahead ones.

For orders published in ts order this is exactly the contract's window, whatever the lag and
whatever order partitions are read in; an order published later than others with a greater ts
(a late event) still counts for every order decided after it reached this stage.

Adds `code_velocity` when due (re-deriving the accrual's status) and forwards every order, flagged
or not, to `ledger-events` keyed by order_id. Writes nothing to ClickHouse: its output is the
forward, which Faust flushes before it commits; the ledger keeps the first decision per order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.types import EventT, TableT

from schemas.facts import CodeRedemptions
from schemas.internal import DecidedOrder
from schemas.reference import ReferenceData, normalise_code

from .barrier import ForwardBarrier
from .context import in_partition
from .offsets import check_fence
from .forwarding import Forwarder, Record
from .rules.abuse import MAX_REDEMPTIONS_PER_CODE, velocity_flag, velocity_horizon, with_flags

#: Uses are kept this long beyond the longest velocity window (measured back from the oldest
#: order already read ahead, else the code's newest use), so that an order arriving up to this
#: late still sees the uses around its own ts.
LATE_ORDER_ALLOWANCE = timedelta(hours=6)

#: A stored use: [order ts (epoch seconds), customer_id].
StoredUse = list[Any]
Use = tuple[datetime, str]


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc)


@dataclass
class CodeState:
    code: str
    uses: list[StoredUse]
    partition: int
    dirty: bool = False

    def known(self) -> set[Use]:
        return {(_ts(ts), customer) for ts, customer in self.uses}

    def add(self, ts: datetime, customer_id: str) -> None:
        """Record one use; a use already recorded (same ts and customer) changes nothing."""
        use = [ts.timestamp(), customer_id]
        if use not in self.uses:
            self.uses.append(use)
            self.dirty = True

    def forget_before(self, cutoff: datetime) -> None:
        """Drop uses at or before `cutoff`, and all but the newest MAX_REDEMPTIONS_PER_CODE."""
        kept = sorted(u for u in self.uses if _ts(u[0]) > cutoff)[-MAX_REDEMPTIONS_PER_CODE:]
        if len(kept) != len(self.uses):
            self.uses = kept
            self.dirty = True


@dataclass
class LookAhead:
    """Reads `code-events` ahead of the stage, once per record, and remembers the uses it saw."""

    bootstrap: str
    topic: str
    _consumer: AIOKafkaConsumer | None = None
    _read_until: dict[int, int] = field(default_factory=dict)  # partition -> next offset to read
    _uses: dict[int, list[tuple[int, str, Use]]] = field(default_factory=lambda: defaultdict(list))

    async def uses(self, ranges: dict[int, tuple[int, int]]) -> dict[str, set[Use]]:
        """Uses per code in `code-events` [start, end) of each partition: {partition: (start, end)}."""
        wanted: dict[TopicPartition, int] = {}
        for partition, (start, end) in ranges.items():
            cached = self._uses[partition]
            self._uses[partition] = [u for u in cached if u[0] >= start]  # the stage is past the rest
            first = max(start, self._read_until.get(partition, 0))
            if first < end:
                wanted[TopicPartition(self.topic, partition)] = first
        if wanted:
            await self._read(wanted, {TopicPartition(self.topic, p): r[1] for p, r in ranges.items()})
        found: dict[str, set[Use]] = defaultdict(set)
        for partition, (start, end) in ranges.items():
            for offset, code, use in self._uses[partition]:
                if start <= offset < end:
                    found[code].add(use)
        return found

    async def _read(self, starts: dict[TopicPartition, int], ends: dict[TopicPartition, int]) -> None:
        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                client_id="attribution-code-lookahead",
            )
            await self._consumer.start()
        consumer = self._consumer
        consumer.assign(list(starts))
        for tp, offset in starts.items():
            consumer.seek(tp, offset)
        remaining = set(starts)
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        break
                    obj = orjson.loads(record.value or b"{}")
                    use = (datetime.fromisoformat(obj["ts"]), obj["customer_id"])
                    self._uses[tp.partition].append(
                        (record.offset, normalise_code(obj["discount_code"]), use)
                    )
            for tp in list(remaining):
                position = await consumer.position(tp)
                self._read_until[tp.partition] = min(position, ends[tp])
                if position >= ends[tp]:
                    remaining.discard(tp)

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()


@dataclass
class CodeStage:
    topic_name: str
    table: TableT
    forwarder: Forwarder
    ledger_events: str
    reference: Callable[[], ReferenceData]
    barrier: ForwardBarrier
    look_ahead: LookAhead

    async def process(self, events: Sequence[EventT]) -> None:
        ref = self.reference()
        window = velocity_horizon(ref)
        horizon = window + LATE_ORDER_ALLOWANCE
        codes: dict[str, CodeState] = {}

        def state_of(code: str, partition: int) -> CodeState:
            state = codes.get(code)
            if state is None:
                with in_partition(self.topic_name, partition):
                    stored = self.table.get(code.encode())
                state = CodeState(code, orjson.loads(stored) if stored else [], partition)
                codes[code] = state
            return state

        batch: list[tuple[Any, DecidedOrder, CodeState]] = []
        after_batch: dict[int, int] = {}
        for event in events:
            message = event.message
            decided = DecidedOrder.from_dict(orjson.loads(message.value or b"{}"))
            state = state_of(normalise_code(decided.discount_code), message.partition)
            batch.append((message, decided, state))
            after_batch[message.partition] = max(after_batch.get(message.partition, 0),
                                                 message.offset + 1)

        await self.barrier.wait()  # every order published before the batch is in code-events now
        ends = await self.barrier.end_offsets(
            [TopicPartition(self.topic_name, p) for p in after_batch]
        )
        ahead = await self.look_ahead.uses(
            {p: (start, ends[TopicPartition(self.topic_name, p)]) for p, start in after_batch.items()}
        )

        for _, decided, state in batch:
            state.add(decided.ts, decided.customer_id)
        # Every known use per code, built once per batch, not once per order of a busy code.
        every_use = {
            code: CodeRedemptions(code, tuple(sorted(state.known() | ahead.get(code, set()))))
            for code, state in codes.items()
        }
        decisions = []
        for message, decided, state in batch:
            flag = velocity_flag(decided, every_use[state.code], ref)
            if flag is not None:
                decided = with_flags(decided, [flag])
            decisions.append(Record(decided.order_id.encode(), decided.to_json(), message.timestamp))
        await self.forwarder.send(self.ledger_events, decisions)

        check_fence()  # a rebalance since the batch began: another worker may own these keys now
        for code, state in codes.items():
            # Keep what an order still to come may count: orders published after this batch have
            # later ts (late ones get LATE_ORDER_ALLOWANCE), those already read ahead may be older.
            waiting = [ts for ts, _ in ahead.get(code, ())]
            oldest = min(waiting, default=max((_ts(u[0]) for u in state.uses), default=None))
            if oldest is not None:
                state.forget_before(oldest - horizon)
            if state.dirty:
                with in_partition(self.topic_name, state.partition):
                    self.table[code.encode()] = orjson.dumps(state.uses)
