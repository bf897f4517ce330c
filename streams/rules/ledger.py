"""The commission ledger of one order (contract §5) as pure state transitions.

Each step takes the order's `OrderLedger` and an input (the decided order, a refund, the
pipeline's event time) and returns the new ledger and the fact to append, if any. Facts are never
updated: every fact_id is a function of the order and the input that caused it, so replaying the
same inputs writes the same ids. No Faust, Kafka or ClickHouse, no clock here: "now" is the
watermark the caller passes in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal

from schemas.events import Order, Refund, Review
from schemas.facts import (
    AbuseFlag,
    Attribution,
    CommissionFact,
    FactKind,
    FactStatus,
    OrderLedger,
)
from schemas.reference import Program

from .abuse import status_for
from .money import ZERO, round_cents


def lock_end(order_ts: datetime, program: Program) -> datetime:
    """When the order's commission locks: refunds before it reverse, refunds after claw back."""
    return order_ts + timedelta(days=program.lock_days)


def open_ledger(
    order: Order,
    attribution: Attribution,
    program: Program,
    commission: Decimal,
    flags: Iterable[AbuseFlag],
) -> tuple[OrderLedger, CommissionFact]:
    """The ledger of a newly attributed order and its accrual fact.

    The accrual is `commission` (0.00 when a flag rejects the order), with status pending, held
    or rejected from the flags.
    """
    status = status_for(flags)
    amount = ZERO if status == "rejected" else round_cents(commission)
    ledger = OrderLedger(
        order_id=order.order_id,
        affiliate_id=attribution.affiliate_id,
        program_id=program.program_id,
        currency=order.currency,
        total=order.total,
        commission=amount,
        status=status,
        order_ts=order.ts,
        lock_end=lock_end(order.ts, program),
    )
    accrual = CommissionFact(
        fact_id=f"{order.order_id}:accrual",
        order_id=order.order_id,
        affiliate_id=attribution.affiliate_id,
        program_id=program.program_id,
        kind="accrual",
        amount=amount,
        currency=order.currency,
        status=status,
        ts=order.ts,
    )
    return ledger, accrual


def _fact(
    ledger: OrderLedger, id_suffix: str, kind: FactKind, amount: Decimal, status: FactStatus,
    ts: datetime,
) -> CommissionFact:
    """A later fact of `ledger`'s order; its id is `<order_id>:<id_suffix>` (deterministic)."""
    return CommissionFact(
        fact_id=f"{ledger.order_id}:{id_suffix}", order_id=ledger.order_id,
        affiliate_id=ledger.affiliate_id, program_id=ledger.program_id, kind=kind, amount=amount,
        currency=ledger.currency, status=status, ts=ts,
    )


def apply_refund(ledger: OrderLedger, refund: Refund) -> tuple[OrderLedger, CommissionFact | None]:
    """Reverse the refunded share of the commission, cumulatively (contract v2 §5).

    The reversal is -(round(commission x min(refunded so far, total) / total) - earlier
    reversals): the refunds are summed before rounding, so three refunds of a third reverse
    exactly the accrual, and the net never goes below 0.00. No fact when nothing moves: a zero
    total or commission (e.g. rejected), nothing left to reverse, or a refund too small to move
    the rounded target by a cent (it still counts towards the next one). `refund.amount` is in
    the order's currency: the caller rejects a refund in another (`currency_mismatch`) and
    deduplicates refunds by event_id.
    """
    refunded = ledger.refunded_total + refund.amount
    ledger = replace(ledger, refunded_total=refunded)
    remaining = ledger.commission - ledger.reversed_total
    if ledger.total <= 0 or ledger.commission <= 0 or remaining <= 0:
        return ledger, None
    target = round_cents(ledger.commission * min(refunded, ledger.total) / ledger.total)
    reversal = min(target - ledger.reversed_total, remaining)
    if reversal <= 0:
        return ledger, None
    fact = _fact(
        ledger, f"reversal:{refund.event_id}", "reversal", -reversal,
        # A refund at exactly lock_end comes after the approval (approve_if_due: watermark >=
        # lock_end), so it claws back.
        "reversed" if refund.ts < ledger.lock_end else "clawback",
        refund.ts,
    )
    return replace(ledger, reversed_total=ledger.reversed_total + reversal), fact


def review_refusal(ledger: OrderLedger | None, review: Review, reviewers: Iterable[str]) -> str | None:
    """Why `review` may not decide (contract v2 §6), or None when it may.

    A decision counts only when its reviewer is on `settings.reviewers` and is not the order's
    own affiliate (nobody releases their own commission).
    """
    if review.reviewer not in reviewers:
        return f"reviewer {review.reviewer!r} is not in settings.reviewers"
    if ledger is not None and review.reviewer == ledger.affiliate_id:
        return f"reviewer {review.reviewer!r} is the order's own affiliate"
    return None


def approve_if_due(
    ledger: OrderLedger, watermark: datetime
) -> tuple[OrderLedger, CommissionFact | None]:
    """Approve a pending order once the pipeline's event time reaches its lock end; only once.

    Held and rejected orders are never approved here: a person decides. An order fully reversed
    before its lock end is still approved: the 0.00 approval line closes it, and a BI query can
    tell "approved with net 0" from "still open".
    """
    if ledger.approved or ledger.status != "pending" or watermark < ledger.lock_end:
        return ledger, None
    fact = _fact(ledger, "approval", "approval", ZERO, "approved", ledger.lock_end)
    return replace(ledger, approved=True), fact


def apply_review(
    ledger: OrderLedger, review: Review
) -> tuple[OrderLedger, CommissionFact | None, str]:
    """A reviewer's decision on a held order: the new ledger, the fact to append, the outcome.

    `release` makes the order pending again: it is approved like any other once the pipeline's
    event time reaches its lock end (no fact now). `reject` appends a reversal of whatever net
    commission is left, with status `rejected` (a 0.00 line when nothing is left, so the order's
    latest fact says it was rejected). Only held orders can be reviewed; any other decision is
    ignored, and the outcome says why.
    """
    if ledger.status != "held":
        state = "approved" if ledger.approved else ledger.status
        return ledger, None, f"ignored: order is {state}, not held"
    if review.decision == "release":
        return replace(ledger, status="pending"), None, "released"
    net = ledger.net_commission
    fact = _fact(ledger, f"review:{review.event_id}", "reversal", -net, "rejected", review.ts)
    return replace(ledger, status="rejected", reversed_total=ledger.reversed_total + net), fact, "rejected"
