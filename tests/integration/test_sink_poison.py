"""The row sink against the real local ClickHouse: one flush of rows over 101 months all land
(current servers refuse an insert block of more than 100 partitions; 18.16 has no such limit, the
unit tests hold the split to it), and a row ClickHouse will not take comes back as `Rejected`
with its message while every other row of the flush lands."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest

from schemas.config import ClickHouseTarget
from sinks.clickhouse import RowSink, connect
from sinks.migrate import migrate_server
from sinks.rows import TABLES

pytestmark = pytest.mark.integration


@pytest.fixture
def target(stack: Any) -> Iterator[ClickHouseTarget]:
    """A migrated database of this test's own on the shared server; dropped afterwards."""
    target = ClickHouseTarget(f"clickhouse://default@{stack.clickhouse_address}/t_{uuid.uuid4().hex[:10]}")
    migrate_server(target)
    yield target
    client = connect(target, with_database=False)
    try:
        client.execute(f"DROP DATABASE IF EXISTS {target.database}")
    finally:
        client.disconnect()


@pytest.fixture
def sink(target: ClickHouseTarget) -> Iterator[RowSink]:
    rows = RowSink(target, TABLES)
    yield rows
    rows.close()


def query(target: ClickHouseTarget, sql: str) -> list[tuple[Any, ...]]:
    client = connect(target)
    try:
        return client.execute(sql)  # type: ignore[no-any-return]
    finally:
        client.disconnect()


def click(event_id: str, ts: Any) -> tuple[Any, ...]:
    return (event_id, ts, "visitor-1", "session-1", "sally", "blog", "", "")


def fact(fact_id: str, amount: Decimal, order_ts: datetime) -> tuple[Any, ...]:
    return (fact_id, f"order-{fact_id}", "sally", "ambassadors", "accrual", amount, "EUR",
            "pending", order_ts, "blog", order_ts)


def test_clicks_over_101_months_in_one_flush_all_land(sink: RowSink, target: ClickHouseTarget) -> None:
    for n in range(101):
        sink.add("clicks", click(f"c{n}", datetime(2016 + n // 12, n % 12 + 1, 15, 8, 30)))
    assert sink.flush() == []
    assert query(target, "SELECT count(), uniqExact(toYYYYMM(ts)) FROM clicks FINAL") == [(101, 101)]


def test_rows_clickhouse_rejects_come_back_with_its_message_and_the_others_land(
    sink: RowSink, target: ClickHouseTarget,
) -> None:
    ts = datetime(2026, 11, 2, 10, 15)
    for n in range(20):
        sink.add("clicks", click(f"c{n}", ts), origin=f"click-event-{n}")
    # DateTime starts in 1970: an event dated 1969 has no ClickHouse representation.
    sink.add("clicks", click("c-1969", datetime(1969, 12, 31, 23, 0)), origin="click-event-1969")
    sink.add("commission_facts", fact("f-ok", Decimal("12.90"), ts))
    # Decimal(18, 2) holds less than 10^16: an absurd order total's commission does not fit.
    sink.add("commission_facts", fact("f-huge", Decimal("1e17"), ts), origin="order-event-huge")

    rejected = sink.flush()

    assert sorted((r.table, r.row[0], r.origin) for r in rejected) == [
        ("clicks", "c-1969", "click-event-1969"),
        ("commission_facts", "f-huge", "order-event-huge"),
    ]
    assert all("Column" in r.error and "out of range" in r.error for r in rejected), rejected
    assert query(target, "SELECT count() FROM clicks FINAL") == [(20,)]
    assert query(target, "SELECT fact_id, amount FROM commission_facts FINAL") == [("f-ok", Decimal("12.90"))]
    assert sink.pending_rows() == 0
    assert sink.flush() == []  # rejected rows are not retried
