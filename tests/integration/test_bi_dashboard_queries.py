"""Every query of the BI dashboard (deploy/grafana/dashboards/bi.json), with the plugin's macros
rendered as grafana-clickhouse-datasource renders them (pkg/macros/macros.go), runs on the local
18.16 and on current ClickHouse (26.9) against the cookbook's known data, with the right answers.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from integration.current_engine import current_server, current_target  # noqa: F401
from schemas.config import ClickHouseTarget
from sinks.clickhouse import connect

from integration.current_engine import debian_target  # noqa: F401
from test_sql_cookbook import T, money, seed
from unit.deploy.test_bi_dashboard import dashboard

pytestmark = pytest.mark.integration

UTC = timezone.utc
#: The dashboard's time range in the test: the last 30 days up to the end of today.
FROM, TO = T - timedelta(days=30), T + timedelta(days=1, seconds=-1)
_MACRO_CALL = re.compile(r"\$__(\w+)(?:\(([^()]*)\))?")


def render(sql: str, start: datetime, end: datetime, interval_s: int = 60) -> str:
    """The plugin's rendering of its macros: DateTime by Unix seconds, Date by UTC day."""

    def date(moment: datetime) -> str:
        return f"toDate('{moment.astimezone(UTC):%Y-%m-%d}')"

    def time(moment: datetime) -> str:
        return f"toDateTime({int(moment.timestamp())})"

    def one(match: re.Match[str]) -> str:
        name, column = match[1], (match[2] or "").strip()
        if name == "timeFilter":
            return f"{column} >= {time(start)} AND {column} <= {time(end)}"
        if name == "dateFilter":
            return f"{column} >= {date(start)} AND {column} <= {date(end)}"
        if name in ("fromTime", "toTime"):
            return time(start if name == "fromTime" else end)
        if name == "interval_s":
            return str(interval_s)
        raise AssertionError(f"no rendering for the macro $__{name}")

    return _MACRO_CALL.sub(one, sql)


def panel_answers(target: ClickHouseTarget) -> dict[str, list[tuple[Any, ...]]]:
    client = connect(target)
    try:
        return {panel["title"]: client.execute(render(t["rawSql"], FROM, TO))
                for panel in dashboard()["panels"] for t in panel["targets"]}
    finally:
        client.disconnect()


def day(value: Any) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value


def check_dashboard(target: ClickHouseTarget) -> None:
    seed(target)
    got = panel_answers(target)
    assert len(got) == len(dashboard()["panels"])
    today = T.replace(tzinfo=None)

    assert [(day(t), c, money(v)) for t, c, v in got["Net commission per day, by currency"]] == [
        (today, "EUR", Decimal("60.00"))]
    assert [(day(t), clicks, orders) for t, clicks, orders in
            got["Clicks and orders per day"]] == [(today, 8, 4)]
    assert [(a, money(net)) for a, _, _, _, net in got["Top partners"]] == [
        ("aff-2", Decimal("35.00")), ("aff-1", Decimal("25.00"))]
    assert [(ch, Decimal(epc)) for ch, _, _, _, epc in
            got["EPC (earnings per click) by channel"]] == [
        ("youtube", Decimal("7.5")), ("blog", Decimal("6.25"))]
    assert [row[0] for row in got["Leaking discount codes"]] == ["SAVE10"]
    payable = {cur: money(balance) for cur, _, _, balance, _, _ in
               got["Payable by currency (contract §9, as of today 00:00 UTC)"]}
    assert payable == {"EUR": Decimal("55.00"), "USD": Decimal("40.00")}
    assert [row[0] for row in got["Held orders awaiting review"]] == ["o4"]

    # Outside the range: nothing but the payable (which is as of today, whatever the range).
    client = connect(target)
    try:
        long_ago = T - timedelta(days=400)
        for panel in dashboard()["panels"]:
            rows = client.execute(render(panel["targets"][0]["rawSql"], long_ago,
                                         long_ago + timedelta(days=7)))
            assert bool(rows) == panel["title"].startswith("Payable"), panel["title"]
    finally:
        client.disconnect()


def test_the_dashboard_queries_answer_on_the_debian_server(
    debian_target: ClickHouseTarget,  # noqa: F811
) -> None:
    check_dashboard(debian_target)


def test_the_dashboard_queries_answer_on_the_current_server(
    current_target: ClickHouseTarget,  # noqa: F811
) -> None:
    check_dashboard(current_target)
