"""Per-code leak evidence that `attribution codes` prints, read from ClickHouse.

A code "looks leaked" when at least one of its redemptions came from a coupon-site referrer or was
flagged for code velocity: both mean people the affiliate never reached are using it. Redemptions
without a click of the code's owner are evidence too, but weak on their own (an influencer's
audience types the code from a video and never clicks), so they only add to the score:

    leak_score = coupon-site redemptions + velocity-flagged redemptions
                 + 0.1 x redemptions without an owner click

Worst (highest score) first; ties by distinct customers.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from clickhouse_driver import Client

#: Weight of a redemption without the owner's click in the leak score (see the module docstring).
NO_CLICK_WEIGHT = Decimal("0.1")


@dataclass(frozen=True)
class CodeEvidence:
    discount_code: str
    affiliate_id: str
    redemptions: int
    distinct_customers: int
    peak_customers_per_hour: int
    attributed_by_code: int
    without_owner_click: int
    from_coupon_sites: int
    velocity_flagged: int
    coupon_sites: tuple[str, ...]
    first_seen: datetime
    last_seen: datetime
    revenue: Decimal
    discount_given: Decimal

    @property
    def leak_score(self) -> Decimal:
        return (self.from_coupon_sites + self.velocity_flagged
                + NO_CLICK_WEIGHT * self.without_owner_click)

    @property
    def looks_leaked(self) -> bool:
        return self.from_coupon_sites > 0 or self.velocity_flagged > 0

    def as_dict(self) -> dict[str, Any]:
        def share(part: int) -> str:
            return f"{part / self.redemptions:.0%}" if self.redemptions else "-"

        return {
            "discount_code": self.discount_code,
            "affiliate_id": self.affiliate_id,
            "leak_score": str(self.leak_score),
            "redemptions": self.redemptions,
            "distinct_customers": self.distinct_customers,
            "peak_customers_per_hour": self.peak_customers_per_hour,
            "without_owner_click": share(self.without_owner_click),
            "from_coupon_sites": share(self.from_coupon_sites),
            "velocity_flagged": self.velocity_flagged,
            "coupon_sites": ",".join(self.coupon_sites),
            "first_seen": self.first_seen.isoformat(sep=" "),
            "last_seen": self.last_seen.isoformat(sep=" "),
            "revenue": str(self.revenue),
            "discount_given": str(self.discount_given),
        }


def code_evidence(
    client: Client, database: str, since: date, until: date, *, only_leaked: bool = True
) -> list[CodeEvidence]:
    """Every code used in [since, until] (days, UTC, inclusive), worst first."""
    # Compared as dates, like the report: a DateTime parameter past 2106 wraps on old servers.
    params = {"since": since, "until": until}
    peaks = dict(
        client.execute(
            f"""
            SELECT discount_code, max(distinct_customers)
            FROM {database}.code_usage_hourly
            WHERE toDate(hour) >= %(since)s AND toDate(hour) <= %(until)s
            GROUP BY discount_code
            """,
            params,
        )
    )
    rows = client.execute(
        f"""
        SELECT discount_code,
               anyIf(affiliate_id, method IN ('code', 'code+click')),
               count(), uniqExact(customer_id),
               countIf(method IN ('code', 'code+click')), countIf(method = 'code'),
               countIf(coupon_site != ''), countIf(has(flags, 'code_velocity')),
               arraySort(groupUniqArrayIf(coupon_site, coupon_site != '')),
               min(ts), max(ts), sum(total), sum(discount_amount)
        FROM {database}.attributed_orders FINAL
        WHERE discount_code != '' AND toDate(ts) >= %(since)s AND toDate(ts) <= %(until)s
        GROUP BY discount_code
        """,
        params,
    )
    evidence = [
        CodeEvidence(
            discount_code=code, affiliate_id=affiliate, redemptions=redemptions,
            distinct_customers=customers, peak_customers_per_hour=peaks.get(code, 0),
            attributed_by_code=by_code, without_owner_click=no_click,
            from_coupon_sites=coupon, velocity_flagged=velocity, coupon_sites=tuple(sites),
            first_seen=first, last_seen=last, revenue=Decimal(revenue),
            discount_given=Decimal(discount),
        )
        for (code, affiliate, redemptions, customers, by_code, no_click, coupon, velocity, sites,
             first, last, revenue, discount) in rows
    ]
    if only_leaked:
        evidence = [e for e in evidence if e.looks_leaked]
    return sorted(evidence, key=lambda e: (-e.leak_score, -e.distinct_customers, e.discount_code))
