"""Stage 2: the visitor join. Clicks become touches; orders are decided against them.

Reads `visitor-events` (keyed by visitor_id). Per visitor, the `touches` table keeps what contract
§4 needs of each click, plus the `visitor-events` offset that added it: an order at offset X only
sees touches added below X, so a replay after a crash decides exactly as the first run did even
though the table may already hold later clicks. Decisions go to `ledger-events` (keyed by order),
where the first decision per order wins, or, for orders with a discount code, first through
`code-events` (keyed by the normalised code) to the code stage. Click rows are in ClickHouse before the table records the click, so a
click the table already knows was written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import orjson
from faust.types import EventT, TableT

from schemas.events import Click, Order
from schemas.facts import Touch
from schemas.internal import DecidedOrder
from schemas.reference import ReferenceData, normalise_code
from schemas.validation import decode_event
from sinks.clickhouse import RowSink
from sinks.metrics import METRICS
from sinks.rows import click_row

from .context import in_partition
from .offsets import check_fence
from .forwarding import Forwarder, Record
from .rules.abuse import coupon_site_seen, flags_for_order
from .rules.attribution import attribute, latest_touch, remember_touch, touch_from_click, touch_horizon
from .rules.commission import commission_for
from .rules.ledger import open_ledger

#: A stored touch: [event_id, ts (epoch seconds), affiliate_id, channel, referrer_host, offset,
#: paid_click_id] (the last is absent in state written before it existed).
StoredTouch = list[Any]


def _to_touch(stored: StoredTouch) -> Touch:
    return Touch(stored[0], datetime.fromtimestamp(stored[1], timezone.utc), stored[2], stored[3],
                 stored[4], stored[6] if len(stored) > 6 else "")


@dataclass
class VisitorState:
    touches: list[StoredTouch]
    partition: int
    dirty: bool = False

    def seen(self, event_id: str) -> bool:
        return any(t[0] == event_id for t in self.touches)

    def visible_at(self, offset: int) -> tuple[Touch, ...]:
        return tuple(_to_touch(t) for t in self.touches if t[5] < offset)


@dataclass
class JoinStage:
    topic_name: str
    touches: TableT
    forwarder: Forwarder
    ledger_events: str
    code_events: str
    sink: RowSink
    reference: Callable[[], ReferenceData]
    _flush: Callable[[RowSink], Any] = field(default=lambda sink: sink.flush())

    def decide(self, order: Order, touches: tuple[Touch, ...], ref: ReferenceData) -> DecidedOrder:
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

    async def process(self, events: Sequence[EventT]) -> None:
        ref = self.reference()
        horizon = touch_horizon(ref)
        visitors: dict[bytes, VisitorState] = {}
        latency_from: list[float] = []
        decisions: dict[str, list[Record]] = {self.ledger_events: [], self.code_events: []}

        def state_of(key: bytes, partition: int) -> VisitorState:
            state = visitors.get(key)
            if state is None:
                with in_partition(self.topic_name, partition):
                    stored = self.touches.get(key)
                state = VisitorState(orjson.loads(stored) if stored else [], partition)
                visitors[key] = state
            return state

        for event in events:
            message = event.message
            decoded = decode_event(message.value or b"")  # validated by the ingest stage already
            key = decoded.visitor_id.encode()  # type: ignore[union-attr]
            state = state_of(key, message.partition)
            if isinstance(decoded, Click):
                if state.seen(decoded.event_id):
                    METRICS.events_duplicate.labels("clicks").inc()
                    continue
                touch = touch_from_click(decoded)
                kept = remember_touch(tuple(_to_touch(t) for t in state.touches), touch, horizon)
                offsets = {t[0]: t[5] for t in state.touches}
                offsets[touch.event_id] = message.offset
                state.touches = [
                    [t.event_id, t.ts.timestamp(), t.affiliate_id, t.channel, t.referrer_host,
                     offsets[t.event_id], t.paid_click_id]
                    for t in kept
                ]
                state.dirty = True
                self.sink.add("clicks", click_row(decoded, touch.referrer_host))
                latency_from.append(message.timestamp)
            elif isinstance(decoded, Order):
                decided = self.decide(decoded, state.visible_at(message.offset), ref)
                # Orders with a code pass the code stage (velocity needs state keyed by code).
                code = normalise_code(decoded.discount_code)
                topic, key = (self.code_events, code) if code else (self.ledger_events, decoded.order_id)
                decisions[topic].append(Record(key.encode(), decided.to_json(), message.timestamp))

        for topic, records in decisions.items():
            await self.forwarder.send(topic, records)
        await self._flush(self.sink)
        _observe_latency("clicks", latency_from)
        check_fence()  # a rebalance since the batch began: another worker may own these keys now
        # Only now, with the rows safe, does the table learn the clicks.
        for key, state in visitors.items():
            if state.dirty:
                with in_partition(self.topic_name, state.partition):
                    self.touches[key] = orjson.dumps(state.touches)


def _observe_latency(table: str, record_times: list[float]) -> None:
    if not record_times:
        return
    now = datetime.now(timezone.utc).timestamp()
    histogram = METRICS.end_to_end_latency.labels(table)
    for record_time in record_times:
        histogram.observe(max(0.0, now - record_time))
