"""The commission ledger of an order (contract §5): accrual, reversals, approval."""

from __future__ import annotations

from decimal import Decimal
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from schemas.events import Refund
from schemas.facts import AbuseFlag, Attribution, CommissionFact, OrderLedger
from schemas.reference import Program
from streams.rules.ledger import apply_refund, approve_if_due, lock_end, open_ledger
from streams.rules.money import round_cents

from .builders import T0, at, order, program, refund, touch

PROGRAM = program(lock_days=30)
LOCK_END = at(days=30)
SALLY = Attribution("sally", "last_click", touch("c-1", at(hours=-1)))
HOLD = AbuseFlag("fast_conversion", "hold", "order 1 s after click c-1, minimum 5 s")
REJECT = AbuseFlag("self_referral", "reject", "customer cust-981 is affiliate sally's own")


def _ledger(commission: str = "10.00", total: str = "100.00",
            flags: tuple[AbuseFlag, ...] = (), prog: Program = PROGRAM) -> OrderLedger:
    ledger, _ = open_ledger(order(total=Decimal(total)), SALLY, prog, Decimal(commission), flags)
    return ledger


# lock_end and open_ledger

def test_lock_end_is_the_order_time_plus_the_programs_lock_days() -> None:
    assert lock_end(T0, program(lock_days=14)) == at(days=14)
    assert lock_end(T0, program(lock_days=0)) == T0


def test_an_unflagged_order_accrues_its_commission_as_pending() -> None:
    ledger, accrual = open_ledger(order(), SALLY, PROGRAM, Decimal("10.00"), ())
    assert accrual == CommissionFact("o-1:accrual", "o-1", "sally", "ambassadors", "accrual",
                                     Decimal("10.00"), "EUR", "pending", T0)
    assert ledger == OrderLedger("o-1", "sally", "ambassadors", "EUR", Decimal("100.00"),
                                 Decimal("10.00"), "pending", T0, LOCK_END, Decimal("0.00"), False)


def test_an_order_with_a_hold_flag_accrues_its_commission_as_held() -> None:
    ledger, accrual = open_ledger(order(), SALLY, PROGRAM, Decimal("10.00"), (HOLD,))
    assert (accrual.amount, accrual.status) == (Decimal("10.00"), "held")
    assert ledger.status == "held"


def test_a_rejected_order_accrues_zero_cents() -> None:
    ledger, accrual = open_ledger(order(), SALLY, PROGRAM, Decimal("10.00"), (HOLD, REJECT))
    assert (str(accrual.amount), accrual.status) == ("0.00", "rejected")
    assert (ledger.commission, ledger.status) == (Decimal("0.00"), "rejected")


def test_the_ledger_survives_the_round_trip_through_json() -> None:
    ledger = _ledger()
    ledger, _ = apply_refund(ledger, refund("r-1", "10", at(days=1)))
    assert OrderLedger.from_dict(ledger.to_dict()) == ledger
    assert ledger.to_dict()["reversed_total"] == "1.00"


# apply_refund

def _assert_counted_without_fact(ledger: OrderLedger, refund_: Refund) -> None:
    """The refund moves no money, but counts towards the next one (cumulative reversals)."""
    after, fact = apply_refund(ledger, refund_)
    assert fact is None
    assert after == replace(ledger, refunded_total=ledger.refunded_total + refund_.amount)


def test_refunds_are_summed_before_rounding_so_a_full_refund_reverses_exactly_the_accrual() -> None:
    ledger = _ledger("10.00", "3.00")
    amounts = []
    for i in range(3):
        ledger, fact = apply_refund(ledger, refund(f"r-{i}", "1", at(days=1 + i)))
        amounts.append(fact.amount if fact else None)
    # v1 rounded each refund alone: -3.33 three times, leaving 0.01 to be approved.
    assert amounts == [Decimal("-3.33"), Decimal("-3.34"), Decimal("-3.33")]
    assert ledger.net_commission == Decimal("0.00")


def test_refunds_too_small_alone_reverse_once_together_they_move_a_cent() -> None:
    ledger = _ledger("10.00", "1000.00")  # 0.04 of 1000 reverses 0.0004: nothing
    ledger, first = apply_refund(ledger, refund("r-1", "0.40", at(days=1)))
    ledger, second = apply_refund(ledger, refund("r-2", "0.40", at(days=2)))
    assert first is None and second is not None and second.amount == Decimal("-0.01")


def test_a_ledger_stored_before_v2_reads_its_refunds_back_from_its_reversals() -> None:
    stored = _ledger("10.00", "100.00").to_dict()
    stored["reversed_total"] = "2.50"
    del stored["refunded_total"]
    ledger = OrderLedger.from_dict(stored)
    assert ledger.refunded_total == Decimal("25.00")
    ledger, fact = apply_refund(ledger, refund("r-9", "75", at(days=3)))
    assert fact is not None and fact.amount == Decimal("-7.50")

def test_a_refund_reverses_its_pro_rata_share_of_the_commission() -> None:
    ledger, fact = apply_refund(_ledger(), refund("r-1", "25.00", at(days=1)))
    assert fact == CommissionFact("o-1:reversal:r-1", "o-1", "sally", "ambassadors", "reversal",
                                  Decimal("-2.50"), "EUR", "reversed", at(days=1))
    assert ledger.reversed_total == Decimal("2.50")
    assert ledger.net_commission == Decimal("7.50")


def test_a_reversal_is_rounded_half_up_to_the_cent() -> None:
    # 0.13 x 5 / 10 = 0.065 -> 0.07
    _, fact = apply_refund(_ledger("0.13", "10.00"), refund("r-1", "5", at(days=1)))
    assert fact is not None and fact.amount == Decimal("-0.07")


def test_a_refund_larger_than_the_total_reverses_only_what_is_left() -> None:
    ledger, fact = apply_refund(_ledger(), refund("r-1", "150", at(days=1)))
    assert fact is not None and fact.amount == Decimal("-10.00")
    assert ledger.net_commission == Decimal("0.00")


def test_refunds_never_take_the_net_commission_below_zero() -> None:
    ledger = _ledger("0.13", "10.00")
    amounts = []
    for i, refunded in enumerate(("5", "5", "5")):
        ledger, fact = apply_refund(ledger, refund(f"r-{i}", refunded, at(days=1)))
        amounts.append(fact.amount if fact else None)
    # 0.065 -> 0.07, then only 0.06 is left, then nothing.
    assert amounts == [Decimal("-0.07"), Decimal("-0.06"), None]
    assert ledger.net_commission == Decimal("0.00")


def test_a_refund_just_before_lock_end_is_a_reversal() -> None:
    _, fact = apply_refund(_ledger(), refund("r-1", "10", at(days=30, microseconds=-1)))
    assert fact is not None and fact.status == "reversed"


def test_a_refund_exactly_at_lock_end_is_a_clawback() -> None:
    _, fact = apply_refund(_ledger(), refund("r-1", "10", LOCK_END))
    assert fact is not None and fact.status == "clawback"


def test_a_refund_of_an_approved_order_is_a_clawback() -> None:
    ledger, _ = approve_if_due(_ledger(), LOCK_END)
    ledger, fact = apply_refund(ledger, refund("r-1", "100", at(days=45)))
    assert fact is not None and (fact.amount, fact.status) == (Decimal("-10.00"), "clawback")
    assert ledger.approved


def test_a_refund_of_a_rejected_order_writes_no_fact() -> None:
    ledger = _ledger(flags=(REJECT,))
    _assert_counted_without_fact(ledger, refund("r-1", "50", at(days=1)))


def test_a_refund_of_a_held_order_reverses_the_held_commission() -> None:
    _, fact = apply_refund(_ledger(flags=(HOLD,)), refund("r-1", "50", at(days=1)))
    assert fact is not None and fact.amount == Decimal("-5.00")


def test_a_refund_of_an_order_with_total_zero_writes_no_fact() -> None:
    ledger = _ledger("5.00", "0")
    _assert_counted_without_fact(ledger, refund("r-1", "1", at(days=1)))


def test_a_refund_too_small_to_reverse_a_cent_writes_no_fact() -> None:
    ledger = _ledger("10.00", "1000.00")
    _assert_counted_without_fact(ledger, refund("r-1", "0.04", at(days=1)))


def test_a_refund_after_a_full_reversal_writes_no_fact() -> None:
    ledger, _ = apply_refund(_ledger(), refund("r-1", "100", at(days=1)))
    _assert_counted_without_fact(ledger, refund("r-2", "1", at(days=2)))


money = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("100000"), places=2)


@given(
    total=st.decimals(min_value=Decimal("0"), max_value=Decimal("100000"), places=2),
    # Independent of the total: a fixed commission may exceed a small order's total.
    commission=st.decimals(min_value=Decimal("0"), max_value=Decimal("1000"), places=2),
    refunds=st.lists(money, max_size=12),
)
def test_net_commission_never_goes_below_zero_for_any_refunds(
    total: Decimal, commission: Decimal, refunds: list[Decimal]
) -> None:
    ledger, accrual = open_ledger(order(total=total), SALLY, PROGRAM, commission, ())
    net = accrual.amount
    for i, amount in enumerate(refunds):
        ledger, fact = apply_refund(ledger, refund(f"r-{i}", str(amount), at(days=i)))
        if fact is not None:
            assert fact.amount < 0 and fact.amount == fact.amount.quantize(Decimal("0.01"))
            net += fact.amount
        assert net >= 0
        assert net == ledger.net_commission
        refunded = sum(refunds[: i + 1], Decimal(0))
        if total > 0 and accrual.amount > 0:  # cumulative (contract v2 §5)
            assert accrual.amount - net == round_cents(accrual.amount * min(refunded, total) / total)
    if sum(refunds, Decimal(0)) >= total > 0:
        assert net == 0


# approve_if_due

def test_a_pending_order_is_approved_when_the_watermark_reaches_lock_end() -> None:
    ledger, fact = approve_if_due(_ledger(), LOCK_END)
    assert fact == CommissionFact("o-1:approval", "o-1", "sally", "ambassadors", "approval",
                                  Decimal("0.00"), "EUR", "approved", LOCK_END)
    assert ledger.approved


def test_a_pending_order_is_not_approved_before_lock_end() -> None:
    ledger = _ledger()
    assert approve_if_due(ledger, at(days=30, microseconds=-1)) == (ledger, None)


def test_the_approval_fact_is_dated_at_lock_end_whatever_the_watermark() -> None:
    _, fact = approve_if_due(_ledger(), at(days=90))
    assert fact is not None and fact.ts == LOCK_END


def test_an_order_is_approved_only_once() -> None:
    ledger, first = approve_if_due(_ledger(), LOCK_END)
    assert first is not None
    assert approve_if_due(ledger, at(days=31)) == (ledger, None)


def test_a_held_order_is_never_approved_automatically() -> None:
    ledger = _ledger(flags=(HOLD,))
    assert approve_if_due(ledger, at(days=365)) == (ledger, None)


def test_a_rejected_order_is_never_approved_automatically() -> None:
    ledger = _ledger(flags=(REJECT,))
    assert approve_if_due(ledger, at(days=365)) == (ledger, None)


def test_an_order_fully_reversed_before_lock_end_is_still_approved_at_zero() -> None:
    ledger, _ = apply_refund(_ledger(), refund("r-1", "100", at(days=2)))
    ledger, fact = approve_if_due(ledger, LOCK_END)
    assert fact is not None and (fact.amount, fact.status) == (Decimal("0.00"), "approved")
    assert ledger.net_commission == Decimal("0.00")
