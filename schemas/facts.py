"""What the pipeline derives from events: touches, attributions, flags and ledger facts.

These are the records the pure rules (`streams.rules`) return and the sinks write. They carry no
behaviour beyond trivial derived properties.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, cast

Method = Literal["code+click", "code", "last_click", "none"]
Severity = Literal["hold", "reject"]
FactKind = Literal["accrual", "reversal", "approval"]
FactStatus = Literal["pending", "held", "rejected", "reversed", "clawback", "approved"]


@dataclass(frozen=True, slots=True)
class Touch:
    """What attribution needs to remember of one click, kept per visitor."""

    event_id: str
    ts: datetime
    affiliate_id: str
    channel: str
    referrer_host: str = ""
    #: The paid-ads click id parameter on the click's landing URL (e.g. "gclid"), or "".
    paid_click_id: str = ""


@dataclass(frozen=True, slots=True)
class Attribution:
    """Who earns an order and why (contract §4)."""

    affiliate_id: str  # '' when unattributed
    method: Method
    click: Touch | None = None  # the attributing (or, for code+click, the owner's latest) click


@dataclass(frozen=True, slots=True)
class AbuseFlag:
    reason: str
    severity: Severity
    detail: str


@dataclass(frozen=True, slots=True)
class CommissionFact:
    """One append-only ledger line (contract §5)."""

    fact_id: str
    order_id: str
    affiliate_id: str
    program_id: str
    kind: FactKind
    amount: Decimal  # quantized to 0.01
    currency: str
    status: FactStatus
    ts: datetime


@dataclass(frozen=True, slots=True)
class OrderLedger:
    """What the ledger remembers of one attributed order between its facts (contract §5).

    Stored in the worker's state keyed by order_id, hence `to_dict`/`from_dict`. `commission` and
    `status` are the accrual's; reversals only grow `reversed_total`, approval only sets
    `approved`.
    """

    order_id: str
    affiliate_id: str
    program_id: str
    currency: str
    total: Decimal  # the order's total: the base of every pro-rata reversal
    commission: Decimal  # the accrual amount, 0.00 when rejected
    status: FactStatus  # of the accrual: pending, held or rejected
    order_ts: datetime
    lock_end: datetime
    reversed_total: Decimal = Decimal("0.00")  # sum of reversal amounts so far, as a positive number
    approved: bool = False
    #: The sum of refund amounts so far (contract v2 §5: reversals are cumulative).
    refunded_total: Decimal = Decimal("0")

    @property
    def net_commission(self) -> Decimal:
        """The sum of the order's fact amounts so far."""
        return self.commission - self.reversed_total

    def to_dict(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "affiliate_id": self.affiliate_id,
            "program_id": self.program_id,
            "currency": self.currency,
            "total": str(self.total),
            "commission": str(self.commission),
            "status": self.status,
            "order_ts": self.order_ts.isoformat(),
            "lock_end": self.lock_end.isoformat(),
            "reversed_total": str(self.reversed_total),
            "approved": self.approved,
            "refunded_total": str(self.refunded_total),
        }

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> "OrderLedger":
        return cls(
            order_id=obj["order_id"],
            affiliate_id=obj["affiliate_id"],
            program_id=obj["program_id"],
            currency=obj["currency"],
            total=Decimal(obj["total"]),
            commission=Decimal(obj["commission"]),
            status=cast(FactStatus, obj["status"]),
            order_ts=datetime.fromisoformat(obj["order_ts"]),
            lock_end=datetime.fromisoformat(obj["lock_end"]),
            reversed_total=Decimal(obj["reversed_total"]),
            approved=bool(obj["approved"]),
            refunded_total=(Decimal(obj["refunded_total"]) if "refunded_total" in obj
                            else _refunded_before_v2(obj)),
        )


def _refunded_before_v2(obj: dict[str, Any]) -> Decimal:
    """A ledger stored before refunds were summed: the refunded amount its reversals imply.

    Exact for an untouched order (0) and for a full refund (the total); in between, within the
    half-cent each v1 reversal was rounded by.
    """
    commission, reversed_total = Decimal(obj["commission"]), Decimal(obj["reversed_total"])
    if commission <= 0 or reversed_total <= 0:
        return Decimal("0")
    return Decimal(obj["total"]) * reversed_total / commission


@dataclass(frozen=True, slots=True)
class CodeRedemptions:
    """Recent uses of one discount code, for the code-velocity flag (contract §6).

    `redemptions` holds (order ts, customer_id) pairs sorted by time, only those inside the
    velocity window of the newest one. Stored in the worker's state keyed by the normalised code.
    """

    code: str
    redemptions: tuple[tuple[datetime, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "redemptions": [[ts.isoformat(), customer_id] for ts, customer_id in self.redemptions],
        }

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> "CodeRedemptions":
        return cls(
            code=obj["code"],
            redemptions=tuple(
                (datetime.fromisoformat(ts), str(customer_id))
                for ts, customer_id in obj["redemptions"]
            ),
        )
