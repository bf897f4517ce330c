"""Payout batches and statements in ClickHouse (contract §9): the reads and writes around the rules.

The arithmetic is `streams.rules.payouts`' (pure; the command in attribution/payouts.py joins the
two): this module only reads `commission_facts FINAL` and the payout tables, and writes what the
rules decided. It must never decide what is owed. Every statement goes through an
`Executor` (sinks.migrate), so the same SQL runs on the Debian 18.16 server (clickhouse_driver)
and on current ClickHouse (chdb in tests). Values in queries are inlined as escaped literals,
not driver parameters, for that reason; inserted rows go as the Executor's `rows`; rows read back may be typed (driver) or text (chdb) and are
converted here.

A batch is written lines first, then its `payouts` row: the row is the batch's commit mark, so a
create cut short is written again (the same deterministic rows) by the next create.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from decimal import Decimal
from typing import Any

from schemas.payouts import LedgerFact, PaidLine, PayoutLine
from streams.rules.payouts import Balance

from .migrate import Executor

OPEN, PAID = "open", "paid"
#: `payouts.version` of each status: FINAL keeps the row with the highest.
STATUS_VERSION = {OPEN: 0, PAID: 1}


class PayoutNotFound(LookupError):
    pass


class PayoutConflict(ValueError):
    """mark-paid of a batch already paid under another reference."""


@dataclass(frozen=True, slots=True)
class PayoutBatch:
    """A batch as stored: its row in `payouts` and its lines."""

    payout_id: str
    until: date
    created_at: datetime
    status: str
    reference: str
    minimum: Decimal
    currency: str
    lines: tuple[PayoutLine, ...]

    def as_dict(self) -> dict[str, object]:
        return {"payout_id": self.payout_id, "until": self.until.isoformat(),
                "created_at": self.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "status": self.status, "reference": self.reference,
                "minimum": str(self.minimum), "currency": self.currency,
                "lines": len(self.lines),
                "total": {c: str(a) for c, a in sorted(_totals(self.lines).items())}}


def _totals(lines: tuple[PayoutLine, ...]) -> dict[str, Decimal]:
    totals: dict[str, Decimal] = {}
    for line in lines:
        totals[line.currency] = totals.get(line.currency, Decimal("0.00")) + line.amount
    return totals


def line_dict(line: PayoutLine) -> dict[str, object]:
    return {"payout_id": line.payout_id, "affiliate_id": line.affiliate_id,
            "currency": line.currency, "amount": str(line.amount), "orders": line.orders}


# --- literals and conversions -------------------------------------------------------------------


def quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _datetime_literal(moment: datetime) -> str:
    return f"toDateTime({quote(moment.strftime('%Y-%m-%d %H:%M:%S'))}, 'UTC')"


def _date_literal(day: date) -> str:
    return f"toDate({quote(day.isoformat())})"


def _cutoff(day: date) -> datetime:
    return datetime.combine(day, time(0, 0))


def _to_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).replace(tzinfo=None) if value.tzinfo else value
    return datetime.fromisoformat(str(value))


def _to_date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def _to_decimal(value: Any) -> Decimal:
    return Decimal(str(value)).quantize(Decimal("0.01"))


# --- reads --------------------------------------------------------------------------------------

_FACT_COLUMNS = "fact_id, order_id, affiliate_id, currency, kind, amount, status, ts"


def _facts(execute: Executor, sql: str) -> list[LedgerFact]:
    return [LedgerFact(str(f), str(o), str(a), str(c), str(k), _to_decimal(amount), str(s),
                       _to_datetime(ts))
            for f, o, a, c, k, amount, s, ts in execute(sql)]


def payable_facts_sql(database: str, until: date) -> str:
    """The facts payable as of `until` (§9): ts before it, of orders approved before it."""
    end = _datetime_literal(_cutoff(until))
    return f"""
        SELECT {_FACT_COLUMNS}
        FROM {database}.commission_facts FINAL
        WHERE affiliate_id != '' AND ts < {end}
          AND order_id IN (SELECT order_id FROM {database}.commission_facts FINAL
                           WHERE kind = 'approval' AND ts < {end})
    """


def read_payable_facts(execute: Executor, database: str, until: date) -> list[LedgerFact]:
    return _facts(execute, payable_facts_sql(database, until))


def balances_sql(database: str, until: date, affiliate_id: str | None = None) -> str:
    """Per affiliate × currency, the payable amount as of `until` (§9) and the orders in it not
    covered by the pair's last earlier line: `streams.rules.payouts.balances`' sums, made by the
    database so that a batch over a whole ledger (millions of orders) never leaves it fact by fact.

    A fact is covered by a line cut off at L when its ts < L and its order was approved before L;
    an order is new when one of its payable facts is not covered. The cut-off is 00:00 UTC, so
    `ts < L` is `toDate(ts) < L` for the UTC columns.
    """
    end = _datetime_literal(_cutoff(until))
    only = f"AND affiliate_id = {quote(affiliate_id)}" if affiliate_id is not None else ""
    return f"""
        SELECT affiliate_id, currency, sum(payable), toUInt64(sum(is_new))
        FROM
        (
            SELECT affiliate_id, currency, order_id,
                   sum(amount) AS payable,
                   countIf(kind = 'approval') AS approvals,
                   if(countIf(kind = 'approval' AND toDate(ts) < last) = 0
                      OR countIf(toDate(ts) >= last) > 0, 1, 0) AS is_new
            FROM
            (
                SELECT affiliate_id, currency, order_id, kind, amount, ts
                FROM {database}.commission_facts FINAL
                WHERE affiliate_id != '' AND ts < {end} {only}
            ) AS facts
            ANY LEFT JOIN
            (
                SELECT affiliate_id, currency, max(until) AS last
                FROM {database}.payout_lines FINAL
                WHERE until < {_date_literal(until)} {only}
                  AND payout_id IN (SELECT payout_id FROM {database}.payouts FINAL)
                GROUP BY affiliate_id, currency
            ) AS paid
            USING (affiliate_id, currency)
            GROUP BY affiliate_id, currency, order_id
            HAVING approvals > 0
        )
        GROUP BY affiliate_id, currency
    """


def read_balances(execute: Executor, database: str, until: date, currency: str | None = None,
                  affiliate_id: str | None = None) -> list[Balance]:
    """Every affiliate × currency balance as of `until` (or one affiliate's), as
    `streams.rules.payouts.balances` gives it from the facts (tests check the two agree),
    counting the lines of batches before it."""
    payable = {(str(a), str(c)): (_to_decimal(amount), int(str(n)))
               for a, c, amount, n in execute(balances_sql(database, until, affiliate_id))}
    paid: dict[tuple[str, str], Decimal] = {}
    for line in read_paid_lines(execute, database, affiliate_id):
        if line.until < until:
            key = (line.affiliate_id, line.currency)
            paid[key] = paid.get(key, Decimal("0.00")) + line.amount
    keys = set(payable) | set(paid)
    if currency:
        keys = {k for k in keys if k[1] == currency}
    zero = (Decimal("0.00"), 0)
    return [Balance(a, c, payable.get((a, c), zero)[0], paid.get((a, c), Decimal("0.00")),
                    payable.get((a, c), zero)[1]) for a, c in sorted(keys)]


def read_paid_lines(execute: Executor, database: str,
                    affiliate_id: str | None = None) -> list[PaidLine]:
    """Lines of every recorded batch (open or paid: a batch is owed once it is created)."""
    where = f"WHERE affiliate_id = {quote(affiliate_id)}" if affiliate_id is not None else ""
    rows = execute(f"""
        SELECT payout_id, until, affiliate_id, currency, amount
        FROM {database}.payout_lines FINAL
        {where}
    """)
    recorded = {b[0] for b in execute(f"SELECT payout_id FROM {database}.payouts FINAL")}
    return [PaidLine(str(p), _to_date(u), str(a), str(c), _to_decimal(amount))
            for p, u, a, c, amount in rows if p in recorded]


def list_batches(execute: Executor, database: str) -> list[PayoutBatch]:
    rows = execute(f"""
        SELECT payout_id, until, created_at, status, reference, minimum, currency
        FROM {database}.payouts FINAL
        ORDER BY until
    """)
    lines = _lines(execute, database, None)
    return [PayoutBatch(str(p), _to_date(u), _to_datetime(c), str(s), str(r), _to_decimal(m),
                        str(cur), tuple(line for line in lines if line.payout_id == p))
            for p, u, c, s, r, m, cur in rows]


def _lines(execute: Executor, database: str, payout_id: str | None) -> list[PayoutLine]:
    where = f"WHERE payout_id = {quote(payout_id)}" if payout_id is not None else ""
    rows = execute(f"""
        SELECT payout_id, affiliate_id, currency, amount, orders
        FROM {database}.payout_lines FINAL
        {where}
        ORDER BY payout_id, affiliate_id, currency
    """)
    return [PayoutLine(str(p), str(a), str(c), _to_decimal(amount), int(str(n)))
            for p, a, c, amount, n in rows]


def get_batch(execute: Executor, database: str, payout_id: str) -> PayoutBatch:
    rows = execute(f"""
        SELECT payout_id, until, created_at, status, reference, minimum, currency
        FROM {database}.payouts FINAL
        WHERE payout_id = {quote(payout_id)}
    """)
    if not rows:
        raise PayoutNotFound(f"no payout batch {payout_id!r}")
    p, u, c, s, r, m, cur = rows[0]
    return PayoutBatch(str(p), _to_date(u), _to_datetime(c), str(s), str(r), _to_decimal(m),
                       str(cur), tuple(_lines(execute, database, payout_id)))


# --- writes -------------------------------------------------------------------------------------


def latest_until(execute: Executor, database: str) -> date | None:
    """The latest cut-off of a recorded batch, None before the first."""
    rows = execute(f"SELECT max(until), count() FROM {database}.payouts FINAL")
    return _to_date(rows[0][0]) if rows and int(str(rows[0][1])) else None


def write_batch(execute: Executor, database: str, payout_id: str, until: date,
                lines: tuple[PayoutLine, ...], now: datetime, minimum: Decimal,
                currency: str) -> None:
    """Lines first, then the batch's `payouts` row (the commit mark: see the module docstring)."""
    if lines:
        execute(f"INSERT INTO {database}.payout_lines "
                f"(payout_id, until, affiliate_id, currency, amount, orders) VALUES",
                [(line.payout_id, until, line.affiliate_id, line.currency, line.amount, line.orders)
                 for line in lines])
    _write_header(execute, database, payout_id, until, now, OPEN, "", minimum, currency)


def _write_header(execute: Executor, database: str, payout_id: str, until: date,
                  created_at: datetime, status: str, reference: str, minimum: Decimal,
                  currency: str) -> None:
    execute(f"INSERT INTO {database}.payouts "
            f"(payout_id, until, created_at, status, reference, minimum, currency, version) VALUES",
            [(payout_id, until, created_at, status, reference, minimum, currency,
              STATUS_VERSION[status])])


def mark_paid(execute: Executor, database: str, payout_id: str, reference: str) -> tuple[PayoutBatch, bool]:
    """Record the batch as paid; (batch, changed). Again with the same reference changes nothing."""
    batch = get_batch(execute, database, payout_id)
    if batch.status == PAID:
        if batch.reference != reference:
            raise PayoutConflict(
                f"{payout_id} was already marked paid with reference {batch.reference!r}")
        return batch, False
    _write_header(execute, database, payout_id, batch.until, batch.created_at, PAID, reference,
                  batch.minimum, batch.currency)
    return get_batch(execute, database, payout_id), True


# --- statements ---------------------------------------------------------------------------------


def read_month_facts(execute: Executor, database: str, affiliate_id: str, first: date,
                     following: date) -> list[LedgerFact]:
    """An affiliate's facts until a month's end, of the orders with a fact in the month: what a
    statement lists (its balances come from `read_balances`, not from every fact of the past)."""
    start, end = _datetime_literal(_cutoff(first)), _datetime_literal(_cutoff(following))
    mine = f"affiliate_id = {quote(affiliate_id)}"
    return _facts(execute, f"""
        SELECT {_FACT_COLUMNS}
        FROM {database}.commission_facts FINAL
        WHERE {mine} AND ts < {end}
          AND order_id IN (SELECT order_id FROM {database}.commission_facts
                           WHERE {mine} AND ts >= {start} AND ts < {end})
    """)


def read_affiliate_currencies(execute: Executor, database: str, affiliate_id: str,
                              before: date) -> frozenset[str]:
    rows = execute(f"""
        SELECT DISTINCT currency FROM {database}.commission_facts
        WHERE affiliate_id = {quote(affiliate_id)} AND ts < {_datetime_literal(_cutoff(before))}
    """)
    return frozenset(str(row[0]) for row in rows)


def read_affiliate_facts(execute: Executor, database: str, affiliate_id: str,
                         before: date) -> list[LedgerFact]:
    """An affiliate's facts with ts before 00:00 UTC of `before` (a statement's month end)."""
    return _facts(execute, f"""
        SELECT {_FACT_COLUMNS}
        FROM {database}.commission_facts FINAL
        WHERE affiliate_id = {quote(affiliate_id)} AND ts < {_datetime_literal(_cutoff(before))}
    """)
