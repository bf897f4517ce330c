"""`attribution forget` (issue 12 item 8): a customer's identifiers leave ClickHouse and the
worker's state, the money stays, and every run is audited.

The ClickHouse half runs on both servers (the Debian 18.16 one and current ClickHouse in chdb);
the whole command runs against the real stack after a real worker has written the rows.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import orjson
import pytest
from kafka import TopicPartition

from schemas.pii import keyed_hash
from sinks.forget import AUDIT_TABLE, ForgetError, forget_customer, mention_pattern, tombstone
from sinks.migrate import migrate

KEY = "forget-test-key-0123456789abcdef"
T = datetime(2026, 11, 2, 10, 0)

Execute = Callable[..., list[tuple[Any, ...]]]


# --- the ClickHouse half, on both servers --------------------------------------------------


def literal(value: object) -> str:
    if isinstance(value, (int, Decimal)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, datetime):
        value = value.strftime("%Y-%m-%d %H:%M:%S")
    from sinks.forget import quote

    return quote(str(value))


@pytest.fixture(params=[pytest.param("debian", marks=pytest.mark.integration), "current"])
def clickhouse(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Execute, str]]:
    """(execute, database): a fresh migrated database on the Debian server or in chdb."""
    database = f"f_{uuid.uuid4().hex[:10]}"
    if request.param == "debian":
        from clickhouse_driver import Client

        stack = request.getfixturevalue("stack")
        host, port = stack.clickhouse_address.split(":")
        client = Client(host=host, port=int(port))

        def execute(sql: str, rows: Any = None) -> list[tuple[Any, ...]]:
            return client.execute(sql, rows) if rows is not None else client.execute(sql)  # type: ignore[no-any-return]

        migrate(execute, database)
        yield execute, database
        client.execute(f"DROP DATABASE IF EXISTS {database}")
        client.disconnect()
        return
    chdb_session = pytest.importorskip("chdb.session")
    session = chdb_session.Session(str(tmp_path / "chdb"))

    def execute_current(sql: str, rows: Any = None) -> list[tuple[Any, ...]]:
        if rows is not None:
            sql += " " + ", ".join("(" + ", ".join(literal(v) for v in row) + ")" for row in rows)
        result = session.query(sql, "JSONCompact")
        text = result.bytes() if hasattr(result, "bytes") else str(result).encode()
        return [tuple(row) for row in orjson.loads(text)["data"]] if text.strip() else []

    try:
        migrate(execute_current, database)
        yield execute_current, database
    finally:
        session.close()


def numbers(value: Any) -> Any:
    """chdb's JSON quotes 64-bit integers, the native client does not."""
    if isinstance(value, list):
        return [numbers(v) for v in value]
    return int(value) if isinstance(value, str) and value.isdigit() else value


def insert(execute: Execute, database: str, table: str, columns: str, rows: list[tuple]) -> None:
    execute(f"INSERT INTO {database}.{table} ({columns}) VALUES", rows)


ODD = "o'brien\\\n€"  # an id that needs escaping


def seed(execute: Execute, database: str) -> None:
    """Customer cust-1 ordered as v1 and v2; cust-10 as v2 (a shared browser) and v3."""
    insert(execute, database, "attributed_orders",
           "order_id, ts, visitor_id, customer_id, affiliate_id, program_id, method, "
           "click_event_id, channel, discount_code, total, currency, commission, flags, status, "
           "version", [
               ("o1", T, "v1", "cust-1", "bob", "p", "last_click", "c1", "blog", "", Decimal("100.00"),
                "EUR", Decimal("10.00"), [], "pending", 0),
               ("o2", T, "v2", "cust-1", "sally", "p", "last_click", "c2", "blog", "", Decimal("40.00"),
                "EUR", Decimal("0.00"), ["self_referral"], "rejected", 0),
               ("o2", T, "v2", "cust-1", "sally", "p", "last_click", "c2", "blog", "", Decimal("40.00"),
                "EUR", Decimal("0.00"), ["self_referral"], "rejected", 1),  # a later version
               ("o3", T, "v2", "cust-10", "bob", "p", "last_click", "c3", "blog", "", Decimal("7.00"),
                "EUR", Decimal("0.70"), [], "pending", 0),
               ("o4", T, "v3", "cust-10", "bob", "p", "none", "", "", "", Decimal("5.00"),
                "EUR", Decimal("0.00"), [], "unattributed", 0),
               ("o5", T, "v9", ODD, "", "", "none", "", "", "", Decimal("1.00"),
                "EUR", Decimal("0.00"), [], "unattributed", 0),
           ])
    insert(execute, database, "clicks",
           "event_id, ts, visitor_id, session_id, affiliate_id, channel, share_id, referrer_host", [
               ("c1", T, "v1", "s1", "bob", "blog", "", "blog.example"),
               ("c1b", T, "v1", "s1b", "bob", "blog", "", ""),
               ("c2", T, "v2", "s2", "sally", "blog", "", ""),
               ("c3", T, "v3", "s3", "bob", "blog", "", ""),
           ])
    insert(execute, database, "commission_facts",
           "fact_id, order_id, affiliate_id, program_id, kind, amount, currency, status, ts, "
           "channel, order_ts", [
               ("o1:accrual", "o1", "bob", "p", "accrual", Decimal("10.00"), "EUR", "pending", T,
                "blog", T),
               ("o3:accrual", "o3", "bob", "p", "accrual", Decimal("0.70"), "EUR", "pending", T,
                "blog", T),
           ])
    insert(execute, database, "abuse_flags",
           "order_id, ts, affiliate_id, discount_code, reason, severity, detail", [
               ("o2", T, "sally", "", "self_referral", "reject",
                "customer cust-1 is affiliate sally's own customer account"),
               ("o3", T, "bob", "", "customer_lookalike", "hold",
                "customer cust-10 looks like affiliate bob's own account cust-1"),
           ])
    insert(execute, database, "reviews",
           "review_id, order_id, ts, decision, reviewer, note, affiliate_id, outcome", [
               ("r1", "o2", T, "reject", "rita", "cust-1 confirmed it, cust-1!", "sally", "rejected"),
           ])


def test_forget_replaces_identifiers_keeps_money_and_is_idempotent(clickhouse):
    execute, db = clickhouse
    seed(execute, db)
    money = f"SELECT sum(total), sum(commission), count() FROM {db}.attributed_orders"
    facts = f"SELECT fact_id, toString(amount), status FROM {db}.commission_facts ORDER BY fact_id"
    money_before, facts_before = execute(money), execute(facts)
    # Physical rows: current ClickHouse may already have merged o2's two versions on insert.
    [(order_rows,)] = execute(f"SELECT count() FROM {db}.attributed_orders "
                              f"WHERE customer_id = 'cust-1' OR visitor_id IN ('v1', 'v2')")
    told: list[tuple[str, ...]] = []
    key = KEY.encode()

    def forget_state(visitors: tuple[str, ...]) -> int:
        told.append(visitors)
        return 0

    outcome = forget_customer(execute, db, "cust-1", key, requested_by="dpo",
                              forget_state=forget_state, timeout=60)

    gone, v1, v2 = tombstone("cust-1", key), tombstone("v1", key), tombstone("v2", key)
    assert told == [("v1", "v2")]
    assert (outcome.outcome, outcome.orders, outcome.visitors) == ("erased", 2, 2)
    assert outcome.rows == {"attributed_orders": int(order_rows), "clicks": 3, "abuse_flags": 2,
                            "reviews": 1}
    assert sorted(execute(f"SELECT order_id, visitor_id, customer_id "
                          f"FROM {db}.attributed_orders FINAL")) == [
        ("o1", v1, gone), ("o2", v2, gone), ("o3", v2, "cust-10"), ("o4", "v3", "cust-10"),
        ("o5", "v9", ODD)]
    assert execute(f"SELECT count() FROM {db}.attributed_orders WHERE customer_id = 'cust-1' "
                   f"OR visitor_id IN ('v1', 'v2')") in ([(0,)], [("0",)])
    assert sorted(execute(f"SELECT event_id, visitor_id, session_id, referrer_host "
                          f"FROM {db}.clicks")) == [
        ("c1", v1, tombstone("s1", key), "blog.example"), ("c1b", v1, tombstone("s1b", key), ""),
        ("c2", v2, tombstone("s2", key), ""), ("c3", "v3", "s3", "")]
    assert sorted(execute(f"SELECT detail FROM {db}.abuse_flags")) == [
        (f"customer cust-10 looks like affiliate bob's own account {gone}",),
        (f"customer {gone} is affiliate sally's own customer account",)]
    assert execute(f"SELECT note FROM {db}.reviews") == [(f"{gone} confirmed it, {gone}!",)]
    assert execute(money) == money_before
    assert execute(facts) == facts_before
    # ClickHouse keeps mutation commands on disk: none names the customer, a visitor or a session.
    commands = repr(execute(f"SELECT command FROM system.mutations WHERE database = '{db}'"))
    assert gone in commands
    assert not mention_pattern("cust-1").search(commands)  # cust-10's flag text is there
    for identifier in ("'v1'", "'v2'", "'s1'", "'s1b'", "'s2'"):
        assert identifier not in commands

    again = forget_customer(execute, db, "cust-1", key, requested_by="dpo",
                            forget_state=forget_state, timeout=60)
    assert (again.outcome, again.rows, len(told)) == ("already_forgotten", {}, 1)
    unknown = forget_customer(execute, db, "nobody", key, requested_by="dpo",
                              forget_state=forget_state, timeout=60)
    assert unknown.outcome == "nothing_found"

    audit = execute(f"SELECT action, subject_hash, tables_touched, table_rows, rows_affected, "
                    f"visitors, orders, state_records, requested_by, outcome "
                    f"FROM {db}.{AUDIT_TABLE} ORDER BY ts, outcome")
    subject = keyed_hash("cust-1", key)
    assert sorted((tuple(numbers(v) for v in row) for row in audit), key=repr) == sorted([
        ("forget", subject, ["abuse_flags", "attributed_orders", "clicks", "reviews"],
         [2, int(order_rows), 3, 1], 6 + int(order_rows), 2, 2, 2, "dpo", "erased"),
        ("forget", subject, [], [], 0, 0, 0, 0, "dpo", "already_forgotten"),
        ("forget", keyed_hash("nobody", key), [], [], 0, 0, 0, 0, "dpo", "nothing_found"),
    ], key=repr)


def test_an_id_that_needs_escaping_is_forgotten_too(clickhouse):
    execute, db = clickhouse
    seed(execute, db)
    outcome = forget_customer(execute, db, ODD, KEY.encode(), requested_by="dpo",
                              forget_state=lambda visitors: 0, timeout=60)
    assert outcome.outcome == "erased"
    assert execute(f"SELECT visitor_id, customer_id FROM {db}.attributed_orders "
                   f"WHERE order_id = 'o5'") == [(tombstone("v9", KEY.encode()),
                                                 tombstone(ODD, KEY.encode()))]


def test_nothing_is_erased_when_the_worker_could_not_be_told(clickhouse):
    execute, db = clickhouse
    seed(execute, db)
    with pytest.raises(ForgetError):
        forget_customer(execute, db, "cust-1", KEY.encode(), requested_by="dpo",
                        forget_state=lambda visitors: 1, timeout=60)
    [(left,)] = execute(f"SELECT count() FROM {db}.attributed_orders FINAL "
                        f"WHERE customer_id = 'cust-1'")
    assert int(left) == 2
    assert [o for (o,) in execute(f"SELECT outcome FROM {db}.{AUDIT_TABLE}")] == ["incomplete"]


# --- the whole command, after a real worker ------------------------------------------------


REFERENCE = {
    "programs": [{"program_id": "aff", "kind": "affiliate",
                  "commission": {"type": "percent", "rate": "0.10"}}],
    "affiliates": [
        {"affiliate_id": "bob", "program_id": "aff", "codes": ["BOB10"]},
        {"affiliate_id": "sally", "program_id": "aff", "customer_id": "cust-gdpr",
         "codes": ["SALLY20"]},
    ],
}


def event_lines() -> list[dict]:
    def click(event_id: str, visitor: str, affiliate: str, minute: int) -> dict:
        return {"event_id": event_id, "type": "click", "ts": f"2026-11-02T10:{minute:02d}:00Z",
                "visitor_id": visitor, "session_id": f"s-{event_id}", "affiliate_id": affiliate,
                "channel": "blog", "ip": "203.0.113.9", "user_agent": "Mozilla/5.0 (X11)"}

    def order(order_id: str, visitor: str, customer: str, total: str) -> dict:
        return {"event_id": f"e-{order_id}", "type": "order", "ts": "2026-11-02T11:00:00Z",
                "order_id": order_id, "visitor_id": visitor, "customer_id": customer,
                "currency": "EUR", "total": total, "ip": "203.0.113.9"}

    return [click("c1", "v-a", "bob", 0), click("c2", "v-a", "bob", 5),
            click("c3", "v-b", "sally", 0), click("c4", "v-c", "bob", 0),
            order("o1", "v-a", "cust-gdpr", "100.00"),
            order("o2", "v-b", "cust-gdpr", "40.00"),  # sally's own account: self_referral
            order("o3", "v-c", "cust-other", "30.00")]


def attribution(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "attribution", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def forget_records(config: Any) -> list[tuple[int, bytes, list[dict]]]:
    """(partition, key, items) of every record on visitor-events that carries a forget item."""
    from streams.kafka_clients import consumer as make_consumer

    topic = config.topic("visitor-events")
    consumer = make_consumer(config, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        found = []
        deadline = time.monotonic() + 20
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            assert time.monotonic() < deadline, f"could not read {topic} up to {end}"
            for tp, records in consumer.poll(timeout_ms=500).items():
                for record in records:
                    items = orjson.loads(record.value)
                    if any(item.get("type") == "forget" for item in items):
                        found.append((tp.partition, record.key, items))
        return sorted(found)
    finally:
        consumer.close()


@pytest.mark.integration
def test_forget_with_a_real_worker_erases_the_customer_from_clickhouse_and_its_state(isolated):
    from kafka.partitioner import murmur2

    from schemas.validation import parse_reference_document
    from streams.publish import produce_lines, publish_reference

    config = isolated.config
    publish_reference(config, *parse_reference_document(orjson.dumps(REFERENCE)))
    produce_lines(config, [orjson.dumps(e) for e in event_lines()])
    isolated.worker().start()
    isolated.wait_for("SELECT count() FROM {db}.attributed_orders FINAL", lambda n: n == 3)
    isolated.wait_for("SELECT count() FROM {db}.commission_facts FINAL", lambda n: n == 3)
    isolated.wait_for("SELECT count() FROM {db}.abuse_flags FINAL", lambda n: n == 1)
    isolated.wait_for("SELECT count() FROM {db}.clicks FINAL", lambda n: n == 4)
    money = ("SELECT order_id, toString(total), toString(commission), status, affiliate_id "
             "FROM {db}.attributed_orders FINAL ORDER BY order_id")
    facts = "SELECT fact_id, toString(amount), status FROM {db}.commission_facts FINAL ORDER BY fact_id"
    money_before, facts_before = isolated.query(money), isolated.query(facts)
    assert isolated.query("SELECT affiliate_id, method FROM {db}.attributed_orders FINAL "
                          "WHERE order_id = 'o1'") == [("bob", "last_click")]  # v-a's clicks count
    total_before = isolated.query("SELECT sum(amount) FROM {db}.commission_facts FINAL")

    env = dict(isolated.env, PII_KEY=KEY)
    without_key = attribution(isolated.env, "forget", "--customer", "cust-gdpr")
    assert without_key.returncode == 2 and "PII_KEY" in without_key.stderr

    first = attribution(env, "forget", "--customer", "cust-gdpr", "--requested-by", "dpo@shop")
    assert first.returncode == 0, first.stderr
    assert "forgot 2 orders and 2 visitors" in first.stdout
    assert "cust-gdpr" not in first.stdout + first.stderr  # only its keyed hash is shown

    key = KEY.encode()
    everything = isolated.query(
        "SELECT groupArray(visitor_id), groupArray(customer_id) FROM {db}.attributed_orders")
    clicks = isolated.query("SELECT groupArray(visitor_id), groupArray(session_id) FROM {db}.clicks")
    text = repr(everything) + repr(clicks) + repr(isolated.query("SELECT * FROM {db}.abuse_flags"))
    for identifier in ("cust-gdpr", "'v-a'", "'v-b'", "s-c1", "s-c2", "s-c3"):
        assert identifier not in text
    assert isolated.query("SELECT order_id, visitor_id, customer_id FROM {db}.attributed_orders "
                          "FINAL ORDER BY order_id") == [
        ("o1", tombstone("v-a", key), tombstone("cust-gdpr", key)),
        ("o2", tombstone("v-b", key), tombstone("cust-gdpr", key)),
        ("o3", "v-c", "cust-other")]
    assert isolated.query("SELECT count() FROM {db}.clicks WHERE visitor_id = 'v-c'") == [(1,)]
    assert isolated.query(money) == money_before
    assert isolated.query(facts) == facts_before
    assert isolated.query("SELECT sum(amount) FROM {db}.commission_facts FINAL") == total_before

    [audit] = isolated.query(f"SELECT action, subject_hash, requested_by, outcome, rows_affected "
                             f"FROM {{db}}.{AUDIT_TABLE}")
    assert audit[:4] == ("forget", keyed_hash("cust-gdpr", key), "dpo@shop", "erased")
    assert audit[4] >= 2 + 3 + 1  # two orders, three clicks, the flag's detail

    partitions = config.partitions
    records = forget_records(config)
    assert [(p, k, [(i["type"], i["visitor_id"]) for i in items]) for p, k, items in records] == \
        sorted((((murmur2(v.encode()) & 0x7FFFFFFF) % partitions), v.encode(), [("forget", v)])
               for v in ("v-a", "v-b"))

    # The worker forgot v-a's clicks: a later order from that browser finds none to attribute
    # to (bob's c2 would have won it).
    produce_lines(config, [orjson.dumps({
        "event_id": "e-o4", "type": "order", "ts": "2026-11-02T12:00:00Z", "order_id": "o4",
        "visitor_id": "v-a", "customer_id": "cust-new", "currency": "EUR", "total": "10.00"})])
    isolated.wait_for("SELECT count() FROM {db}.attributed_orders FINAL WHERE order_id = 'o4'",
                      lambda n: n == 1)
    assert isolated.query("SELECT affiliate_id, method FROM {db}.attributed_orders FINAL "
                          "WHERE order_id = 'o4'") == [("", "none")]

    second = attribution(env, "forget", "--customer", "cust-gdpr", "--requested-by", "dpo@shop")
    assert second.returncode == 0, second.stderr
    assert "already forgotten" in second.stdout
    assert len(forget_records(config)) == 2
    unknown = attribution(env, "forget", "--customer", "nobody")
    assert unknown.returncode == 0 and "nothing found" in unknown.stdout
    assert isolated.query(f"SELECT outcome FROM {{db}}.{AUDIT_TABLE} ORDER BY outcome") == [
        ("already_forgotten",), ("erased",), ("nothing_found",)]
