"""The DDL on both engines: the Debian 18.16 server and current ClickHouse (chdb, in-process)."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

import pytest

from sinks.migrate import MIGRATIONS_TABLE, available_migrations, migrate

CONTRACT_COLUMNS = {
    "attributed_orders": {"order_id", "ts", "visitor_id", "customer_id", "affiliate_id",
                          "program_id", "method", "click_event_id", "channel", "discount_code",
                          "total", "currency", "flags", "status"},
    "commission_facts": {"fact_id", "order_id", "affiliate_id", "program_id", "kind", "amount",
                         "currency", "status", "ts"},
    "abuse_flags": {"order_id", "ts", "affiliate_id", "discount_code", "reason", "severity",
                    "detail"},
    "clicks": {"event_id", "ts", "visitor_id", "session_id", "affiliate_id", "channel",
               "share_id", "referrer_host"},
    "shares": {"event_id", "ts", "affiliate_id", "share_id", "channel"},
}
REPORTING = {"affiliate_channel_daily": {"day", "affiliate_id", "channel", "clicks", "shares",
                                         "orders", "revenue", "net_commission"}}

T0 = datetime(2026, 11, 2, 10, 0)
T1 = datetime(2026, 11, 2, 11, 0)
SAMPLE_ROWS = [
    ("INSERT INTO {db}.clicks (event_id, ts, visitor_id, session_id, affiliate_id, channel,"
     " share_id, referrer_host) VALUES", [("c1", T0, "v", "s", "a", "blog", "", "")]),
    ("INSERT INTO {db}.attributed_orders (order_id, ts, visitor_id, customer_id, affiliate_id,"
     " program_id, method, click_event_id, channel, discount_code, total, currency, commission,"
     " flags, status, version) VALUES",
     [("o1", T1, "v", "c", "a", "p", "last_click", "c1", "blog", "", Decimal("100.00"), "EUR",
       Decimal("10.00"), [], "pending", 0)]),
    ("INSERT INTO {db}.commission_facts (fact_id, order_id, affiliate_id, program_id, kind, amount,"
     " currency, status, ts, channel, order_ts) VALUES",
     [("o1:accrual", "o1", "a", "p", "accrual", Decimal("10.00"), "EUR", "pending", T1, "blog",
       T1)]),
]


def sql_literal(value: object) -> str:
    if isinstance(value, (int, Decimal)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(sql_literal(v) for v in value) + "]"
    if isinstance(value, datetime):
        value = value.strftime("%Y-%m-%d %H:%M:%S")
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def columns_of(execute, database: str, table: str) -> set[str]:
    rows = execute(f"SELECT name FROM system.columns WHERE database = '{database}' AND table = '{table}'")
    return {row[0] for row in rows}


def check_schema(execute, database: str) -> None:
    first = migrate(execute, database)
    assert [m.version for m in first] == [m.version for m in available_migrations()]
    assert migrate(execute, database) == []  # idempotent: nothing applied twice
    versions = execute(f"SELECT count() FROM {database}.{MIGRATIONS_TABLE} FINAL")[0][0]
    assert int(versions) == len(available_migrations())
    for table, columns in {**CONTRACT_COLUMNS, **REPORTING}.items():
        assert columns <= columns_of(execute, database, table), table
    for statement, rows in SAMPLE_ROWS:
        execute(statement.replace("{db}", database), rows)
    row = execute(
        f"SELECT clicks, orders, toString(revenue), toString(net_commission) "
        f"FROM {database}.affiliate_channel_daily WHERE affiliate_id = 'a' AND currency = 'EUR'"
    )
    # compared as numbers: current ClickHouse prints decimals without trailing zeros
    assert [tuple(Decimal(str(v)) for v in r) for r in row] == [(0, 1, Decimal("100"), Decimal("10"))]


@pytest.mark.integration
def test_migrations_apply_once_on_the_debian_server(stack):
    from clickhouse_driver import Client

    host, port = stack.clickhouse_address.split(":")
    client = Client(host=host, port=int(port))
    database = f"m_{uuid.uuid4().hex[:10]}"

    def execute(sql: str, rows=None):
        return client.execute(sql, rows) if rows is not None else client.execute(sql)

    try:
        check_schema(execute, database)
    finally:
        client.execute(f"DROP DATABASE IF EXISTS {database}")


def test_migrations_apply_once_on_current_clickhouse(tmp_path):
    chdb_session = pytest.importorskip("chdb.session")
    session = chdb_session.Session(str(tmp_path / "chdb"))
    database = "attribution_current"

    def execute(sql: str, rows=None):
        if rows is not None:
            values = ", ".join("(" + ", ".join(sql_literal(v) for v in row) + ")" for row in rows)
            sql = f"{sql} {values}"
        result = session.query(sql, "TabSeparated")
        text = result.bytes().decode() if hasattr(result, "bytes") else str(result)
        return [tuple(line.split("\t")) for line in text.splitlines() if line]

    try:
        check_schema(execute, database)
    finally:
        session.close()
