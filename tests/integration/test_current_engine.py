"""The same schema, rows and reports on current ClickHouse (26.9, chdb-core) as on the local
18.16: production runs current releases, the dev box runs Debian's.

Both servers are spoken to as the worker and the CLI speak to ClickHouse: over the native
protocol, migrations by `sinks.migrate`, rows by `RowSink` from the `sinks.rows` converters, and
the queries of `attribution report` and `attribution codes`.
"""

from __future__ import annotations

import urllib.request
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from deploy.current_clickhouse import CurrentClickHouse
from integration.current_engine import current_server, current_target  # noqa: F401
from schemas.config import ClickHouseTarget
from schemas.events import Click, Review, Share
from schemas.facts import AbuseFlag, CommissionFact, FactKind, FactStatus, OrderLedger
from schemas.internal import DecidedOrder
from sinks.clickhouse import RowSink, connect
from sinks.code_report import code_evidence
from sinks.migrate import MIGRATIONS_TABLE, available_migrations, migrate_server
from sinks.report import build_report
from sinks.rows import TABLES, click_row, fact_row, flag_rows, order_row, review_row, share_row

pytestmark = pytest.mark.integration

DAY = datetime(2026, 11, 2, 10, 0, tzinfo=timezone.utc)
SINCE, UNTIL = date(2026, 11, 1), date(2026, 11, 30)


def fact(order_id: str, kind: FactKind, amount: str, status: FactStatus, ts: datetime,
         affiliate: str = "aff-1", currency: str = "EUR") -> CommissionFact:
    return CommissionFact(f"{order_id}:{kind}", order_id, affiliate, "prog-1", kind,
                          Decimal(amount), currency, status, ts)


def order(order_id: str, ts: datetime, *, affiliate: str = "aff-1", method: str = "last_click",
          channel: str = "blog", code: str = "", total: str = "100.00", commission: str = "10.00",
          status: FactStatus = "pending", currency: str = "EUR", customer: str = "cust-1",
          flags: tuple[AbuseFlag, ...] = (), coupon_site: str = "") -> DecidedOrder:
    ledger = OrderLedger(order_id, affiliate, "prog-1", currency, Decimal(total),
                         Decimal(commission), status, ts, ts + timedelta(days=30))
    return DecidedOrder(
        order_id=order_id, ts=ts, visitor_id=f"v-{customer}", customer_id=customer,
        affiliate_id=affiliate, program_id="prog-1", method=method,
        click_event_id="c1" if method != "code" else "", click_ts=None, channel=channel,
        discount_code=code, total=Decimal(total), currency=currency, flags=flags,
        ledger=ledger, accrual=fact(order_id, "accrual", commission, status, ts, affiliate,
                                    currency),
        coupon_site=coupon_site, discount_amount=Decimal("5.00") if code else Decimal("0"),
    )


def seed_rows() -> list[tuple[str, tuple[Any, ...]]]:
    """A small day of traffic: clicks and a share, orders by click and by code (one from a coupon
    site, one held for velocity), a review, approvals, a refund's reversal, and a replay."""
    later = DAY + timedelta(hours=1)
    velocity = (AbuseFlag("code_velocity", "hold", "12 customers in 1 h"),)
    orders = [
        order("o1", later),
        order("o2", later, affiliate="aff-2", channel="social", total="250.40", commission="25.04"),
        order("o3", later, method="code", channel="", code="SAVE10", customer="cust-2",
              coupon_site="coupons.example"),
        order("o4", later, method="code", channel="", code="SAVE10", customer="cust-3",
              status="held", flags=velocity),
        order("o5", later, affiliate="aff-2", currency="USD", total="80.00", commission="8.00"),
    ]
    rows: list[tuple[str, tuple[Any, ...]]] = [
        ("clicks", click_row(Click("c1", DAY, "v-cust-1", "s1", "aff-1", "blog"), "blog.example")),
        ("clicks", click_row(Click("c2", DAY, "v-cust-9", "s2", "aff-2", "social"), "")),
        ("shares", share_row(Share("sh1", DAY, "aff-2", "share-1", "social", "https://x.example"))),
    ]
    for decided in orders:
        rows.append(("attributed_orders", order_row(decided)))
        rows.extend(("abuse_flags", flag) for flag in flag_rows(decided))
        assert decided.accrual is not None
        rows.append(("commission_facts", fact_row(decided.accrual, decided.channel, decided.ts)))
    rows += [
        ("commission_facts", fact_row(fact("o1", "approval", "0.00", "approved", DAY + timedelta(
            days=30)), "blog", later)),
        ("commission_facts", fact_row(fact("o2", "reversal", "-12.52", "reversed", DAY + timedelta(
            days=2), affiliate="aff-2"), "social", later)),
        ("reviews", review_row(Review("r1", DAY + timedelta(hours=3), "o4", "release", "maria"),
                               "aff-1", "released")),
    ]
    # A replay: the same rows again, which FINAL must collapse on both servers.
    return rows + rows[3:8]


def write(target: ClickHouseTarget, rows: list[tuple[str, tuple[Any, ...]]]) -> None:
    sink = RowSink(target, TABLES)
    try:
        for table, row in rows:
            sink.add(table, row)
        assert sink.flush() == []
    finally:
        sink.close()


def reports(target: ClickHouseTarget) -> tuple[list[Any], list[Any]]:
    """(`attribution report` rows, `attribution codes` evidence), both for November."""
    client = connect(target)
    try:
        report = build_report(client, target.database, SINCE, UNTIL)
        codes = code_evidence(client, target.database, SINCE, UNTIL, only_leaked=False)
    finally:
        client.disconnect()
    return sorted(report.rows, key=lambda r: (r.affiliate_id, r.channel, r.currency)), codes


def test_the_current_server_is_26_9_on_loopback_over_both_protocols(
    current_server: CurrentClickHouse,  # noqa: F811
) -> None:
    assert current_server.host == "127.0.0.1"
    assert current_server.probe().startswith("26.9.")
    # FORMAT given: chdb's HTTP answers CSV by default, a server TabSeparated.
    url = (f"http://{current_server.host}:{current_server.http_port}/"
           "?query=SELECT%20version()%20FORMAT%20TabSeparated")
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.read().decode().startswith("26.9.")


def test_every_migration_applies_once_on_the_current_server(
    current_target: ClickHouseTarget,  # noqa: F811
) -> None:
    applied = migrate_server(current_target)
    assert [m.version for m in applied] == [m.version for m in available_migrations()]
    assert migrate_server(current_target) == []
    client = connect(current_target)
    try:
        [(versions,)] = client.execute(f"SELECT count() FROM {MIGRATIONS_TABLE} FINAL")
    finally:
        client.disconnect()
    assert versions == len(available_migrations())


def test_reports_on_the_current_server_equal_those_on_the_debian_server(
    current_target: ClickHouseTarget, isolated: Any,  # noqa: F811
) -> None:
    debian: ClickHouseTarget = isolated.config.clickhouse
    rows = seed_rows()
    for target in (current_target, debian):
        migrate_server(target)
        assert migrate_server(target) == []
        write(target, rows)

    current_report, current_codes = reports(current_target)
    debian_report, debian_codes = reports(debian)

    assert current_report == debian_report
    assert current_codes == debian_codes
    # Equal and right: a query both engines got wrong the same way must not pass.
    by_key = {(r.affiliate_id, r.channel, r.currency): r for r in current_report}
    blog = by_key["aff-1", "blog", "EUR"]
    assert (blog.clicks, blog.orders, blog.revenue) == (1, 1, Decimal("100.00"))
    assert (blog.net_commission, blog.approved, blog.pending) == (
        Decimal("10.00"), Decimal("10.00"), Decimal("0"))
    social = by_key["aff-2", "social", "EUR"]
    assert (social.clicks, social.shares, social.orders) == (1, 1, 1)
    assert social.net_commission == Decimal("12.52")
    assert by_key["aff-2", "blog", "USD"].orders == 1
    [save10] = current_codes
    assert (save10.discount_code, save10.redemptions, save10.distinct_customers) == ("SAVE10", 2, 2)
    assert (save10.from_coupon_sites, save10.velocity_flagged) == (1, 1)
    assert save10.coupon_sites == ("coupons.example",)
    assert save10.revenue == Decimal("200.00")
