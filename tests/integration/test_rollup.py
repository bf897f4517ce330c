"""The rollup `affiliate_channel_daily_totals` (issue 14 item 3) on the local 18.16 (month rebuilds)
and on current ClickHouse 26.9 (its refreshable view): `attribution report` read from it equals
the report the live view `affiliate_channel_daily` and the ledger gave before it, a replay changes
nothing, a late refund rebuilds its month only, and `--since/--until` reads only those days."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from integration.current_engine import current_server, current_target  # noqa: F401
from schemas.config import ClickHouseTarget
from sinks.clickhouse import connect
from sinks.migrate import SchemaOptions, migrate_server
from sinks.report import ReportRow, _merge_currencyless, build_report
from sinks.rollup import TOTALS, ClickHorizon, MonthRange, RefreshResult, refresh

pytestmark = pytest.mark.integration

D = Decimal
OCT, NOV = 202610, 202611
EVERYTHING = (date(1970, 1, 1), date(2105, 12, 31))

CLICKS = ("INSERT INTO {db}.clicks (event_id, ts, visitor_id, session_id, affiliate_id, channel,"
          " share_id, referrer_host) VALUES")
SHARES = "INSERT INTO {db}.shares (event_id, ts, affiliate_id, share_id, channel, url) VALUES"
ORDERS = ("INSERT INTO {db}.attributed_orders (order_id, ts, visitor_id, customer_id, affiliate_id,"
          " program_id, method, click_event_id, channel, discount_code, total, currency,"
          " commission, flags, status, version) VALUES")
FACTS = ("INSERT INTO {db}.commission_facts (fact_id, order_id, affiliate_id, program_id, kind,"
         " amount, currency, status, ts, channel, order_ts) VALUES")


class Server:
    """One database on one server, spoken to as the CLI does (native protocol)."""

    def __init__(self, target: ClickHouseTarget) -> None:
        self.target = target
        self.database = target.database
        self.client = connect(target)

    def execute(self, sql: str, rows: list[tuple[Any, ...]] | None = None) -> list[tuple[Any, ...]]:
        sql = sql.replace("{db}", self.database)
        return self.client.execute(sql, rows) if rows is not None else self.client.execute(sql)  # type: ignore[no-any-return]

    def insert(self, data: "Traffic") -> None:
        for sql, rows in ((CLICKS, data.clicks), (SHARES, data.shares), (ORDERS, data.orders),
                          (FACTS, data.facts)):
            if rows:
                self.execute(sql, rows)

    def refresh(self, **options: Any) -> RefreshResult:
        return refresh(self.execute, self.database, **options)

    def report(self, since: date = EVERYTHING[0], until: date = EVERYTHING[1]) -> list[ReportRow]:
        return build_report(self.client, self.database, since, until).rows

    def rollup_rows(self) -> list[tuple[Any, ...]]:
        return self.execute(f"SELECT * FROM {{db}}.{TOTALS} ORDER BY day, affiliate_id, channel,"
                            " currency")

    def live_report(self, since: date = EVERYTHING[0], until: date = EVERYTHING[1]) -> list[ReportRow]:
        """The report as `build_report` made it before the rollup: the live view's counts and the
        ledger's per-order states, both read with FINAL at query time."""
        params = {"since": since, "until": until}
        counts = self.client.execute(
            f"""SELECT affiliate_id, channel, currency, sum(clicks), sum(shares), sum(orders),
                       sum(revenue), sum(net_commission)
                FROM {self.database}.affiliate_channel_daily
                WHERE day >= %(since)s AND day <= %(until)s
                GROUP BY affiliate_id, channel, currency""", params)
        states = self.client.execute(
            f"""SELECT affiliate_id, channel, currency, sumIf(net, state = 'pending'),
                       sumIf(net, state = 'approved'), sumIf(net, state = 'held')
                FROM
                (
                    SELECT order_id, any(affiliate_id) AS affiliate_id, any(channel) AS channel,
                           any(currency) AS currency, min(order_ts) AS first_ts,
                           sum(amount) AS net,
                           if(countIf(kind = 'approval') > 0, 'approved',
                              anyIf(status, kind = 'accrual')) AS state
                    FROM {self.database}.commission_facts FINAL
                    GROUP BY order_id
                )
                WHERE toDate(first_ts) >= %(since)s AND toDate(first_ts) <= %(until)s
                GROUP BY affiliate_id, channel, currency""", params)
        rows: dict[tuple[str, str, str], ReportRow] = {}
        for affiliate, channel, currency, clicks, shares, orders, revenue, net in counts:
            row = rows.setdefault((affiliate, channel, currency), ReportRow(affiliate, channel, currency))
            row.clicks += clicks
            row.shares += shares
            row.orders += orders
            row.revenue += D(revenue)
            row.net_commission += D(net)
        for affiliate, channel, currency, pending, approved, held in states:
            row = rows.setdefault((affiliate, channel, currency), ReportRow(affiliate, channel, currency))
            row.pending += D(pending)
            row.approved += D(approved)
            row.held += D(held)
        return _merge_currencyless(rows)

    def close(self) -> None:
        self.client.disconnect()


class Traffic:
    """Rows of the four sources, built up by the helpers below."""

    def __init__(self) -> None:
        self.clicks: list[tuple[Any, ...]] = []
        self.shares: list[tuple[Any, ...]] = []
        self.orders: list[tuple[Any, ...]] = []
        self.facts: list[tuple[Any, ...]] = []

    def click(self, event_id: str, ts: datetime, affiliate: str, channel: str) -> None:
        self.clicks.append((event_id, ts, "v", "s", affiliate, channel, "", ""))

    def share(self, event_id: str, ts: datetime, affiliate: str, channel: str) -> None:
        self.shares.append((event_id, ts, affiliate, "share", channel, "https://x.example"))

    def order(self, order_id: str, ts: datetime, affiliate: str, channel: str, total: str,
              commission: str, currency: str = "EUR", status: str = "pending") -> None:
        self.orders.append((order_id, ts, "v", "cust", affiliate, "prog", "last_click", "c",
                            channel, "", D(total), currency, D(commission), [], status, 0))
        self.fact(order_id, "accrual", commission, status, ts, ts, affiliate, channel, currency)

    def fact(self, order_id: str, kind: str, amount: str, status: str, ts: datetime,
             order_ts: datetime, affiliate: str, channel: str, currency: str = "EUR") -> None:
        self.facts.append((f"{order_id}:{kind}:{ts:%Y%m%d%H%M%S}", order_id, affiliate, "prog",
                           kind, D(amount), currency, status, ts, channel, order_ts))


def two_months() -> Traffic:
    """A few days in October and November: clicks, a share, orders in two currencies; one order
    approved, one held."""
    traffic = Traffic()
    oct3, oct20, nov2, nov3 = (datetime(2026, 10, 3, 10), datetime(2026, 10, 20, 9),
                               datetime(2026, 11, 2, 12), datetime(2026, 11, 3, 8))
    for n, (ts, affiliate, channel) in enumerate([
            (oct3, "sally", "blog"), (oct3, "sally", "blog"), (oct20, "tom", "social"),
            (nov2, "sally", "blog"), (nov3, "tom", "social"), (nov3, "tom", "email")]):
        traffic.click(f"c{n}", ts, affiliate, channel)
    traffic.share("s1", oct20, "tom", "social")
    traffic.order("o1", oct3 + timedelta(hours=1), "sally", "blog", "100.00", "10.00")
    traffic.order("o2", oct20 + timedelta(hours=1), "tom", "social", "250.40", "25.04", status="held")
    traffic.order("o3", nov2 + timedelta(hours=1), "sally", "blog", "80.00", "8.00", currency="USD")
    traffic.order("o4", nov3 + timedelta(hours=1), "tom", "email", "60.00", "6.00")
    traffic.fact("o1", "approval", "0.00", "approved", datetime(2026, 11, 2), oct3 + timedelta(hours=1),
                 "sally", "blog")
    return traffic


def by_key(rows: list[ReportRow]) -> dict[tuple[str, str, str], ReportRow]:
    return {(r.affiliate_id, r.channel, r.currency): r for r in rows}


@pytest.fixture
def debian(isolated: Any) -> Iterator[Server]:
    server = Server(isolated.config.clickhouse)
    yield server
    server.close()


@pytest.fixture
def current(current_target: ClickHouseTarget) -> Iterator[Server]:  # noqa: F811
    migrate_server(current_target)
    server = Server(current_target)
    yield server
    server.close()


def check_replays_and_late_refunds(server: Server, rebuilt: Callable[[RefreshResult], list[int] | None]) -> None:
    """The whole story on one server; `rebuilt` says which months a refresh rebuilt (18.16) or
    None where the server refreshes everything at once."""
    traffic = two_months()
    server.insert(traffic)
    time.sleep(1.1)  # the parts' second is over: a rebuild that starts now is newer than them

    assert rebuilt(server.refresh()) in ([OCT, NOV], None)
    expected = server.live_report()
    assert server.report() == expected
    rows = by_key(expected)
    # sally's blog has money in two currencies: its clicks stay on a row of their own.
    assert (rows["sally", "blog", ""].clicks, rows["sally", "blog", "EUR"].approved) == (3, D("10.00"))
    assert rows["tom", "social", "EUR"].held == D("25.04")
    assert (rows["tom", "social", "EUR"].shares, rows["sally", "blog", "USD"].pending) == (1, D("8.00"))
    assert rebuilt(server.refresh()) in ([], None)  # nothing changed: nothing rebuilt

    # A refund in November of an October order: October is rebuilt, November is not.
    late = Traffic()
    late.fact("o1", "reversal", "-4.00", "clawback", datetime(2026, 11, 20), datetime(2026, 10, 3, 11),
              "sally", "blog")
    server.insert(late)
    assert rebuilt(server.refresh()) in ([OCT], None)
    refunded = by_key(server.report())["sally", "blog", "EUR"]
    assert (refunded.net_commission, refunded.approved) == (D("6.00"), D("6.00"))
    assert server.report() == server.live_report()
    settled = server.rollup_rows()

    # A replay of everything: the same rows again, so the same rollup, row for row.
    server.insert(traffic)
    server.insert(late)
    done = rebuilt(server.refresh(within=MonthRange(NOV, NOV)))
    assert done in ([NOV], None)  # only the months asked for
    if done is not None:
        assert OCT in (rebuilt(server.refresh()) or [])
    assert server.rollup_rows() == settled
    assert server.report() == server.live_report()

    # --since/--until: only those days.
    november = server.report(date(2026, 11, 1), date(2026, 11, 30))
    assert november == server.live_report(date(2026, 11, 1), date(2026, 11, 30))
    assert {(r.affiliate_id, r.channel, r.currency) for r in november} == {
        ("sally", "blog", "USD"), ("tom", "social", ""), ("tom", "email", "EUR")}
    assert (by_key(november)["sally", "blog", "USD"].orders, by_key(november)["sally", "blog", "USD"].clicks) == (1, 1)
    oct3 = server.report(date(2026, 10, 3), date(2026, 10, 3))
    assert [(r.affiliate_id, r.clicks, r.orders, r.net_commission) for r in oct3] == [
        ("sally", 2, 1, D("6.00"))]


def test_on_18_16_months_are_rebuilt_when_touched_and_replays_change_nothing(debian: Server) -> None:
    check_replays_and_late_refunds(debian, lambda result: result.rebuilt)


def test_on_the_current_server_the_view_recomputes_it_and_replays_change_nothing(current: Server) -> None:
    def refreshed(result: RefreshResult) -> None:
        assert result.rebuilt == []
        return None

    check_replays_and_late_refunds(current, refreshed)


def test_a_month_whose_sources_are_emptied_is_emptied_in_the_rollup(debian: Server) -> None:
    debian.insert(two_months())
    time.sleep(1.1)
    debian.refresh()
    debian.execute(f"ALTER TABLE {{db}}.clicks DROP PARTITION {OCT}")
    debian.execute(f"ALTER TABLE {{db}}.shares DROP PARTITION {OCT}")
    debian.execute(f"ALTER TABLE {{db}}.attributed_orders DROP PARTITION {OCT}")
    debian.execute(f"ALTER TABLE {{db}}.commission_facts DROP PARTITION {OCT}")
    assert debian.refresh().rebuilt == [OCT]
    assert debian.report(date(2026, 10, 1), date(2026, 10, 31)) == []
    assert debian.report() == debian.live_report()


def test_on_the_current_server_days_past_the_click_horizon_keep_their_clicks(
    current_target: ClickHouseTarget,  # noqa: F811
) -> None:
    """Raw clicks expire after CLICKHOUSE_CLICKS_TTL_DAYS: the view keeps a closed day's clicks
    from the rollup itself and recomputes the rest, money included."""
    migrate_server(current_target, options=SchemaOptions(clicks_ttl_days=5))
    server = Server(current_target)
    try:
        today = datetime.now(timezone.utc).replace(tzinfo=None, hour=0, minute=0, second=0,
                                                   microsecond=0)
        closed, open_ = (today - timedelta(days=10)).date(), (today - timedelta(days=1)).date()
        # What a refresh saw while the closed day's clicks were still there:
        server.execute(f"INSERT INTO {{db}}.{TOTALS} (day, affiliate_id, channel, currency, clicks)"
                       " VALUES", [(closed, "sally", "blog", "", 7)])
        traffic = Traffic()
        traffic.click("c-open", today - timedelta(days=1), "sally", "blog")
        traffic.order("o-closed", today - timedelta(days=10), "sally", "blog", "50.00", "5.00")
        server.insert(traffic)
        server.refresh(force=True)
        [row] = server.report(closed, closed)
        assert (row.clicks, row.orders, row.net_commission) == (7, 1, D("5.00"))
        [row] = server.report(open_, open_)
        assert row.clicks == 1
        server.refresh(force=True)  # and again: kept, not doubled
        assert server.report(closed, closed)[0].clicks == 7
    finally:
        server.close()


def test_db_migrate_makes_the_view_follow_the_period_and_the_click_ttl(
    current_target: ClickHouseTarget,  # noqa: F811
) -> None:
    server = Server(current_target)

    def view_query() -> str:
        [(query,)] = server.execute("SELECT create_table_query FROM system.tables WHERE database ="
                                    f" '{server.database}' AND name = '{TOTALS}_refresh'")
        return str(query)

    try:
        migrate_server(current_target, options=SchemaOptions(rollup_refresh_seconds=60))
        assert "REFRESH EVERY 1 MINUTE" in view_query()
        assert ClickHorizon.parse(view_query()) == ClickHorizon(400)
        migrate_server(current_target, options=SchemaOptions(rollup_refresh_seconds=300,
                                                             clicks_ttl_days=800))
        assert "REFRESH EVERY 5 MINUTE" in view_query()
        # Clicks older than 400 days may be gone: those days stay closed under the longer TTL.
        [(today,)] = server.execute("SELECT today()")
        assert ClickHorizon.parse(view_query()) == ClickHorizon(800, today - timedelta(days=398))
        migrate_server(current_target, options=SchemaOptions(clicks_ttl_days=30))
        assert ClickHorizon.parse(view_query()) == ClickHorizon(30)
        assert server.refresh(force=True).view_refreshed
    finally:
        server.close()


# --- A property: the rollup's report is the live one, whatever the traffic ------------------------

CHANNELS = ("blog", "social", "")
AFFILIATES = ("sally", "tom", "")
DAYS = [datetime(2026, 9, 28, 6) + timedelta(days=n, hours=n % 7) for n in range(40)]


@st.composite
def traffic_of(draw: st.DrawFn) -> tuple[Traffic, Traffic]:
    """Random traffic across three months, and a random part of it to replay."""
    traffic = Traffic()
    for n in range(draw(st.integers(0, 12))):
        traffic.click(f"c{n}", draw(st.sampled_from(DAYS)), draw(st.sampled_from(AFFILIATES)),
                      draw(st.sampled_from(CHANNELS)))
    for n in range(draw(st.integers(0, 4))):
        traffic.share(f"s{n}", draw(st.sampled_from(DAYS)), draw(st.sampled_from(AFFILIATES)),
                      draw(st.sampled_from(CHANNELS)))
    for n in range(draw(st.integers(0, 8))):
        ts = draw(st.sampled_from(DAYS))
        affiliate, channel = draw(st.sampled_from(AFFILIATES)), draw(st.sampled_from(CHANNELS))
        currency = draw(st.sampled_from(("EUR", "USD")))
        commission = draw(st.integers(0, 5000))
        traffic.order(f"o{n}", ts, affiliate, channel, f"{commission * 10 / 100:.2f}",
                      f"{commission / 100:.2f}", currency,
                      draw(st.sampled_from(("pending", "held", "rejected"))))
        if draw(st.booleans()):
            traffic.fact(f"o{n}", "approval", "0.00", "approved", ts + timedelta(days=14), ts,
                         affiliate, channel, currency)
        if draw(st.booleans()):
            traffic.fact(f"o{n}", "reversal", f"-{commission / 200:.2f}",
                         draw(st.sampled_from(("reversed", "clawback"))), ts + timedelta(days=40),
                         ts, affiliate, channel, currency)
    replay = Traffic()
    for name in ("clicks", "shares", "orders", "facts"):
        rows = getattr(traffic, name)
        getattr(replay, name).extend(row for row in rows if draw(st.booleans()))
    return traffic, replay


@pytest.fixture(params=["18.16", "26.9"])
def either(request: pytest.FixtureRequest) -> Server:
    """The local 18.16 and the current server in turn."""
    return request.getfixturevalue("debian" if request.param == "18.16" else "current")  # type: ignore[no-any-return]


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=traffic_of(), since=st.sampled_from(DAYS), length=st.integers(0, 45))
def test_the_rollups_report_is_the_live_views_for_any_traffic_and_replay(
    either: Server, data: tuple[Traffic, Traffic], since: datetime, length: int,
) -> None:
    for table in ("clicks", "shares", "attributed_orders", "commission_facts", TOTALS,
                  "rollup_refreshes"):
        either.execute(f"TRUNCATE TABLE {{db}}.{table}")
    traffic, replay = data
    either.insert(traffic)
    either.insert(replay)
    first, last = since.date(), since.date() + timedelta(days=length)
    assert either.report(first, last) == either.live_report(first, last)
    assert either.report() == either.live_report()


def test_a_user_who_may_not_write_reads_the_rollup_as_it_is_with_a_warning(debian: Server) -> None:
    """The `bi` user (readonly): no refresh, the rows the rollup has, and how old they are."""
    from clickhouse_driver import Client

    traffic = two_months()
    debian.insert(traffic)
    debian.refresh()
    late = Traffic()
    late.fact("o1", "reversal", "-4.00", "clawback", datetime(2026, 11, 20), datetime(2026, 10, 3, 11),
              "sally", "blog")
    debian.insert(late)
    target = debian.target
    reader = Client(target.host, port=target.port, user=target.user, database=debian.database,
                    settings={"readonly": 1})
    try:
        report = build_report(reader, debian.database, *EVERYTHING)
    finally:
        reader.disconnect()
    assert report.warning is not None and "code 164" in report.warning
    assert "last refreshed" in report.warning and "ago" in report.warning
    # The refund is not in it yet: the rollup was read as it was.
    assert by_key(report.rows)["sally", "blog", "EUR"].net_commission == D("10.00")
    assert build_report(debian.client, debian.database, *EVERYTHING).warning is None


def test_rollup_refresh_prints_the_months_it_rebuilt_and_fails_with_exit_1(
    debian: Server, isolated: Any,
) -> None:
    import subprocess
    import sys

    def attribution(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "attribution", "rollup", "refresh", *args],
                              env=dict(isolated.env, **env), capture_output=True, text=True,
                              timeout=120)

    debian.insert(two_months())
    time.sleep(1.1)
    first = attribution()
    assert first.returncode == 0, first.stderr
    assert "rebuilt 2026-10 in" in first.stdout and "rebuilt 2026-11 in" in first.stdout
    assert "rebuilt 2 months (2026-10, 2026-11)" in first.stdout
    again = attribution()
    assert again.returncode == 0 and "nothing changed" in again.stdout
    everything = attribution("--all")
    assert "rebuilt 2 months" in everything.stdout
    url = isolated.env["CLICKHOUSE_URL"].rsplit("/", 1)[0] + "/no_such_database"
    failed = attribution(CLICKHOUSE_URL=url)
    assert failed.returncode == 1
    assert "cannot refresh the rollup" in failed.stderr and "Stack trace" not in failed.stderr


def test_a_staging_table_left_by_a_killed_rebuild_is_dropped(debian: Server) -> None:
    from sinks.rollup import drop_abandoned_staging

    debian.execute(f"CREATE TABLE {{db}}.{TOTALS}_staging_202611_deadbeef AS {{db}}.{TOTALS}")
    assert drop_abandoned_staging(debian.execute, debian.database) == []  # young: maybe running
    assert drop_abandoned_staging(debian.execute, debian.database, older_than=-5) == [
        f"{TOTALS}_staging_202611_deadbeef"]
    assert debian.execute(f"SELECT count() FROM system.tables WHERE database = '{debian.database}'"
                          f" AND name LIKE '%staging%'") == [(0,)]


def test_a_current_server_without_the_view_rebuilds_months_until_db_migrate_creates_it(
    current: Server,
) -> None:
    """A database migrated on 18.16 and then served by a current ClickHouse has no view."""
    current.execute(f"DROP TABLE {{db}}.{TOTALS}_refresh")
    current.insert(two_months())
    time.sleep(1.1)
    assert current.refresh().rebuilt == [OCT, NOV]
    assert current.report() == current.live_report()
    migrate_server(current.target)
    late = Traffic()
    late.fact("o1", "reversal", "-4.00", "clawback", datetime(2026, 11, 20), datetime(2026, 10, 3, 11),
              "sally", "blog")
    current.insert(late)
    assert current.refresh().view_refreshed
    assert current.report() == current.live_report()


def test_max_age_reads_a_recent_rollup_as_it_is_and_refreshes_an_older_one(either: Server) -> None:
    """`report --max-age S`: no rebuild when the months were recomputed less than S ago (a busy
    store's current month is always stale); the default, 0, is exact to the last row."""
    either.insert(two_months())
    either.refresh()
    before = sum(r.clicks for r in either.report())
    more = Traffic()
    more.click("late-click", datetime(2026, 11, 3, 9), "sally", "blog")
    either.insert(more)
    hour = build_report(either.client, either.database, *EVERYTHING, max_age_seconds=3600).rows
    assert sum(r.clicks for r in hour) == before  # read as it is: recomputed seconds ago
    assert sum(r.clicks for r in either.report()) == before + 1  # max-age 0: brought up to date


def test_on_18_16_a_merge_of_a_months_parts_does_not_make_it_stale(debian: Server) -> None:
    """A big backlog's background merges go on for minutes: if each made its month stale, every
    report would rebuild it. Only an insert (a new block number) does."""
    traffic = two_months()
    debian.insert(traffic)
    debian.insert(traffic)  # a replay: more parts to merge
    assert debian.refresh().rebuilt == [202610, 202611]
    for table in ("clicks", "attributed_orders", "commission_facts"):
        debian.execute(f"OPTIMIZE TABLE {{db}}.{table} FINAL")
    assert debian.refresh().rebuilt == []
    more = Traffic()
    more.click("late-click", datetime(2026, 11, 3, 9), "sally", "blog")
    debian.insert(more)
    assert debian.refresh().rebuilt == [202611]
