"""The rollup's pure pieces without a server: months, which months are stale, the refresh period
of a view, and that migration 0007's view recomputes what `sinks.rollup.totals_select` does. The
rebuilds themselves run on both ClickHouse servers in tests/integration/test_rollup.py."""

from __future__ import annotations

import re
from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sinks.migrate import Dialect, SchemaOptions, available_migrations, render
from sinks.rollup import (
    ClickHorizon,
    MonthRange,
    click_horizon_sql,
    create_refresh_view_sql,
    fingerprint,
    format_month,
    month_of,
    month_start,
    next_month,
    parse_partition,
    refresh_period_seconds,
    run_every,
    stale_months,
    totals_select,
)

months = st.dates(date(1990, 1, 1), date(2200, 12, 31)).map(month_of)


def test_a_day_belongs_to_its_month_as_to_yyyymm_writes_it() -> None:
    assert month_of(date(2026, 11, 30)) == 202611
    assert month_of(date(2027, 1, 1)) == 202701
    assert format_month(202611) == "2026-11"
    assert month_start(202611) == date(2026, 11, 1)


@given(months)
def test_the_next_month_starts_the_day_after_the_month_ends(month: int) -> None:
    following = next_month(month)
    assert following > month
    assert month_of(month_start(following)) == following
    assert (month_start(following) - month_start(month)).days in (28, 29, 30, 31)


def test_a_month_number_outside_the_calendar_is_refused() -> None:
    with pytest.raises(ValueError):
        month_start(202613)
    with pytest.raises(ValueError):
        month_start(202600)


def test_a_part_partition_is_read_as_its_month_quoted_or_not() -> None:
    assert parse_partition("202611") == 202611
    assert parse_partition("'202611'") == 202611
    with pytest.raises(ValueError, match="not a month"):
        parse_partition("tuple()")


def test_a_month_range_of_days_holds_the_months_they_touch() -> None:
    within = MonthRange.of_days(date(2026, 10, 31), date(2026, 12, 1))
    assert [m for m in (202609, 202610, 202611, 202612, 202701) if m in within] == [
        202610, 202611, 202612]


def test_a_month_never_built_is_stale() -> None:
    assert stale_months({202611: "clicks:7"}, {}) == [202611]


def test_a_month_is_stale_exactly_when_its_sources_fingerprint_changed() -> None:
    built_from = fingerprint({"clicks": 7, "commission_facts": 9})
    assert stale_months({202611: built_from}, {202611: built_from}) == []
    # an insert (a replay too) takes a new, higher block number
    assert stale_months({202611: fingerprint({"clicks": 12, "commission_facts": 9})},
                        {202611: built_from}) == [202611]
    # a first row in another source table
    assert stale_months({202611: fingerprint({"clicks": 7, "commission_facts": 9, "shares": 3})},
                        {202611: built_from}) == [202611]


def test_merges_leave_the_fingerprint_as_it_was() -> None:
    # parts [1..3] and [4..7] merged into [1..7]: the highest block number is still 7
    before = {"clicks": max(3, 7)}
    after = {"clicks": 7}
    assert fingerprint(before) == fingerprint(after) == "clicks:7"


def test_a_month_whose_sources_are_gone_is_rebuilt_to_empty() -> None:
    assert stale_months({}, {202610: "clicks:1"}, built={202610}) == [202610]
    # Once rebuilt empty it has no rows and no sources: nothing to do.
    assert stale_months({}, {202610: "clicks:1"}, built=set()) == []


def test_only_months_within_the_range_are_rebuilt() -> None:
    changes = {202609: "clicks:3", 202610: "clicks:3", 202611: "clicks:3"}
    assert stale_months(changes, {}, within=MonthRange(202610, 202611)) == [202610, 202611]


@given(st.dictionaries(months, st.integers(0, 50)), st.dictionaries(months, st.integers(0, 50)))
def test_a_month_is_rebuilt_when_and_only_when_its_sources_differ_from_its_last_rebuild(
    now: dict[int, int], then: dict[int, int],
) -> None:
    changes = {m: fingerprint({"clicks": n}) for m, n in now.items()}
    marks = {m: fingerprint({"clicks": n}) for m, n in then.items()}
    stale = set(stale_months(changes, marks))
    for month, number in now.items():
        assert (month in stale) == (then.get(month) != number)
    assert stale <= set(changes)
    assert sorted(stale) == stale_months(changes, marks)


def test_the_refresh_period_is_read_back_whatever_unit_the_server_writes_it_in() -> None:
    assert refresh_period_seconds("CREATE MATERIALIZED VIEW d.v REFRESH EVERY 1 MINUTE TO d.t") == 60
    assert refresh_period_seconds("... REFRESH EVERY 90 SECOND TO d.t ...") == 90
    assert refresh_period_seconds("... REFRESH EVERY 2 HOUR TO d.t ...") == 7200
    assert refresh_period_seconds("CREATE VIEW d.v AS SELECT 1") is None


def test_one_month_is_recomputed_from_each_source_partition_of_that_month() -> None:
    sql = totals_select("db", month=202611)
    assert sql.count("FINAL") == 4
    assert sql.count("WHERE toYYYYMM(ts) = 202611") == 3
    assert "WHERE toYYYYMM(order_ts) = 202611" in sql
    assert "affiliate_channel_daily_totals" not in sql  # 18.16: no horizon, never reads itself


def test_past_the_click_horizon_the_clicks_are_the_rollups_own() -> None:
    horizon = click_horizon_sql(400)
    sql = totals_select("db", click_horizon=horizon)
    assert f"FROM db.affiliate_channel_daily_totals\n    WHERE day < {horizon}" in sql
    assert f"FROM db.clicks FINAL\n    WHERE toDate(ts) >= {horizon}" in sql
    assert "toYYYYMM" not in sql


def _squeeze(sql: str) -> str:
    return re.sub(r"\s+", " ", sql).strip()


def test_migration_0007s_view_recomputes_what_totals_select_does() -> None:
    (migration,) = [m for m in available_migrations() if m.name == "rollup"]
    view = migration.sql.split("TO {db}.affiliate_channel_daily_totals\nAS\n", 1)[1]
    expected = totals_select("{db}", click_horizon=click_horizon_sql("{clicks_ttl_days}"))
    assert _squeeze(view).rstrip(";").strip() == _squeeze(expected)


def test_a_failed_round_of_the_service_is_reported_and_the_next_one_runs() -> None:
    rounds: list[int] = []
    errors: list[str] = []
    sleeps: list[float] = []

    def round_() -> None:
        rounds.append(1)
        if len(rounds) == 1:
            raise RuntimeError("server restarting")

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_every(5.0, round_, lambda exc: errors.append(str(exc)), sleep)
    assert len(rounds) == 3 and errors == ["server restarting"]
    assert all(0 <= s <= 5.0 for s in sleeps)


TODAY = date(2026, 12, 1)


def test_the_click_horizon_is_two_days_inside_the_ttl() -> None:
    assert ClickHorizon(400).day(TODAY) == date(2025, 10, 29)
    assert ClickHorizon(0).day(TODAY) == date(1970, 1, 1)


def test_a_longer_ttl_keeps_closed_the_days_whose_clicks_are_gone_already() -> None:
    longer = ClickHorizon(400).under(800, TODAY)
    assert longer == ClickHorizon(800, date(2025, 10, 29))
    assert longer.day(TODAY) == date(2025, 10, 29)
    assert longer.day(TODAY.replace(year=2028)) == date(2026, 9, 25)  # the TTL's own, later
    assert ClickHorizon(400).under(0, TODAY) == ClickHorizon(0, date(2025, 10, 29))


def test_a_shorter_ttl_or_none_before_needs_no_floor() -> None:
    assert ClickHorizon(400).under(30, TODAY) == ClickHorizon(30)
    assert ClickHorizon(0).under(30, TODAY) == ClickHorizon(30)


@given(st.integers(0, 3000), st.integers(0, 3000), st.dates(date(2000, 1, 1), date(2100, 1, 1)))
def test_a_ttl_change_never_opens_a_day_that_was_closed(old: int, new: int, today: date) -> None:
    changed = ClickHorizon(old).under(new, today)
    assert changed.day(today) >= ClickHorizon(old).day(today)


def test_the_horizon_is_read_back_from_the_servers_text_of_the_query() -> None:
    # As 26.9 writes the view's query back (parenthesised).
    plain = "WHERE day < if(400 = 0, toDate('1970-01-01'), (today() - 400) + 2) AND clicks > 0"
    assert ClickHorizon.parse(plain) == ClickHorizon(400)
    floored = ("WHERE day < greatest(if(800 = 0, toDate('1970-01-01'), (today() - 800) + 2), "
               "toDate('2025-10-29')) AND clicks > 0")
    assert ClickHorizon.parse(floored) == ClickHorizon(800, date(2025, 10, 29))
    assert ClickHorizon.parse(ClickHorizon(800, date(2025, 10, 29)).sql()) == ClickHorizon(
        800, date(2025, 10, 29))
    assert ClickHorizon.parse("SELECT 1") is None


def test_the_view_reconcile_creates_where_it_is_missing_is_migration_0007s() -> None:
    (migration,) = [m for m in available_migrations() if m.name == "rollup"]
    options = SchemaOptions(clicks_ttl_days=90, rollup_refresh_seconds=30)
    [view] = [statement for statement in render(migration.sql, "db", Dialect((26, 9)), options)
              if statement.sql.startswith("CREATE MATERIALIZED VIEW")]
    assert _squeeze(create_refresh_view_sql("db", options)) == _squeeze(view.sql)
    assert not [statement for statement in render(migration.sql, "db", Dialect((18, 16)), options)
                if "MATERIALIZED VIEW" in statement.sql]
