"""The three stages of the hot path as plain objects over plain state: no Kafka, no ClickHouse.

- `VisitorStage` (per partition of `clicks`/`orders`/`visitor-events`, keyed by visitor):
  remembers clicks as touches and decides orders against them (contract §4-§6).
- `CodeStage` (per partition of `code-events`, keyed by normalised code): code velocity needs
  every use of a code, from every visitor partition. It decides an order once every orders
  partition has reported (in-band, by a *progress* item) that it decided everything published
  before that order; until then later uses are read ahead and counted.
- `LedgerStage` (per partition of `ledger-events`/`refunds`/`reviews`, keyed by order): the
  commission ledger, first decision per order wins; approvals by the worker's event time.

Each takes a batch's inputs, reads its store through `Staged`, and writes what is to be done into
an `Effects`: rows, forwards, flag messages. The runner makes the effects, then the state, then
commits. Every stage is idempotent under a replay of its inputs (after a crash, the state may
already hold a replayed batch's writes).
"""

from __future__ import annotations

import hashlib
import heapq
from bisect import bisect_left, bisect_right, insort
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

import orjson

from schemas.events import Click, Order, Refund, Review
from schemas.facts import CommissionFact, OrderLedger, Touch
from schemas.internal import DECIDED_ORDER_TYPE, DecidedOrder
from schemas.reference import ReferenceData, normalise_code
from schemas.validation import decode_event, decode_review, review_to_json
from sinks.rows import click_row, fact_row, flag_message, flag_rows, order_row, review_row

from ..rules.abuse import (
    MAX_REDEMPTIONS_PER_CODE,
    coupon_site_seen,
    flags_for_order,
    velocity_horizon,
    velocity_limit,
    velocity_over_limit,
    with_flags,
)
from ..rules.attribution import attribute, latest_touch, remember_touch, touch_from_click
from ..rules.commission import commission_for
from ..rules.ledger import apply_refund, apply_review, approve_if_due, open_ledger, review_refusal
from .effects import CODE, LEDGER, DeadLetter, Effects
from .state import Staged

#: The item type of an orders partition's progress report on `code-events`.
PROGRESS_TYPE = "orders_progress"
#: Where a code partition keeps the progress it has seen (no code is empty or starts with NUL).
PROGRESS_KEY = b"\x00progress"
#: Uses are kept this long beyond the longest velocity window (measured back from the oldest
#: order still waiting, else the code's newest use): an order arriving up to this late still
#: sees the uses around its own ts.
LATE_ORDER_ALLOWANCE = timedelta(hours=6)

_EPOCH_MIN = datetime.min.replace(tzinfo=timezone.utc)


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc)


# --- visitors ------------------------------------------------------------------------------


def _to_touch(stored: list[Any]) -> Touch:
    """A stored touch: [event_id, ts (epoch s), affiliate_id, channel, referrer_host, _, paid_click_id]."""
    return Touch(stored[0], _ts(stored[1]), stored[2], stored[3], stored[4],
                 stored[6] if len(stored) > 6 else "")


def _stored(touch: Touch) -> list[Any]:
    return [touch.event_id, touch.ts.timestamp(), touch.affiliate_id, touch.channel,
            touch.referrer_host, 0, touch.paid_click_id]


def decide_order(order: Order, touches: tuple[Touch, ...], ref: ReferenceData) -> DecidedOrder:
    """Contract §4-§6 for one order, against its visitor's touches (code velocity comes later)."""
    attribution = attribute(order, touches, ref)
    affiliate = ref.affiliates.get(attribution.affiliate_id) if attribution.affiliate_id else None
    program = ref.program_of(affiliate) if affiliate else None
    ledger = accrual = None
    flags: tuple = ()
    latest = latest_touch(touches, order.ts)
    if affiliate is not None and program is not None and attribution.method != "none":
        flags = flags_for_order(order, attribution, affiliate, latest, ref)
        commission = commission_for(order, affiliate, program)
        ledger, accrual = open_ledger(order, attribution, program, commission, flags)
    click = attribution.click
    return DecidedOrder(
        order_id=order.order_id,
        ts=order.ts,
        visitor_id=order.visitor_id,
        customer_id=order.customer_id,
        affiliate_id=attribution.affiliate_id if ledger else "",
        program_id=program.program_id if (program and ledger) else "",
        method=attribution.method if ledger else "none",
        click_event_id=click.event_id if (click and ledger) else "",
        click_ts=click.ts if (click and ledger) else None,
        channel=click.channel if (click and ledger) else "",
        discount_code=order.discount_code,
        total=order.total,
        currency=order.currency,
        flags=flags,
        ledger=ledger,
        accrual=accrual,
        coupon_site=coupon_site_seen(order, latest, ref.settings.coupon_sites)
        if order.discount_code else "",
        discount_amount=order.discount_amount,
    )


class VisitorStage:
    """One partition's visitors: their touches, and the orders decided against them."""

    def __init__(self, store: Staged, horizon: timedelta) -> None:
        self.store = store
        self.horizon = horizon  # `touch_horizon` of the batch's reference data
        self._touches: dict[bytes, tuple[Touch, ...]] = {}
        self._dirty: set[bytes] = set()

    def touches_of(self, visitor_id: str) -> tuple[Touch, ...]:
        key = visitor_id.encode()
        touches = self._touches.get(key)
        if touches is None:
            stored = self.store.get(key)
            touches = tuple(_to_touch(t) for t in orjson.loads(stored)) if stored else ()
            self._touches[key] = touches
        return touches

    def click(self, click: Click, ref: ReferenceData, effects: Effects) -> bool:
        """Remember a click; False when it is a duplicate already remembered."""
        touches = self.touches_of(click.visitor_id)
        if any(t.event_id == click.event_id for t in touches):
            return False
        touch = touch_from_click(click)
        self._touches[click.visitor_id.encode()] = remember_touch(touches, touch, self.horizon)
        self._dirty.add(click.visitor_id.encode())
        effects.row("clicks", click_row(click, touch.referrer_host))
        return True

    def order(self, order: Order, ref: ReferenceData, effects: Effects,
              orders_end: dict[int, int] | None, timestamp_ms: int | None) -> DecidedOrder:
        """Decide an order and forward it: to the code stage when it has a code, else the ledger.

        `orders_end`: the end offset of every `orders` partition when this order was read (the
        code stage waits for all of them to be decided before it counts the code's uses).
        """
        decided = decide_order(order, self.touches_of(order.visitor_id), ref)
        code = normalise_code(order.discount_code)
        if code:
            item = decided.to_json()
            if orders_end is not None:
                obj = orjson.loads(item)
                obj["orders_end"] = {str(p): end for p, end in orders_end.items()}
                item = orjson.dumps(obj)
            effects.forward(CODE, code.encode(), item, timestamp_ms)
        else:
            effects.forward(LEDGER, order.order_id.encode(), decided.to_json(), timestamp_ms)
        return decided

    def forget(self, visitor_id: str) -> None:
        """Erase a visitor's touches (`attribution forget`): later orders see no click of theirs."""
        key = visitor_id.encode()
        self._touches[key] = ()
        self._dirty.add(key)

    def finish(self) -> None:
        """Stage the touches of every visitor this batch changed (a forgotten one is deleted)."""
        for key in self._dirty:
            touches = self._touches[key]
            self.store.put(key, orjson.dumps([_stored(t) for t in touches]) if touches else None)
        self._dirty.clear()


# --- codes ---------------------------------------------------------------------------------


@dataclass
class WaitingOrder:
    """A coded order read from `code-events`, not decided yet."""

    offset: int
    decided: DecidedOrder
    code: str
    orders_end: dict[int, int]
    timestamp_ms: int | None


#: A use of a code: (order ts as epoch seconds, customer token).
Use = tuple[float, str]
_TOKEN_PREFIX = "h:"


def customer_token(customer_id: str, key: bytes = b"") -> str:
    """What the code stage keeps of a customer: a 96-bit keyed hash (BLAKE2b, keyed with
    PII_KEY when set). Code velocity only counts distinct customers, so the state never needs
    the id itself, and `attribution forget` has nothing to erase there."""
    if customer_id.startswith(_TOKEN_PREFIX):
        return customer_id  # stored before, already a token
    digest = hashlib.blake2b(customer_id.encode(), digest_size=12, key=key[:64]).hexdigest()
    return _TOKEN_PREFIX + digest
#: Codes whose stored uses a code stage keeps in memory between batches, at most.
MAX_CACHED_CODES = 20_000


class CodeStage:
    """One partition of codes: uses per code, and the orders waiting for the others' progress.

    Per code it keeps, sorted by time, the stored uses and the uses of orders still waiting (read
    ahead): deciding an order looks only at the uses inside the longest velocity window before
    it, so a hot code with thousands of waiting orders costs a binary search per order, not a
    scan of everything waiting.
    """

    def __init__(self, store: Staged, token_key: bytes = b"") -> None:
        self.store = store
        self.token_key = token_key
        stored = store.get(PROGRESS_KEY)
        #: Per orders partition: every order below this offset has been decided (and forwarded).
        self.progress: dict[int, int] = (
            {int(p): o for p, o in orjson.loads(stored).items()} if stored else {}
        )
        self.waiting: deque[WaitingOrder] = deque()
        self._uses: dict[str, list[Use]] = {}  # stored uses per code, sorted (a cache of the store)
        self._ahead: dict[str, list[Use]] = {}  # uses of waiting orders per code, sorted
        self._dirty: set[str] = set()
        self._progress_dirty = False

    def begin_batch(self, store: Staged) -> None:
        """A new batch reads and writes through `store` (the same store, new staged writes)."""
        self.store = store
        if len(self._uses) > MAX_CACHED_CODES:
            self._uses.clear()

    def receive(self, item: dict[str, Any], offset: int, timestamp_ms: int | None) -> None:
        if item.get("type") == PROGRESS_TYPE:
            partition, decided_below = int(item["partition"]), int(item["decided_below"])
            if decided_below > self.progress.get(partition, 0):
                self.progress[partition] = decided_below
                self._progress_dirty = True
            return
        decided = DecidedOrder.from_dict(item)
        orders_end = {int(p): int(e) for p, e in (item.get("orders_end") or {}).items()}
        code = normalise_code(decided.discount_code)
        self.waiting.append(WaitingOrder(offset, decided, code, orders_end, timestamp_ms))
        insort(self._ahead.setdefault(code, []),
               (decided.ts.timestamp(), customer_token(decided.customer_id, self.token_key)))

    def first_waiting_offset(self) -> int | None:
        return self.waiting[0].offset if self.waiting else None

    def _ready(self, order: WaitingOrder) -> bool:
        return all(self.progress.get(p, 0) >= end for p, end in order.orders_end.items())

    def uses_of(self, code: str) -> list[Use]:
        uses = self._uses.get(code)
        if uses is None:
            stored = self.store.get(code.encode())
            uses = sorted((float(t), customer_token(str(c), self.token_key))
                          for t, c in orjson.loads(stored)) if stored else []
            self._uses[code] = uses
        return uses

    def decide_ready(self, ref: ReferenceData, effects: Effects) -> int:
        """Decide the waiting orders whose earlier orders are all in; returns how many."""
        decided = 0
        while self.waiting and self._ready(self.waiting[0]):
            order = self.waiting.popleft()
            use = (order.decided.ts.timestamp(),
                   customer_token(order.decided.customer_id, self.token_key))
            ahead = self._ahead[order.code]
            del ahead[bisect_left(ahead, use)]
            if not ahead:
                del self._ahead[order.code]
            uses = self.uses_of(order.code)
            at = bisect_left(uses, use)
            if at == len(uses) or uses[at] != use:
                uses.insert(at, use)
                self._dirty.add(order.code)
            velocity = velocity_limit(order.decided, ref)
            flag = None
            if velocity is not None:
                # Distinct customers among every known use in (O.ts - window, O.ts]: stored,
                # and read ahead (orders still waiting behind this one).
                low, high = (use[0] - velocity.window_minutes * 60, "\U0010ffff"), (use[0], "\U0010ffff")
                customers = {c for _, c in uses[bisect_right(uses, low):bisect_right(uses, high)]}
                if ahead:
                    customers.update(c for _, c in ahead[bisect_right(ahead, low):bisect_right(ahead, high)])
                flag = velocity_over_limit(len(customers), velocity)
            result = with_flags(order.decided, [flag]) if flag is not None else order.decided
            effects.forward(LEDGER, result.order_id.encode(), result.to_json(), order.timestamp_ms)
            decided += 1
        return decided

    def finish(self, ref: ReferenceData) -> None:
        """Forget uses no order to come can count, and stage what changed."""
        horizon = (velocity_horizon(ref) + LATE_ORDER_ALLOWANCE).total_seconds()
        for code in self._dirty:
            uses = self._uses[code]
            ahead = self._ahead.get(code)
            oldest = ahead[0][0] if ahead else (uses[-1][0] if uses else None)
            if oldest is not None:
                kept = uses[bisect_right(uses, (oldest - horizon, "\U0010ffff")):]
                uses[:] = kept[-MAX_REDEMPTIONS_PER_CODE:]
            self.store.put(code.encode(), orjson.dumps([list(u) for u in uses]))
        self._dirty.clear()
        if self._progress_dirty:
            self.store.put(PROGRESS_KEY, orjson.dumps({str(p): o for p, o in self.progress.items()}))
            self._progress_dirty = False


def progress_item(partition: int, decided_below: int) -> bytes:
    return orjson.dumps({"type": PROGRESS_TYPE, "partition": partition, "decided_below": decided_below})


# --- the commission ledger -----------------------------------------------------------------


@dataclass
class Entry:
    """One order's stored state (JSON in the store)."""

    decided: bool = False
    channel: str = ""
    currency: str = ""  # the order's, once decided: a refund in another is refused
    ledger: OrderLedger | None = None
    refunds: list[str] = field(default_factory=list)  # event_ids of refunds and reviews applied
    waiting: list[str] = field(default_factory=list)  # raw refunds/reviews waiting for the order

    @classmethod
    def load(cls, raw: bytes | None) -> "Entry":
        if not raw:
            return cls()
        obj = orjson.loads(raw)
        ledger = OrderLedger.from_dict(obj["ledger"]) if obj["ledger"] else None
        return cls(
            decided=obj["decided"],
            channel=obj["channel"],
            currency=obj.get("currency", ledger.currency if ledger else ""),
            ledger=ledger,
            refunds=obj["refunds"],
            waiting=obj["waiting"],
        )

    def dump(self) -> bytes:
        return orjson.dumps({
            "decided": self.decided,
            "channel": self.channel,
            "currency": self.currency,
            "ledger": self.ledger.to_dict() if self.ledger else None,
            "refunds": self.refunds,
            "waiting": self.waiting,
        })

    def awaits_approval(self) -> bool:
        return self.ledger is not None and self.ledger.status == "pending" and not self.ledger.approved


#: Refunds and reviews one order may have (applied or waiting for it). Ids are at most 256
#: characters and a waiting item is stored compact (`_compact`), so an order's entry stays far
#: below a changelog record's 1 MB; what comes beyond goes to dead-letters (`order_state_full`).
MAX_LATER_PER_ORDER = 500


def _compact(later: Refund | Review) -> bytes:
    """What a refund or review waiting for its order keeps: the fields the ledger uses."""
    if isinstance(later, Review):
        return review_to_json(later)
    return orjson.dumps({"type": "refund", "event_id": later.event_id,
                         "ts": later.ts.isoformat(), "order_id": later.order_id,
                         "amount": str(later.amount), "currency": later.currency})


def _decode_later(raw: bytes) -> Refund | Review:
    if orjson.loads(raw).get("type") == "review":
        return decode_review(raw)
    refund = decode_event(raw, "refund")
    assert isinstance(refund, Refund)
    return refund


@dataclass
class Approvals:
    """The worker's event time and the pending orders waiting for it (contract §5).

    The event time is the largest `ts` of an order or refund the worker's ledger partitions have
    processed; a review is not event time.
    """

    watermark: datetime = _EPOCH_MIN
    _due: list[tuple[datetime, str, int]] = field(default_factory=list)  # (lock_end, order, partition)

    def add(self, lock_end: datetime, order_id: str, partition: int) -> None:
        heapq.heappush(self._due, (lock_end, order_id, partition))

    def advance(self, ts: datetime) -> None:
        if ts > self.watermark:
            self.watermark = ts

    def due(self, owned: set[int]) -> Iterable[tuple[str, int]]:
        while self._due and self._due[0][0] <= self.watermark:
            _, order_id, partition = heapq.heappop(self._due)
            if partition in owned:
                yield order_id, partition

    def forget(self, partitions: set[int]) -> None:
        self._due = [d for d in self._due if d[2] not in partitions]
        heapq.heapify(self._due)


class LedgerStage:
    """One partition of orders' ledgers."""

    def __init__(self, partition: int, store: Staged, approvals: Approvals,
                 ref: ReferenceData | None = None, topic: str = LEDGER) -> None:
        self.partition = partition
        self.store = store
        self.approvals = approvals
        self.ref = ref or ReferenceData()
        self.topic = topic  # where items applied after waiting are said to come from
        self._entries: dict[str, Entry] = {}
        self._loaded: dict[str, bytes | None] = {}  # as stored when the batch first read it

    def index_pending(self) -> int:
        """Put this partition's pending orders on the approvals index (after an assignment)."""
        count = 0
        for key, raw in self.store.items():
            entry = Entry.load(raw)
            if entry.awaits_approval():
                assert entry.ledger is not None
                self.approvals.add(entry.ledger.lock_end, key.decode(), self.partition)
                count += 1
        return count

    def entry(self, order_id: str) -> Entry:
        entry = self._entries.get(order_id)
        if entry is None:
            raw = self.store.get(order_id.encode())
            entry = self._entries[order_id] = Entry.load(raw)
            self._loaded[order_id] = raw
        return entry

    def receive(self, item: bytes, effects: Effects, metrics: Any,
                source: tuple[str, int, int] | None = None) -> None:
        """One `ledger-events` item, refund or review (validated already); `source` is the
        (topic, partition, offset) a dead letter names."""
        self._source = source or (self.topic, self.partition, -1)
        obj = orjson.loads(item)
        kind = obj.get("type")
        if kind == DECIDED_ORDER_TYPE:
            order = DecidedOrder.from_dict(obj)
            self.approvals.advance(order.ts)
            self._record_order(order, effects, metrics)
        elif kind == "review":
            review = decode_review(item)
            self._record_later(review, item, effects, metrics)
        else:
            refund = decode_event(item, "refund")
            assert isinstance(refund, Refund)
            self.approvals.advance(refund.ts)
            self._record_later(refund, item, effects, metrics)

    def _record_order(self, order: DecidedOrder, effects: Effects, metrics: Any) -> None:
        entry = self.entry(order.order_id)
        if entry.decided:
            metrics.events_duplicate.labels("orders").inc()
            return
        entry.decided = True
        entry.channel = order.channel
        entry.currency = order.currency
        entry.ledger = order.ledger
        effects.row("attributed_orders", order_row(order))
        metrics.orders_attributed.labels(order.method).inc()
        for row in flag_rows(order):
            effects.row("abuse_flags", row)
        for flag in order.flags:
            metrics.abuse_flags.labels(flag.reason).inc()
            effects.flags.append((order.order_id.encode(), flag_message(order, flag)))
        if order.accrual is not None:
            self._write_fact(order.accrual, entry, effects, metrics)
        if entry.awaits_approval():
            assert entry.ledger is not None
            self.approvals.add(entry.ledger.lock_end, order.order_id, self.partition)
        waiting = sorted((_decode_later(raw.encode()) for raw in entry.waiting),
                         key=lambda r: (r.ts, r.event_id))
        entry.waiting = []
        self._source = (self.topic, self.partition, -1)
        for later in waiting:
            self._apply_later(later, entry, effects, metrics)

    def _record_later(self, later: Refund | Review, raw: bytes, effects: Effects, metrics: Any) -> None:
        entry = self.entry(later.order_id)
        waiting_ids = {orjson.loads(w)["event_id"] for w in entry.waiting}
        if later.event_id in entry.refunds or later.event_id in waiting_ids:
            metrics.events_duplicate.labels("reviews" if isinstance(later, Review) else "refunds").inc()
            return
        if len(entry.refunds) + len(entry.waiting) >= MAX_LATER_PER_ORDER:
            self._dead_letter(
                later, "order_state_full",
                f"order {later.order_id} already has {MAX_LATER_PER_ORDER} refunds and reviews",
                effects, metrics)
            return
        if not entry.decided:
            entry.waiting.append(_compact(later).decode())
            return
        self._apply_later(later, entry, effects, metrics)

    def _dead_letter(self, later: Refund | Review, reason: str, detail: str, effects: Effects,
                     metrics: Any) -> None:
        topic, partition, offset = self._source
        effects.dead_letters.append(DeadLetter(
            later.order_id.encode(), _compact(later), reason, detail, topic, partition, offset))
        kind = "reviews" if isinstance(later, Review) else "refunds"
        metrics.events_invalid.labels(kind, reason).inc()
        metrics.dead_letters.inc()

    def _apply_later(self, later: Refund | Review, entry: Entry, effects: Effects, metrics: Any) -> None:
        entry.refunds.append(later.event_id)
        if isinstance(later, Review):
            refusal = review_refusal(entry.ledger, later, self.ref.settings.reviewers)
            if refusal is not None:
                self._dead_letter(later, "unauthorized_review", refusal, effects, metrics)
                effects.row("reviews", review_row(
                    later, entry.ledger.affiliate_id if entry.ledger else "",
                    f"unauthorized: {refusal}"))
                metrics.reviews.labels("unauthorized").inc()
                return
            if entry.ledger is None:
                effects.row("reviews", review_row(later, "", "ignored: order is unattributed"))
                return
            entry.ledger, fact, outcome = apply_review(entry.ledger, later)
            effects.row("reviews", review_row(later, entry.ledger.affiliate_id, outcome))
            metrics.reviews.labels(outcome.split(":")[0]).inc()
            if fact is not None:
                self._write_fact(fact, entry, effects, metrics)
            if entry.awaits_approval():  # released: approved at its lock end like any pending order
                self.approvals.add(entry.ledger.lock_end, later.order_id, self.partition)
            return
        if later.currency and entry.currency and later.currency != entry.currency:
            self._dead_letter(
                later, "currency_mismatch",
                f"refund in {later.currency} of order {later.order_id} in {entry.currency}",
                effects, metrics)
            return
        if entry.ledger is None:
            return  # unattributed order: nothing to reverse
        entry.ledger, fact = apply_refund(entry.ledger, later)
        if fact is not None:
            self._write_fact(fact, entry, effects, metrics)

    def approve(self, order_id: str, effects: Effects, metrics: Any) -> None:
        entry = self.entry(order_id)
        if entry.ledger is None or not entry.awaits_approval():
            return
        entry.ledger, fact = approve_if_due(entry.ledger, self.approvals.watermark)
        if fact is not None:
            self._write_fact(fact, entry, effects, metrics)

    def _write_fact(self, fact: CommissionFact, entry: Entry, effects: Effects, metrics: Any) -> None:
        assert entry.ledger is not None
        effects.row("commission_facts", fact_row(fact, entry.channel, entry.ledger.order_ts))
        metrics.facts_written.labels(fact.kind).inc()

    def finish(self) -> None:
        """Stage the entries this batch changed (a duplicate or a no-op changes none)."""
        for order_id, entry in self._entries.items():
            raw = entry.dump()
            if raw != self._loaded.get(order_id):
                self.store.put(order_id.encode(), raw)
        self._entries.clear()
        self._loaded.clear()
