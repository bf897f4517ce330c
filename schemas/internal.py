"""Messages on the worker's internal topics, and their JSON codec.

`ledger-events` (keyed by order_id) carries two kinds of message: the raw bytes of a valid refund
(decoded again with `schemas.validation.decode_event`), and a `DecidedOrder`: the join stage's
complete decision about one order. The ledger stage records the first decision per order_id and
ignores later ones, which is what makes a replayed join harmless.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from .facts import AbuseFlag, CommissionFact, OrderLedger

DECIDED_ORDER_TYPE = "decided_order"


@dataclass(frozen=True, slots=True)
class DecidedOrder:
    """An order joined to its visitor's clicks: attribution, commission, flags, status."""

    order_id: str
    ts: datetime
    visitor_id: str
    customer_id: str
    affiliate_id: str
    program_id: str
    method: str
    click_event_id: str
    click_ts: datetime | None
    channel: str
    discount_code: str
    total: Decimal
    currency: str
    flags: tuple[AbuseFlag, ...]
    ledger: OrderLedger | None  # None when unattributed
    accrual: CommissionFact | None  # None when unattributed
    #: For per-code leak reporting: the coupon site the order or the visitor's latest click came
    #: from ('' if none), and the discount the code gave (0 when the producer did not say).
    coupon_site: str = ""
    discount_amount: Decimal = Decimal("0")

    @property
    def commission(self) -> Decimal:
        return self.ledger.commission if self.ledger else Decimal("0.00")

    @property
    def status(self) -> str:
        return self.ledger.status if self.ledger else "unattributed"

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "type": DECIDED_ORDER_TYPE,
                "order_id": self.order_id,
                "ts": _ts(self.ts),
                "visitor_id": self.visitor_id,
                "customer_id": self.customer_id,
                "affiliate_id": self.affiliate_id,
                "program_id": self.program_id,
                "method": self.method,
                "click_event_id": self.click_event_id,
                "click_ts": _ts(self.click_ts) if self.click_ts else None,
                "channel": self.channel,
                "discount_code": self.discount_code,
                "total": str(self.total),
                "currency": self.currency,
                "flags": [[f.reason, f.severity, f.detail] for f in self.flags],
                "ledger": self.ledger.to_dict() if self.ledger else None,
                "accrual": fact_to_dict(self.accrual) if self.accrual else None,
                "coupon_site": self.coupon_site,
                "discount_amount": str(self.discount_amount),
            }
        )

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> "DecidedOrder":
        return cls(
            order_id=obj["order_id"],
            ts=datetime.fromisoformat(obj["ts"]),
            visitor_id=obj["visitor_id"],
            customer_id=obj["customer_id"],
            affiliate_id=obj["affiliate_id"],
            program_id=obj["program_id"],
            method=obj["method"],
            click_event_id=obj["click_event_id"],
            click_ts=datetime.fromisoformat(obj["click_ts"]) if obj["click_ts"] else None,
            channel=obj["channel"],
            discount_code=obj["discount_code"],
            total=Decimal(obj["total"]),
            currency=obj["currency"],
            flags=tuple(AbuseFlag(r, s, d) for r, s, d in obj["flags"]),  # type: ignore[arg-type]
            ledger=OrderLedger.from_dict(obj["ledger"]) if obj["ledger"] else None,
            accrual=fact_from_dict(obj["accrual"]) if obj["accrual"] else None,
            coupon_site=obj.get("coupon_site", ""),
            discount_amount=Decimal(obj.get("discount_amount", "0")),
        )


def fact_to_dict(fact: CommissionFact) -> dict[str, Any]:
    return {
        "fact_id": fact.fact_id,
        "order_id": fact.order_id,
        "affiliate_id": fact.affiliate_id,
        "program_id": fact.program_id,
        "kind": fact.kind,
        "amount": str(fact.amount),
        "currency": fact.currency,
        "status": fact.status,
        "ts": _ts(fact.ts),
    }


def fact_from_dict(obj: dict[str, Any]) -> CommissionFact:
    return CommissionFact(
        fact_id=obj["fact_id"],
        order_id=obj["order_id"],
        affiliate_id=obj["affiliate_id"],
        program_id=obj["program_id"],
        kind=obj["kind"],
        amount=Decimal(obj["amount"]),
        currency=obj["currency"],
        status=obj["status"],
        ts=datetime.fromisoformat(obj["ts"]),
    )


def _ts(value: datetime) -> str:
    return value.isoformat()
