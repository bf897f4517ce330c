"""Small builders for the rules' input records, with sensible defaults for unit tests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from schemas.events import Order, OrderItem, Refund
from schemas.facts import Touch
from schemas.reference import (
    Affiliate,
    Commission,
    Program,
    ReferenceData,
    Settings,
)

T0 = datetime(2026, 11, 2, 10, 0, 0, tzinfo=timezone.utc)


def at(**delta: float) -> datetime:
    """T0 plus a timedelta, e.g. at(days=-30) or at(seconds=5)."""
    return T0 + timedelta(**delta)


def touch(event_id: str, ts: datetime, affiliate_id: str = "sally", **kw: Any) -> Touch:
    return Touch(event_id=event_id, ts=ts, affiliate_id=affiliate_id,
                 channel=kw.pop("channel", "instagram"), **kw)


def order(**kw: Any) -> Order:
    fields: dict[str, Any] = dict(
        event_id="o-evt-1", ts=T0, order_id="o-1", visitor_id="v-1", customer_id="cust-1",
        currency="EUR", total=Decimal("100.00"),
    )
    fields.update(kw)
    return Order(**fields)


def item(category: str, quantity: str, price: str, sku: str = "sku") -> OrderItem:
    return OrderItem(sku=sku, category=category, quantity=Decimal(quantity), price=Decimal(price))


def refund(event_id: str, amount: str, ts: datetime, order_id: str = "o-1") -> Refund:
    return Refund(event_id=event_id, ts=ts, order_id=order_id, amount=Decimal(amount))


def program(program_id: str = "ambassadors", **kw: Any) -> Program:
    fields: dict[str, Any] = dict(
        program_id=program_id, kind="affiliate", commission=Commission("percent", Decimal("0.10")),
    )
    fields.update(kw)
    return Program(**fields)


def affiliate(affiliate_id: str = "sally", **kw: Any) -> Affiliate:
    fields: dict[str, Any] = dict(affiliate_id=affiliate_id, program_id="ambassadors")
    fields.update(kw)
    return Affiliate(**fields)


def reference(
    affiliates: tuple[Affiliate, ...] = (),
    programs: tuple[Program, ...] = (),
    settings: Settings = Settings(),
) -> ReferenceData:
    return ReferenceData(
        programs={p.program_id: p for p in (programs or (program(),))},
        affiliates={a.affiliate_id: a for a in affiliates},
        settings=settings,
    )
