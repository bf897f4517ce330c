"""A realistic, deterministic traffic generator: visitors, sessions, clicks, shares, orders, refunds.

Zipf-distributed affiliates, ~3 % of visitors convert, some with the affiliate's code, some
refunds days later, a few repeated events (dedup) and planted abuse: a leaked code redeemed in a
burst from a coupon site, a self-referral and instant conversions. Same seed, same events.
Events come out in non-decreasing `ts`; memory stays bounded by one visitor's events at a time
plus a heap of pending future events.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

CHANNELS = ("facebook", "instagram", "tiktok", "youtube", "email", "blog", "twitter", "other")
REFERRERS = {
    "facebook": "https://l.facebook.com/l.php", "instagram": "https://instagram.com/",
    "tiktok": "https://www.tiktok.com/", "youtube": "https://www.youtube.com/watch",
    "email": "", "blog": "https://blog.example.org/post", "twitter": "https://t.co/abc",
    "other": "https://news.example.com/",
}
CATEGORIES = (("shoes", "59.90"), ("shirts", "24.50"), ("bags", "89.00"), ("gift-cards", "25.00"),
              ("socks", "7.99"))
LEAKED_AFFILIATE = "aff-002"
SELF_REFERRER = "aff-003"


def sample_reference(n_affiliates: int = 50, seed: int = 7) -> dict[str, Any]:
    """Two programs, `n_affiliates` affiliates (one inactive), settings (contract §3)."""
    rng = random.Random(seed)
    affiliates = []
    for n in range(1, n_affiliates + 1):
        program = "friends" if n % 10 == 0 else "ambassadors"
        affiliates.append({
            "affiliate_id": f"aff-{n:03d}",
            "program_id": program,
            "tier": rng.choice(["", "", "macro", "mega"]) if program == "ambassadors" else "",
            "customer_id": f"cust-aff-{n:03d}",
            "codes": [f"AFF{n:03d}SAVE"],
            "status": "inactive" if n == n_affiliates else "active",
        })
    return {
        "programs": [
            {"program_id": "ambassadors", "kind": "affiliate", "attribution_window_days": 30,
             "lock_days": 30, "commission": {"type": "percent", "rate": "0.10"},
             "tier_rates": {"macro": "0.15", "mega": "0.20"},
             "category_rates": {"gift-cards": "0.02"},
             "velocity": {"max_customers": 20, "window_minutes": 60}},
            {"program_id": "friends", "kind": "referral", "attribution_window_days": 7,
             "lock_days": 14, "commission": {"type": "fixed", "amount": "5.00"}},
        ],
        "affiliates": affiliates,
        "settings": {"coupon_sites": ["retailmenot.com", "joinhoney.com", "slickdeals.net"],
                     "fast_conversion_seconds": 5},
    }


@dataclass
class TrafficProfile:
    visitors: int = 20_000
    start: datetime = datetime(2026, 11, 2, tzinfo=timezone.utc)
    duration: timedelta = timedelta(days=1)
    conversion_rate: float = 0.03
    code_share: float = 0.3
    refund_rate: float = 0.05
    shares_per_affiliate: int = 5
    zipf_s: float = 1.1
    duplicate_rate: float = 0.002
    seed: int = 42
    plant_abuse: bool = True
    leak_burst: int = 40
    extra: dict[str, Any] = field(default_factory=dict)


def _ts(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (rank ** s) for rank in range(1, n + 1)]


def generate(reference: dict[str, Any], profile: TrafficProfile) -> Iterator[dict[str, Any]]:
    rng = random.Random(profile.seed)
    affiliates = [a for a in reference["affiliates"]]
    weights = _zipf_weights(len(affiliates), profile.zipf_s)
    seq = itertools.count()
    pending: list[tuple[datetime, int, dict[str, Any]]] = []
    span = profile.duration.total_seconds()

    def push(at: datetime, event: dict[str, Any]) -> None:
        event["ts"] = _ts(at)
        heapq.heappush(pending, (at, next(seq), event))

    order_no = itertools.count(1)

    def place_order(at: datetime, visitor: str, customer: str, code: str = "",
                    referrer: str = "") -> None:
        items = []
        for _ in range(rng.randint(1, 3)):
            category, price = rng.choice(CATEGORIES)
            items.append({"sku": f"{category}-{rng.randint(1, 40)}", "category": category,
                          "quantity": rng.randint(1, 2), "price": price})
        total = sum(Decimal(i["price"]) * i["quantity"] for i in items)
        order_id = f"o-{profile.seed}-{next(order_no):07d}"
        order: dict[str, Any] = {"event_id": f"e-{order_id}", "type": "order", "order_id": order_id,
                                 "visitor_id": visitor, "customer_id": customer, "currency": "EUR",
                                 "total": str(total), "items": items}
        if code:
            order["discount_code"] = code
        if referrer:
            order["referrer"] = referrer
        push(at, order)
        if rng.random() < profile.refund_rate:
            amount = total if rng.random() < 0.5 else (total / 2).quantize(Decimal("0.01"))
            push(at + timedelta(hours=rng.randint(6, 48)),
                 {"event_id": f"r-{order_id}", "type": "refund", "order_id": order_id,
                  "amount": str(amount), "reason": "returned"})

    # shares over the day
    for affiliate in affiliates:
        for k in range(profile.shares_per_affiliate):
            at = profile.start + timedelta(seconds=rng.uniform(0, span))
            push(at, {"event_id": f"sh-{affiliate['affiliate_id']}-{k}", "type": "share",
                      "affiliate_id": affiliate["affiliate_id"],
                      "share_id": f"{affiliate['affiliate_id']}-{k}",
                      "channel": rng.choice(CHANNELS)})

    if profile.plant_abuse:  # queued first: the heap releases them at their time
        _plant_abuse(push, place_order, affiliates, profile, rng)

    # visitors arrive uniformly over the day
    arrivals = sorted(rng.uniform(0, span) for _ in range(profile.visitors))
    for index, offset in enumerate(arrivals):
        visitor = f"v-{profile.seed}-{index:07d}"
        at = profile.start + timedelta(seconds=offset)
        last_click: tuple[datetime, dict[str, Any]] | None = None
        for session in range(rng.randint(1, 3)):
            for _ in range(rng.randint(1, 3)):
                affiliate = rng.choices(affiliates, weights)[0]
                channel = rng.choice(CHANNELS)
                click = {"event_id": f"c-{visitor}-{next(seq)}", "type": "click",
                         "visitor_id": visitor, "session_id": f"{visitor}-s{session}",
                         "affiliate_id": affiliate["affiliate_id"], "channel": channel,
                         "referrer": REFERRERS[channel], "landing_url": "https://shop.example/"}
                push(at, click)
                last_click = (at, affiliate)
                at += timedelta(seconds=rng.randint(20, 600))
            at += timedelta(minutes=rng.randint(30, 300))
        if last_click and rng.random() < profile.conversion_rate:
            click_at, affiliate = last_click
            code = affiliate["codes"][0].lower() if rng.random() < profile.code_share else ""
            place_order(click_at + timedelta(minutes=rng.randint(2, 240)), visitor,
                        f"cust-{visitor}", code)
        elif not last_click and rng.random() < profile.conversion_rate:
            place_order(at, visitor, f"cust-{visitor}")
        # release everything that can no longer be preceded by a later visitor's events
        yield from _release(pending, profile.start + timedelta(seconds=offset), rng, profile)

    yield from _release(pending, None, rng, profile)


def _plant_abuse(push: Any, place_order: Any, affiliates: list[dict[str, Any]],
                 profile: TrafficProfile, rng: random.Random) -> None:
    by_id = {a["affiliate_id"]: a for a in affiliates}
    noon = profile.start + profile.duration / 2
    leaked = by_id.get(LEAKED_AFFILIATE)
    if leaked:  # a code posted on a coupon site: a burst of strangers, no click from its owner
        for k in range(profile.leak_burst):
            place_order(noon + timedelta(seconds=k * 40), f"v-leak-{k}", f"cust-leak-{k}",
                        leaked["codes"][0], "https://www.retailmenot.com/view/shop.example")
    self_ref = by_id.get(SELF_REFERRER)
    if self_ref:  # the affiliate buys through its own link
        push(noon, {"event_id": "c-self-1", "type": "click", "visitor_id": "v-self",
                    "session_id": "v-self-s", "affiliate_id": SELF_REFERRER, "channel": "blog"})
        place_order(noon + timedelta(minutes=5), "v-self", self_ref["customer_id"])
    for k in range(3):  # instant conversions: paid one second after the click
        affiliate = affiliates[k % len(affiliates)]["affiliate_id"]
        at = noon + timedelta(minutes=10 + k)
        push(at, {"event_id": f"c-fast-{k}", "type": "click", "visitor_id": f"v-fast-{k}",
                  "session_id": f"v-fast-{k}-s", "affiliate_id": affiliate, "channel": "other"})
        place_order(at + timedelta(seconds=1), f"v-fast-{k}", f"cust-fast-{k}")


def _release(pending: list[tuple[datetime, int, dict[str, Any]]], until: datetime | None,
             rng: random.Random, profile: TrafficProfile) -> Iterator[dict[str, Any]]:
    while pending and (until is None or pending[0][0] <= until):
        _, _, event = heapq.heappop(pending)
        yield event
        if rng.random() < profile.duplicate_rate:
            yield dict(event)  # a producer retry: same event_id again


def write_jsonl(events: Iterable[dict[str, Any]], path: Path) -> int:
    count = 0
    with Path(path).open("wb") as out:
        for event in events:
            out.write(orjson.dumps(event) + b"\n")
            count += 1
    return count


def count_by_type(events: Iterable[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in events:
        counts[event["type"]] = counts.get(event["type"], 0) + 1
    return counts
