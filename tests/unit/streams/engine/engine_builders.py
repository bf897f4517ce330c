"""Builders for the engine's stage tests: a reference with a code, click and item builders, a
fake metrics object, and a batch of the ledger stage run the way the runner runs it.

The event and reference builders are the rules tests' own (`tests/unit/rules/builders.py`).
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from schemas.events import Click, Refund, Review
from schemas.facts import AbuseFlag, Attribution
from schemas.internal import DecidedOrder
from schemas.reference import ReferenceData, Settings, Velocity
from schemas.validation import encode_json, review_to_json
from streams.engine.effects import Effects, Forward
from streams.engine.stages import Approvals, LedgerStage
from streams.engine.state import MemoryStore, Staged
from unit.rules.builders import (  # tests/ is on sys.path (tests/conftest.py), as for tests_support
    T0,
    affiliate,
    at,
    decided,
    order,
    program,
    reference,
    touch,
)

#: Code velocity limit of the test program: a fourth distinct customer in an hour is held.
MAX_CUSTOMERS = 3
REF: ReferenceData = reference(
    affiliates=(
        affiliate("sally", customer_id="cust-sally", codes=("SALLY20",)),
        affiliate("bob", customer_id="cust-bob"),
    ),
    programs=(program(lock_days=30, velocity=Velocity(MAX_CUSTOMERS, window_minutes=60)),),
    # "sally" may review (others' orders only: contract v2 §6); "mallory" may not review at all.
    settings=Settings(reviewers=("ann", "sally")),
)
LOCK_END = at(days=30)
HOLD = AbuseFlag("fast_conversion", "hold", "order 1 s after click c-1, minimum 5 s")


class FakeMetrics:
    """Stands in for `sinks.metrics.METRICS`: `metrics.<name>.labels(*values).inc(n)` counts
    into `counts[(name, *values)]`."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, ...]] = Counter()

    def __getattr__(self, name: str) -> "_Family":
        if name.startswith("_"):
            raise AttributeError(name)
        return _Family(self.counts, name)


class _Family:
    def __init__(self, counts: Counter[tuple[str, ...]], name: str) -> None:
        self.counts, self.name = counts, name

    def labels(self, *values: str) -> "_Child":
        return _Child(self.counts, (self.name, *values))

    def inc(self, amount: float = 1) -> None:  # an unlabelled counter
        self.counts[(self.name,)] += int(amount)


class _Child:
    def __init__(self, counts: Counter[tuple[str, ...]], key: tuple[str, ...]) -> None:
        self.counts, self.key = counts, key

    def inc(self, amount: float = 1) -> None:
        self.counts[self.key] += int(amount)


def click(event_id: str, ts: datetime, visitor_id: str = "v-1", affiliate_id: str = "sally",
          **kw: Any) -> Click:
    return Click(event_id=event_id, ts=ts, visitor_id=visitor_id, session_id="s-1",
                 affiliate_id=affiliate_id, channel=kw.pop("channel", "instagram"), **kw)


def coded(order_id: str, customer_id: str, ts: datetime, code: str = "SALLY20") -> DecidedOrder:
    """A pending order attributed to sally through her code (velocity not yet checked)."""
    return decided(order(order_id=order_id, event_id=f"e-{order_id}", customer_id=customer_id,
                         ts=ts, discount_code=code))


def code_item(decision: DecidedOrder, orders_end: dict[int, int] | None = None) -> dict[str, Any]:
    """`decision` as the visitor stage forwards it to `code-events` (an element of a record)."""
    item: dict[str, Any] = orjson.loads(decision.to_json())
    if orders_end is not None:
        item["orders_end"] = {str(p): end for p, end in orders_end.items()}
    return item


def progress(partition: int, decided_below: int) -> dict[str, Any]:
    return {"type": "orders_progress", "partition": partition, "decided_below": decided_below}


def pending(order_id: str = "o-1", ts: datetime = T0, total: str = "100.00",
            commission: str = "10.00", currency: str = "EUR") -> DecidedOrder:
    """A pending order attributed to sally by her click an hour before."""
    return decided(order(order_id=order_id, event_id=f"e-{order_id}", ts=ts, total=Decimal(total),
                         currency=currency),
                   Attribution("sally", "last_click", touch("c-1", at(hours=-1))),
                   commission=commission)


def held(order_id: str = "o-1", ts: datetime = T0) -> DecidedOrder:
    return decided(order(order_id=order_id, event_id=f"e-{order_id}", ts=ts),
                   Attribution("sally", "last_click", touch("c-1", at(hours=-1))), flags=(HOLD,))


def unattributed(order_id: str = "o-1", ts: datetime = T0) -> DecidedOrder:
    return decided(order(order_id=order_id, event_id=f"e-{order_id}", ts=ts),
                   Attribution("", "none"))


def refund_item(event_id: str, amount: str, ts: datetime, order_id: str = "o-1",
                currency: str = "") -> bytes:
    """A refund's bytes as they reach the ledger stage from `refunds` or `ledger-events`."""
    return encode_json(Refund(event_id=event_id, ts=ts, order_id=order_id,
                              amount=Decimal(amount), currency=currency))


def review_item(event_id: str, decision: str, ts: datetime, order_id: str = "o-1",
                reviewer: str = "ann") -> bytes:
    return review_to_json(Review(event_id=event_id, ts=ts, order_id=order_id,
                                 decision=decision, reviewer=reviewer))  # type: ignore[arg-type]


def ledger_batch(store: MemoryStore, approvals: Approvals, items: list[bytes],
                 metrics: Any = None, partition: int = 0, ref: ReferenceData = REF) -> Effects:
    """One batch of one ledger partition as `Engine.process` runs it: receive every item, approve
    what the event time made due, stage, then make the state (the changelog is assumed acked)."""
    metrics = metrics if metrics is not None else FakeMetrics()
    staged = Staged(store)
    stage = LedgerStage(partition, staged, approvals, ref)
    effects = Effects()
    for item in items:
        stage.receive(item, effects, metrics)
    for order_id, p in list(approvals.due({partition})):
        assert p == partition
        stage.approve(order_id, effects, metrics)
    stage.finish()
    store.write(staged.writes)
    return effects


def facts(effects: Effects) -> list[tuple[str, str, str, str]]:
    """The commission facts a batch writes: (fact_id, kind, amount, status)."""
    return [(row[0], row[4], str(row[5]), row[7]) for row in effects.rows.get("commission_facts", [])]


def forwarded(effects: Effects, topic: str) -> list[Forward]:
    return [f for f in effects.forwards if f.topic == topic]
