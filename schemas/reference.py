"""Reference data of contract §3: programs, affiliates and settings, as frozen records.

Parsing and validation of the reference JSON lives in `schemas.validation`. Defaults here are the
contract's defaults; change them only with the contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal, Mapping

DEFAULT_ATTRIBUTION_WINDOW_DAYS = 30
DEFAULT_LOCK_DAYS = 30
DEFAULT_VELOCITY_MAX_CUSTOMERS = 20
DEFAULT_VELOCITY_WINDOW_MINUTES = 60
#: 5 s: faster than a human can browse from a click to a paid order; such orders are held for
#: review (click injection / cookie stuffing), not rejected, because some are genuine re-orders.
DEFAULT_FAST_CONVERSION_SECONDS = 5
#: How far ahead of the processing machine's clock an event's `ts` may be (contract §2).
DEFAULT_MAX_FUTURE_SECONDS = 300

#: Major coupon and deal aggregators. A code seen with one of these referrers has leaked.
DEFAULT_COUPON_SITES: tuple[str, ...] = (
    "retailmenot.com",
    "joinhoney.com",
    "honey.com",
    "slickdeals.net",
    "coupons.com",
    "couponfollow.com",
    "dealspotr.com",
    "knoji.com",
    "wethrift.com",
    "couponbirds.com",
    "groupon.com",
    "rakuten.com",
    "capitaloneshopping.com",
    "karmanow.com",
    "offers.com",
    "savings.com",
    "vouchercodes.co.uk",
    "myvouchercodes.co.uk",
    "vouchercloud.com",
    "hotukdeals.com",
    "mydealz.de",
    "dealabs.com",
    "promocodes.com",
    "couponcabin.com",
    "brads-deals.com",
)


@dataclass(frozen=True, slots=True)
class Commission:
    type: Literal["percent", "fixed"]
    rate: Decimal = Decimal("0")  # percent programs: fraction of total, e.g. 0.10
    amount: Decimal = Decimal("0")  # fixed programs: per order with total > 0
    currency: str = ""  # fixed programs: paid only on orders in this currency (ISO 4217)


@dataclass(frozen=True, slots=True)
class Velocity:
    max_customers: int = DEFAULT_VELOCITY_MAX_CUSTOMERS
    window_minutes: int = DEFAULT_VELOCITY_WINDOW_MINUTES


@dataclass(frozen=True, slots=True)
class Program:
    program_id: str
    kind: Literal["referral", "affiliate"]
    commission: Commission
    attribution_window_days: int = DEFAULT_ATTRIBUTION_WINDOW_DAYS
    lock_days: int = DEFAULT_LOCK_DAYS
    tier_rates: Mapping[str, Decimal] = field(default_factory=dict)
    category_rates: Mapping[str, Decimal] = field(default_factory=dict)
    velocity: Velocity = Velocity()


@dataclass(frozen=True, slots=True)
class Affiliate:
    affiliate_id: str
    program_id: str
    tier: str = ""
    customer_id: str = ""
    codes: tuple[str, ...] = ()  # normalised: trimmed, upper case
    status: str = "active"
    payout_email: str = ""  # §9: the PayPal recipient of `payouts export --format paypal`

    @property
    def active(self) -> bool:
        return self.status == "active"


@dataclass(frozen=True, slots=True)
class Link:
    """A tracking link of the edge (contract §8): `/r/{link_id}` redirects to `url`."""

    link_id: str
    affiliate_id: str
    url: str
    channel: str = "other"


@dataclass(frozen=True, slots=True)
class Settings:
    coupon_sites: tuple[str, ...] = DEFAULT_COUPON_SITES
    fast_conversion_seconds: int = DEFAULT_FAST_CONVERSION_SECONDS
    #: Who may decide on held orders (contract §6); nobody by default.
    reviewers: tuple[str, ...] = ()
    max_future_seconds: int = DEFAULT_MAX_FUTURE_SECONDS
    #: The tracking edge (contract §8): its links, where an ad-hoc link may send a browser,
    #: and which sites' pages may post events (host names; a subdomain matches).
    links: tuple[Link, ...] = ()
    allowed_redirect_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()

    def link(self, link_id: str) -> Link | None:
        return next((link for link in self.links if link.link_id == link_id), None)


def normalise_code(code: str) -> str:
    """Codes match case-insensitively after trimming (contract §3)."""
    return code.strip().upper()


@dataclass(frozen=True)
class ReferenceData:
    """A consistent view of all reference data, as the rules see it."""

    programs: Mapping[str, Program] = field(default_factory=dict)
    affiliates: Mapping[str, Affiliate] = field(default_factory=dict)
    settings: Settings = Settings()

    def __post_init__(self) -> None:
        # Index codes once per snapshot: owner_of_code runs for every order.
        index: dict[str, str] = {}
        for affiliate in self.affiliates.values():
            for code in affiliate.codes:
                index[code] = affiliate.affiliate_id
        object.__setattr__(self, "_code_owner", index)

    def owner_of_code(self, code: str) -> Affiliate | None:
        """The affiliate owning `code` (any status), or None."""
        owner_id = self._code_owner.get(normalise_code(code))  # type: ignore[attr-defined]
        return self.affiliates.get(owner_id) if owner_id else None

    def program_of(self, affiliate: Affiliate) -> Program | None:
        return self.programs.get(affiliate.program_id)
