"""Balances, payout batches and statements from the ledger (contract §9), without ClickHouse."""

from __future__ import annotations

from collections import Counter
from datetime import date, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.rules.payouts import (
    LedgerFact,
    PaidLine,
    PayoutOutOfOrder,
    balances,
    month_bounds,
    payout_id_for,
    plan_batch,
    statements,
)

D = Decimal


def fact(order: str, kind: str, amount: str, ts: datetime, status: str = "pending",
         affiliate: str = "sally", currency: str = "EUR", n: int = 0) -> LedgerFact:
    return LedgerFact(f"{order}:{kind}:{n}", order, affiliate, currency, kind, D(amount), status, ts)


def approved_order(order: str, amount: str, accrued: datetime, approved: datetime,
                   **kw: str) -> list[LedgerFact]:
    return [fact(order, "accrual", amount, accrued, **kw),
            fact(order, "approval", "0.00", approved, status="approved", **kw)]


def paid(batch_lines, until: date) -> list[PaidLine]:
    return [PaidLine(line.payout_id, until, line.affiliate_id, line.currency, line.amount)
            for line in batch_lines]


NOV = datetime(2026, 11, 2, 10, 0)
DEC = datetime(2026, 12, 2, 10, 0)


def test_an_order_is_payable_only_once_its_approval_is_before_the_cut_off():
    facts = approved_order("o1", "80.00", NOV, DEC)
    assert balances(facts, [], date(2026, 12, 2)) == []
    assert balances(facts, [], date(2026, 12, 3))[0].amount == D("80.00")


def test_a_fact_at_the_cut_off_itself_is_not_counted():
    facts = approved_order("o1", "80.00", NOV, datetime(2026, 12, 1, 0, 0))
    assert plan_batch(facts, [], date(2026, 12, 1)).lines == ()
    assert plan_batch(facts, [], date(2026, 12, 2)).lines[0].amount == D("80.00")


def test_batch_id_is_the_cut_off_date():
    assert payout_id_for(date(2026, 12, 1)) == "payout-2026-12-01"
    batch = plan_batch(approved_order("o1", "80.00", NOV, DEC), [], date(2026, 12, 5))
    assert batch.payout_id == "payout-2026-12-05"
    assert [(l.affiliate_id, l.currency, l.amount, l.orders) for l in batch.lines] == [
        ("sally", "EUR", D("80.00"), 1)]


def test_balance_below_minimum_is_carried_then_paid_when_it_reaches_it():
    facts = approved_order("o1", "30.00", NOV, DEC)
    first = plan_batch(facts, [], date(2026, 12, 5))
    assert first.lines == ()
    assert [b.amount for b in first.carried] == [D("30.00")]
    facts += approved_order("o2", "25.00", DEC, DEC + timedelta(days=1))
    second = plan_batch(facts, [], date(2026, 12, 10), latest_until=date(2026, 12, 5))
    assert [(l.amount, l.orders) for l in second.lines] == [(D("55.00"), 2)]


def test_minimum_and_currency_options():
    facts = approved_order("o1", "30.00", NOV, DEC) + approved_order(
        "o2", "70.00", NOV, DEC, currency="USD")
    assert [l.currency for l in plan_batch(facts, [], date(2026, 12, 5), minimum=D("10")).lines] \
        == ["EUR", "USD"]
    assert [l.currency for l in plan_batch(facts, [], date(2026, 12, 5)).lines] == ["USD"]
    assert plan_batch(facts, [], date(2026, 12, 5), minimum=D("10"), currency="EUR").lines[0] \
        .amount == D("30.00")


def test_an_earlier_batch_is_not_paid_again():
    facts = approved_order("o1", "80.00", NOV, DEC)
    first = plan_batch(facts, [], date(2026, 12, 5))
    again = plan_batch(facts, paid(first.lines, date(2026, 12, 5)), date(2026, 12, 10),
                       latest_until=date(2026, 12, 5))
    assert again.lines == ()


def test_a_cut_off_not_after_the_latest_batch_is_refused():
    with pytest.raises(PayoutOutOfOrder):
        plan_batch([], [], date(2026, 12, 5), latest_until=date(2026, 12, 5))
    with pytest.raises(PayoutOutOfOrder):
        plan_batch([], [], date(2026, 12, 1), latest_until=date(2026, 12, 5))


def test_clawback_after_payout_carries_a_negative_balance_forward():
    facts = approved_order("o1", "80.00", NOV, DEC)
    first = plan_batch(facts, [], date(2026, 12, 5))
    earlier = paid(first.lines, date(2026, 12, 5))
    facts.append(fact("o1", "reversal", "-80.00", datetime(2026, 12, 20), status="clawback"))
    second = plan_batch(facts, earlier, date(2027, 1, 1), latest_until=date(2026, 12, 5))
    assert second.lines == ()
    assert [(b.amount, b.payable, b.paid) for b in second.carried] == [
        (D("-80.00"), D("0.00"), D("80.00"))]
    facts += approved_order("o2", "100.00", DEC, datetime(2027, 1, 5))
    third = plan_batch(facts, earlier, date(2027, 1, 10), minimum=D("10.00"),
                       latest_until=date(2027, 1, 1))
    assert [l.amount for l in third.lines] == [D("20.00")]  # 100.00 earned, 80.00 owed back


def test_statement_reconciles_opening_movements_and_closing():
    facts = approved_order("o1", "80.00", NOV, DEC)
    earlier = paid(plan_batch(facts, [], date(2026, 12, 5)).lines, date(2026, 12, 5))
    facts.append(fact("o1", "reversal", "-20.00", datetime(2026, 12, 20), status="clawback"))
    facts.append(fact("o3", "accrual", "15.00", datetime(2026, 12, 21)))
    (dec,) = statements("sally", "2026-12", facts, earlier)
    assert dec.opening_balance == D("0.00")
    assert (dec.accruals, dec.clawbacks, dec.approvals, dec.approved, dec.adjustments) == (
        D("15.00"), D("-20.00"), 1, D("60.00"), D("0.00"))
    assert dec.payouts == D("80.00")
    assert dec.closing_balance == D("-20.00")
    assert dec.closing_balance == dec.opening_balance + dec.approved + dec.adjustments - dec.payouts
    assert [(o.order_id, o.state) for o in dec.orders] == [("o1", "approved"), ("o3", "pending")]


def test_month_bounds():
    assert month_bounds("2026-12") == (date(2026, 12, 1), date(2027, 1, 1))
    with pytest.raises(ValueError):
        month_bounds("2026-1")


# --- properties --------------------------------------------------------------------------------

START = datetime(2026, 10, 1)
AFFILIATES = ("sally", "tom")
CURRENCIES = ("EUR", "USD")


@st.composite
def ledgers(draw) -> list[LedgerFact]:
    facts: list[LedgerFact] = []
    for index in range(draw(st.integers(0, 12))):
        order = f"o{index}"
        affiliate = draw(st.sampled_from(AFFILIATES))
        currency = draw(st.sampled_from(CURRENCIES))
        accrued = START + timedelta(hours=draw(st.integers(0, 24 * 90)))
        commission = D(draw(st.integers(0, 20_000))) / 100
        kw = dict(affiliate=affiliate, currency=currency)
        facts.append(fact(order, "accrual", str(commission), accrued, **kw))
        approved_at = None
        if draw(st.booleans()):
            approved_at = accrued + timedelta(days=draw(st.integers(0, 40)))
            facts.append(fact(order, "approval", "0.00", approved_at, status="approved", **kw))
        reversed_so_far = D(0)
        for n in range(draw(st.integers(0, 2))):
            part = D(draw(st.integers(0, int((commission - reversed_so_far) * 100)))) / 100
            reversed_so_far += part
            ts = accrued + timedelta(hours=draw(st.integers(1, 24 * 120)))
            status = "clawback" if approved_at is not None and ts > approved_at else "reversed"
            facts.append(fact(order, "reversal", str(-part), ts, status=status, n=n, **kw))
    return facts


cutoffs = st.lists(st.integers(1, 200), min_size=1, max_size=6, unique=True).map(
    lambda days: [START.date() + timedelta(days=d) for d in sorted(days)])


def _run(facts, days, minimum):
    earlier: list[PaidLine] = []
    batches = []
    latest = None
    for day in days:
        batch = plan_batch(facts, earlier, day, minimum=minimum, latest_until=latest)
        batches.append(batch)
        earlier += paid(batch.lines, day)
        latest = day
    return batches, earlier


@settings(max_examples=200, deadline=None)
@given(ledgers(), cutoffs, st.sampled_from([D("0"), D("10.00"), D("50.00")]))
def test_every_fact_is_paid_at_most_once(facts, days, minimum):
    batches, _ = _run(facts, days, minimum)
    counts = Counter(fact_id for b in batches for line in b.lines for fact_id in line.fact_ids)
    assert all(n == 1 for n in counts.values())


@settings(max_examples=200, deadline=None)
@given(ledgers(), cutoffs, st.sampled_from([D("0"), D("10.00"), D("50.00")]))
def test_lines_plus_carried_balances_equal_the_payable_sum(facts, days, minimum):
    batches, earlier = _run(facts, days, minimum)
    last = days[-1]
    payable = {b.affiliate_id + b.currency: b.payable for b in balances(facts, [], last)}
    paid_total: Counter = Counter()
    for line in earlier:
        paid_total[line.affiliate_id + line.currency] += line.amount
    carried = {b.affiliate_id + b.currency: b.amount for b in batches[-1].carried}
    for key in set(payable) | set(paid_total):
        assert paid_total.get(key, D(0)) + carried.get(key, D(0)) == payable.get(key, D(0)), key
    for batch in batches:
        assert all(line.amount >= max(minimum, D("0.01")) for line in batch.lines)


@settings(max_examples=100, deadline=None)
@given(ledgers(), cutoffs)
def test_a_batch_is_the_same_when_planned_again(facts, days):
    assert _run(facts, days, D("50.00"))[0] == _run(list(reversed(facts)), days, D("50.00"))[0]


@settings(max_examples=100, deadline=None)
@given(ledgers(), cutoffs, st.sampled_from(AFFILIATES))
def test_statements_reconcile(facts, days, affiliate):
    _, earlier = _run(facts, days, D("10.00"))
    for month in ("2026-10", "2026-11", "2026-12", "2027-01"):
        for s in statements(affiliate, month, facts, earlier):
            assert s.closing_balance == (
                s.opening_balance + s.approved + s.adjustments - s.payouts), (month, s)


def test_a_clawback_in_a_later_month_is_an_adjustment_of_that_month():
    facts = approved_order("o1", "80.00", NOV, datetime(2026, 11, 20))
    earlier = paid(plan_batch(facts, [], date(2026, 11, 25)).lines, date(2026, 11, 25))
    facts.append(fact("o1", "reversal", "-30.00", datetime(2026, 12, 3), status="clawback"))
    (nov,) = statements("sally", "2026-11", facts, earlier)
    (dec,) = statements("sally", "2026-12", facts, earlier)
    assert (nov.approved, nov.payouts, nov.closing_balance) == (D("80.00"), D("80.00"), D("0.00"))
    assert (dec.opening_balance, dec.clawbacks, dec.adjustments, dec.closing_balance) == (
        D("0.00"), D("-30.00"), D("-30.00"), D("-30.00"))
    assert dec.orders[0].net == D("50.00")
