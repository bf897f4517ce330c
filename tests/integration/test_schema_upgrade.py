"""Migration 0006 on a database with rows: the tables get their new sort keys and keep every row,
on Debian's 18.16 and on current ClickHouse (26.9), also when the rebuild was cut off half-way;
and TTLs follow the settings on the server that has them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal

import pytest

from integration.current_engine import (  # noqa: F401
    current_server, current_target, debian_target, engine_target)
from schemas.config import ClickHouseTarget
from sinks.migrate import (
    MIGRATIONS_TABLE,
    Dialect,
    SchemaOptions,
    available_migrations,
    migrate,
    rebuild_table,
)

pytestmark = pytest.mark.integration

NEW_KEYS = {
    "clicks": "affiliate_id, toDate(ts), event_id",
    "shares": "affiliate_id, toDate(ts), event_id",
    "attributed_orders": "affiliate_id, toDate(ts), order_id",
    "commission_facts": "affiliate_id, toDate(order_ts), order_id, fact_id",
    "abuse_flags": "affiliate_id, toDate(ts), order_id, reason",
}
T = datetime(2026, 10, 30, 12, 0)
ROWS = {
    "clicks": ("event_id, ts, visitor_id, session_id, affiliate_id, channel, share_id, referrer_host",
               [(f"c{i}", T, f"v{i}", "s", f"aff{i % 3}", "blog", "", "") for i in range(50)]),
    "shares": ("event_id, ts, affiliate_id, share_id, channel, url",
               [(f"s{i}", T, "aff1", f"sh{i}", "email", "https://x") for i in range(5)]),
    "attributed_orders": (
        "order_id, ts, visitor_id, customer_id, affiliate_id, program_id, method, click_event_id,"
        " channel, discount_code, total, currency, commission, flags, status, version",
        [(f"o{i}", T, f"v{i}", f"cu{i}", f"aff{i % 3}", "p", "last_click", f"c{i}", "blog", "",
          Decimal("10.00"), "EUR", Decimal("1.00"), ["fast_conversion"] if i == 1 else [],
          "pending", 0) for i in range(10)]),
    "commission_facts": (
        "fact_id, order_id, affiliate_id, program_id, kind, amount, currency, status, ts, channel,"
        " order_ts",
        [(f"o{i}:accrual", f"o{i}", f"aff{i % 3}", "p", "accrual", Decimal("1.00"), "EUR",
          "pending", T, "blog", T) for i in range(10)]),
    "abuse_flags": ("order_id, ts, affiliate_id, discount_code, reason, severity, detail",
                    [("o1", T, "aff1", "", "fast_conversion", "hold", "12 s")]),
}


class Server:
    def __init__(self, execute, database: str) -> None:
        self.execute, self.database = execute, database

    def __call__(self, sql: str, rows=None):
        return self.execute(sql.replace("{db}", self.database), rows)

    def sorting_key(self, table: str) -> str:
        return str(self(f"SELECT sorting_key FROM system.tables WHERE database = '{{db}}' "
                        f"AND name = '{table}'")[0][0])

    def tables(self) -> set[str]:
        return {str(r[0]) for r in self("SELECT name FROM system.tables WHERE database = '{db}'")}

    def contents(self, table: str) -> list[tuple[object, ...]]:
        columns = ROWS[table][0]
        return sorted(tuple(map(str, row)) for row in self(f"SELECT {columns} FROM {{db}}.{table} FINAL"))


@pytest.fixture
def server(engine_target: ClickHouseTarget) -> Iterator[Server]:
    from sinks.clickhouse import connect

    client = connect(engine_target, with_database=False)

    def execute(sql: str, rows=None):
        return client.execute(sql, rows) if rows is not None else client.execute(sql)

    yield Server(execute, engine_target.database)
    client.disconnect()


def install_before_0006(server: Server) -> None:
    """A database as migrations 0001-0005 left it, with rows (some written twice: a replay)."""
    dialect = Dialect.detect(server)
    server("CREATE DATABASE IF NOT EXISTS {db}")
    server(f"CREATE TABLE {{db}}.{MIGRATIONS_TABLE} (version UInt32, name String, applied_at "
           "DateTime('UTC') DEFAULT now()) ENGINE = ReplacingMergeTree ORDER BY version")
    for migration in available_migrations():
        if migration.version >= 6:
            break
        for statement in migration.statements(server.database, dialect):
            server(statement)
        server(f"INSERT INTO {{db}}.{MIGRATIONS_TABLE} (version, name) VALUES",
               [(migration.version, migration.name)])
    for table, (columns, rows) in ROWS.items():
        server(f"INSERT INTO {{db}}.{table} ({columns}) VALUES", rows)
        server(f"INSERT INTO {{db}}.{table} ({columns}) VALUES", rows[:3])  # a replay


def test_0006_gives_the_tables_their_sort_keys_and_keeps_every_row(server):
    install_before_0006(server)
    before = {table: server.contents(table) for table in ROWS}
    said: list[str] = []
    applied = migrate(server, server.database, said.append, SchemaOptions(0, 0))
    assert 6 in [m.version for m in applied]
    for table, key in NEW_KEYS.items():
        assert server.sorting_key(table) in (key, key.replace(")", ", 'UTC')")), table
        assert server.contents(table) == before[table], table
        assert f"{table}__before_0006" in server.tables()  # kept for the operator to check
    assert any("kept the old clicks as clicks__before_0006 (53 rows)" in line for line in said)
    assert migrate(server, server.database, said.append, SchemaOptions(0, 0)) == []
    # the report view still reads the tables by name
    clicks = server("SELECT sum(clicks) FROM {db}.affiliate_channel_daily")[0][0]
    assert int(clicks) == 50


@pytest.mark.parametrize("cut_after", ["copy", "first_rename"])
def test_a_rebuild_cut_off_half_way_finishes_on_the_next_run(server, cut_after):
    install_before_0006(server)
    before = server.contents("clicks")
    dialect = Dialect.detect(server)
    migration = next(m for m in available_migrations() if m.version == 6)
    create = next(s.sql for s in migration.plan(server.database, dialect) if s.rebuild == "clicks")
    # what the first run got done before it was killed
    server(create.replace(f"{server.database}.clicks", f"{server.database}.clicks__rebuild", 1))
    server("INSERT INTO {db}.clicks__rebuild (event_id, ts, visitor_id, session_id, affiliate_id,"
           " channel, share_id, referrer_host, inserted_at) SELECT event_id, ts, visitor_id, "
           "session_id, affiliate_id, channel, share_id, referrer_host, inserted_at "
           "FROM {db}.clicks LIMIT 10")
    if cut_after == "first_rename":
        server("RENAME TABLE {db}.clicks TO {db}.clicks__before_0006")
    rebuild_table(server, server.database, "clicks", create, 6)
    assert server.sorting_key("clicks") in (NEW_KEYS["clicks"],
                                            "affiliate_id, toDate(ts, 'UTC'), event_id")
    assert server.contents("clicks") == before
    assert "clicks__rebuild" not in server.tables()


def test_ttls_follow_the_settings_where_the_server_has_them(server):
    migrate(server, server.database, options=SchemaOptions(clicks_ttl_days=30, pii_ttl_days=90))
    clicks = str(server("SHOW CREATE TABLE {db}.clicks")[0][0])
    orders = str(server("SHOW CREATE TABLE {db}.attributed_orders")[0][0])
    if not Dialect.detect(server).ttl:  # 18.16: none, and nothing fails
        assert "TTL" not in clicks + orders
        return
    assert "TTL ts + toIntervalDay(30)" in clicks
    assert "`visitor_id` String TTL ts + toIntervalDay(90)" in clicks
    assert "`customer_id` String TTL ts + toIntervalDay(90)" in orders
    said: list[str] = []
    migrate(server, server.database, said.append, SchemaOptions(30, 90))
    assert not [line for line in said if "TTL" in line]  # unchanged settings, no ALTER
    migrate(server, server.database, said.append, SchemaOptions(0, 0))
    assert "TTL" not in str(server("SHOW CREATE TABLE {db}.clicks")[0][0])
    # old identifying values are emptied once expired: a click from long ago
    migrate(server, server.database, options=SchemaOptions(clicks_ttl_days=0, pii_ttl_days=90))
    old = datetime(2020, 1, 1)
    server("INSERT INTO {db}.clicks (event_id, ts, visitor_id, session_id, affiliate_id, channel,"
           " share_id, referrer_host) VALUES", [("old", old, "v-old", "s-old", "a", "blog", "", "")])
    server("OPTIMIZE TABLE {db}.clicks FINAL")
    assert [tuple(map(str, r)) for r in server(
        "SELECT event_id, visitor_id, session_id, affiliate_id FROM {db}.clicks")] == [
        ("old", "", "", "a")]
