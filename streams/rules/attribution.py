"""Who earns an order: the visitor's remembered clicks, and attribution (contract §4).

Pure functions over frozen records from `schemas`: no Faust, Kafka or ClickHouse here, no clock,
no I/O. The stream layer keeps one tuple of `Touch`es per visitor (built with `remember_touch`)
and calls `attribute` once per order, with the reference data current at that moment.
"""

from __future__ import annotations

import re
from functools import lru_cache

from collections.abc import Iterable
from datetime import datetime, timedelta
from urllib.parse import parse_qsl, urlsplit

from schemas.events import Click, Order
from schemas.facts import Attribution, Touch
from schemas.reference import DEFAULT_ATTRIBUTION_WINDOW_DAYS, ReferenceData, normalise_code

TOUCH_HORIZON_DAYS_DEFAULT = DEFAULT_ATTRIBUTION_WINDOW_DAYS
#: A person clicks a handful of affiliate links a month; a visitor id with hundreds of clicks is a
#: bot or a click-stuffing script replaying one cookie. Without a cap such a visitor grows its
#: table value (rewritten on every click) without bound. Dropping its oldest clicks costs at most
#: a `code+click` that becomes `code`: last-click attribution only ever needs the newest click.
MAX_TOUCHES_PER_VISITOR = 200


@lru_cache(maxsize=65_536)  # referrers repeat a lot (a site's pages, a campaign's links)
def referrer_host(url: str) -> str:
    """The lower-cased host of a URL or of a bare host (``shop.example.com/x``), without port.

    '' when there is no host. A trailing dot (``retailmenot.com.``, a valid absolute name) is
    dropped so that it cannot hide a coupon site; ``www.`` is kept.
    """
    text = url.strip()
    if not text:
        return ""
    if "://" not in text and not text.startswith("//"):
        text = "//" + text  # a bare host: make urlsplit read it as the network location
    try:
        host = urlsplit(text).hostname or ""
    except ValueError:  # e.g. an unbalanced IPv6 bracket: no usable host
        return ""
    return host.rstrip(".")


#: Click ids that ad networks append to a landing URL when a *paid* search ad was clicked
#: (Google Ads auto-tagging, Microsoft Ads, Google's iOS variants, DoubleClick). fbclid is not
#: here: Facebook adds it to every outbound link, organic posts included.
PAID_CLICK_ID_PARAMS = ("gclid", "gbraid", "wbraid", "msclkid", "dclid")


#: Any of the names, in any case, or a percent sign (an encoded name is only found by parsing).
_MAY_HAVE_PAID_CLICK_ID = re.compile("|".join((*PAID_CLICK_ID_PARAMS, "%")), re.IGNORECASE)


def paid_click_id(landing_url: str) -> str:
    """The first paid-search click id parameter present (non-empty) on `landing_url`, or ''."""
    if "=" not in landing_url or _MAY_HAVE_PAID_CLICK_ID.search(landing_url) is None:
        return ""  # cheap and exact: no such name anywhere (a percent-encoded one is parsed)
    try:
        params = {key.lower() for key, value in parse_qsl(urlsplit(landing_url).query) if value}
    except ValueError:
        return ""
    return next((name for name in PAID_CLICK_ID_PARAMS if name in params), "")


def touch_from_click(click: Click) -> Touch:
    return Touch(
        event_id=click.event_id,
        ts=click.ts,
        affiliate_id=click.affiliate_id,
        channel=click.channel,
        referrer_host=referrer_host(click.referrer),
        paid_click_id=paid_click_id(click.landing_url),
    )


def _touch_order(touch: Touch) -> tuple[datetime, str]:
    """Chronological order; ties on ts go to the greater event_id (contract §4, step 2)."""
    return (touch.ts, touch.event_id)


def remember_touch(
    touches: tuple[Touch, ...], touch: Touch, horizon: timedelta
) -> tuple[Touch, ...]:
    """A visitor's touches with `touch` added, sorted by (ts, event_id) and bounded.

    A touch whose event_id is already remembered is ignored (the first one wins). Touches older
    than the newest one minus `horizon` are forgotten, and so is anything beyond the newest
    `MAX_TOUCHES_PER_VISITOR`. The result depends only on the set of touches seen, not on the
    order they arrived in, and remembering the same touch twice changes nothing.
    """
    if any(known.event_id == touch.event_id for known in touches):
        return touches
    merged = sorted((*touches, touch), key=_touch_order)
    oldest_kept = merged[-1].ts - horizon
    recent = [t for t in merged if t.ts >= oldest_kept]
    return tuple(recent[-MAX_TOUCHES_PER_VISITOR:])


def touch_horizon(ref: ReferenceData) -> timedelta:
    """How long a click can matter: the longest attribution window of any program (>= 30 days)."""
    days = max(
        (p.attribution_window_days for p in ref.programs.values()),
        default=TOUCH_HORIZON_DAYS_DEFAULT,
    )
    return timedelta(days=max(days, TOUCH_HORIZON_DAYS_DEFAULT))


def latest_touch(touches: Iterable[Touch], until: datetime) -> Touch | None:
    """The visitor's latest click at or before `until`, whoever it was for (abuse checks)."""
    earlier = [t for t in touches if t.ts <= until]
    return max(earlier, key=_touch_order, default=None)


def qualifying_clicks(order: Order, touches: Iterable[Touch], ref: ReferenceData) -> list[Touch]:
    """The touches that may attribute `order`, oldest first (contract §4).

    A click qualifies when it is not after the order, the order falls within the attribution
    window of the clicked affiliate's program (exactly the window still counts), and that
    affiliate is known, active and in a known program.
    """
    qualifying: list[Touch] = []
    for touch in touches:
        if touch.ts > order.ts:
            continue
        affiliate = ref.affiliates.get(touch.affiliate_id)
        if affiliate is None or not affiliate.active:
            continue
        program = ref.program_of(affiliate)
        if program is None:
            continue
        if order.ts - touch.ts <= timedelta(days=program.attribution_window_days):
            qualifying.append(touch)
    return sorted(qualifying, key=_touch_order)


def attribute(order: Order, touches: Iterable[Touch], ref: ReferenceData) -> Attribution:
    """Who earns `order` and why (contract §4, steps 1 to 3)."""
    qualifying = qualifying_clicks(order, touches, ref)

    code = normalise_code(order.discount_code)
    owner = ref.owner_of_code(code) if code else None
    # An inactive owner, or one whose program is unknown, earns nothing: fall through to clicks.
    if owner is not None and owner.active and ref.program_of(owner) is not None:
        own_clicks = [t for t in qualifying if t.affiliate_id == owner.affiliate_id]
        if own_clicks:
            return Attribution(owner.affiliate_id, "code+click", own_clicks[-1])
        return Attribution(owner.affiliate_id, "code")

    if qualifying:
        last = qualifying[-1]
        return Attribution(last.affiliate_id, "last_click", last)
    return Attribution("", "none")
