"""`payouts create` sums balances in the database (sinks.payouts.balances_sql) so that a batch over
millions of orders never leaves it fact by fact. The rules' `balances` over the facts is the
definition (contract §9, unit-tested with hypothesis): here both give the same balances, orders and
batches for random ledgers and successive batches, on Debian's 18.16 and on ClickHouse 26.9."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from decimal import Decimal

import pytest

from attribution.payouts import create_or_get
from integration.current_engine import (  # noqa: F401
    current_server, current_target, debian_target, engine_target)
from schemas.config import ClickHouseTarget
from sinks.migrate import migrate
from sinks.payouts import read_balances, read_paid_lines, read_payable_facts
from streams.rules.payouts import balances, plan_batch

pytestmark = pytest.mark.integration

D = Decimal
NOW = datetime(2026, 12, 1, 9, 0)
START = datetime(2026, 6, 1)
INSERT = ("INSERT INTO {db}.commission_facts (fact_id, order_id, affiliate_id, program_id, kind,"
          " amount, currency, status, ts, channel, order_ts) VALUES")


def random_ledger(seed: int, orders: int = 400) -> list[tuple[object, ...]]:
    """Orders over five months: accruals, most approved at their lock end, some refunded before
    it (reversed) or after it (clawed back, partly or in full), some held and never approved."""
    rng = random.Random(seed)
    rows: list[tuple[object, ...]] = []
    for n in range(orders):
        order, affiliate = f"o{n}", rng.choice(["ann", "bob", "cy", "dee", "eve", "fay", ""])
        currency = rng.choice(["EUR", "EUR", "USD"])
        placed = START + timedelta(minutes=rng.randrange(150 * 24 * 60))
        commission = D(rng.randrange(100, 20_000)) / 100
        held = rng.random() < 0.1
        status = "held" if held else "pending"

        def fact(kind: str, amount: Decimal, at: datetime, fact_status: str) -> None:
            rows.append((f"{order}:{kind}:{at:%Y%m%d%H%M}", order, affiliate, "p", kind, amount,
                         currency, fact_status, at, "blog", placed))

        fact("accrual", commission, placed, status)
        lock_end = placed + timedelta(days=30)
        refund = rng.random()
        if refund < 0.15:  # refunded before the lock end: reversed, then approved at 0
            fact("reversal", -commission, placed + timedelta(days=rng.randrange(1, 29)), "reversed")
        if not held:
            fact("approval", D("0.00"), lock_end, "approved")
        if 0.15 <= refund < 0.3:  # after the lock end: clawed back, part or all
            part = commission if rng.random() < 0.5 else (commission / 2).quantize(D("0.01"))
            fact("reversal", -part, lock_end + timedelta(days=rng.randrange(1, 60)), "clawback")
    return rows


@pytest.fixture
def execute(engine_target: ClickHouseTarget) -> Iterator:
    from sinks.clickhouse import connect

    client = connect(engine_target, with_database=False)

    def run(sql: str, rows=None):
        return client.execute(sql, rows) if rows is not None else client.execute(sql)

    run.database = engine_target.database  # type: ignore[attr-defined]
    migrate(run, engine_target.database)
    yield run
    client.disconnect()


@pytest.mark.parametrize("seed", [1, 2])
def test_the_databases_balances_and_batches_are_the_rules_own(execute, seed):
    database = execute.database
    ledger = random_ledger(seed)
    execute(INSERT.replace("{db}", database), ledger)
    execute(INSERT.replace("{db}", database), ledger[: len(ledger) // 3])  # a replay
    minimum = D("50.00")
    for cut_off in (date(2026, 8, 1), date(2026, 9, 15), date(2026, 10, 1), date(2026, 11, 20)):
        facts = read_payable_facts(execute, database, cut_off)
        earlier = read_paid_lines(execute, database)
        expected = balances(facts, earlier, cut_off)
        assert read_balances(execute, database, cut_off) == expected, cut_off
        assert read_balances(execute, database, cut_off, "USD") == [
            b for b in expected if b.currency == "USD"]
        batch, planned = create_or_get(execute, database, cut_off, minimum, None, NOW)
        rules = plan_batch(facts, earlier, cut_off, minimum=minimum)
        assert planned is not None
        assert [(l.affiliate_id, l.currency, l.amount, l.orders) for l in planned.lines] == [
            (l.affiliate_id, l.currency, l.amount, l.orders) for l in rules.lines]
        assert planned.carried == rules.carried
        assert [(l.affiliate_id, l.currency, l.amount, l.orders) for l in batch.lines] == [
            (l.affiliate_id, l.currency, l.amount, l.orders) for l in rules.lines]
    # ann's paid orders all clawed back after the last batch: her balance goes negative, carried
    net: dict[tuple[str, str], Decimal] = {}
    for fact in read_payable_facts(execute, database, date(2026, 11, 20)):
        if fact.affiliate_id == "ann":
            net[(fact.order_id, fact.currency)] = net.get((fact.order_id, fact.currency), D(0)) + fact.amount
    at = datetime(2026, 11, 25)
    execute(INSERT.replace("{db}", database), [
        (f"{order}:clawback:all", order, "ann", "p", "reversal", -amount, currency, "clawback", at,
         "blog", START) for (order, currency), amount in net.items() if amount > 0])
    cut_off = date(2026, 12, 1)
    found = read_balances(execute, database, cut_off)
    assert found == balances(read_payable_facts(execute, database, cut_off),
                             read_paid_lines(execute, database), cut_off)
    assert [b for b in found if b.affiliate_id == "ann" and b.amount < 0]
    _, planned = create_or_get(execute, database, cut_off, D("50.00"), None, NOW)
    assert planned is not None
    assert "ann" not in {line.affiliate_id for line in planned.lines}
    assert [b for b in planned.carried if b.affiliate_id == "ann" and b.amount < 0]


def test_statements_from_the_databases_balances_are_those_from_every_fact(execute):
    """`attribution statement` reads the month's orders and sums the balances in the database;
    the rules' statement over the affiliate's whole history is the definition."""
    from attribution.payouts import statements_for
    from sinks.payouts import read_affiliate_facts
    from streams.rules.payouts import month_bounds, statements

    database = execute.database
    execute(INSERT.replace("{db}", database), random_ledger(3, orders=300))
    create_or_get(execute, database, date(2026, 8, 10), D("50.00"), None, NOW)
    create_or_get(execute, database, date(2026, 10, 3), D("20.00"), None, NOW)
    compared = 0
    for affiliate in ("ann", "bob", "eve", "nobody"):
        for month in ("2026-06", "2026-08", "2026-10", "2026-12"):
            _, following = month_bounds(month)
            everything = statements(affiliate, month,
                                    read_affiliate_facts(execute, database, affiliate, following),
                                    read_paid_lines(execute, database, affiliate))
            assert statements_for(execute, database, affiliate, month) == everything
            compared += len(everything)
    assert compared > 10
