"""The four input events of contract §2, as small frozen records.

This module only says what a valid event *is*. Decoding raw Kafka bytes into these records, with a
reason for every rejection, lives in `schemas.validation`. Nothing here imports Kafka or
ClickHouse.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal, Union

EventType = Literal["click", "share", "order", "refund"]

#: Channels a click or share may name; anything else is stored as ``other`` (contract §2).
CHANNELS: frozenset[str] = frozenset(
    {
        "facebook",
        "twitter",
        "instagram",
        "linkedin",
        "tiktok",
        "youtube",
        "email",
        "blog",
        "podcast",
        "other",
    }
)

#: Input topic (before `TOPIC_PREFIX`) of each event type.
TOPIC_OF_TYPE: dict[str, str] = {
    "click": "clicks",
    "share": "shares",
    "order": "orders",
    "refund": "refunds",
}


def normalise_channel(value: str | None) -> str:
    """Lower-case a channel name and map anything unknown (or missing) to ``other``."""
    if not value:
        return "other"
    channel = value.strip().lower()
    return channel if channel in CHANNELS else "other"


@dataclass(frozen=True, slots=True)
class Click:
    event_id: str
    ts: datetime  # aware, UTC
    visitor_id: str
    session_id: str
    affiliate_id: str
    channel: str = "other"
    share_id: str = ""
    landing_url: str = ""
    referrer: str = ""
    ip: str = ""
    user_agent: str = ""

    type: Literal["click"] = "click"


@dataclass(frozen=True, slots=True)
class Share:
    event_id: str
    ts: datetime
    affiliate_id: str
    share_id: str
    channel: str
    url: str = ""

    type: Literal["share"] = "share"


@dataclass(frozen=True, slots=True)
class OrderItem:
    sku: str
    category: str
    quantity: Decimal
    price: Decimal


@dataclass(frozen=True, slots=True)
class Order:
    event_id: str
    ts: datetime
    order_id: str
    visitor_id: str
    customer_id: str
    currency: str  # ISO 4217, upper case
    total: Decimal  # net merchandise amount, >= 0: the commission base
    session_id: str = ""
    discount_code: str = ""
    referrer: str = ""
    ip: str = ""
    user_agent: str = ""
    items: tuple[OrderItem, ...] = ()
    #: Optional, not in contract v1: the discount the code gave, for per-code leak reporting.
    discount_amount: Decimal = Decimal("0")

    type: Literal["order"] = "order"


@dataclass(frozen=True, slots=True)
class Refund:
    event_id: str
    ts: datetime
    order_id: str
    amount: Decimal  # > 0
    currency: str = ""
    reason: str = ""

    type: Literal["refund"] = "refund"


Event = Union[Click, Share, Order, Refund]

#: Decisions a reviewer can take on a held order (not contract input: published by
#: `attribution review` to the `reviews` topic, keyed by order_id).
ReviewDecision = Literal["release", "reject"]
REVIEW_DECISIONS: tuple[str, ...] = ("release", "reject")


@dataclass(frozen=True, slots=True)
class Review:
    event_id: str
    ts: datetime
    order_id: str
    decision: ReviewDecision
    reviewer: str
    note: str = ""

    type: Literal["review"] = "review"
