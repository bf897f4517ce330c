"""The warehouse benchmark (`loadtests/warehouse.py`) at a tiny scale on the local 18.16 server:
its generate and measure path runs, and the history it generates is a consistent ledger, so the
benchmark cannot silently rot (a query measured over rows that make no sense measures nothing).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from loadtests.warehouse import (
    History, Timing, clickhouse, generate, measure, payouts_create_action, table)
from schemas.config import ClickHouseTarget
from sinks.report import build_report

HISTORY = History(clicks=20_000, orders=1_000, days=60, end=date(2026, 12, 1))
QUERIES = ["rollup refresh, whole history", "report, one day", "report, 30 days",
           "statement, a median affiliate", "statement, the largest affiliate",
           "payouts create, whole ledger"]


@pytest.fixture(scope="module")
def bench(request: pytest.FixtureRequest) -> Iterator[tuple[ClickHouseTarget, list[Timing]]]:
    """The history generated and measured once (one run each) in a database of the module's own.

    Only ClickHouse is needed: the `stack` fixture (which starts Kafka too) only when ClickHouse
    is not running, as integration.current_engine's `debian_target` does.
    """
    from deploy.stack import Stack

    local = Stack()
    if not local.status().clickhouse.running:
        local = request.getfixturevalue("stack")
    target = ClickHouseTarget(
        f"clickhouse://default@{local.clickhouse_address}/t_wh_{uuid.uuid4().hex[:10]}")
    try:
        used, _ = generate(target, HISTORY, lambda line: None)
        assert used == HISTORY
        yield target, measure(target, used, runs=1, patience=60.0, give_up=300.0,
                              say=lambda line: None)
    finally:
        with clickhouse(target, with_database=False) as (_, execute):
            execute(f"DROP DATABASE IF EXISTS {target.database}")


def query(target: ClickHouseTarget, sql: str) -> list[tuple[Any, ...]]:
    with clickhouse(target) as (_, execute):
        return execute(sql.replace("{db}", target.database))


def test_every_query_is_measured_and_the_table_names_each(
        bench: tuple[ClickHouseTarget, list[Timing]]) -> None:
    _, timings = bench
    assert [t.name for t in timings] == QUERIES
    for timing in timings:
        assert len(timing.runs) == 1 and not timing.stopped and not timing.error, timing
        assert timing.detail
    printed = table({"local": {"timings": [t.as_dict() for t in timings]}})
    assert all(name in printed for name in QUERIES)
    # The payout tables are left empty, as before the runs.
    assert query(bench[0], "SELECT count() FROM {db}.payouts")[0][0] == 0


def test_the_history_has_the_rows_asked_for_each_id_once(
        bench: tuple[ClickHouseTarget, list[Timing]]) -> None:
    target, _ = bench
    for table_name, key, expected in (("clicks", "event_id", HISTORY.clicks),
                                      ("shares", "event_id", HISTORY.shares),
                                      ("attributed_orders", "order_id", HISTORY.orders)):
        count, distinct = query(target, f"SELECT count(), uniqExact({key}) FROM {{db}}.{table_name}")[0]
        assert count == distinct == expected, table_name
    first, last = query(target, "SELECT min(ts), max(ts) FROM {db}.clicks")[0]
    assert first.date() == HISTORY.start and last.date() == HISTORY.end - timedelta(days=1)
    affiliates, channels, currencies = query(target, """
        SELECT uniqExact(affiliate_id), uniqExact(channel), uniqExact(currency)
        FROM {db}.attributed_orders WHERE affiliate_id != ''""")[0]
    assert affiliates > 100 and channels >= 8 and currencies == 3
    # Zipf-like: the largest affiliate has many times the median's clicks.
    sizes = [n for (n,) in query(target, "SELECT count() AS n FROM {db}.clicks "
                                         "GROUP BY affiliate_id ORDER BY n DESC")]
    assert sizes[0] > 20 * sizes[len(sizes) // 2]


def test_every_attributed_order_has_exactly_one_accrual_and_no_other_order_any_fact(
        bench: tuple[ClickHouseTarget, list[Timing]]) -> None:
    target, _ = bench
    wrong = query(target, """
        SELECT order_id, affiliate_id, accruals, facts
        FROM {db}.attributed_orders
        ANY LEFT JOIN (SELECT order_id, countIf(kind = 'accrual') AS accruals, count() AS facts
                       FROM {db}.commission_facts GROUP BY order_id) USING order_id
        WHERE (affiliate_id != '' AND accruals != 1) OR (affiliate_id = '' AND facts != 0)
    """)
    assert wrong == []
    (unattributed,) = query(target, "SELECT countIf(affiliate_id = '') FROM {db}.attributed_orders")[0]
    assert 0 < unattributed < HISTORY.orders // 5


def test_facts_follow_the_ledger_rules(bench: tuple[ClickHouseTarget, list[Timing]]) -> None:
    """Accruals are the order's commission with its status; approvals 0.00 at lock end of pending
    orders only; reversals negative, within the accrual, `reversed` before lock end and
    `clawback` after; every fact carries its order's affiliate, currency, channel and time."""
    target, _ = bench
    # 18.16 joins by USING and cannot name the right side's columns: they are renamed.
    rows = query(target, """
        SELECT kind, status, amount, ts, o_ts, o_status, o_commission, o_program,
               affiliate_id = o_affiliate AND currency = o_currency AND channel = o_channel
                   AND order_ts = o_ts AND program_id = o_program
        FROM {db}.commission_facts
        ANY INNER JOIN (SELECT order_id, ts AS o_ts, status AS o_status,
                               commission AS o_commission, program_id AS o_program,
                               affiliate_id AS o_affiliate, currency AS o_currency,
                               channel AS o_channel
                        FROM {db}.attributed_orders) USING order_id
    """)
    kinds = {row[0] for row in rows}
    assert kinds == {"accrual", "approval", "reversal"}
    statuses = set()
    for kind, status, amount, ts, order_ts, order_status, commission, program, same in rows:
        assert same
        lock_end = order_ts + timedelta(days=14 if program == "friends" else 30)
        if kind == "accrual":
            assert (amount, status, ts) == (commission, order_status, order_ts)
        elif kind == "approval":
            assert (amount, status, ts, order_status) == (Decimal("0.00"), "approved", lock_end,
                                                          "pending")
        else:
            assert -commission <= amount < 0
            assert status == ("reversed" if ts < lock_end else "clawback")
            statuses.add(status)
        assert ts < datetime.combine(HISTORY.end, time(), tzinfo=timezone.utc)
    assert statuses == {"reversed", "clawback"}


def test_the_report_of_the_whole_history_equals_sums_from_the_tables(
        bench: tuple[ClickHouseTarget, list[Timing]]) -> None:
    target, _ = bench
    with clickhouse(target) as (client, _):
        rows = build_report(client, target.database, HISTORY.start,
                            HISTORY.end - timedelta(days=1)).rows
    clicks, = query(target, "SELECT count() FROM {db}.clicks FINAL")[0]
    shares, = query(target, "SELECT count() FROM {db}.shares FINAL")[0]
    orders, revenue = query(target, "SELECT count(), sum(total) FROM {db}.attributed_orders FINAL")[0]
    net, approved, held = query(target, """
        SELECT sum(net), sumIf(net, state = 'approved'), sumIf(net, state = 'held')
        FROM (SELECT order_id, sum(amount) AS net,
                     if(countIf(kind = 'approval') > 0, 'approved', anyIf(status, kind = 'accrual')) AS state
              FROM {db}.commission_facts FINAL GROUP BY order_id)""")[0]
    assert sum(r.clicks for r in rows) == clicks
    assert sum(r.shares for r in rows) == shares
    assert sum(r.orders for r in rows) == orders
    assert sum(r.revenue for r in rows) == revenue
    assert sum(r.net_commission for r in rows) == net
    assert sum(r.approved for r in rows) == approved > 0
    assert sum(r.held for r in rows) == held > 0


def test_payouts_create_pays_every_balance_reached_computed_from_the_facts(
        bench: tuple[ClickHouseTarget, list[Timing]]) -> None:
    """§9 in SQL, independently of the rules: an approved order's facts before the cut-off,
    summed per affiliate x currency; every sum of at least 50.00 is a line."""
    target, _ = bench
    cut_off = f"toDateTime('{HISTORY.end.isoformat()} 00:00:00', 'UTC')"
    expected = {(a, c): amount for a, c, amount in query(target, f"""
        SELECT affiliate_id, currency, sum(amount) AS payable
        FROM {{db}}.commission_facts FINAL
        WHERE ts < {cut_off} AND order_id IN (SELECT order_id FROM {{db}}.commission_facts FINAL
                                              WHERE kind = 'approval' AND ts < {cut_off})
        GROUP BY affiliate_id, currency
        HAVING payable >= 50""")}
    try:
        with clickhouse(target) as (client, execute):
            detail = payouts_create_action(target.database, HISTORY.end)(client, execute)
        lines = {(a, c): amount for a, c, amount in query(
            target, "SELECT affiliate_id, currency, amount FROM {db}.payout_lines FINAL")}
    finally:
        query(target, "TRUNCATE TABLE {db}.payout_lines")
        query(target, "TRUNCATE TABLE {db}.payouts")
    assert lines == expected and len(lines) > 10
    assert detail.startswith(f"{len(lines):,} lines")


def test_keep_reuses_a_history_of_the_same_sizes(
        bench: tuple[ClickHouseTarget, list[Timing]]) -> None:
    target, _ = bench
    later = History(HISTORY.clicks, HISTORY.orders, HISTORY.days, HISTORY.end + timedelta(days=3))
    used, outcome = generate(target, later, lambda line: None, keep=True)
    assert outcome.reused and used == HISTORY
    assert outcome.rows["clicks"] == HISTORY.clicks
