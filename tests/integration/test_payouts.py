"""Payouts and statements (contract §9) on ClickHouse: the commands on the local 18.16 server, and
the same queries and writes on current ClickHouse (chdb, in-process)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from datetime import date, datetime
from decimal import Decimal

import pytest

from attribution.payouts import create_or_get
from sinks.migrate import migrate
from sinks.payouts import get_batch, list_batches, mark_paid, read_affiliate_facts, read_paid_lines
from streams.rules.payouts import statements

from test_migrations import sql_literal  # tests/integration/test_migrations.py

D = Decimal
NOW = datetime(2026, 12, 1, 9, 0)


def _fact(order: str, kind: str, amount: str, ts: str, status: str, affiliate: str = "sally",
          currency: str = "EUR") -> tuple[object, ...]:
    moment = datetime.fromisoformat(ts)
    return (f"{order}:{kind}:{ts}", order, affiliate, "ambassadors", kind, D(amount), currency,
            status, moment, "blog", datetime(2026, 10, 2, 10, 0))


#: sally: o1 80.00 EUR and o3 60.00 USD approved on 1-2 Nov, o4 40.00 EUR still pending; tom: o2
#: 30.00 EUR approved (below the minimum). An unattributed order's facts are never paid.
FACTS = [
    _fact("o1", "accrual", "80.00", "2026-10-02 10:00:00", "pending"),
    _fact("o1", "approval", "0.00", "2026-11-01 10:00:00", "approved"),
    _fact("o2", "accrual", "30.00", "2026-10-02 11:00:00", "pending", affiliate="tom"),
    _fact("o2", "approval", "0.00", "2026-11-01 11:00:00", "approved", affiliate="tom"),
    _fact("o3", "accrual", "60.00", "2026-10-03 10:00:00", "pending", currency="USD"),
    _fact("o3", "approval", "0.00", "2026-11-02 10:00:00", "approved", currency="USD"),
    _fact("o4", "accrual", "40.00", "2026-11-03 10:00:00", "pending"),
]
#: after the first batch: o1 refunded in full after its lock end
CLAWBACK = [_fact("o1", "reversal", "-80.00", "2026-11-20 10:00:00", "clawback")]

INSERT = ("INSERT INTO {db}.commission_facts (fact_id, order_id, affiliate_id, program_id, kind,"
          " amount, currency, status, ts, channel, order_ts) VALUES")


def _insert(execute, database: str, rows: list[tuple[object, ...]]) -> None:
    execute(INSERT.replace("{db}", database), rows)


def isolated_execute(isolated, sql: str, rows=None):
    """isolated.query, with an insert's rows sent the driver's way (an inline VALUES insert hangs
    on the native protocol)."""
    from sinks.clickhouse import connect

    client = connect(isolated.config.clickhouse)
    try:
        sql = sql.replace("{db}", isolated.config.clickhouse.database)
        return client.execute(sql, rows) if rows is not None else client.execute(sql)
    finally:
        client.disconnect()


def _lines(batch) -> list[tuple[str, str, Decimal, int]]:
    return [(l.affiliate_id, l.currency, l.amount, l.orders) for l in batch.lines]


def check_payout_queries(execute, database: str) -> None:
    """The whole §9 flow through sinks/payouts.py and the rules, on whichever engine `execute` is."""
    _insert(execute, database, FACTS)
    batch, planned = create_or_get(execute, database, date(2026, 11, 5), D("50.00"), None, NOW)
    assert planned is not None
    assert _lines(batch) == [("sally", "EUR", D("80.00"), 1), ("sally", "USD", D("60.00"), 1)]
    assert [(b.affiliate_id, b.amount) for b in planned.carried] == [("tom", D("30.00"))]
    again, replanned = create_or_get(execute, database, date(2026, 11, 5), D("10.00"), None, NOW)
    assert replanned is None and again == batch  # same DATE: nothing new, whatever the options
    assert [b.payout_id for b in list_batches(execute, database)] == ["payout-2026-11-05"]

    paid, changed = mark_paid(execute, database, "payout-2026-11-05", "PP-1")
    assert changed and paid.status == "paid" and paid.reference == "PP-1"
    assert mark_paid(execute, database, "payout-2026-11-05", "PP-1")[1] is False
    assert get_batch(execute, database, "payout-2026-11-05").status == "paid"

    _insert(execute, database, CLAWBACK)
    second, planned = create_or_get(execute, database, date(2026, 12, 1), D("10.00"), None, NOW)
    assert planned is not None
    assert _lines(second) == [("tom", "EUR", D("30.00"), 1)]
    assert [(b.affiliate_id, b.currency, b.amount) for b in planned.carried] == [
        ("sally", "EUR", D("-80.00"))]

    (eur, usd) = statements("sally", "2026-11",
                            read_affiliate_facts(execute, database, "sally", date(2026, 12, 1)),
                            read_paid_lines(execute, database, "sally"))
    assert (eur.currency, eur.opening_balance, eur.accruals, eur.clawbacks, eur.approvals,
            eur.payouts, eur.closing_balance) == (
        "EUR", D("0.00"), D("40.00"), D("-80.00"), 1, D("80.00"), D("-80.00"))
    assert [(o.order_id, o.state) for o in eur.orders] == [("o1", "approved"), ("o4", "pending")]
    assert (usd.approved, usd.payouts, usd.closing_balance) == (D("60.00"), D("60.00"), D("0.00"))


def test_payout_queries_on_current_clickhouse(tmp_path):
    chdb_session = pytest.importorskip("chdb.session")
    session = chdb_session.Session(str(tmp_path / "chdb"))
    database = "payouts_current"

    def execute(sql: str, rows=None):
        if rows is not None:
            sql += " " + ", ".join("(" + ", ".join(sql_literal(v) for v in row) + ")" for row in rows)
        result = session.query(sql, "TabSeparated")
        text = result.bytes().decode() if hasattr(result, "bytes") else str(result)
        return [tuple(line.split("\t")) for line in text.splitlines() if line]

    try:
        migrate(execute, database)
        check_payout_queries(execute, database)
    finally:
        session.close()


@pytest.mark.integration
def test_payout_queries_on_the_debian_server(isolated):
    def execute(sql: str, rows=None):
        return isolated_execute(isolated, sql, rows)

    check_payout_queries(execute, isolated.config.clickhouse.database)


def said(result: subprocess.CompletedProcess[str]) -> str:
    """stderr as one line: the console wraps messages at its width."""
    return " ".join(result.stderr.split())


from integration.current_engine import current_server, current_target  # noqa: E402,F401


@pytest.mark.integration
def test_payout_queries_on_the_current_server_over_the_native_protocol(current_target):  # noqa: F811
    """As the CLI speaks to a production server: clickhouse_driver against ClickHouse 26.9."""
    from sinks.clickhouse import connect
    from sinks.migrate import migrate_server

    migrate_server(current_target)
    client = connect(current_target)

    def execute(sql: str, rows=None):
        return client.execute(sql, rows) if rows is not None else client.execute(sql)

    try:
        check_payout_queries(execute, current_target.database)
    finally:
        client.disconnect()


def attribution(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "attribution", *args], env=env,
                          capture_output=True, text=True, timeout=300)


REFERENCE = {
    "programs": [{"program_id": "ambassadors", "kind": "affiliate",
                  "commission": {"type": "percent", "rate": "0.10"}}],
    "affiliates": [
        {"affiliate_id": "sally", "program_id": "ambassadors", "payout_email": "sally@example.com"},
        {"affiliate_id": "tom", "program_id": "ambassadors"},
    ],
}


@pytest.mark.integration
def test_payout_commands(isolated, tmp_path):
    env = isolated.env
    isolated_execute(isolated, INSERT, FACTS)

    created = attribution(env, "payouts", "create", "--until", "2026-11-05", "--format", "json")
    assert created.returncode == 0, created.stderr
    assert "created payout-2026-11-05" in said(created)
    (batch,) = json.loads(created.stdout)
    assert [(l["affiliate_id"], l["currency"], l["amount"]) for l in batch["lines"]] == [
        ("sally", "EUR", "80.00"), ("sally", "USD", "60.00")]
    again = attribution(env, "payouts", "create", "--until", "2026-11-05", "--format", "json")
    assert again.returncode == 0 and "nothing written" in said(again)
    assert json.loads(again.stdout) == [batch]
    assert isolated.query("SELECT count() FROM {db}.payouts")[0][0] == 1
    assert isolated.query("SELECT count() FROM {db}.payout_lines")[0][0] == 2
    earlier = attribution(env, "payouts", "create", "--until", "2026-11-01")
    assert earlier.returncode == 1 and "must be cut off later" in said(earlier)

    listed = attribution(env, "payouts", "list", "--format", "json")
    assert [b["payout_id"] for b in json.loads(listed.stdout)] == ["payout-2026-11-05"]
    shown = attribution(env, "payouts", "show", "payout-2026-11-05", "--format", "csv")
    assert list(csv.DictReader(io.StringIO(shown.stdout)))[0]["amount"] == "80.00"
    assert attribution(env, "payouts", "show", "payout-2026-11-05").returncode == 0
    assert attribution(env, "payouts", "show", "payout-1999-01-01").returncode == 1

    exported = attribution(env, "payouts", "export", "payout-2026-11-05", "--format", "csv")
    assert exported.stdout.splitlines()[0] == "payout_id,affiliate_id,currency,amount,orders"
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps(REFERENCE))
    assert attribution(env, "load-reference", str(reference)).returncode == 0
    paypal = attribution(env, "payouts", "export", "payout-2026-11-05", "--format", "paypal")
    assert paypal.returncode == 0, paypal.stderr
    assert [row[:4] for row in csv.reader(io.StringIO(paypal.stdout))] == [
        ["sally@example.com", "80.00", "EUR", "payout-2026-11-05"],
        ["sally@example.com", "60.00", "USD", "payout-2026-11-05"]]

    for _ in range(2):
        paid = attribution(env, "payouts", "mark-paid", "payout-2026-11-05", "--reference", "PP-1")
        assert paid.returncode == 0, paid.stderr
    assert "already paid" in said(paid)
    other = attribution(env, "payouts", "mark-paid", "payout-2026-11-05", "--reference", "PP-2")
    assert other.returncode == 1

    isolated_execute(isolated, INSERT, CLAWBACK)
    second = attribution(env, "payouts", "create", "--until", "2026-12-01", "--minimum", "10",
                         "--format", "json")
    assert second.returncode == 0, second.stderr
    assert "(1 negative)" in said(second)
    assert [(l["affiliate_id"], l["amount"]) for l in json.loads(second.stdout)[0]["lines"]] == [
        ("tom", "30.00")]
    no_email = attribution(env, "payouts", "export", "payout-2026-12-01", "--format", "paypal")
    assert no_email.returncode == 1 and "no payout_email for tom" in said(no_email)

    statement = attribution(env, "statement", "sally", "--month", "2026-11", "--format", "json")
    assert statement.returncode == 0, statement.stderr
    eur = json.loads(statement.stdout)[0]
    assert (eur["opening_balance"], eur["payouts"], eur["closing_balance"]) == (
        "0.00", "80.00", "-80.00")
    assert attribution(env, "statement", "sally", "--month", "2026-11").returncode == 0
    december = attribution(env, "statement", "sally", "--month", "2026-12", "--format", "json")
    assert json.loads(december.stdout)[0]["opening_balance"] == "-80.00"


@pytest.mark.parametrize("command", [["payouts"], ["payouts", "create"], ["payouts", "list"],
                                     ["payouts", "show"], ["payouts", "export"],
                                     ["payouts", "mark-paid"], ["statement"]])
def test_payout_commands_explain_themselves(command):
    result = subprocess.run([sys.executable, "-m", "attribution", *command, "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Usage" in result.stdout, result.stderr


def test_paypal_file_has_one_line_per_payment_and_refuses_missing_emails():
    from attribution.payouts import paypal_csv
    from schemas.payouts import PayoutLine

    lines = (PayoutLine("payout-2026-11-05", "sally", "EUR", D("80.00"), 1),
             PayoutLine("payout-2026-11-05", "tom", "USD", D("55.10"), 2))
    text = paypal_csv(lines, {"sally": "sally@example.com", "tom": "tom@example.com"}, "note, 1")
    assert list(csv.reader(io.StringIO(text))) == [
        ["sally@example.com", "80.00", "EUR", "payout-2026-11-05", "note, 1"],
        ["tom@example.com", "55.10", "USD", "payout-2026-11-05", "note, 1"]]
    with pytest.raises(LookupError, match="tom"):
        paypal_csv(lines, {"sally": "sally@example.com"}, "")
