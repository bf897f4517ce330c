"""A reviewer's decision on a held order (`apply_review`): release or reject, nothing else."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.events import ReviewDecision
from schemas.facts import AbuseFlag, Attribution, CommissionFact, OrderLedger
from streams.rules.ledger import apply_refund, apply_review, approve_if_due, open_ledger

from .builders import at, order, program, refund, review, touch

PROGRAM = program(lock_days=30)
LOCK_END = at(days=30)
SALLY = Attribution("sally", "last_click", touch("c-1", at(hours=-1)))
HOLD = AbuseFlag("paid_search_click", "hold", "click c-1 landed with paid-search id gclid")
REJECT = AbuseFlag("self_referral", "reject", "customer cust-981 is affiliate sally's own")


def _ledger(commission: str = "10.00", total: str = "100.00",
            flags: tuple[AbuseFlag, ...] = (HOLD,)) -> OrderLedger:
    ledger, _ = open_ledger(order(total=Decimal(total)), SALLY, PROGRAM, Decimal(commission), flags)
    return ledger


# release

def test_releasing_a_held_order_makes_it_pending_without_a_fact() -> None:
    held = _ledger()
    released, fact, outcome = apply_review(held, review("rv-1", "release", at(days=2)))
    assert (fact, outcome) == (None, "released")
    assert released.status == "pending"
    assert (released.commission, released.reversed_total) == (held.commission, Decimal("0.00"))


def test_a_released_order_is_approved_at_lock_end_like_any_pending_order() -> None:
    released, _, _ = apply_review(_ledger(), review("rv-1", "release", at(days=2)))
    assert approve_if_due(released, at(days=30, microseconds=-1)) == (released, None)
    approved, fact = approve_if_due(released, LOCK_END)
    assert fact == CommissionFact("o-1:approval", "o-1", "sally", "ambassadors", "approval",
                                  Decimal("0.00"), "EUR", "approved", LOCK_END)
    assert approved.approved


def test_a_release_after_lock_end_is_approved_at_the_next_watermark() -> None:
    released, _, _ = apply_review(_ledger(), review("rv-1", "release", at(days=40)))
    _, fact = approve_if_due(released, at(days=40))
    assert fact is not None and fact.ts == LOCK_END


def test_a_released_order_keeps_what_refunds_already_reversed() -> None:
    held, _ = apply_refund(_ledger(), refund("r-1", "25", at(days=1)))
    released, _, _ = apply_review(held, review("rv-1", "release", at(days=2)))
    assert released.net_commission == Decimal("7.50")


# reject

def test_rejecting_a_held_order_reverses_its_whole_commission() -> None:
    rejected, fact, outcome = apply_review(_ledger(), review("rv-1", "reject", at(days=2)))
    assert outcome == "rejected"
    assert fact == CommissionFact("o-1:review:rv-1", "o-1", "sally", "ambassadors", "reversal",
                                  Decimal("-10.00"), "EUR", "rejected", at(days=2))
    assert rejected.status == "rejected"
    assert rejected.net_commission == Decimal("0.00")


def test_rejecting_a_partly_refunded_held_order_reverses_only_the_rest() -> None:
    held, first = apply_refund(_ledger(), refund("r-1", "25", at(days=1)))
    rejected, fact, _ = apply_review(held, review("rv-1", "reject", at(days=2)))
    assert first is not None and fact is not None
    assert (first.amount, fact.amount) == (Decimal("-2.50"), Decimal("-7.50"))
    assert rejected.net_commission == Decimal("0.00")


def test_rejecting_a_fully_refunded_held_order_writes_a_zero_line() -> None:
    held, _ = apply_refund(_ledger(), refund("r-1", "100", at(days=1)))
    rejected, fact, outcome = apply_review(held, review("rv-1", "reject", at(days=2)))
    assert outcome == "rejected"
    assert fact is not None and (str(fact.amount), fact.status) == ("0.00", "rejected")
    assert fact.fact_id == "o-1:review:rv-1"
    assert (rejected.status, rejected.net_commission) == ("rejected", Decimal("0.00"))


def test_the_rejection_fact_id_names_the_review_so_a_replay_writes_the_same_id() -> None:
    _, first, _ = apply_review(_ledger(), review("rv-7", "reject", at(days=2)))
    _, again, _ = apply_review(_ledger(), review("rv-7", "reject", at(days=2)))
    assert first is not None and first == again and first.fact_id == "o-1:review:rv-7"


def test_a_rejection_after_lock_end_is_still_a_rejection() -> None:
    _, fact, _ = apply_review(_ledger(), review("rv-1", "reject", at(days=45)))
    assert fact is not None and (fact.status, fact.ts) == ("rejected", at(days=45))


def test_an_order_rejected_by_review_is_never_approved_nor_refunded_below_zero() -> None:
    rejected, _, _ = apply_review(_ledger(), review("rv-1", "reject", at(days=2)))
    assert approve_if_due(rejected, at(days=365)) == (rejected, None)
    after, fact = apply_refund(rejected, refund("r-1", "50", at(days=3)))
    assert fact is None and after.net_commission == rejected.net_commission == 0


# ignored reviews

def _approved() -> OrderLedger:
    ledger, _ = approve_if_due(_ledger(flags=()), LOCK_END)
    return ledger


def _released() -> OrderLedger:
    ledger, _, _ = apply_review(_ledger(), review("rv-0", "release", at(days=1)))
    return ledger


def _rejected_by_review() -> OrderLedger:
    ledger, _, _ = apply_review(_ledger(), review("rv-0", "reject", at(days=1)))
    return ledger


@pytest.mark.parametrize("decision", ["release", "reject"])
@pytest.mark.parametrize(
    ("ledger", "state"),
    [
        pytest.param(_ledger(flags=()), "pending", id="pending"),
        pytest.param(_ledger(flags=(REJECT,)), "rejected", id="rejected by a flag"),
        pytest.param(_ledger(flags=(HOLD, REJECT)), "rejected", id="held and rejected"),
        pytest.param(_approved(), "approved", id="approved"),
        pytest.param(_released(), "pending", id="already released"),
        pytest.param(_rejected_by_review(), "rejected", id="already rejected by review"),
    ],
)
def test_a_review_of_an_order_that_is_not_held_is_ignored(
    ledger: OrderLedger, state: str, decision: ReviewDecision
) -> None:
    after, fact, outcome = apply_review(ledger, review("rv-1", decision, at(days=2)))
    assert (after, fact) == (ledger, None)
    assert outcome.startswith("ignored:") and state in outcome


# invariant

money = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("100000"), places=2)


@given(
    total=st.decimals(min_value=Decimal("0"), max_value=Decimal("100000"), places=2),
    commission=st.decimals(min_value=Decimal("0"), max_value=Decimal("1000"), places=2),
    refunds=st.lists(money, max_size=10),
    decision=st.sampled_from(["release", "reject"]),
    review_position=st.integers(min_value=0, max_value=10),
)
def test_net_commission_of_a_reviewed_order_never_goes_below_zero_and_is_zero_once_rejected(
    total: Decimal, commission: Decimal, refunds: list[Decimal], decision: ReviewDecision,
    review_position: int,
) -> None:
    ledger, accrual = open_ledger(order(total=total), SALLY, PROGRAM, commission, (HOLD,))
    net = accrual.amount
    position = min(review_position, len(refunds))
    steps: list[Decimal | None] = [*refunds[:position], None, *refunds[position:]]
    for day, amount in enumerate(steps, start=1):
        if amount is None:
            ledger, fact, _ = apply_review(ledger, review("rv-1", decision, at(days=day)))
        else:
            ledger, fact = apply_refund(ledger, refund(f"r-{day}", str(amount), at(days=day)))
        if fact is not None:
            assert fact.kind == "reversal" and fact.amount <= 0
            net += fact.amount
        assert net >= 0
        assert net == ledger.net_commission
    if decision == "reject":
        assert net == 0 and ledger.status == "rejected"
    else:
        assert ledger.status == "pending"
    _, approval = approve_if_due(ledger, at(days=365))
    assert (approval is not None) == (decision == "release")
