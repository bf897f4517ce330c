"""Small builders for the rules' input records, with sensible defaults for unit tests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from schemas.events import Order, OrderItem, Refund, Review, ReviewDecision
from schemas.facts import AbuseFlag, Attribution, Touch
from schemas.internal import DecidedOrder
from schemas.reference import (
    Affiliate,
    Commission,
    Program,
    ReferenceData,
    Settings,
)
from streams.rules.ledger import open_ledger

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


def review(event_id: str, decision: ReviewDecision, ts: datetime, order_id: str = "o-1") -> Review:
    return Review(event_id=event_id, ts=ts, order_id=order_id, decision=decision, reviewer="ann")


def decided(
    of: Order | None = None,
    attribution: Attribution = Attribution("sally", "code"),
    in_program: Program | None = None,
    commission: str = "10.00",
    flags: tuple[AbuseFlag, ...] = (),
) -> DecidedOrder:
    """The join stage's decision about `of` (an order with code SALLY20 by default).

    Built like `streams.engine.stages.decide_order` does, with the commission and flags given rather
    than computed; an attribution of method "none" gives an unattributed decision (no ledger).
    """
    placed = of if of is not None else order(discount_code="SALLY20")
    attributed = attribution.method != "none"
    prog = in_program if in_program is not None else program()
    ledger, accrual = (
        open_ledger(placed, attribution, prog, Decimal(commission), flags) if attributed
        else (None, None)
    )
    click = attribution.click if attributed else None
    return DecidedOrder(
        order_id=placed.order_id,
        ts=placed.ts,
        visitor_id=placed.visitor_id,
        customer_id=placed.customer_id,
        affiliate_id=attribution.affiliate_id if attributed else "",
        program_id=prog.program_id if attributed else "",
        method=attribution.method,
        click_event_id=click.event_id if click else "",
        click_ts=click.ts if click else None,
        channel=click.channel if click else "",
        discount_code=placed.discount_code,
        total=placed.total,
        currency=placed.currency,
        flags=flags if attributed else (),
        ledger=ledger,
        accrual=accrual,
        discount_amount=placed.discount_amount,
    )
