"""Migrations rendered for the server they run on (sinks.migrate.render), without a server."""

from __future__ import annotations

import pytest

from sinks.migrate import (
    DEBIAN_18_16,
    Dialect,
    SchemaOptions,
    available_migrations,
    render,
    ttl_statements,
)

CURRENT = Dialect((26, 9))

SQL = """
-- a comment; with a semicolon that must not split anything
CREATE TABLE {db}.t (c LowCardinality(String), n LowCardinality(Nullable(String)), a Array(LowCardinality(String)))
ENGINE = MergeTree ORDER BY (c, DAY_OF(ts));

-- requires: refreshable_views
CREATE MATERIALIZED VIEW {db}.v REFRESH EVERY {rollup_refresh_seconds} SECOND TO {db}.t AS SELECT 1;

-- unless: refreshable_views
CREATE TABLE {db}.marks (m UInt32) ENGINE = MergeTree ORDER BY m;

-- rebuild: t2
CREATE TABLE {db}.t2 (x String) ENGINE = MergeTree ORDER BY x
"""


def test_current_servers_get_low_cardinality_toDate_and_the_refreshable_view():
    statements = render(SQL, "db1", CURRENT, SchemaOptions(rollup_refresh_seconds=30))
    assert [s.sql.split("(")[0].strip() for s in statements] == [
        "CREATE TABLE db1.t", "CREATE MATERIALIZED VIEW db1.v REFRESH EVERY 30 SECOND TO db1.t AS SELECT 1",
        "CREATE TABLE db1.t2"]
    assert "c LowCardinality(String)" in statements[0].sql
    assert "ORDER BY (c, toDate(ts))" in statements[0].sql
    assert [s.rebuild for s in statements] == [None, None, "t2"]


def test_debian_18_16_gets_plain_types_a_utc_day_and_the_marks_table():
    statements = render(SQL, "db1", DEBIAN_18_16)
    assert [s.sql.split("(")[0].strip() for s in statements] == [
        "CREATE TABLE db1.t", "CREATE TABLE db1.marks", "CREATE TABLE db1.t2"]
    table = statements[0].sql
    assert "LowCardinality" not in table
    assert "c String, n Nullable(String), a Array(String)" in table
    assert "ORDER BY (c, toDate(ts, 'UTC'))" in table


def test_a_directive_without_a_statement_is_an_error():
    with pytest.raises(ValueError, match="no statement"):
        render("CREATE TABLE x (a UInt8) ENGINE = Log;\n-- requires: ttl\n", "db", CURRENT)


def test_an_unknown_feature_is_named():
    with pytest.raises(ValueError, match="unknown schema feature 'window_views'"):
        render("-- requires: window_views\nSELECT 1", "db", CURRENT)


@pytest.mark.parametrize("version, dialect", [("18.16.1", (18, 16)), ("26.9.2.1", (26, 9)),
                                              ("24.10.1.2812", (24, 10))])
def test_versions_parse(version, dialect):
    assert Dialect.parse(version).version == dialect


def test_features_by_version():
    assert not DEBIAN_18_16.low_cardinality and not DEBIAN_18_16.ttl
    assert not DEBIAN_18_16.refreshable_views
    assert Dialect((24, 9)).ttl and not Dialect((24, 9)).refreshable_views
    assert CURRENT.low_cardinality and CURRENT.ttl and CURRENT.refreshable_views


@pytest.mark.parametrize("dialect", [DEBIAN_18_16, CURRENT])
def test_every_shipped_migration_renders(dialect):
    for migration in available_migrations():
        for statement in migration.plan("db", dialect):
            assert "{" not in statement.sql.replace("{}", ""), (migration.name, statement.sql)
            assert "DAY_OF" not in statement.sql
            if not dialect.low_cardinality:
                assert "LowCardinality" not in statement.sql


CLICKS_WITH_TTL = """CREATE TABLE db.clicks
(
    `event_id` String,
    `ts` DateTime('UTC'),
    `visitor_id` String TTL ts + toIntervalDay(400),
    `session_id` String TTL ts + toIntervalDay(400),
    `channel` LowCardinality(String)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (affiliate_id, toDate(ts), event_id)
TTL ts + toIntervalDay(400)
SETTINGS index_granularity = 8192"""

ORDERS_WITHOUT_TTL = """CREATE TABLE db.attributed_orders
(
    `order_id` String,
    `ts` DateTime('UTC'),
    `visitor_id` String,
    `customer_id` String
)
ENGINE = ReplacingMergeTree(version)
ORDER BY order_id
SETTINGS index_granularity = 8192"""


def fake_server(queries: dict[str, str]):
    def execute(sql, rows=None):
        for table, query in queries.items():
            if f"name = '{table}'" in sql and "create_table_query" in sql:
                return [(query,)]
            if f"table = '{table}'" in sql and "SELECT name, type" in sql:
                return [("visitor_id", "String"), ("session_id", "String"), ("customer_id", "String")]
        raise AssertionError(sql)
    return execute


def test_ttl_statements_only_for_what_differs_from_the_settings():
    execute = fake_server({"clicks": CLICKS_WITH_TTL, "attributed_orders": ORDERS_WITHOUT_TTL})
    assert ttl_statements(execute, "db", SchemaOptions(400, 400)) == [
        "ALTER TABLE db.attributed_orders MODIFY COLUMN visitor_id String TTL ts + toIntervalDay(400)",
        "ALTER TABLE db.attributed_orders MODIFY COLUMN customer_id String TTL ts + toIntervalDay(400)",
    ]
    assert ttl_statements(execute, "db", SchemaOptions(30, 0)) == [
        "ALTER TABLE db.clicks MODIFY TTL ts + toIntervalDay(30)",
        "ALTER TABLE db.clicks MODIFY COLUMN visitor_id REMOVE TTL",
        "ALTER TABLE db.clicks MODIFY COLUMN session_id REMOVE TTL",
    ]
    assert ttl_statements(execute, "db", SchemaOptions(0, 0))[0] == "ALTER TABLE db.clicks REMOVE TTL"
