"""The per-affiliate, per-channel summary that `attribution report` prints, read from ClickHouse.

Everything comes from the rollup `affiliate_channel_daily_totals` (sinks/rollup.py), its rows of
the asked days only: clicks, shares, orders, revenue and net commission as the live view
`affiliate_channel_daily` counts them; pending / approved / held per order from the ledger:
approved once it has an approval fact, else its accrual's status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from clickhouse_driver import Client

from .migrate import Executor
from .rollup import TOTALS, MonthRange, cannot_write, refreshed_at
from .rollup import refresh as refresh_rollup

ZERO = Decimal("0.00")


@dataclass
class ReportRow:
    affiliate_id: str
    channel: str
    currency: str = ""
    clicks: int = 0
    shares: int = 0
    orders: int = 0
    revenue: Decimal = ZERO
    net_commission: Decimal = ZERO
    pending: Decimal = ZERO
    approved: Decimal = ZERO
    held: Decimal = ZERO

    @property
    def conversion_rate(self) -> Decimal | None:
        """Attributed orders per click; None without clicks (e.g. code-only orders)."""
        if not self.clicks:
            return None
        return (Decimal(self.orders) / Decimal(self.clicks)).quantize(Decimal("0.0001"))

    def as_dict(self) -> dict[str, Any]:
        rate = self.conversion_rate
        return {
            "affiliate_id": self.affiliate_id,
            "channel": self.channel,
            "currency": self.currency,
            "clicks": self.clicks,
            "shares": self.shares,
            "orders": self.orders,
            "conversion_rate": str(rate) if rate is not None else None,
            "revenue": str(self.revenue),
            "net_commission": str(self.net_commission),
            "pending": str(self.pending),
            "approved": str(self.approved),
            "held": str(self.held),
        }


@dataclass
class Report:
    rows: list[ReportRow] = field(default_factory=list)
    #: Set when the rollup could not be brought up to date (a read-only user): how old it is.
    warning: str | None = None


def build_report(client: Client, database: str, since: date, until: date, *,
                 refresh: bool = True, max_age_seconds: float = 0) -> Report:
    """The report for days since..until, read from the rollup's rows of those days only.

    With `refresh`, the rollup's months in the range are brought up to date first
    (`sinks.rollup.refresh`), unless they were recomputed less than `max_age_seconds` ago (0:
    always; a busy store's current month is always stale, and its rebuild takes seconds). A user
    who may not write (e.g. the `bi` user) reads the rollup as it is, and the report carries a
    warning saying how old it is.
    """
    def execute(sql: str, rows: list[tuple[object, ...]] | None = None) -> list[tuple[object, ...]]:
        return client.execute(sql, rows) if rows is not None else client.execute(sql)  # type: ignore[no-any-return]

    warning = None
    if refresh and max_age_seconds > 0:
        last = refreshed_at(execute, database, MonthRange.of_days(since, until))
        now = datetime.fromtimestamp(int(str(execute("SELECT toUnixTimestamp(now())")[0][0])),
                                     timezone.utc)
        refresh = last is None or (now - last).total_seconds() >= max_age_seconds
    if refresh:
        within = MonthRange.of_days(since, until)
        try:
            refresh_rollup(execute, database, within=within)
        except Exception as exc:
            if not cannot_write(exc):
                raise
            warning = _stale_warning(execute, database, within, exc)
    totals = client.execute(
        f"""
        SELECT affiliate_id, toString(channel), toString(currency), sum(clicks), sum(shares),
               sum(orders), sum(revenue), sum(net_commission), sum(pending), sum(approved),
               sum(held)
        FROM {database}.{TOTALS}
        WHERE day >= %(since)s AND day <= %(until)s
        GROUP BY affiliate_id, channel, currency
        """,
        {"since": since, "until": until},
    )
    rows: dict[tuple[str, str, str], ReportRow] = {}
    for (affiliate, channel, currency, clicks, shares, orders, revenue, net, pending, approved,
         held) in totals:
        # ZERO + ...: two decimal places whatever scale the driver hands back (it drops zeros).
        rows[affiliate, channel, currency] = ReportRow(
            affiliate, channel, currency, int(clicks), int(shares), int(orders),
            ZERO + Decimal(revenue), ZERO + Decimal(net), ZERO + Decimal(pending),
            ZERO + Decimal(approved), ZERO + Decimal(held))
    return Report(_merge_currencyless(rows), warning)


def _stale_warning(execute: Executor, database: str, within: MonthRange, error: Exception) -> str:
    why = f"code {getattr(error, 'code', '?')}"
    try:
        last = refreshed_at(execute, database, within)
        now = datetime.fromtimestamp(int(str(execute("SELECT toUnixTimestamp(now())")[0][0])),
                                     timezone.utc)
    except Exception:  # the warning must not hide the report
        last, now = None, datetime.now(timezone.utc)
    if last is None:
        age = "some of its months were never refreshed"
    else:
        age = f"last refreshed {last:%Y-%m-%d %H:%M:%S} UTC, {_age(now - last)} ago"
    return (f"this user may not refresh the rollup ({why}): it is read as it is, {age}; "
            "run `attribution rollup refresh` as a user who may write")


def _age(elapsed: timedelta) -> str:
    seconds = max(0, int(elapsed.total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 120:
        return f"{minutes} min"
    hours = minutes // 60
    return f"{hours} h {minutes % 60} min" if hours < 48 else f"{hours // 24} days"


def _merge_currencyless(rows: dict[tuple[str, str, str], ReportRow]) -> list[ReportRow]:
    """Clicks and shares carry no currency: fold them into the pair's only money row, if one."""
    money: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
    for key in rows:
        if key[2] != "":
            money.setdefault(key[:2], []).append(key)
    merged: dict[tuple[str, str, str], ReportRow] = {}
    for key, row in sorted(rows.items()):
        affiliate, channel, currency = key
        if currency == "":
            money_rows = money.get((affiliate, channel), [])
            if len(money_rows) == 1:
                target = rows[money_rows[0]]
                target.clicks += row.clicks
                target.shares += row.shares
                continue
        merged[key] = row
    return sorted(
        merged.values(),
        key=lambda r: (-r.net_commission, -r.orders, r.affiliate_id, r.channel, r.currency),
    )
