"""The view `order_states` (migration 0008, issue 14 item 4) on the local 18.16 and on current
ClickHouse (26.9): one row per order with its current status, amounts, review and payout.

The rows are the worker's (the `sinks.rows` converters, written by `RowSink`) and the payout
batches are made by the code of `attribution payouts create` and `mark-paid`, so the view is
checked against what production writes, not against rows shaped by hand.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from attribution.payouts import create_or_get
from integration.current_engine import current_server, current_target, debian_target  # noqa: F401
from schemas.config import ClickHouseTarget
from schemas.events import Review
from schemas.facts import AbuseFlag
from schemas.internal import DecidedOrder
from sinks.clickhouse import connect
from sinks.migrate import migrate_server
from sinks.payouts import mark_paid
from sinks.rows import fact_row, flag_rows, order_row, review_row

from test_current_engine import fact, order, write  # tests/integration/test_current_engine.py

pytestmark = pytest.mark.integration

D = Decimal
CENT = Decimal("0.01")
UTC = timezone.utc
NOW = datetime(2026, 12, 1, 9, 0)
OCT = datetime(2026, 10, 2, 10, 0, tzinfo=UTC)
#: Lock end of the October orders (30 days): their approvals' ts.
LOCK_END = OCT + timedelta(days=30)
HOLD = (AbuseFlag("code_velocity", "hold", "21 customers in 60 min"),)
REJECT = (AbuseFlag("self_referral", "reject", "customer is the affiliate"),)


def unattributed(order_id: str, ts: datetime) -> DecidedOrder:
    return DecidedOrder(order_id=order_id, ts=ts, visitor_id="v-9", customer_id="cust-9",
                        affiliate_id="", program_id="", method="none", click_event_id="",
                        click_ts=None, channel="", discount_code="", total=D("45.00"),
                        currency="EUR", flags=(), ledger=None, accrual=None)


def seed_rows() -> list[tuple[str, tuple[Any, ...]]]:
    """One order per status, as the worker writes them (aff-1 unless said; lock 30 days)."""
    orders = [
        order("o-pending", OCT + timedelta(days=20), commission="10.00"),
        order("o-partial", OCT + timedelta(days=20), commission="10.00"),
        order("o-held", OCT + timedelta(days=20), status="held", flags=HOLD, method="code",
              code="SAVE10"),
        order("o-released", OCT + timedelta(days=20), status="held", flags=HOLD),
        order("o-rejected", OCT, status="rejected", flags=REJECT, commission="0.00"),
        order("o-rejected-by-review", OCT, status="held", flags=HOLD),
        order("o-reversed", OCT),
        order("o-paid", OCT, total="800.00", commission="80.00"),
        order("o-clawed", OCT, currency="USD", total="600.00", commission="60.00"),
        order("o-carried", OCT, affiliate="aff-2", total="300.00", commission="30.00"),
        order("o-approved", OCT + timedelta(days=27), total="200.00", commission="20.00"),
    ]
    rows: list[tuple[str, tuple[Any, ...]]] = []
    for decided in [*orders, unattributed("o-none", OCT)]:
        rows.append(("attributed_orders", order_row(decided)))
        rows.extend(("abuse_flags", flag) for flag in flag_rows(decided))
        if decided.accrual is not None:
            rows.append(("commission_facts",
                         fact_row(decided.accrual, decided.channel, decided.ts)))
    by_id = {o.order_id: o for o in orders}

    def later(order_id: str, kind: str, amount: str, status: str, ts: datetime,
              suffix: str = "") -> tuple[str, tuple[Any, ...]]:
        decided = by_id[order_id]
        made = fact(order_id, kind, amount, status, ts, decided.affiliate_id,  # type: ignore[arg-type]
                    decided.currency)
        made = replace(made, fact_id=made.fact_id + suffix)
        return "commission_facts", fact_row(made, decided.channel, decided.ts)

    def approval(order_id: str) -> tuple[str, tuple[Any, ...]]:
        return later(order_id, "approval", "0.00", "approved",
                     by_id[order_id].ts + timedelta(days=30))

    rows += [
        later("o-partial", "reversal", "-4.00", "reversed", OCT + timedelta(days=21)),
        later("o-reversed", "reversal", "-10.00", "reversed", OCT + timedelta(days=3)),
        # Fully reversed before its lock end, and still approved: the 0.00 approval closes it.
        approval("o-reversed"),
        approval("o-paid"),
        approval("o-clawed"),
        approval("o-carried"),
        approval("o-approved"),
        ("reviews", review_row(Review("r-released", OCT + timedelta(days=21), "o-released",
                                      "release", "maria"), "aff-1", "released")),
        # A refused review changes nothing and is not the order's reviewer.
        ("reviews", review_row(Review("r-self", OCT + timedelta(days=1), "o-rejected-by-review",
                                      "release", "aff-1"), "aff-1",
                               "unauthorized: reviewer 'aff-1' is the order's own affiliate")),
        ("reviews", review_row(Review("r-reject", OCT + timedelta(days=2), "o-rejected-by-review",
                                      "reject", "omar"), "aff-1", "rejected")),
        later("o-rejected-by-review", "reversal", "-10.00", "rejected", OCT + timedelta(days=2),
              ":review:r-reject"),
    ]
    return rows


#: After the first batch (cut off 2026-11-03, paid): a refund of half of o-clawed after its
#: lock end.
CLAWBACK_AT = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)


def clawback_row() -> tuple[str, tuple[Any, ...]]:
    made = fact("o-clawed", "reversal", "-30.00", "clawback", CLAWBACK_AT, currency="USD")
    return "commission_facts", fact_row(made, "blog", OCT)


EXPECTED = {
    # order_id: (status, net, accrued, reversed, clawed_back, reviewer, decision, payout_id,
    #            payout_status)
    "o-none": ("unattributed", "0.00", "0.00", "0.00", "0.00", "", "", "", ""),
    "o-pending": ("pending", "10.00", "10.00", "0.00", "0.00", "", "", "", ""),
    "o-partial": ("pending", "6.00", "10.00", "-4.00", "0.00", "", "", "", ""),
    "o-held": ("held", "10.00", "10.00", "0.00", "0.00", "", "", "", ""),
    "o-released": ("pending", "10.00", "10.00", "0.00", "0.00", "maria", "release", "", ""),
    "o-rejected": ("rejected", "0.00", "0.00", "0.00", "0.00", "", "", "", ""),
    "o-rejected-by-review": ("rejected", "0.00", "10.00", "0.00", "0.00", "omar", "reject", "",
                             ""),
    "o-reversed": ("reversed", "0.00", "10.00", "-10.00", "0.00", "", "", "payout-2026-11-03",
                   "paid"),
    "o-paid": ("paid", "80.00", "80.00", "0.00", "0.00", "", "", "payout-2026-11-03", "paid"),
    "o-clawed": ("clawed back", "30.00", "60.00", "-30.00", "-30.00", "", "",
                 "payout-2026-11-03", "paid"),
    # 30.00 was below the first batch's minimum (carried, no line): the second batch paid it.
    "o-carried": ("paid", "30.00", "30.00", "0.00", "0.00", "", "", "payout-2026-11-25", "open"),
    # Approved on 2026-11-28, after the last batch's cut-off.
    "o-approved": ("approved", "20.00", "20.00", "0.00", "0.00", "", "", "", ""),
}


def states(target: ClickHouseTarget) -> dict[str, tuple[object, ...]]:
    client = connect(target)
    try:
        rows = client.execute("""
            SELECT order_id, status, net_commission, accrued, reversed, clawed_back, reviewer,
                   review_decision, payout_id, payout_status
            FROM order_states
            ORDER BY order_id
        """)
    finally:
        client.disconnect()
    return {r[0]: (r[1], *(str(Decimal(v).quantize(CENT)) for v in r[2:6]), *r[6:]) for r in rows}


def times(target: ClickHouseTarget) -> dict[str, tuple[datetime, datetime]]:
    client = connect(target)
    try:
        rows = client.execute("SELECT order_id, approved_at, reviewed_at FROM order_states")
    finally:
        client.disconnect()
    return {r[0]: (_naive_utc(r[1]), _naive_utc(r[2])) for r in rows}


def _naive_utc(moment: datetime) -> datetime:
    """The driver gives DateTime('UTC') aware or naive depending on the server's version."""
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def run_payouts_and_refund(target: ClickHouseTarget) -> None:
    """Two batches as `attribution payouts create` makes them, the first marked paid, and a
    clawback in between."""
    client = connect(target)

    def execute(sql: str, rows: Any = None) -> Any:
        return client.execute(sql, rows) if rows is not None else client.execute(sql)

    try:
        create_or_get(execute, target.database, date(2026, 11, 3), D("50.00"), None, NOW)
        mark_paid(execute, target.database, "payout-2026-11-03", "PP-1")
        write(target, [clawback_row()])
        _, planned = create_or_get(execute, target.database, date(2026, 11, 25), D("10.00"),
                                   None, NOW)
        assert planned is not None and [(b.affiliate_id, b.currency) for b in planned.carried] \
            == [("aff-1", "USD")]  # the clawback's -30.00: carried, never paid
    finally:
        client.disconnect()


def check_order_states(target: ClickHouseTarget) -> None:
    migrate_server(target)
    rows = seed_rows()
    write(target, rows)
    run_payouts_and_refund(target)
    assert states(target) == EXPECTED

    at = times(target)
    assert at["o-paid"] == (_naive_utc(LOCK_END), datetime(1970, 1, 1))
    assert at["o-released"] == (datetime(1970, 1, 1), _naive_utc(OCT + timedelta(days=21)))

    # A replay (every row again, and the batch's create again) changes nothing.
    write(target, rows + [clawback_row()])
    client = connect(target)
    try:
        create_or_get(lambda sql, r=None: client.execute(sql, r) if r is not None
                      else client.execute(sql), target.database, date(2026, 11, 3), D("50.00"),
                      None, NOW)
    finally:
        client.disconnect()
    assert states(target) == EXPECTED

    # A create cut short after its lines (no `payouts` row yet) is no batch: nothing is paid.
    client = connect(target)
    try:
        client.execute("INSERT INTO payout_lines (payout_id, until, affiliate_id, currency, amount,"
                       " orders) VALUES",
                       [("payout-2026-11-30", date(2026, 11, 30), "aff-1", "EUR", D("20.00"), 1)])
    finally:
        client.disconnect()
    assert states(target) == EXPECTED


def test_every_order_state_on_the_debian_server(debian_target: ClickHouseTarget) -> None:
    check_order_states(debian_target)


def test_every_order_state_on_the_current_server(
    current_target: ClickHouseTarget,  # noqa: F811
) -> None:
    check_order_states(current_target)
