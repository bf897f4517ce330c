"""The shapes payouts are computed from and written as (contract §9): ledger facts, payout lines.

Shared by the pure rules (streams/rules/payouts.py) and the ClickHouse reads and writes
(sinks/payouts.py); no logic here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal


@dataclass(frozen=True, slots=True)
class LedgerFact:
    """One `commission_facts` row, as much of it as payouts need. `ts` is naive UTC or aware."""

    fact_id: str
    order_id: str
    affiliate_id: str
    currency: str
    kind: str  # accrual | reversal | approval
    amount: Decimal
    status: str
    ts: datetime


@dataclass(frozen=True, slots=True)
class PaidLine:
    """A line of an earlier batch: what it paid one affiliate in one currency."""

    payout_id: str
    until: date
    affiliate_id: str
    currency: str
    amount: Decimal


@dataclass(frozen=True, slots=True)
class PayoutLine:
    payout_id: str
    affiliate_id: str
    currency: str
    amount: Decimal
    orders: int
    #: the facts this line pays for the first time (not stored; lets tests check each fact is
    #: paid at most once)
    fact_ids: frozenset[str] = frozenset()
