"""docs/sql-cookbook.md: every ```sql block runs on the local 18.16 and on current ClickHouse (26.9)
against a small database with known data, and the answers are the right ones.

The data is the worker's rows (the `sinks.rows` converters, written by `RowSink`) dated relative to
today, since the cookbook's questions are ("this week", "the last 30 days"); the payout batch is
made by `attribution payouts create`'s code and the rollup by `sinks.rollup.refresh`.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from attribution.payouts import create_or_get
from integration.current_engine import current_server, current_target  # noqa: F401
from schemas.config import ClickHouseTarget
from schemas.events import Click, Share
from schemas.facts import AbuseFlag
from sinks.clickhouse import connect
from sinks.migrate import migrate_server
from sinks.rollup import refresh
from sinks.rows import click_row, fact_row, flag_rows, order_row, share_row

from test_current_engine import fact, order, write  # tests/integration/test_current_engine.py
from integration.current_engine import debian_target  # noqa: F401
from test_order_state import unattributed

pytestmark = pytest.mark.integration

COOKBOOK = Path(__file__).resolve().parents[2] / "docs" / "sql-cookbook.md"
_SQL_BLOCK = re.compile(r"^```sql\n(.*?)^```", re.S | re.M)
_QUESTION = re.compile(r"^## (\d+)\. (.+)$", re.M)

D = Decimal
UTC = timezone.utc
TODAY = datetime.now(UTC).date()
#: The data's "now": 00:00 UTC today, inside this week, this month and every window.
T = datetime.combine(TODAY, time(0, 0), tzinfo=UTC)
VELOCITY = (AbuseFlag("code_velocity", "hold", "21 customers in 60 min"),)


def cookbook_queries() -> dict[int, str]:
    """Question number -> its SQL, in the order of the page."""
    text = COOKBOOK.read_text(encoding="utf-8")
    queries: dict[int, str] = {}
    for match in _SQL_BLOCK.finditer(text):
        questions = list(_QUESTION.finditer(text, 0, match.start()))
        assert questions, f"a ```sql block before the first question: {match[1][:60]!r}"
        number = int(questions[-1][1])
        assert number not in queries, f"question {number} has two ```sql blocks"
        queries[number] = match[1].strip().rstrip(";")
    return queries


def seed_rows() -> list[tuple[str, tuple[Any, ...]]]:
    """Today: aff-1 on blog (4 clicks, o1 and o2, o2 refunded a quarter), aff-2 on youtube
    (4 clicks, a share, o3) and with its code SAVE10 from a coupon site, held for velocity (o4),
    and an unattributed order (o5). Weeks ago, approved: aff-1 o6 60.00 and o9 55.00 EUR,
    aff-2 o8 70.00 EUR and o7 40.00 USD."""
    today_orders = [
        order("o1", T, total="100.00", commission="10.00"),
        order("o2", T, total="200.00", commission="20.00"),
        order("o3", T, affiliate="aff-2", channel="youtube", total="300.00", commission="30.00",
              customer="cust-3"),
        order("o4", T, affiliate="aff-2", method="code", channel="", code="SAVE10",
              total="50.00", commission="5.00", status="held", flags=VELOCITY,
              customer="cust-4", coupon_site="retailmenot.com"),
    ]
    old = T - timedelta(days=40)
    approved_orders = [
        (order("o6", old, total="600.00", commission="60.00"), T - timedelta(days=10)),
        (order("o7", old, affiliate="aff-2", channel="youtube", currency="USD", total="400.00",
               commission="40.00"), T - timedelta(days=10)),
        (order("o8", old, affiliate="aff-2", channel="youtube", total="700.00",
               commission="70.00"), T - timedelta(days=10)),
        (order("o9", T - timedelta(days=33), total="550.00", commission="55.00"),
         T - timedelta(days=3)),
    ]
    rows: list[tuple[str, tuple[Any, ...]]] = []
    for n in range(4):
        rows.append(("clicks", click_row(Click(f"c1-{n}", T, f"v-{n}", f"s-{n}", "aff-1", "blog"),
                                         "blog.example")))
        rows.append(("clicks", click_row(Click(f"c2-{n}", T, f"w-{n}", f"s-{n}", "aff-2",
                                               "youtube"), "")))
    rows.append(("shares", share_row(Share("sh1", T, "aff-2", "share-1", "youtube",
                                           "https://youtube.example/v"))))
    everything = [*today_orders, *(o for o, _ in approved_orders)]
    for decided in [*everything, unattributed("o5", T)]:
        rows.append(("attributed_orders", order_row(decided)))
        rows.extend(("abuse_flags", flag) for flag in flag_rows(decided))
        if decided.accrual is not None:
            rows.append(("commission_facts", fact_row(decided.accrual, decided.channel,
                                                      decided.ts)))
    for decided, approved_at in approved_orders:
        approval = fact(decided.order_id, "approval", "0.00", "approved", approved_at,
                        decided.affiliate_id, decided.currency)
        rows.append(("commission_facts", fact_row(approval, decided.channel, decided.ts)))
    refund = fact("o2", "reversal", "-5.00", "reversed", T)
    rows.append(("commission_facts", fact_row(refund, "blog", T)))
    return rows


def seed(target: ClickHouseTarget) -> None:
    migrate_server(target)
    write(target, seed_rows())
    client = connect(target)

    def execute(sql: str, rows: Any = None) -> Any:
        return client.execute(sql, rows) if rows is not None else client.execute(sql)

    try:
        # Pays o6 (aff-1) and o8 (aff-2) in EUR; aff-2's 40.00 USD is under the minimum.
        create_or_get(execute, target.database, TODAY - timedelta(days=5), D("50.00"), None,
                      datetime.now(UTC).replace(tzinfo=None))
        refresh(execute, target.database, force=True)
    finally:
        client.disconnect()


def answers(target: ClickHouseTarget) -> dict[int, list[tuple[Any, ...]]]:
    client = connect(target)
    try:
        return {number: client.execute(sql) for number, sql in cookbook_queries().items()}
    finally:
        client.disconnect()


def money(value: Any) -> Decimal:
    """A Decimal to the cent (the driver may give Decimal128 without its trailing zeros)."""
    return Decimal(value).quantize(Decimal("0.01"))


def check_cookbook(target: ClickHouseTarget) -> None:
    seed(target)
    got = answers(target)
    assert sorted(got) == list(range(1, 11))

    top = [(a, c, n, money(r), money(net)) for a, c, n, r, net in got[1]]
    assert top == [("aff-2", "EUR", 2, D("350.00"), D("35.00")),
                   ("aff-1", "EUR", 2, D("300.00"), D("25.00"))]

    epc = [(ch, cur, clicks, money(net), Decimal(e)) for ch, cur, clicks, net, e in got[2]]
    assert epc == [("youtube", "EUR", 4, D("30.00"), D("7.5")),
                   ("blog", "EUR", 4, D("25.00"), D("6.25"))]

    ((code, owner, used, coupon, velocity, no_click, score, discount),) = got[3]
    assert (code, owner, used, coupon, velocity, no_click) == ("SAVE10", "aff-2", 1, 1, 1, 1)
    assert score == pytest.approx(2.1) and money(discount) == D("5.00")

    payable = {cur: tuple(money(v) for v in values[:4]) + (values[4],)
               for cur, *values in got[4]}
    assert payable == {"EUR": (D("185.00"), D("130.00"), D("55.00"), D("55.00"), 1),
                       "USD": (D("40.00"), D("0.00"), D("40.00"), D("0.00"), 0)}

    refunds = {(a, c): (n, r, pct) for a, c, n, r, pct, _, _ in got[5]}
    assert refunds == {("aff-1", "EUR"): (2, 1, 50.0), ("aff-2", "EUR"): (2, 0, 0.0)}
    assert money(got[5][0][6]) == D("-5.00")

    assert got[6] == [("blog", 4, 2, 50.0), ("youtube", 4, 1, 25.0)]

    ((held_order, held_affiliate, _, waiting_hours, flags, *_),) = got[7]
    assert (held_order, held_affiliate, flags) == ("o4", "aff-2", ["code_velocity"])
    assert 0 <= waiting_hours <= 25

    states = {(a, c): tuple(money(v) for v in values) for a, c, *values in got[8]}
    assert states == {
        ("aff-1", "EUR"): (D("25.00"), D("0.00"), D("115.00"), D("140.00")),
        ("aff-2", "EUR"): (D("30.00"), D("5.00"), D("70.00"), D("105.00")),
        ("aff-2", "USD"): (D("0.00"), D("0.00"), D("40.00"), D("40.00")),
    }

    methods = {(m, c): (n, money(r)) for m, c, n, r in got[9]}
    assert methods == {("last_click", "EUR"): (3, D("600.00")), ("code", "EUR"): (1, D("50.00")),
                       ("none", "EUR"): (1, D("45.00"))}

    assert [(d, c, clicks, shares, n, money(r), money(net))
            for d, c, clicks, shares, n, r, net in got[10]] == [
        (TODAY, "EUR", 4, 0, 2, D("300.00"), D("25.00"))]


def test_the_cookbook_has_ten_questions_each_with_one_query() -> None:
    queries = cookbook_queries()
    assert len(queries) >= 10
    assert all("{db}" not in sql and "attribution." not in sql for sql in queries.values()), \
        "BI connects to the database: tables are named without it"


def test_the_cookbook_answers_on_the_debian_server(
    debian_target: ClickHouseTarget,  # noqa: F811
) -> None:
    check_cookbook(debian_target)


def test_the_cookbook_answers_on_the_current_server(
    current_target: ClickHouseTarget,  # noqa: F811
) -> None:
    check_cookbook(current_target)
