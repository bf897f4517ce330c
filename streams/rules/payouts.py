"""Balances, payout batches and statements from the commission ledger (contract §9).

Pure: no Faust, Kafka or ClickHouse. `sinks/payouts.py` reads the facts and earlier lines, calls
these functions, and writes what they return. Money is Decimal, never a binary float.

The definitions, exactly as §9 gives them:
- an order's payable amount as of DATE is the sum of its facts with `ts` < DATE when its approval
  fact has `ts` < DATE, else 0 (a later clawback lowers a later balance);
- an affiliate's balance in a currency as of DATE is the payable amount of all its orders minus
  what earlier batches paid it; it may be negative and a negative balance is carried, never paid.

A DATE is a cut-off at 00:00 UTC of that day: `--until 2026-12-01` covers facts up to
2026-11-30 23:59:59.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timezone
from decimal import Decimal

from schemas.payouts import LedgerFact, PaidLine, PayoutLine

from .money import ZERO

#: §9's default `--minimum`: below it a positive balance is carried to the next batch, as
#: payment fees would eat a smaller transfer.
DEFAULT_MINIMUM = Decimal("50.00")


class PayoutOutOfOrder(ValueError):
    """A batch cut off before (or at) an existing batch's cut-off: it would pay facts twice."""


@dataclass(frozen=True, slots=True)
class Balance:
    affiliate_id: str
    currency: str
    payable: Decimal  # payable amount of all the affiliate's orders in the currency
    paid: Decimal  # what earlier batches paid
    orders: int  # orders with a payable amount not yet covered by an earlier paid line

    @property
    def amount(self) -> Decimal:
        return self.payable - self.paid


@dataclass(frozen=True, slots=True)
class Batch:
    payout_id: str
    until: date
    lines: tuple[PayoutLine, ...]
    carried: tuple[Balance, ...]  # balances not paid and not zero: below the minimum, or negative

    @property
    def total(self) -> dict[str, Decimal]:
        totals: dict[str, Decimal] = defaultdict(lambda: ZERO)
        for line in self.lines:
            totals[line.currency] += line.amount
        return dict(totals)


def payout_id_for(until: date) -> str:
    """The batch of a cut-off has one id, so running `payouts create` twice creates nothing new."""
    return f"payout-{until.isoformat()}"


def cutoff(day: date) -> datetime:
    """00:00 UTC of `day`, naive (ClickHouse's DateTime('UTC') reads back naive)."""
    return datetime.combine(day, time(0, 0))


def _naive_utc(ts: datetime) -> datetime:
    return ts.astimezone(timezone.utc).replace(tzinfo=None) if ts.tzinfo else ts


def payable_facts(facts: Sequence[LedgerFact], until: date) -> list[LedgerFact]:
    """The facts that count in payable amounts as of `until`: ts < until, order approved < until."""
    end = cutoff(until)
    approved = {f.order_id for f in facts if f.kind == "approval" and _naive_utc(f.ts) < end}
    return [f for f in facts if f.order_id in approved and _naive_utc(f.ts) < end]


def balances(facts: Sequence[LedgerFact], earlier: Sequence[PaidLine], until: date,
             currency: str | None = None) -> list[Balance]:
    """Every affiliate × currency balance as of `until` (sorted), counting lines cut off before it."""
    payable: dict[tuple[str, str], Decimal] = defaultdict(lambda: ZERO)
    paid: dict[tuple[str, str], Decimal] = defaultdict(lambda: ZERO)
    last_paid: dict[tuple[str, str], date] = {}
    for line in earlier:
        if line.until < until:
            key = (line.affiliate_id, line.currency)
            paid[key] += line.amount
            last_paid[key] = max(line.until, last_paid.get(key, line.until))
    new_orders: dict[tuple[str, str], set[str]] = defaultdict(set)
    settled = _settled_facts(facts, last_paid)
    for fact in payable_facts(facts, until):
        key = (fact.affiliate_id, fact.currency)
        payable[key] += fact.amount
        if fact.fact_id not in settled.get(key, ()):
            new_orders[key].add(fact.order_id)
    keys = set(payable) | set(paid)
    if currency:
        keys = {k for k in keys if k[1] == currency}
    return [Balance(a, c, payable[(a, c)], paid[(a, c)], len(new_orders[(a, c)]))
            for a, c in sorted(keys)]


def _settled_facts(facts: Sequence[LedgerFact],
                   last_paid: dict[tuple[str, str], date]) -> dict[tuple[str, str], set[str]]:
    """Per affiliate × currency, the facts already paid: payable as of its last paid line's cut-off."""
    settled: dict[tuple[str, str], set[str]] = defaultdict(set)
    for day in set(last_paid.values()):
        for fact in payable_facts(facts, day):
            key = (fact.affiliate_id, fact.currency)
            if last_paid.get(key) == day:
                settled[key].add(fact.fact_id)
    return settled


def plan_batch(facts: Sequence[LedgerFact], earlier: Sequence[PaidLine], until: date, *,
               minimum: Decimal = DEFAULT_MINIMUM, currency: str | None = None,
               latest_until: date | None = None) -> Batch:
    """The batch `payout-<until>`: a line per affiliate × currency whose balance is ≥ `minimum`.

    `earlier` holds the lines of every existing batch; `latest_until` the latest existing cut-off
    (batches without lines count too). A cut-off at or before it is refused: the facts it covers
    were already counted, and paying them again is exactly what must not happen.
    """
    if latest_until is not None and until <= latest_until:
        raise PayoutOutOfOrder(
            f"a batch cut off at {latest_until.isoformat()} exists; a new batch must be cut off later")
    last_paid: dict[tuple[str, str], date] = {}
    for line in earlier:
        key = (line.affiliate_id, line.currency)
        last_paid[key] = max(line.until, last_paid.get(key, line.until))
    settled = _settled_facts(facts, last_paid)
    now_payable = payable_facts(facts, until)

    def new_facts(key: tuple[str, str]) -> frozenset[str]:
        return frozenset(f.fact_id for f in now_payable if (f.affiliate_id, f.currency) == key
                         and f.fact_id not in settled.get(key, ()))

    return batch_from_balances(balances(facts, earlier, until, currency), until, minimum=minimum,
                               latest_until=latest_until, fact_ids=new_facts)


def batch_from_balances(found: Sequence[Balance], until: date, *,
                        minimum: Decimal = DEFAULT_MINIMUM, latest_until: date | None = None,
                        fact_ids: Callable[[tuple[str, str]], frozenset[str]] = lambda key: frozenset(),
                        ) -> Batch:
    """The batch `payout-<until>` from balances as of `until` (`balances`, or the same sums made by
    the database over a whole ledger): a line per balance ≥ `minimum`, the others carried."""
    if latest_until is not None and until <= latest_until:
        raise PayoutOutOfOrder(
            f"a batch cut off at {latest_until.isoformat()} exists; a new batch must be cut off later")
    payout_id = payout_id_for(until)
    # A balance of 0.00 is not a payment, whatever the minimum.
    floor = max(minimum, Decimal("0.01"))
    lines: list[PayoutLine] = []
    carried: list[Balance] = []
    for balance in sorted(found, key=lambda b: (b.affiliate_id, b.currency)):
        if balance.amount >= floor:
            lines.append(PayoutLine(payout_id, balance.affiliate_id, balance.currency,
                                    balance.amount, balance.orders,
                                    fact_ids((balance.affiliate_id, balance.currency))))
        elif balance.amount != ZERO:
            carried.append(balance)
    return Batch(payout_id, until, tuple(lines), tuple(carried))


# --- statements --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatementOrder:
    order_id: str
    currency: str
    first_ts: datetime
    accrued: Decimal
    net: Decimal  # sum of its facts up to the month's end
    state: str  # approved | pending | held | rejected (status of its accrual unless approved)


@dataclass(frozen=True, slots=True)
class Statement:
    affiliate_id: str
    month: str  # YYYY-MM
    currency: str
    opening_balance: Decimal
    accruals: Decimal
    reversals: Decimal  # refunds before lock end (status reversed)
    clawbacks: Decimal  # refunds after lock end (status clawback)
    approvals: int  # orders approved in the month
    approved: Decimal  # what those approvals made payable (their facts up to the month's end)
    adjustments: Decimal  # facts in the month of orders approved before it (clawbacks, mostly)
    payouts: Decimal  # lines of batches cut off in the month
    closing_balance: Decimal
    orders: tuple[StatementOrder, ...] = field(default=())


def month_bounds(month: str) -> tuple[date, date]:
    """`YYYY-MM` -> (first day, first day of the next month); ValueError when malformed."""
    year, _, mon = month.partition("-")
    if len(year) != 4 or len(mon) != 2:
        raise ValueError(f"month must be YYYY-MM, got {month!r}")
    first = date(int(year), int(mon), 1)
    following = date(first.year + (first.month == 12), first.month % 12 + 1, 1)
    return first, following


@dataclass(frozen=True, slots=True)
class Balances:
    """An affiliate's §9 balances per currency at a month's first day and the next's, and every
    currency it has facts in until then: what `statements` needs beyond the month's own orders."""

    opening: dict[str, Decimal]
    closing: dict[str, Decimal]
    currencies: frozenset[str]


def statements(affiliate_id: str, month: str, facts: Sequence[LedgerFact],
               earlier: Sequence[PaidLine], known: Balances | None = None) -> list[Statement]:
    """One statement per currency the affiliate has facts or payouts in.

    closing = opening + approved + adjustments − payouts, where opening and closing are the §9
    balances as of the first day of the month and of the next.

    `facts` are the affiliate's facts until the month's end, or, with `known` balances (summed by
    the database over the whole history), only those of the orders with a fact in the month.
    """
    first, following = month_bounds(month)
    start, end = cutoff(first), cutoff(following)
    mine = [f for f in facts if f.affiliate_id == affiliate_id]
    my_lines = [line for line in earlier if line.affiliate_id == affiliate_id]
    currencies = sorted({f.currency for f in mine} | {line.currency for line in my_lines}
                        | (known.currencies if known else frozenset()))
    if known is None:
        opening = {b.currency: b.amount for b in balances(mine, my_lines, first)}
        closing = {b.currency: b.amount for b in balances(mine, my_lines, following)}
    else:
        opening, closing = known.opening, known.closing
    approval_ts = {f.order_id: _naive_utc(f.ts) for f in mine if f.kind == "approval"}
    result: list[Statement] = []
    for currency in currencies:
        in_currency = [f for f in mine if f.currency == currency]
        in_month = [f for f in in_currency if start <= _naive_utc(f.ts) < end]
        approved_now = {o for o, ts in approval_ts.items() if start <= ts < end}
        approved_before = {o for o, ts in approval_ts.items() if ts < start}
        approved = sum((f.amount for f in in_currency
                        if f.order_id in approved_now and _naive_utc(f.ts) < end), ZERO)
        adjustments = sum((f.amount for f in in_month if f.order_id in approved_before), ZERO)
        payouts = sum((line.amount for line in my_lines
                       if line.currency == currency and first <= line.until < following), ZERO)
        result.append(Statement(
            affiliate_id=affiliate_id, month=month, currency=currency,
            opening_balance=opening.get(currency, ZERO),
            accruals=sum((f.amount for f in in_month if f.kind == "accrual"), ZERO),
            reversals=sum((f.amount for f in in_month
                           if f.kind == "reversal" and f.status != "clawback"), ZERO),
            clawbacks=sum((f.amount for f in in_month
                           if f.kind == "reversal" and f.status == "clawback"), ZERO),
            approvals=len({f.order_id for f in in_month if f.kind == "approval"}),
            approved=approved, adjustments=adjustments, payouts=payouts,
            closing_balance=closing.get(currency, ZERO),
            orders=_month_orders(in_currency, {f.order_id for f in in_month}, end),
        ))
    return result


def _month_orders(facts: Sequence[LedgerFact], order_ids: set[str],
                  end: datetime) -> tuple[StatementOrder, ...]:
    by_order: dict[str, list[LedgerFact]] = defaultdict(list)
    for fact in facts:
        if fact.order_id in order_ids and _naive_utc(fact.ts) < end:
            by_order[fact.order_id].append(fact)
    orders: list[StatementOrder] = []
    for order_id, own in by_order.items():
        accrual = next((f for f in own if f.kind == "accrual"), None)
        if any(f.kind == "approval" for f in own):
            state = "approved"
        else:
            state = accrual.status if accrual is not None else "pending"
        orders.append(StatementOrder(
            order_id=order_id, currency=own[0].currency,
            first_ts=min(_naive_utc(f.ts) for f in own),
            accrued=sum((f.amount for f in own if f.kind == "accrual"), ZERO),
            net=sum((f.amount for f in own), ZERO), state=state))
    return tuple(sorted(orders, key=lambda o: (o.first_ts, o.order_id)))
