"""The contract §7 tables as the sink sees them, and one converter per row kind.

Each converter is deterministic: the same record always gives the same row, so a replay
re-inserts identical rows that `FINAL` collapses.
"""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import orjson

from schemas.events import Click, Review, Share
from schemas.facts import AbuseFlag, CommissionFact
from schemas.internal import DecidedOrder
from schemas.reference import normalise_code

from .clickhouse import Table

#: `total` is stored to the cent like every amount (Decimal(18, 2)); the commission is computed
#: from the exact total before this rounding.
CENT = Decimal("0.01")

TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        Table(
            "clicks",
            ("event_id", "ts", "visitor_id", "session_id", "affiliate_id", "channel", "share_id",
             "referrer_host"),
        ),
        Table("shares", ("event_id", "ts", "affiliate_id", "share_id", "channel", "url")),
        Table(
            "attributed_orders",
            ("order_id", "ts", "visitor_id", "customer_id", "affiliate_id", "program_id", "method",
             "click_event_id", "channel", "discount_code", "total", "currency", "commission",
             "flags", "status", "version", "coupon_site", "discount_amount"),
        ),
        Table(
            "commission_facts",
            ("fact_id", "order_id", "affiliate_id", "program_id", "kind", "amount", "currency",
             "status", "ts", "channel", "order_ts"),
            partition_column="order_ts",  # PARTITION BY toYYYYMM(order_ts)
        ),
        Table(
            "abuse_flags",
            ("order_id", "ts", "affiliate_id", "discount_code", "reason", "severity", "detail"),
        ),
        Table(
            "reviews",
            ("review_id", "order_id", "ts", "decision", "reviewer", "note", "affiliate_id",
             "outcome"),
        ),
    )
}


def _utc(value: datetime) -> datetime:
    """ClickHouse DateTime has whole seconds; the driver wants naive UTC for DateTime('UTC')."""
    return value.astimezone(timezone.utc).replace(tzinfo=None, microsecond=0)


def click_row(click: Click, referrer_host: str) -> tuple[Any, ...]:
    return (click.event_id, _utc(click.ts), click.visitor_id, click.session_id,
            click.affiliate_id, click.channel, click.share_id, referrer_host)


def share_row(share: Share) -> tuple[Any, ...]:
    return (share.event_id, _utc(share.ts), share.affiliate_id, share.share_id, share.channel,
            share.url)


def order_row(order: DecidedOrder) -> tuple[Any, ...]:
    return (order.order_id, _utc(order.ts), order.visitor_id, order.customer_id,
            order.affiliate_id, order.program_id, order.method, order.click_event_id,
            order.channel, normalise_code(order.discount_code), order.total.quantize(CENT, ROUND_HALF_UP),
            order.currency, order.commission, [f.reason for f in order.flags], order.status, 0,
            order.coupon_site, order.discount_amount.quantize(CENT, ROUND_HALF_UP))


def fact_row(fact: CommissionFact, channel: str, order_ts: datetime) -> tuple[Any, ...]:
    return (fact.fact_id, fact.order_id, fact.affiliate_id, fact.program_id, fact.kind,
            fact.amount, fact.currency, fact.status, _utc(fact.ts), channel, _utc(order_ts))


def flag_rows(order: DecidedOrder) -> list[tuple[Any, ...]]:
    return [
        (order.order_id, _utc(order.ts), order.affiliate_id, normalise_code(order.discount_code), flag.reason,
         flag.severity, flag.detail)
        for flag in order.flags
    ]


def review_row(review: Review, affiliate_id: str, outcome: str) -> tuple[Any, ...]:
    return (review.event_id, review.order_id, _utc(review.ts), review.decision, review.reviewer,
            review.note, affiliate_id, outcome)


def flag_message(order: DecidedOrder, flag: AbuseFlag) -> bytes:
    """One flag as published to the `abuse-flags` topic for alerting systems."""
    return orjson.dumps(
        {"order_id": order.order_id, "ts": _utc(order.ts).isoformat() + "Z",
         "affiliate_id": order.affiliate_id, "program_id": order.program_id,
         "discount_code": normalise_code(order.discount_code), "reason": flag.reason,
         "severity": flag.severity, "detail": flag.detail, "status": order.status,
         "total": str(order.total), "currency": order.currency}
    )
