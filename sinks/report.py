"""The per-affiliate, per-channel summary that `attribution report` prints, read from ClickHouse.

Counts come from the `affiliate_channel_daily` view; pending / approved / held amounts from the
ledger, per order: approved once it has an approval fact, else its accrual's status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Any

from clickhouse_driver import Client

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


def build_report(client: Client, database: str, since: date, until: date) -> Report:
    params = {"since": since, "until": until}
    counts = client.execute(
        f"""
        SELECT affiliate_id, channel, currency, sum(clicks), sum(shares), sum(orders),
               sum(revenue), sum(net_commission)
        FROM {database}.affiliate_channel_daily
        WHERE day >= %(since)s AND day <= %(until)s
        GROUP BY affiliate_id, channel, currency
        """,
        params,
    )
    states = client.execute(
        f"""
        SELECT affiliate_id, channel, currency,
               sumIf(net, state = 'pending'), sumIf(net, state = 'approved'),
               sumIf(net, state = 'held')
        FROM
        (
            SELECT order_id, any(affiliate_id) AS affiliate_id, any(channel) AS channel,
                   any(currency) AS currency, min(order_ts) AS first_ts, sum(amount) AS net,
                   if(countIf(kind = 'approval') > 0, 'approved',
                      anyIf(status, kind = 'accrual')) AS state
            FROM {database}.commission_facts FINAL
            GROUP BY order_id
        )
        WHERE toDate(first_ts) >= %(since)s AND toDate(first_ts) <= %(until)s
        GROUP BY affiliate_id, channel, currency
        """,
        params,
    )
    rows: dict[tuple[str, str, str], ReportRow] = {}
    for affiliate, channel, currency, clicks, shares, orders, revenue, net in counts:
        row = rows.setdefault((affiliate, channel, currency), ReportRow(affiliate, channel, currency))
        row.clicks += clicks
        row.shares += shares
        row.orders += orders
        row.revenue += Decimal(revenue)
        row.net_commission += Decimal(net)
    for affiliate, channel, currency, pending, approved, held in states:
        row = rows.setdefault((affiliate, channel, currency), ReportRow(affiliate, channel, currency))
        row.pending += Decimal(pending)
        row.approved += Decimal(approved)
        row.held += Decimal(held)
    return Report(_merge_currencyless(rows))


def _merge_currencyless(rows: dict[tuple[str, str, str], ReportRow]) -> list[ReportRow]:
    """Clicks and shares carry no currency: fold them into the pair's only money row, if one."""
    merged: dict[tuple[str, str, str], ReportRow] = {}
    for key, row in sorted(rows.items()):
        affiliate, channel, currency = key
        if currency == "":
            money_rows = [k for k in rows if k[:2] == (affiliate, channel) and k[2] != ""]
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
