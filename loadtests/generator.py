"""Synthetic shop traffic for load tests and the demo: a reference document (contract §3) and a
deterministic, time-ordered stream of input events (contract §2).

The stream looks like a day of an affiliate shop: visitors arrive on a daily rhythm and come back
for a few sessions, clicking links of affiliates whose popularity follows a Zipf law; about
`conversion_rate` of them buy, some with the affiliate's code, and a few refund later. Affiliates
post shares, and some clicks come through them. Visitors with no click buy too (unattributed
orders). Planted on top, so that the abuse rules have something to find: one leaked code (a burst
of orders from a coupon site), one self-referral and a few instant conversions. Planted visitors'
ids start with ``p-``, all others with ``v-``; ids embed the seed, so files made with different
seeds never share an id.

Everything is drawn from one seeded `random.Random`: the same reference and profile give the same
events, byte for byte. Events come out lazily in non-decreasing `ts` order. What is held in memory
is one small record per visitor who will come back, the events of journeys under way (minutes to
hours ahead, refunds up to two days), and one record per sharing affiliate; never the stream.

A backlog can be given a *shape* (`arrange`, `SHAPES`): the order its events are published in,
or how its visitors spread over partitions. And a profile can be sized by events and by the share
of orders in them (`plan_profile`), for order-heavy backlogs.

This module must never import streams, sinks or attribution code: it makes input, it does not
know how input is judged. It does no I/O but `write_jsonl` and the command line at the end, which
imports the project's config and publisher only when asked to publish:

    python -m loadtests.generator --visitors 20000 [--seed 42] --out day.jsonl
    python -m loadtests.generator --visitors 20000 --publish --rate 500    # env: TOPIC_PREFIX ...
    python -m loadtests.generator --events 300000 --order-share 0.2 --shape topic-by-topic \
        --out backlog.jsonl
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import math
import os
import random
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple, TypeVar

import orjson

from schemas.events import TOPIC_OF_TYPE
from schemas.reference import Affiliate
from schemas.validation import encode_json, parse_reference_document

EventJson = dict[str, Any]
_Item = TypeVar("_Item")

#: The affiliates the planted abuse is about (both are ambassadors in `sample_reference`).
LEAKED_CODE_AFFILIATE = "aff-002"
SELF_REFERRING_AFFILIATE = "aff-003"
LEAKED_AFFILIATE = LEAKED_CODE_AFFILIATE  # the shorter name other modules import
#: 40 customers in 30 minutes: twice the default velocity limit (20 per 60 minutes), so the
#: burst is flagged whatever the exact window arithmetic.
LEAK_ORDERS = 40
LEAK_SPAN_SECONDS = 30 * 60
INSTANT_CONVERSIONS = 3
#: 1 s from click to order: well under the default `fast_conversion_seconds` (5).
INSTANT_CONVERSION_SECONDS = 1

#: The shortest honest path from a click to a paid order (browse, cart, pay). Regular orders stay
#: above it so that `fast_conversion` flags only the planted instant conversions.
MIN_ORDER_DELAY_SECONDS = 60
#: Median 25 minutes, most within 2 hours, capped at 6 hours: the minutes-to-hours of a checkout.
ORDER_DELAY_MEDIAN_SECONDS = 25 * 60
ORDER_DELAY_SIGMA = 1.0
MAX_ORDER_DELAY_SECONDS = 6 * 3600
#: Refunds come one hour to two days after the order, even past the profile's duration.
MIN_REFUND_DELAY_SECONDS = 3600
MAX_REFUND_DELAY_SECONDS = 2 * 86_400

#: Channels clicks and shares come from; contract §2 names (this shop has no linkedin or podcast
#: partners).
CLICK_CHANNELS: tuple[str, ...] = (
    "facebook", "instagram", "tiktok", "youtube", "email", "blog", "twitter", "other",
)
#: Sessions per visitor 1..5 and clicks per session 1..4: most people come once and click once.
SESSION_WEIGHTS = (45, 25, 14, 10, 6)
CLICK_WEIGHTS = (55, 25, 12, 8)
#: A returning visitor mostly clicks the same affiliate again (they follow one creator).
FAVOURITE_AFFILIATE_SHARE = 0.6
#: Affiliates post mostly on their own platform.
PRIMARY_CHANNEL_SHARE = 0.7
#: Clicks that come through one of the affiliate's recent shares.
SHARED_LINK_SHARE = 0.1
RECENT_SHARES_KEPT = 3
#: In-app browsers (Instagram, TikTok, mail apps) often send no referrer at all.
NO_REFERRER_SHARE = 0.25
#: Codes typed in lower case: contract §3 matches codes case-insensitively, so this must not
#: change attribution; it exercises the normalisation.
LOWER_CASE_CODE_SHARE = 0.1
#: Orders of visitors with no click that still carry a code (word of mouth): method `code`.
ORGANIC_CODE_SHARE = 0.1
#: Of refunds, the share that is partial (one line, one unit or a goodwill discount).
PARTIAL_REFUND_SHARE = 0.4
GOODWILL_REFUND_FRACTION = 0.2
#: Return visits: within hours mostly, otherwise days later (often past the profile's end).
SAME_DAY_RETURN_SHARE = 0.65
SAME_DAY_RETURN_MEAN_SECONDS = 2 * 3600
LATER_RETURN_MEAN_SECONDS = 36 * 3600
MIN_RETURN_SECONDS = 10 * 60
#: Seconds between clicks of one session: a few seconds at least, a minute on average.
MIN_CLICK_GAP_SECONDS = 3
MEAN_CLICK_GAP_SECONDS = 60
#: Arrivals follow the clock: ±60 % around the mean, peaking at 20:00 UTC (European evening,
#: American afternoon).
DAILY_SWING = 0.6
PEAK_HOUR_UTC = 20

CURRENCY = "USD"
SHOP = "shop.example"
#: Category -> (weight in baskets, lowest and highest price in cents). Gift cards come in fixed
#: denominations instead (`GIFT_CARD_CENTS`); they earn the low `category_rates` rate.
CATEGORIES: dict[str, tuple[int, int, int]] = {
    "apparel": (30, 1_999, 8_999),
    "shoes": (15, 4_999, 15_999),
    "beauty": (20, 899, 4_999),
    "electronics": (10, 2_999, 39_999),
    "home": (15, 1_499, 12_999),
    "gift-cards": (10, 0, 0),
}
GIFT_CARD_CENTS = (2_500, 5_000, 10_000)
SKUS_PER_CATEGORY = 25
ITEM_WEIGHTS = (70, 22, 8)
QUANTITY_WEIGHTS = (85, 11, 4)
USER_AGENTS = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 15; Pixel 9) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/22B83 Instagram 354.0.0.0",
)
_ALPHANUMERIC = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_DEFAULT_COUPON_SITE = "retailmenot.com"
_UTC = timezone.utc


def sample_reference(n_affiliates: int = 50, seed: int = 7) -> dict[str, Any]:
    """A reference document (contract §3) for `generate`: two programs and `n_affiliates`.

    `ambassadors` (affiliate kind, 10 %, macro 15 %, mega 20 %, gift cards 2 %) holds aff-001 to
    aff-003 and about three quarters of the rest; `friends` (referral kind, 5.00 per order) the
    others, without tier. Ambassador tiers follow popularity (the ids' order, as in `generate`):
    the first tenth mega, the next fifth macro, the rest micro. Every affiliate has customer id
    ``cust-aff-NNN`` and one code ``AFFNNNSAVE``; one affiliate after aff-003 is inactive.
    """
    if n_affiliates < 4:
        raise ValueError(
            f"n_affiliates must be at least 4 (aff-002 and aff-003 carry the planted abuse and "
            f"one later affiliate is inactive), got {n_affiliates}"
        )
    rng = random.Random(seed)
    later = list(range(4, n_affiliates + 1))
    friends = set(rng.sample(later, k=len(later) // 4))
    inactive = rng.choice(later)
    ambassadors = [n for n in range(1, n_affiliates + 1) if n not in friends]
    mega = max(1, round(len(ambassadors) * 0.1))
    macro = max(1, round(len(ambassadors) * 0.2))
    tier_of = {
        number: "mega" if rank < mega else "macro" if rank < mega + macro else "micro"
        for rank, number in enumerate(ambassadors)
    }
    affiliates = []
    for number in range(1, n_affiliates + 1):
        affiliate: dict[str, Any] = {
            "affiliate_id": f"aff-{number:03d}",
            "program_id": "friends" if number in friends else "ambassadors",
        }
        if number in tier_of:
            affiliate["tier"] = tier_of[number]
        affiliate["customer_id"] = f"cust-aff-{number:03d}"
        affiliate["codes"] = [f"AFF{number:03d}SAVE"]
        affiliate["status"] = "inactive" if number == inactive else "active"
        affiliates.append(affiliate)
    return {
        "programs": [
            {
                "program_id": "ambassadors",
                "kind": "affiliate",
                "attribution_window_days": 30,
                "lock_days": 30,
                "commission": {"type": "percent", "rate": "0.10"},
                "tier_rates": {"macro": "0.15", "mega": "0.20"},
                "category_rates": {"gift-cards": "0.02"},
            },
            {
                "program_id": "friends",
                "kind": "referral",
                "attribution_window_days": 7,
                "lock_days": 14,
                "commission": {"type": "fixed", "amount": "5.00", "currency": CURRENCY},
            },
        ],
        "affiliates": affiliates,
        "settings": {
            "coupon_sites": ["retailmenot.com", "joinhoney.com", "slickdeals.net"],
            "fast_conversion_seconds": 5,
        },
    }


@dataclass(frozen=True)
class TrafficProfile:
    """How much traffic `generate` makes, over what time, and how it behaves."""

    visitors: int = 20_000
    start: datetime = datetime(2026, 11, 2, tzinfo=_UTC)
    duration: timedelta = timedelta(days=1)
    #: Share of visitors who place an order (planted visitors come on top).
    conversion_rate: float = 0.03
    #: Share of orders after a click that use the clicked affiliate's code.
    code_share: float = 0.3
    refund_rate: float = 0.05
    #: Shares per active affiliate per day.
    share_rate: float = 5.0
    #: Exponent of the Zipf law of affiliate popularity (rank = order in the reference).
    zipf_s: float = 1.1
    seed: int = 42
    #: Share of visitors who never click an affiliate link; their orders are unattributed.
    organic_share: float = 0.2
    #: Share of events sent twice with the same event_id (a producer retry), to exercise dedup.
    duplicate_rate: float = 0.002
    plant_code_leak: bool = True
    plant_self_referral: bool = True
    plant_instant_conversions: bool = True

    def __post_init__(self) -> None:
        if self.visitors < 0:
            raise ValueError(f"visitors must be >= 0, got {self.visitors}")
        if self.start.tzinfo is None or self.start.utcoffset() is None:
            raise ValueError(f"start must be timezone-aware, got {self.start!r}")
        # An hour at least: the planted code leak needs half an hour of room.
        if self.duration < timedelta(hours=1):
            raise ValueError(f"duration must be at least one hour, got {self.duration}")
        for name in (
            "conversion_rate", "code_share", "refund_rate", "organic_share", "duplicate_rate",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.share_rate < 0:
            raise ValueError(f"share_rate must be >= 0, got {self.share_rate}")
        if self.zipf_s < 0:
            raise ValueError(f"zipf_s must be >= 0, got {self.zipf_s}")


def generate(reference: Mapping[str, Any], profile: TrafficProfile) -> Iterator[EventJson]:
    """The events of `profile` against `reference`, as contract-§2 JSON objects.

    Times are whole seconds, RFC 3339 with ``Z``; money is a decimal string. Clicks, shares and
    orders fall within ``[start, start + duration)``; refunds up to two days after their order.
    `reference` is checked like `attribution load-reference` checks it (`InvalidReference`); the
    planted abuse needs aff-002 active with a code and aff-003 active with a customer id
    (`ValueError` otherwise; turn the toggles off for other references).
    """
    return _Traffic(reference, profile).events()


def write_jsonl(events: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> int:
    """Write `events` one JSON object a line (what `attribution produce` reads); their number."""
    count = 0
    with open(path, "wb", buffering=1 << 20) as out:
        for event in events:
            out.write(encode_json(event) + b"\n")
            count += 1
    return count


def count_by_type(events: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """How many events of each type, duplicates included; every contract type is a key."""
    counts = dict.fromkeys(TOPIC_OF_TYPE, 0)
    for event in events:
        kind = event["type"]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def seconds_until_due(sent: int, rate: float, elapsed: float) -> float:
    """How long to wait before sending item number `sent` (from 0) at `rate` items/s, `elapsed`
    seconds after the first went out.

    Item n is due at n / rate from the start: the schedule is fixed, it does not slide. A late
    item goes at once and the next ones keep their slots, so a pause (a GC, a slow broker ack) is
    made up and the average rate holds; a sliding schedule would quietly send less than asked
    exactly when the system under test is slow.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    return max(0.0, sent / rate - elapsed)


def pace(
    items: Iterable[_Item],
    rate: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[_Item]:
    """`items`, each handed out when it is due at `rate` per second (see `seconds_until_due`)."""
    start = clock()
    for sent, item in enumerate(items):
        wait = seconds_until_due(sent, rate, clock() - start)
        if wait > 0:
            sleep(wait)
        yield item


# --- shapes of a backlog -------------------------------------------------------------------------

#: The shapes `arrange` gives a backlog:
#: - ``interleaved``: as generated, every topic in `ts` order together (a live shop's traffic);
#: - ``topic-by-topic``: every click and share, then every order, then every refund (a backlog
#:   loaded one export file at a time);
#: - ``orders-first``: every order, then every click and share, then every refund;
#: - ``hot-partition``: interleaved, but about `HOT_SHARE` of the visitors (so of their clicks
#:   and orders, which are keyed by visitor) land on partition 0 (`HOT_PARTITION`) and the
#:   others on the other partitions.
SHAPES: tuple[str, ...] = ("interleaved", "topic-by-topic", "orders-first", "hot-partition")
#: The partitions the project's topics get by default (`ATTRIBUTION_PARTITIONS`).
DEFAULT_PARTITIONS = 8
HOT_PARTITION = 0
HOT_SHARE = 0.8
#: Events of a type, by shape: the order in which the types are published (types in one group
#: keep their generated, time-ordered interleaving).
_TYPE_GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {
    "topic-by-topic": (("click", "share"), ("order",), ("refund",)),
    "orders-first": (("order",), ("click", "share"), ("refund",)),
}


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (Java's, and kafka-python's
    `DefaultPartitioner`, which `attribution produce` uses) gives a record with `key`."""
    from kafka.partitioner.default import murmur2  # pure Python; imported only when needed

    return (murmur2(key) & 0x7FFFFFFF) % partitions


def is_hot_visitor(visitor_id: str, hot_share: float = HOT_SHARE) -> bool:
    """Whether `hot-partition` puts this visitor on the hot partition: a fixed function of the id
    (CRC-32 below `hot_share` of its range), so every event of a visitor agrees."""
    return zlib.crc32(visitor_id.encode()) < hot_share * 2**32


def hot_visitor_id(
    visitor_id: str, partitions: int, hot_share: float = HOT_SHARE
) -> str:
    """The id a visitor gets in the `hot-partition` shape: itself when it already hashes to where
    the visitor belongs (the hot partition, or any other one for the rest), else the first of
    ``<id>-k1``, ``<id>-k2``, ... that does. Distinct ids stay distinct (the suffix cannot make one
    id into another: generated ids never end in ``-k<n>``)."""
    if partitions < 2:
        return visitor_id
    hot = is_hot_visitor(visitor_id, hot_share)
    candidate = visitor_id
    for n in itertools.count(1):
        if (kafka_partition(candidate.encode(), partitions) == HOT_PARTITION) == hot:
            return candidate
        candidate = f"{visitor_id}-k{n}"
    raise AssertionError("unreachable")  # pragma: no cover - itertools.count never ends


def arrange(
    events: Iterable[EventJson],
    shape: str,
    *,
    partitions: int = DEFAULT_PARTITIONS,
    hot_share: float = HOT_SHARE,
) -> Iterator[EventJson]:
    """`events` (as `generate` makes them) in the order, or with the keys, of `shape` (`SHAPES`).

    ``interleaved`` and ``hot-partition`` stream; the reordering shapes hold the events in memory
    (a backlog is a list anyway). ``hot-partition`` renames visitors (`hot_visitor_id`, consistently
    in clicks and orders, which are keyed by `visitor_id`), for a topic of `partitions` partitions;
    renaming changes no attribution, flag or amount, only which partition a visitor lands on.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    if not 0.0 <= hot_share <= 1.0:
        raise ValueError(f"hot_share must be between 0 and 1, got {hot_share}")
    if shape == "interleaved":
        yield from events
    elif shape == "hot-partition":
        renamed: dict[str, str] = {}
        for event in events:
            visitor_id = event.get("visitor_id")
            if isinstance(visitor_id, str):
                new_id = renamed.get(visitor_id)
                if new_id is None:
                    new_id = renamed[visitor_id] = hot_visitor_id(
                        visitor_id, partitions, hot_share
                    )
                if new_id != visitor_id:
                    event = {**event, "visitor_id": new_id}
            yield event
    else:
        groups = _TYPE_GROUPS[shape]
        held: list[list[EventJson]] = [[] for _ in groups]
        group_of = {kind: n for n, kinds in enumerate(groups) for kind in kinds}
        for event in events:
            held[group_of[event["type"]]].append(event)
        for group in held:
            yield from group


# --- sizing a profile by events and order share --------------------------------------------------

#: Visitors of the pilot run that `plan_profile` measures the profile's traffic with.
PLAN_PILOT_VISITORS = 5_000


@dataclass(frozen=True)
class _PerVisitor:
    """What a pilot day of a profile shows, per visitor and as constants."""

    clicks: float  # events per visitor that do not depend on the conversion rate
    orders: float  # orders per visitor at conversion rate 1
    refunds_per_order: float
    constant_events: int  # shares and the planted visitors' events: independent of visitors
    constant_orders: int  # the planted orders


def _measure(reference: Mapping[str, Any], profile: TrafficProfile) -> _PerVisitor:
    pilot = replace(profile, visitors=PLAN_PILOT_VISITORS, conversion_rate=1.0)
    clicks = orders = refunds = constant_events = constant_orders = 0
    for event in generate(reference, pilot):
        kind = event["type"]
        planted = str(event.get("visitor_id", "")).startswith("p-")
        if kind == "share" or planted:
            constant_events += 1
            constant_orders += kind == "order"
        elif kind == "click":
            clicks += 1
        elif kind == "order":
            orders += 1
        else:
            refunds += 1
    return _PerVisitor(
        clicks=clicks / PLAN_PILOT_VISITORS,
        orders=orders / PLAN_PILOT_VISITORS,
        refunds_per_order=refunds / max(1, orders),
        constant_events=constant_events,
        constant_orders=constant_orders,
    )


def plan_profile(
    reference: Mapping[str, Any],
    *,
    events: int | None = None,
    visitors: int | None = None,
    order_share: float | None = None,
    **fields: Any,
) -> TrafficProfile:
    """A `TrafficProfile` (the other `fields` as given) sized by `events` or `visitors`, whose
    events are about `order_share` orders (by count, refunds and duplicates included in the
    total) when it is given; otherwise the profile's `conversion_rate` is kept.

    One pilot day of `PLAN_PILOT_VISITORS` visitors (a fraction of a second) measures clicks and
    orders per visitor; the conversion rate and visitor count follow from them. The result is
    approximate (within a few per cent of `events` and of `order_share`): `events` is the size
    of the backlog to aim at, not a bound. `ValueError` when the share cannot be reached: with
    every visitor buying, orders are about 30 % of this generator's events.
    """
    if (events is None) == (visitors is None):
        raise ValueError("give exactly one of events and visitors")
    if events is not None and events < 1:
        raise ValueError(f"events must be >= 1, got {events}")
    if order_share is not None and not 0.0 < order_share < 1.0:
        raise ValueError(f"order_share must be between 0 and 1 (exclusive), got {order_share}")
    base = TrafficProfile(**fields)
    m = _measure(reference, base)
    growth = 1 + m.refunds_per_order  # every order brings this many events (itself, refunds)
    if order_share is None:
        conversion = base.conversion_rate
        if visitors is None:
            assert events is not None
            per_visitor = m.clicks + conversion * m.orders * growth
            visitors = max(1, math.ceil((events - m.constant_events) / per_visitor))
        return replace(base, visitors=visitors)
    s = order_share
    if visitors is None:
        assert events is not None
        # N visitors, conversion c: N (clicks + c orders growth) + constants = events, and
        # N c orders + planted orders = s events.
        regular_orders = s * events - m.constant_orders
        visitors = max(1, math.ceil(
            (events - m.constant_events - regular_orders * growth) / m.clicks
        ))
    else:
        regular_orders = (
            s * (visitors * m.clicks + m.constant_events) - m.constant_orders
        ) / (1 - s * growth)
    most = (visitors * m.orders + m.constant_orders) / (
        visitors * (m.clicks + m.orders * growth) + m.constant_events
    )
    conversion = regular_orders / (visitors * m.orders) if visitors and m.orders else -1.0
    if not 0.0 <= conversion <= 1.0 or regular_orders < 0:
        raise ValueError(
            f"order_share {s} cannot be reached with this profile and {visitors} visitors: "
            f"orders are at most about {most:.1%} of the events (every visitor buying), and at "
            f"least the {m.constant_orders} planted orders (turn planting off for fewer)"
        )
    return replace(base, visitors=visitors, conversion_rate=conversion)


# --- the generator -------------------------------------------------------------------------------

# What a heap entry asks for when its time comes.
_EMIT = 0  # yield the event in the payload
_VISIT = 1  # the next visitor arrives
_SESSION = 2  # a visitor comes back
_SHARE = 3  # an affiliate posts a share


def _cumulative(weights: Sequence[float]) -> list[float]:
    return list(itertools.accumulate(weights))


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


class _Visitor(NamedTuple):
    """Who is browsing; a tuple because one is made per visitor (cheaper than a frozen dataclass)."""

    number: int
    visitor_id: str
    customer_id: str
    favourite: int  # index into the affiliates
    converts: bool
    ip: str
    user_agent: str


class _Traffic:
    """One run of `generate`: the random source, the clock and the heap of what happens next."""

    def __init__(self, reference: Mapping[str, Any], profile: TrafficProfile) -> None:
        _, affiliates, settings = parse_reference_document(orjson.dumps(reference))
        if not affiliates:
            raise ValueError("the reference has no affiliates to click")
        self.profile = profile
        self.rng = random.Random(profile.seed)
        self.tag = str(profile.seed)
        self.start = math.floor(profile.start.timestamp())
        self.span = int(profile.duration.total_seconds())
        self.end = self.start + self.span
        self.affiliates = affiliates
        self.handles = [a.affiliate_id.replace("-", "").lower() for a in affiliates]
        self.popularity = _cumulative(
            [1.0 / (rank ** profile.zipf_s) for rank in range(1, len(affiliates) + 1)]
        )
        self.primary_channel = [self.rng.choice(CLICK_CHANNELS) for _ in affiliates]
        self.recent_shares: list[deque[tuple[str, str]]] = [
            deque(maxlen=RECENT_SHARES_KEPT) for _ in affiliates
        ]
        coupon_sites = settings.coupon_sites if settings is not None else ()
        self.coupon_site = coupon_sites[0] if coupon_sites else _DEFAULT_COUPON_SITE
        self.catalog = self._catalog()
        self.category_names = list(CATEGORIES)
        self.category_weights = _cumulative([weight for weight, _, _ in CATEGORIES.values()])
        self.session_weights = _cumulative(SESSION_WEIGHTS)
        self.click_weights = _cumulative(CLICK_WEIGHTS)
        self.item_weights = _cumulative(ITEM_WEIGHTS)
        self.quantity_weights = _cumulative(QUANTITY_WEIGHTS)
        self.knots, self.intensity = self._daily_rhythm()

        self.heap: list[tuple[int, int, int, Any]] = []
        self.sequence = itertools.count()
        self.event_numbers = itertools.count(1)
        self.order_numbers = itertools.count(1)
        self.share_numbers = itertools.count(1)
        self.arrivals = self._arrival_times()

        self._plant()
        first = next(self.arrivals, None)
        if first is not None:
            self._push(first, _VISIT, 1)
        if profile.share_rate > 0:
            for index, affiliate in enumerate(affiliates):
                if affiliate.active:
                    self._push(self.start + self._share_gap(), _SHARE, index)

    # --- the loop ---

    def events(self) -> Iterator[EventJson]:
        heap = self.heap
        pop = heapq.heappop
        chance = self.rng.random
        duplicate_rate = self.profile.duplicate_rate
        minute = -1
        prefix = ""
        while heap:
            ts, _, kind, payload = pop(heap)
            if kind == _EMIT:
                # Formatting at emission, in time order, lets one strftime serve a whole minute.
                if ts // 60 != minute:
                    minute = ts // 60
                    prefix = time.strftime("%Y-%m-%dT%H:%M:", time.gmtime(minute * 60))
                payload["ts"] = f"{prefix}{ts % 60:02d}Z"
                if duplicate_rate and chance() < duplicate_rate:
                    resent = orjson.loads(orjson.dumps(payload))
                    yield payload
                    yield resent
                else:
                    yield payload
            elif kind == _VISIT:
                self._visit(ts, payload)
            elif kind == _SESSION:
                self._session(ts, *payload)
            else:
                self._share(ts, payload)

    def _push(self, ts: int, kind: int, payload: Any) -> None:
        heapq.heappush(self.heap, (ts, next(self.sequence), kind, payload))

    def _event(self, kind: str) -> EventJson:
        # 'ts' is filled in at emission; the key is set now to keep the contract's field order.
        return {
            "event_id": f"e-{self.tag}-{next(self.event_numbers):08d}",
            "type": kind,
            "ts": None,
        }

    # --- random helpers ---

    def _pick(self, cumulative: list[float]) -> int:
        """An index drawn with the weights whose running sums are `cumulative`."""
        index = bisect.bisect_right(cumulative, self.rng.random() * cumulative[-1])
        return min(index, len(cumulative) - 1)

    def _ip(self) -> str:
        rest = self.rng.getrandbits(24)
        return f"{self.rng.randint(11, 223)}.{rest >> 16}.{(rest >> 8) & 255}.{rest & 255 or 1}"

    def _token(self, length: int) -> str:
        return "".join(self.rng.choices(_ALPHANUMERIC, k=length))

    def _share_gap(self) -> int:
        return 1 + int(self.rng.expovariate(self.profile.share_rate / 86_400))

    # --- the shape of a day ---

    def _daily_rhythm(self) -> tuple[list[int], list[float]]:
        """Hourly knots over the profile and the running arrival intensity at each."""
        knots = list(range(0, self.span, 3600)) + [self.span]
        running = [0.0]
        for low, high in itertools.pairwise(knots):
            hour = ((self.start + (low + high) / 2) % 86_400) / 3600
            rate = 1 + DAILY_SWING * math.sin(2 * math.pi * (hour - PEAK_HOUR_UTC + 6) / 24)
            running.append(running[-1] + rate * (high - low))
        return knots, running

    def _arrival_times(self) -> Iterator[int]:
        """The visitors' first arrivals in increasing order, one at a time.

        The order statistics of `visitors` uniform draws, made one after the other (the smallest
        of the k still to come is 1 - U^(1/k) of the remaining room), then mapped through the
        daily rhythm's cumulative intensity: no list of arrivals is ever held.
        """
        total = self.intensity[-1]
        point = 0.0
        for remaining in range(self.profile.visitors, 0, -1):
            point += (1.0 - point) * (1.0 - self.rng.random() ** (1.0 / remaining))
            target = point * total
            segment = min(bisect.bisect_right(self.intensity, target), len(self.knots) - 1)
            low_mass, high_mass = self.intensity[segment - 1], self.intensity[segment]
            low, high = self.knots[segment - 1], self.knots[segment]
            offset = low + (high - low) * (target - low_mass) / (high_mass - low_mass)
            yield self.start + min(int(offset), self.span - 1)

    def _catalog(self) -> dict[str, list[tuple[str, int]]]:
        catalog: dict[str, list[tuple[str, int]]] = {}
        for category, (_, low, high) in CATEGORIES.items():
            code = category.replace("-", "")[:3].upper()
            if category == "gift-cards":
                catalog[category] = [(f"GC-{cents // 100:03d}", cents) for cents in GIFT_CARD_CENTS]
            else:
                catalog[category] = [
                    # Shop prices end in .99 / .49: draw whole units, then take a cent off.
                    (f"{code}-{n:04d}", self.rng.randint(low // 50, high // 50) * 50 - 1)
                    for n in range(1, SKUS_PER_CATEGORY + 1)
                ]
        return catalog

    # --- visitors ---

    def _visit(self, ts: int, number: int) -> None:
        nxt = next(self.arrivals, None)
        if nxt is not None:
            self._push(nxt, _VISIT, number + 1)
        rng = self.rng
        visitor = _Visitor(
            number=number,
            visitor_id=f"v-{self.tag}-{number:06d}",
            customer_id=f"c-{self.tag}-{number:06d}",
            favourite=self._pick(self.popularity),
            converts=rng.random() < self.profile.conversion_rate,
            ip=self._ip(),
            user_agent=rng.choice(USER_AGENTS),
        )
        if rng.random() < self.profile.organic_share:
            if visitor.converts:
                self._organic_order(ts, visitor)
            return
        self._session(ts, visitor, 1, 1 + self._pick(self.session_weights))

    def _session(self, ts: int, visitor: _Visitor, index: int, sessions: int) -> None:
        """Session `index` of `sessions`: its clicks, then the next visit or the order."""
        rng = self.rng
        session_id = f"s-{self.tag}-{visitor.number:06d}-{index}"
        clicked = visitor.favourite
        click_ts = ts
        for n in range(1 + self._pick(self.click_weights)):
            if n:
                gap = MIN_CLICK_GAP_SECONDS + int(rng.expovariate(1 / MEAN_CLICK_GAP_SECONDS))
                if click_ts + gap >= self.end:
                    break
                click_ts += gap
            if rng.random() >= FAVOURITE_AFFILIATE_SHARE:
                clicked = self._pick(self.popularity)
            else:
                clicked = visitor.favourite
            self._click(click_ts, visitor, session_id, clicked)
        if index < sessions:
            mean = (
                SAME_DAY_RETURN_MEAN_SECONDS
                if rng.random() < SAME_DAY_RETURN_SHARE
                else LATER_RETURN_MEAN_SECONDS
            )
            back = click_ts + MIN_RETURN_SECONDS + int(rng.expovariate(1 / mean))
            if back < self.end:
                self._push(back, _SESSION, (visitor, index + 1, sessions))
                return
        if visitor.converts:
            self._order_after_click(click_ts, visitor, session_id, self.affiliates[clicked])

    def _click(
        self,
        ts: int,
        visitor: _Visitor,
        session_id: str,
        index: int,
        channel: str | None = None,
    ) -> None:
        rng = self.rng
        affiliate_id = self.affiliates[index].affiliate_id
        share_id = ""
        if channel is None:
            recent = self.recent_shares[index]
            if recent and rng.random() < SHARED_LINK_SHARE:
                share_id, channel = rng.choice(recent)
            elif rng.random() < PRIMARY_CHANNEL_SHARE:
                channel = self.primary_channel[index]
            else:
                channel = rng.choice(CLICK_CHANNELS)
        event = self._event("click")
        event["visitor_id"] = visitor.visitor_id
        event["session_id"] = session_id
        event["affiliate_id"] = affiliate_id
        event["channel"] = channel
        if share_id:
            event["share_id"] = share_id
        referrer = self._referrer(channel, index)
        if referrer:
            event["referrer"] = referrer
        category = self.category_names[self._pick(self.category_weights)]
        sku = rng.choice(self.catalog[category])[0]
        event["landing_url"] = (
            f"https://{SHOP}/p/{sku}?aff={affiliate_id}&utm_source={channel}"
        )
        event["ip"] = visitor.ip
        event["user_agent"] = visitor.user_agent
        self._push(ts, _EMIT, event)

    def _referrer(self, channel: str, index: int) -> str:
        rng = self.rng
        if channel == "email" or rng.random() < NO_REFERRER_SHARE:
            return ""
        handle = self.handles[index]
        if channel == "twitter":
            return f"https://t.co/{self._token(10)}"
        if channel == "instagram":
            return "https://l.instagram.com/" if rng.random() < 0.7 else (
                f"https://www.instagram.com/{handle}/"
            )
        if channel == "youtube":
            return f"https://www.youtube.com/watch?v={self._token(11)}"
        if channel == "facebook":
            return "https://l.facebook.com/" if rng.random() < 0.7 else "https://m.facebook.com/"
        if channel == "tiktok":
            return f"https://www.tiktok.com/@{handle}"
        if channel == "blog":
            return f"https://blog.{handle}.example/posts/{rng.randint(1, 400)}"
        return "https://www.google.com/" if rng.random() < 0.5 else ""

    def _share(self, ts: int, index: int) -> None:
        rng = self.rng
        affiliate_id = self.affiliates[index].affiliate_id
        channel = (
            self.primary_channel[index]
            if rng.random() < PRIMARY_CHANNEL_SHARE
            else rng.choice(CLICK_CHANNELS)
        )
        share_id = f"sh-{self.tag}-{next(self.share_numbers):06d}"
        category = self.category_names[self._pick(self.category_weights)]
        event = self._event("share")
        event["affiliate_id"] = affiliate_id
        event["share_id"] = share_id
        event["channel"] = channel
        event["url"] = f"https://{SHOP}/p/{rng.choice(self.catalog[category])[0]}?aff={affiliate_id}"
        self.recent_shares[index].append((share_id, channel))
        self._push(ts, _EMIT, event)
        following = ts + self._share_gap()
        if following < self.end:
            self._push(following, _SHARE, index)

    # --- orders and refunds ---

    def _order_delay(self, after: int) -> int | None:
        """When an order placed after `after` lands, or None when the day ends first."""
        rng = self.rng
        delay = int(rng.lognormvariate(math.log(ORDER_DELAY_MEDIAN_SECONDS), ORDER_DELAY_SIGMA))
        delay = min(max(delay, MIN_ORDER_DELAY_SECONDS), MAX_ORDER_DELAY_SECONDS)
        if after + delay < self.end:
            return after + delay
        room = self.end - 1 - after
        if room < MIN_ORDER_DELAY_SECONDS:
            return None  # the cart was abandoned at the end of the profile
        return after + rng.randint(MIN_ORDER_DELAY_SECONDS, room)

    def _typed_code(self, affiliate: Affiliate) -> str:
        code = affiliate.codes[0]
        return code.lower() if self.rng.random() < LOWER_CASE_CODE_SHARE else code

    def _order_after_click(
        self, click_ts: int, visitor: _Visitor, session_id: str, clicked: Affiliate
    ) -> None:
        ts = self._order_delay(click_ts)
        if ts is None:
            return
        code = ""
        if clicked.codes and self.rng.random() < self.profile.code_share:
            code = self._typed_code(clicked)
        self._order(ts, visitor, session_id=session_id, code=code)

    def _organic_order(self, arrival: int, visitor: _Visitor) -> None:
        ts = self._order_delay(arrival)
        if ts is None:
            return
        code = ""
        if self.rng.random() < ORGANIC_CODE_SHARE:
            friend = self.affiliates[self._pick(self.popularity)]
            if friend.codes:
                code = self._typed_code(friend)
        self._order(ts, visitor, session_id=f"s-{self.tag}-{visitor.number:06d}-1", code=code)

    def _order(
        self,
        ts: int,
        visitor: _Visitor,
        *,
        session_id: str,
        code: str = "",
        referrer: str = "",
        refundable: bool = True,
    ) -> None:
        rng = self.rng
        items: list[dict[str, Any]] = []
        lines: list[tuple[int, int]] = []  # (quantity, price in cents), for refunds
        total = 0
        for _ in range(1 + self._pick(self.item_weights)):
            category = self.category_names[self._pick(self.category_weights)]
            sku, price = rng.choice(self.catalog[category])
            quantity = 1 + self._pick(self.quantity_weights)
            items.append(
                {"sku": sku, "category": category, "quantity": quantity, "price": _money(price)}
            )
            lines.append((quantity, price))
            total += quantity * price
        order_id = f"o-{self.tag}-{next(self.order_numbers):07d}"
        event = self._event("order")
        event["order_id"] = order_id
        event["visitor_id"] = visitor.visitor_id
        event["customer_id"] = visitor.customer_id
        event["currency"] = CURRENCY
        event["total"] = _money(total)
        event["session_id"] = session_id
        if code:
            event["discount_code"] = code
        if referrer:
            event["referrer"] = referrer
        event["ip"] = visitor.ip
        event["user_agent"] = visitor.user_agent
        event["items"] = items
        self._push(ts, _EMIT, event)
        if refundable and rng.random() < self.profile.refund_rate:
            self._refund(ts, order_id, lines, total)

    def _refund(self, order_ts: int, order_id: str, lines: list[tuple[int, int]], total: int) -> None:
        rng = self.rng
        ts = order_ts + rng.randint(MIN_REFUND_DELAY_SECONDS, MAX_REFUND_DELAY_SECONDS)
        amount, reason = total, rng.choice(("returned", "cancelled", "damaged"))
        if rng.random() < PARTIAL_REFUND_SHARE:
            if len(lines) > 1:
                quantity, price = rng.choice(lines)
                amount, reason = quantity * price, "returned item"
            elif lines[0][0] > 1:
                amount, reason = lines[0][1], "returned one unit"
            else:
                amount, reason = max(1, round(total * GOODWILL_REFUND_FRACTION)), "goodwill"
        event = self._event("refund")
        event["order_id"] = order_id
        event["amount"] = _money(amount)
        event["currency"] = CURRENCY
        event["reason"] = reason
        self._push(ts, _EMIT, event)

    # --- planted abuse ---

    def _planted_visitor(self, name: str) -> _Visitor:
        return _Visitor(
            number=0,
            visitor_id=f"p-{self.tag}-{name}",
            customer_id=f"c-{self.tag}-{name}",
            favourite=0,
            converts=True,
            ip=self._ip(),
            user_agent=self.rng.choice(USER_AGENTS),
        )

    def _planted_affiliate(self, affiliate_id: str, toggle: str, need: str) -> int:
        for index, affiliate in enumerate(self.affiliates):
            if affiliate.affiliate_id == affiliate_id:
                has_need = affiliate.codes if need == "code" else affiliate.customer_id
                if affiliate.active and has_need:
                    return index
        raise ValueError(
            f"{toggle} needs an active affiliate {affiliate_id!r} with a {need} in the "
            f"reference; turn {toggle} off for this reference"
        )

    def _plant(self) -> None:
        profile = self.profile
        if profile.plant_code_leak:
            self._plant_code_leak()
        if profile.plant_self_referral:
            self._plant_self_referral()
        if profile.plant_instant_conversions:
            self._plant_instant_conversions()

    def _plant_code_leak(self) -> None:
        """LEAK_ORDERS customers with no click use aff-002's code, coming from a coupon site."""
        leaked = self.affiliates[
            self._planted_affiliate(LEAKED_CODE_AFFILIATE, "plant_code_leak", "code")
        ]
        burst_start = self.start + int((self.span - LEAK_SPAN_SECONDS) * 0.4)
        offsets = sorted(self.rng.randrange(LEAK_SPAN_SECONDS) for _ in range(LEAK_ORDERS))
        for n, offset in enumerate(offsets, start=1):
            visitor = self._planted_visitor(f"leak-{n:02d}")
            self._order(
                burst_start + offset,
                visitor,
                session_id=f"s-{self.tag}-leak-{n:02d}",
                code=leaked.codes[0],
                referrer=f"https://www.{self.coupon_site}/view/{SHOP}",
                refundable=False,
            )

    def _plant_self_referral(self) -> None:
        """aff-003 clicks its own link and orders as its own customer 20 minutes later."""
        index = self._planted_affiliate(
            SELF_REFERRING_AFFILIATE, "plant_self_referral", "customer id"
        )
        visitor = _Visitor(
            number=0,
            visitor_id=f"p-{self.tag}-self-1",
            customer_id=self.affiliates[index].customer_id,
            favourite=index,
            converts=True,
            ip=self._ip(),
            user_agent=self.rng.choice(USER_AGENTS),
        )
        click_ts = self.start + self.span // 4
        session_id = f"s-{self.tag}-self-1"
        self._click(click_ts, visitor, session_id, index, channel="instagram")
        self._order(click_ts + 20 * 60, visitor, session_id=session_id, refundable=False)

    def _plant_instant_conversions(self) -> None:
        """A few clicks followed by an order one second later (click injection)."""
        candidates = [
            index for index, affiliate in enumerate(self.affiliates)
            if affiliate.active
            and affiliate.affiliate_id not in (LEAKED_CODE_AFFILIATE, SELF_REFERRING_AFFILIATE)
        ]
        if not candidates:
            raise ValueError(
                "plant_instant_conversions needs an active affiliate besides the planted ones; "
                "turn plant_instant_conversions off for this reference"
            )
        for n in range(1, INSTANT_CONVERSIONS + 1):
            index = candidates[min(self._pick(self.popularity), len(candidates) - 1)]
            visitor = self._planted_visitor(f"instant-{n}")
            click_ts = self.start + int(self.span * (0.4 + 0.15 * n))
            session_id = f"s-{self.tag}-instant-{n}"
            self._click(click_ts, visitor, session_id, index)
            self._order(
                click_ts + INSTANT_CONVERSION_SECONDS,
                visitor,
                session_id=session_id,
                refundable=False,
            )


# --- the command line ----------------------------------------------------------------------------

#: Seconds between progress lines while publishing: often enough to see the rate, rarely enough
#: not to flood a log.
PROGRESS_EVERY_SECONDS = 5.0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m loadtests.generator`: write a generated day as JSONL, or publish it paced."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.generator",
        description="Generate a day of shop traffic against the sample reference (50 affiliates): "
        "write it as JSONL, or publish it to Kafka at a fixed rate (env KAFKA_BOOTSTRAP, "
        "TOPIC_PREFIX, like every attribution command).",
    )
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--visitors", type=int, help="visitors in the day")
    size.add_argument("--events", type=int,
                      help="about this many events (visitors are chosen to match)")
    parser.add_argument("--seed", type=int, default=TrafficProfile.seed,
                        help="random seed; ids embed it, so two seeds never share an id")
    parser.add_argument("--order-share", type=float, metavar="SHARE",
                        help="make about SHARE of the events orders (e.g. 0.2 for an order-heavy "
                        "backlog; at most about 0.3); default: 3 %% of visitors buy (~1.5 %% orders)")
    parser.add_argument("--shape", choices=SHAPES, default="interleaved",
                        help="interleaved (default: every topic in time order together), "
                        "topic-by-topic (all clicks and shares, then all orders, then all "
                        "refunds), orders-first (orders, then clicks and shares, then refunds), "
                        f"hot-partition (about {HOT_SHARE * 100:.0f} %% of the visitors keyed to partition "
                        f"{HOT_PARTITION})")
    parser.add_argument("--partitions", type=int, default=None,
                        help="with --shape hot-partition: partitions of the input topics "
                        "(default: $ATTRIBUTION_PARTITIONS, else 8)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", metavar="FILE.jsonl", help="write the events to FILE.jsonl")
    target.add_argument("--publish", action="store_true",
                        help="publish the events to the input topics (needs --rate)")
    parser.add_argument("--rate", type=float, metavar="EVENTS_PER_S",
                        help="with --publish: events per second, on a fixed schedule")
    parser.add_argument("--reference", metavar="FILE.json",
                        help="also write the sample reference document (for load-reference)")
    parser.add_argument("--load-reference", action="store_true",
                        help="with --publish: first publish the sample reference data")
    args = parser.parse_args(argv)
    if args.publish and (args.rate is None or args.rate <= 0):
        parser.error("--publish needs --rate EVENTS_PER_S > 0")
    if not args.publish and (args.rate is not None or args.load_reference):
        parser.error("--rate and --load-reference go with --publish")
    reference = sample_reference()
    partitions = args.partitions or int(
        os.environ.get("ATTRIBUTION_PARTITIONS") or DEFAULT_PARTITIONS
    )
    try:
        profile = plan_profile(reference, events=args.events, visitors=args.visitors,
                               order_share=args.order_share, seed=args.seed)
        if partitions < 1:
            raise ValueError(f"--partitions must be >= 1, got {partitions}")
    except ValueError as exc:
        parser.error(str(exc))
    if args.reference:
        with open(args.reference, "wb") as out:
            out.write(orjson.dumps(reference, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"{profile.visitors} visitors, conversion rate {profile.conversion_rate:.4f}, "
          f"shape {args.shape}", file=sys.stderr)
    events = arrange(generate(reference, profile), args.shape, partitions=partitions)
    if args.out:
        count = write_jsonl(events, args.out)
        print(f"wrote {count} events to {args.out}", file=sys.stderr)
        return 0
    return _publish(reference, events, args.rate, args.load_reference)


def _publish(
    reference: Mapping[str, Any], events: Iterable[EventJson], rate: float, load_reference: bool
) -> int:
    # Imported here: generating must not need the pipeline's publisher (see the module docstring).
    from pydantic import ValidationError

    from schemas.config import Config
    from streams.publish import make_producer, produce_lines, publish_reference

    try:
        config = Config.from_env()
    except ValidationError as exc:
        print(f"bad configuration: {exc}", file=sys.stderr)
        return 2
    if load_reference:
        published = publish_reference(config, *parse_reference_document(orjson.dumps(reference)))
        print(f"published reference data {published}", file=sys.stderr)
    started = time.monotonic()
    sent = 0
    last_report = started

    def on_line(count: int) -> None:
        nonlocal sent, last_report
        sent += count
        now = time.monotonic()
        if now - last_report >= PROGRESS_EVERY_SECONDS:
            last_report = now
            print(f"{sent} events in {now - started:.0f} s ({sent / (now - started):,.0f}/s)",
                  file=sys.stderr)

    lines = pace((encode_json(event) for event in events), rate)
    producer = make_producer(config)
    try:
        summary = produce_lines(config, lines, on_line=on_line, producer=producer)
    except KeyboardInterrupt:
        print(f"interrupted after {sent} events", file=sys.stderr)
        return 130
    finally:
        producer.close(timeout=10)
    elapsed = time.monotonic() - started
    print(f"published {summary.total_sent} events in {elapsed:.1f} s "
          f"({summary.total_sent / max(elapsed, 1e-9):,.0f}/s) to {dict(summary.sent)}; "
          f"skipped {dict(summary.skipped)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
