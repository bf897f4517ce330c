"""Abuse flags of an attributed order (contract §6) and the status they give its accrual.

Pure functions over frozen records: no Kafka or ClickHouse, no clock. Code velocity needs every
use of a code across orders: the code stage (`streams.engine.stages.CodeStage`) collects them and
asks `velocity_limit` / `velocity_over_limit` after the order's other flags were decided here.
A flag never changes who earns the order; it only holds or rejects the commission.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta

from schemas.events import Order
from schemas.facts import AbuseFlag, Attribution, CodeRedemptions, FactStatus, Touch
from schemas.internal import DecidedOrder
from schemas.reference import (
    DEFAULT_VELOCITY_WINDOW_MINUTES,
    Affiliate,
    Program,
    ReferenceData,
    Settings,
    Velocity,
    normalise_code,
)

from .attribution import referrer_host
from .money import ZERO

#: A leaked code is flagged once more than `max_customers` (20 by default) use it within the
#: window, long before this many uses. The cap only bounds the table value of a code that went
#: viral; the newest uses are kept, so a flagged code stays flagged. Velocity limits above this
#: many customers per window are not supported.
MAX_REDEMPTIONS_PER_CODE = 10_000

_CODE_METHODS = ("code", "code+click")
_CLICK_METHODS = ("last_click", "code+click")

#: Every reason this module can raise, in the order flags are reported: contract §6's table,
#: then the project's own signals.
REASONS = (
    "self_referral",
    "coupon_site_referrer",
    "code_velocity",
    "fast_conversion",
    "customer_lookalike",
    "paid_search_click",
    "currency_mismatch",
)


def coupon_site_of(host: str, sites: Iterable[str]) -> str | None:
    """The coupon site `host` is, or is a subdomain of; None if it is none of them."""
    host = referrer_host(host)
    if not host:
        return None
    for site in sites:
        # Sites are normalised like referrers, so "RetailMeNot.com" or a full URL still match.
        site_host = referrer_host(site)
        if site_host and (host == site_host or host.endswith("." + site_host)):
            return site_host
    return None


def host_matches(host: str, sites: Iterable[str]) -> bool:
    """True when `host` equals one of `sites` or is a subdomain of one (not a mere suffix)."""
    return coupon_site_of(host, sites) is not None


def coupon_site_seen(order: Order, latest_touch: Touch | None, sites: Iterable[str]) -> str:
    """The coupon site the order's referrer, or else its visitor's latest click, came from; ''."""
    for host in (referrer_host(order.referrer), latest_touch.referrer_host if latest_touch else ""):
        site = coupon_site_of(host, sites)
        if site is not None:
            return site
    return ""


def self_referral(order: Order, affiliate: Affiliate) -> AbuseFlag | None:
    """Reject: the affiliate earning the order is the customer who placed it."""
    customer = order.customer_id.strip()
    if customer and customer == affiliate.customer_id.strip():
        return AbuseFlag(
            "self_referral",
            "reject",
            f"customer {customer} is affiliate {affiliate.affiliate_id}'s own customer account",
        )
    return None


def coupon_site_referrer(
    order: Order, attribution: Attribution, latest_touch: Touch | None, ref: ReferenceData
) -> AbuseFlag | None:
    """Hold: an affiliate's code used by a visitor coming from a coupon site (a leaked code).

    Looks at the order's own referrer and at the referrer of the visitor's latest click
    (`latest_touch`, whoever it was for). Only orders attributed through a code are concerned.
    """
    if attribution.method not in _CODE_METHODS:
        return None
    sites = ref.settings.coupon_sites
    found: list[str] = []
    order_host = referrer_host(order.referrer)
    order_site = coupon_site_of(order_host, sites)
    if order_site is not None:
        found.append(f"order referrer {order_host} is coupon site {order_site}")
    if latest_touch is not None:
        click_site = coupon_site_of(latest_touch.referrer_host, sites)
        if click_site is not None:
            found.append(
                f"latest click {latest_touch.event_id} came from {latest_touch.referrer_host},"
                f" coupon site {click_site}"
            )
    if not found:
        return None
    code = normalise_code(order.discount_code)
    return AbuseFlag("coupon_site_referrer", "hold", f"code {code}: " + "; ".join(found))


def fast_conversion(
    order: Order, attribution: Attribution, settings: Settings
) -> AbuseFlag | None:
    """Hold: the order came less than `fast_conversion_seconds` after its attributing click.

    Exactly the threshold is not flagged ("<", contract §6).
    """
    click = attribution.click
    if attribution.method not in _CLICK_METHODS or click is None:
        return None
    elapsed = order.ts - click.ts
    if elapsed < timedelta(seconds=settings.fast_conversion_seconds):
        return AbuseFlag(
            "fast_conversion",
            "hold",
            f"order {elapsed.total_seconds():g} s after click {click.event_id},"
            f" minimum {settings.fast_conversion_seconds} s",
        )
    return None


def _identity(value: str) -> str:
    """An id reduced to lower-case letters and digits: "Cust-981 " and "cust981" are one."""
    return re.sub(r"[^0-9a-z]", "", value.casefold())


def customer_lookalike(order: Order, affiliate: Affiliate) -> AbuseFlag | None:
    """Hold: the customer id matches the affiliate's own after normalisation, but not exactly.

    The exact match is `self_referral` (reject); a near-identical id ("Sally.Smith" vs
    "sallysmith") is usually the same person with a second account, but not always: a person
    decides.
    """
    customer, own = order.customer_id.strip(), affiliate.customer_id.strip()
    if not customer or not own or customer == own:
        return None
    if _identity(customer) and _identity(customer) == _identity(own):
        return AbuseFlag(
            "customer_lookalike",
            "hold",
            f"customer {customer} looks like affiliate {affiliate.affiliate_id}'s own account {own}",
        )
    return None


def paid_search_click(attribution: Attribution) -> AbuseFlag | None:
    """Hold: the attributing click came from a paid search ad (a gclid/msclkid on its landing URL).

    Most programs forbid affiliates to bid on the store's brand in search ads: the store pays
    for the ad click *and* the commission on a customer who was already looking for it.
    """
    click = attribution.click
    if attribution.method not in _CLICK_METHODS or click is None or not click.paid_click_id:
        return None
    return AbuseFlag(
        "paid_search_click",
        "hold",
        f"click {click.event_id} landed with paid-search id {click.paid_click_id}",
    )


def currency_mismatch(order: Order, program: Program | None) -> AbuseFlag | None:
    """Hold: a fixed commission is paid only on orders in its currency (contract v2 §3, §6).

    The order earns 0.00 (`commission_for`); a person decides whether the partner is owed the
    amount in another currency.
    """
    if program is None or program.commission.type != "fixed" or not program.commission.currency:
        return None
    if order.currency == program.commission.currency:
        return None
    return AbuseFlag(
        "currency_mismatch",
        "hold",
        f"program {program.program_id} pays {program.commission.amount} "
        f"{program.commission.currency}; the order is in {order.currency}",
    )


def velocity_horizon(ref: ReferenceData) -> timedelta:
    """How long a redemption can matter: the longest velocity window of any program (>= 60 min).

    The code stage keeps uses this long, since one code's owner may change program.
    """
    minutes = max(
        (p.velocity.window_minutes for p in ref.programs.values()),
        default=DEFAULT_VELOCITY_WINDOW_MINUTES,
    )
    return timedelta(minutes=max(minutes, DEFAULT_VELOCITY_WINDOW_MINUTES))


def code_velocity(
    state: CodeRedemptions, order_ts: datetime, velocity: Velocity
) -> AbuseFlag | None:
    """Hold: more than `max_customers` distinct customers used the code in (O.ts - window, O.ts].

    `state` must already include the order being checked.
    """
    window_start = order_ts - timedelta(minutes=velocity.window_minutes)
    customers = {c for ts, c in state.redemptions if window_start < ts <= order_ts}
    return velocity_over_limit(len(customers), velocity)


def velocity_over_limit(distinct_customers: int, velocity: Velocity) -> AbuseFlag | None:
    """The `code_velocity` flag for this many distinct customers in the window, if over the limit."""
    if distinct_customers > velocity.max_customers:
        return AbuseFlag(
            "code_velocity",
            "hold",
            f"{distinct_customers} distinct customers in {velocity.window_minutes} min,"
            f" limit {velocity.max_customers}",
        )
    return None


def flags_for_order(
    order: Order,
    attribution: Attribution,
    affiliate: Affiliate | None,
    latest_touch: Touch | None,
    ref: ReferenceData,
) -> tuple[AbuseFlag, ...]:
    """Every flag that applies to an attributed order but code velocity, in the order of
    contract §6's table (velocity needs every use of the code: the code stage adds it later
    with `velocity_limit`, `velocity_over_limit` and `with_flags`).

    `affiliate` is the attributed one; `latest_touch` the visitor's latest click at or before
    the order (`attribution.latest_touch`). Unattributed orders get no flags.
    """
    if attribution.method == "none" or affiliate is None:
        return ()
    candidates = (
        self_referral(order, affiliate),
        coupon_site_referrer(order, attribution, latest_touch, ref),
        fast_conversion(order, attribution, ref.settings),
        customer_lookalike(order, affiliate),
        paid_search_click(attribution),
        currency_mismatch(order, ref.program_of(affiliate)),
    )
    return tuple(flag for flag in candidates if flag is not None)


def velocity_flag(
    decided: DecidedOrder, redemptions: CodeRedemptions, ref: ReferenceData
) -> AbuseFlag | None:
    """`code_velocity` for an order decided without it; `redemptions` include the order.

    Only orders attributed through their code are flagged; the limit is the one of the program
    the order was attributed in (the code owner's).
    """
    velocity = velocity_limit(decided, ref)
    return None if velocity is None else code_velocity(redemptions, decided.ts, velocity)


def velocity_limit(decided: DecidedOrder, ref: ReferenceData) -> Velocity | None:
    """The velocity limit an order is checked against: its program's, for orders attributed
    through their code; None for any other order (never flagged)."""
    if decided.method not in _CODE_METHODS or decided.ledger is None:
        return None
    program = ref.programs.get(decided.program_id)
    return program.velocity if program is not None else Velocity()


def with_flags(decided: DecidedOrder, extra: Iterable[AbuseFlag]) -> DecidedOrder:
    """`decided` with more flags, its accrual status (and amount, when rejected) re-derived."""
    known = {flag.reason for flag in decided.flags}
    added = []
    for flag in extra:
        if flag.reason not in known:
            known.add(flag.reason)
            added.append(flag)
    if not added or decided.ledger is None or decided.accrual is None:
        return decided
    flags = tuple(sorted((*decided.flags, *added), key=lambda f: REASONS.index(f.reason)))
    status = status_for(flags)
    amount = decided.ledger.commission if status != "rejected" else ZERO
    return replace(
        decided,
        flags=flags,
        ledger=replace(decided.ledger, status=status, commission=amount),
        accrual=replace(decided.accrual, status=status, amount=amount),
    )


def status_for(flags: Iterable[AbuseFlag]) -> FactStatus:
    """The accrual's status: rejected beats held beats pending (contract §5)."""
    severities = {flag.severity for flag in flags}
    if "reject" in severities:
        return "rejected"
    if "hold" in severities:
        return "held"
    return "pending"
