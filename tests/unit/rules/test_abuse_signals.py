"""The project's own abuse signals (README) and the flags the code stage adds to a decided order.

Paid-search click ids on landing URLs, customer ids that look like the affiliate's own, the coupon
site an order came from, code velocity on a decided order, and `with_flags`.
"""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest

from schemas.events import Click
from schemas.facts import AbuseFlag, Attribution, CodeRedemptions, Method, Touch
from schemas.reference import Velocity
from streams.rules.abuse import (
    coupon_site_seen,
    customer_lookalike,
    flags_for_order,
    paid_search_click,
    self_referral,
    velocity_flag,
    with_flags,
)
from streams.rules.attribution import PAID_CLICK_ID_PARAMS, paid_click_id, touch_from_click

from .builders import T0, affiliate, at, decided, order, program, reference, touch

SALLY = affiliate("sally", customer_id="cust-981", codes=("SALLY20",))
SITES = ("retailmenot.com", "joinhoney.com")

SELF = AbuseFlag("self_referral", "reject", "customer cust-981 is affiliate sally's own")
COUPON = AbuseFlag("coupon_site_referrer", "hold", "code SALLY20: order referrer retailmenot.com")
VELOCITY = AbuseFlag("code_velocity", "hold", "3 distinct customers in 60 min, limit 2")
FAST = AbuseFlag("fast_conversion", "hold", "order 1 s after click c-1, minimum 5 s")
LOOKALIKE = AbuseFlag("customer_lookalike", "hold", "customer Cust.981 looks like cust-981")
PAID = AbuseFlag("paid_search_click", "hold", "click c-1 landed with paid-search id gclid")


# paid_click_id

@pytest.mark.parametrize(
    ("landing_url", "expected"),
    [
        ("https://shop.example/p?gclid=EAIaIQobChMI", "gclid"),
        ("https://shop.example/p?gbraid=0AAAAA", "gbraid"),
        ("https://shop.example/p?wbraid=CkAK", "wbraid"),
        ("https://shop.example/p?msclkid=7c2f", "msclkid"),
        ("https://shop.example/p?dclid=CJv", "dclid"),
        ("https://shop.example/p?utm_source=google&gclid=abc&utm_medium=cpc", "gclid"),
        ("https://shop.example/p?GCLID=abc", "gclid"),
        ("https://shop.example/p?MsClkId=abc", "msclkid"),
        ("shop.example/p?gclid=abc", "gclid"),
        # Several ids: the first of PAID_CLICK_ID_PARAMS, whatever their order on the URL.
        ("https://shop.example/p?msclkid=b&gclid=a", "gclid"),
        ("https://shop.example/p?gclid=&msclkid=b", "msclkid"),
        ("https://shop.example/p?%67clid=abc", "gclid"),  # a percent-encoded name is still one
    ],
)
def test_a_paid_search_click_id_on_the_landing_url_is_named(
    landing_url: str, expected: str
) -> None:
    assert paid_click_id(landing_url) == expected


@pytest.mark.parametrize(
    "landing_url",
    [
        pytest.param("", id="no url"),
        pytest.param("https://shop.example/p", id="no query"),
        pytest.param("https://shop.example/p?utm_source=instagram", id="no click id"),
        pytest.param("https://shop.example/p?gclid=", id="empty gclid"),
        pytest.param("https://shop.example/p?gclid", id="gclid without value"),
        pytest.param("https://shop.example/p?fbclid=IwAR3", id="fbclid is organic facebook"),
        pytest.param("https://shop.example/p?gclidx=abc&xgclid=abc", id="longer names"),
        pytest.param("https://shop.example/p#gclid=abc", id="in the fragment"),
        pytest.param("https://shop.example/p?ref=gclid", id="as a value"),
        pytest.param("http://[::1/p?gclid=abc", id="malformed url"),
        pytest.param("http://[not-an-ip]/?gclid=abc", id="malformed ipv6 host"),
    ],
)
def test_a_landing_url_without_a_non_empty_paid_click_id_gives_an_empty_id(
    landing_url: str,
) -> None:
    assert paid_click_id(landing_url) == ""


def test_every_paid_click_id_param_is_recognised_alone() -> None:
    for name in PAID_CLICK_ID_PARAMS:
        assert paid_click_id(f"https://shop.example/?{name}=1") == name


def _click(landing_url: str) -> Click:
    return Click(event_id="c-1", ts=T0, visitor_id="v-1", session_id="s-1",
                 affiliate_id="sally", channel="blog", landing_url=landing_url,
                 referrer="https://www.google.com/search?q=shop")


def test_a_touch_remembers_the_paid_click_id_of_its_click() -> None:
    remembered = touch_from_click(_click("https://shop.example/?utm_source=x&gclid=abc"))
    assert remembered == Touch("c-1", T0, "sally", "blog", "www.google.com", "gclid")


def test_a_touch_of_an_unpaid_click_has_an_empty_paid_click_id() -> None:
    assert touch_from_click(_click("https://shop.example/?fbclid=abc")).paid_click_id == ""


# customer_lookalike

@pytest.mark.parametrize(
    ("customer_id", "own_customer_id"),
    [
        ("Cust-981", "cust-981"),
        ("cust981", "cust-981"),
        ("CUST_981", "cust-981"),
        (" cust.981 ", "cust-981"),
        ("Sally.Smith", "sallysmith"),
        ("sally smith", "sally-smith"),
    ],
)
def test_a_customer_id_equal_to_the_affiliates_own_once_normalised_is_held(
    customer_id: str, own_customer_id: str
) -> None:
    owner = affiliate("sally", customer_id=own_customer_id)
    flag = customer_lookalike(order(customer_id=customer_id), owner)
    assert flag is not None and (flag.reason, flag.severity) == ("customer_lookalike", "hold")
    assert customer_id.strip() in flag.detail and own_customer_id in flag.detail
    assert "sally" in flag.detail
    assert self_referral(order(customer_id=customer_id), owner) is None


@pytest.mark.parametrize(
    ("customer_id", "own_customer_id"),
    [
        pytest.param("cust-981", "cust-981", id="exact: that is self_referral"),
        pytest.param(" cust-981 ", "cust-981", id="exact after trimming"),
        pytest.param("cust-982", "cust-981", id="another customer"),
        pytest.param("cust-9810", "cust-981", id="one digit more"),
        pytest.param("", "cust-981", id="empty customer"),
        pytest.param("cust-981", "", id="affiliate without customer account"),
        pytest.param("", "", id="both empty"),
        pytest.param("   ", "  ", id="both blank"),
        pytest.param("---", "...", id="nothing left after normalising"),
    ],
)
def test_a_customer_id_not_merely_alike_is_no_lookalike(
    customer_id: str, own_customer_id: str
) -> None:
    owner = affiliate("sally", customer_id=own_customer_id)
    assert customer_lookalike(order(customer_id=customer_id), owner) is None


# paid_search_click

PAID_TOUCH = touch("c-1", at(hours=-1), paid_click_id="gclid")


@pytest.mark.parametrize("method", ["last_click", "code+click"])
def test_an_order_attributed_through_a_paid_search_click_is_held(method: Method) -> None:
    flag = paid_search_click(Attribution("sally", method, PAID_TOUCH))
    assert flag == AbuseFlag("paid_search_click", "hold",
                             "click c-1 landed with paid-search id gclid")


@pytest.mark.parametrize(
    "attribution",
    [
        pytest.param(Attribution("sally", "last_click", touch("c-1", at(hours=-1))),
                     id="unpaid last click"),
        pytest.param(Attribution("sally", "code+click", touch("c-1", at(hours=-1))),
                     id="unpaid code+click"),
        pytest.param(Attribution("sally", "code"), id="code only"),
        pytest.param(Attribution("sally", "code", PAID_TOUCH), id="code with a paid click"),
        pytest.param(Attribution("", "none", PAID_TOUCH), id="unattributed"),
        pytest.param(Attribution("sally", "last_click"), id="last click without its click"),
    ],
)
def test_an_order_not_attributed_through_a_paid_click_is_not_flagged(
    attribution: Attribution,
) -> None:
    assert paid_search_click(attribution) is None


# coupon_site_seen

@pytest.mark.parametrize(
    ("referrer", "latest_host", "expected"),
    [
        pytest.param("https://www.retailmenot.com/view/shop", None, "retailmenot.com",
                     id="order referrer, subdomain"),
        pytest.param("joinhoney.com", None, "joinhoney.com", id="order referrer, bare host"),
        pytest.param("", "deals.joinhoney.com", "joinhoney.com", id="latest click"),
        pytest.param("https://retailmenot.com/x", "joinhoney.com", "retailmenot.com",
                     id="order referrer first"),
        pytest.param("https://www.google.com/", "joinhoney.com", "joinhoney.com",
                     id="ordinary referrer: the latest click"),
        pytest.param("https://notretailmenot.com/", None, "", id="a mere suffix"),
        pytest.param("https://www.google.com/", "www.instagram.com", "", id="ordinary both"),
        pytest.param("", "", "", id="no referrer at all"),
        pytest.param("", None, "", id="no referrer, no click"),
    ],
)
def test_the_coupon_site_seen_is_the_orders_referrer_else_the_latest_clicks(
    referrer: str, latest_host: str | None, expected: str
) -> None:
    latest = None
    if latest_host is not None:
        latest = touch("c-9", at(minutes=-5), referrer_host=latest_host)
    assert coupon_site_seen(order(referrer=referrer), latest, SITES) == expected


def test_no_coupon_site_is_seen_when_the_list_is_empty() -> None:
    assert coupon_site_seen(order(referrer="retailmenot.com"), None, ()) == ""


# flags_for_order

def _redeemed(*customers: str) -> CodeRedemptions:
    """One use of SALLY20 per customer, a minute apart, the last one at T0."""
    uses = ((at(minutes=-before), customer) for before, customer in enumerate(reversed(customers)))
    return CodeRedemptions("SALLY20", tuple(sorted(uses)))


def test_every_flag_that_applies_is_reported_contract_flags_first() -> None:
    ref = reference(affiliates=(SALLY,),
                    programs=(program(velocity=Velocity(max_customers=2, window_minutes=60)),))
    flagged = order(customer_id="Cust.981", discount_code="SALLY20",
                    referrer="https://www.retailmenot.com/")
    paid_click = touch("c-1", at(seconds=-1), paid_click_id="gclid")
    flags = flags_for_order(flagged, Attribution("sally", "code+click", paid_click), SALLY,
                            paid_click, ref)
    assert [f.reason for f in flags] == [
        "coupon_site_referrer", "fast_conversion", "customer_lookalike", "paid_search_click",
    ]


def test_the_affiliates_exact_customer_id_is_a_self_referral_not_a_lookalike() -> None:
    flags = flags_for_order(order(customer_id="cust-981"), Attribution("sally", "last_click",
                            PAID_TOUCH), SALLY, PAID_TOUCH, reference(affiliates=(SALLY,)))
    assert [f.reason for f in flags] == ["self_referral", "paid_search_click"]


def test_an_unattributed_order_gets_no_flags_even_from_a_paid_click() -> None:
    flags = flags_for_order(order(customer_id="Cust.981"), Attribution("", "none"), SALLY,
                            PAID_TOUCH, reference(affiliates=(SALLY,)))
    assert flags == ()


# velocity_flag

LIMIT_2 = program("influencers", velocity=Velocity(max_customers=2, window_minutes=60))


@pytest.mark.parametrize(
    ("customers", "flagged"),
    [
        pytest.param(("a", "b"), False, id="as many customers as the limit"),
        pytest.param(("a", "b", "c"), True, id="one customer more than the limit"),
        pytest.param(("a", "b", "a", "b"), False, id="repeat customers count once"),
    ],
)
def test_a_code_order_is_held_above_its_programs_velocity_limit(
    customers: tuple[str, ...], flagged: bool
) -> None:
    ref = reference(affiliates=(SALLY,), programs=(program(), LIMIT_2))
    flag = velocity_flag(decided(in_program=LIMIT_2), _redeemed(*customers), ref)
    if flagged:
        assert flag == AbuseFlag("code_velocity", "hold",
                                 f"{len(set(customers))} distinct customers in 60 min, limit 2")
    else:
        assert flag is None


def test_the_velocity_limit_is_the_one_of_the_program_the_order_was_attributed_in() -> None:
    # Sally's current program (ambassadors, 20 customers) does not matter: the decision's does.
    ref = reference(affiliates=(SALLY,), programs=(program(), LIMIT_2))
    assert velocity_flag(decided(in_program=LIMIT_2), _redeemed("a", "b", "c"), ref) is not None
    assert velocity_flag(decided(), _redeemed("a", "b", "c"), ref) is None


def test_an_unknown_program_has_the_default_velocity_limit_of_20_customers() -> None:
    ref = reference(affiliates=(SALLY,))
    gone = decided(in_program=program("retired"))
    twenty = [f"cust-{i}" for i in range(20)]
    assert velocity_flag(gone, _redeemed(*twenty), ref) is None
    flag = velocity_flag(gone, _redeemed(*twenty, "cust-20"), ref)
    assert flag is not None and flag.detail == "21 distinct customers in 60 min, limit 20"


def test_a_code_plus_click_order_is_checked_for_velocity() -> None:
    ref = reference(affiliates=(SALLY,), programs=(LIMIT_2,))
    code_click = decided(attribution=Attribution("sally", "code+click", touch("c-1", at(hours=-1))),
                         in_program=LIMIT_2)
    assert velocity_flag(code_click, _redeemed("a", "b", "c"), ref) is not None


@pytest.mark.parametrize(
    "attribution",
    [
        pytest.param(Attribution("sally", "last_click", touch("c-1", at(hours=-1))),
                     id="last click"),
        pytest.param(Attribution("", "none"), id="unattributed"),
    ],
)
def test_an_order_not_attributed_through_its_code_is_never_a_velocity_case(
    attribution: Attribution,
) -> None:
    ref = reference(affiliates=(SALLY,), programs=(LIMIT_2,))
    not_by_code = decided(attribution=attribution, in_program=LIMIT_2)
    assert velocity_flag(not_by_code, _redeemed("a", "b", "c", "d"), ref) is None


# with_flags

def test_a_hold_flag_holds_a_pending_order_and_keeps_its_commission() -> None:
    pending = decided()
    held = with_flags(pending, [VELOCITY])
    assert held.flags == (VELOCITY,)
    assert held.ledger is not None and held.accrual is not None
    assert (held.ledger.status, held.ledger.commission) == ("held", Decimal("10.00"))
    assert (held.accrual.status, held.accrual.amount) == ("held", Decimal("10.00"))
    assert held.accrual.fact_id == "o-1:accrual"
    assert held.status == "held" and held.commission == Decimal("10.00")


def test_a_reject_flag_rejects_a_pending_order_at_zero_cents() -> None:
    rejected = with_flags(decided(), [SELF])
    assert rejected.ledger is not None and rejected.accrual is not None
    assert (rejected.ledger.status, str(rejected.ledger.commission)) == ("rejected", "0.00")
    assert (rejected.accrual.status, str(rejected.accrual.amount)) == ("rejected", "0.00")


def test_a_hold_flag_leaves_a_rejected_order_rejected_at_zero_cents() -> None:
    rejected = decided(flags=(SELF,))
    still = with_flags(rejected, [VELOCITY])
    assert still.flags == (SELF, VELOCITY)
    assert still.ledger is not None and still.accrual is not None
    assert (still.ledger.status, str(still.accrual.amount)) == ("rejected", "0.00")


def test_a_hold_flag_on_a_held_order_keeps_it_held() -> None:
    held = with_flags(decided(flags=(FAST,)), [VELOCITY])
    assert held.status == "held" and held.commission == Decimal("10.00")


@pytest.mark.parametrize(
    ("present", "extra", "expected"),
    [
        pytest.param((FAST,), [VELOCITY], (VELOCITY, FAST), id="velocity before fast"),
        pytest.param((COUPON, PAID), [VELOCITY], (COUPON, VELOCITY, PAID), id="in the middle"),
        pytest.param((), [PAID, LOOKALIKE, SELF], (SELF, LOOKALIKE, PAID), id="several, unsorted"),
    ],
)
def test_flags_are_added_in_the_order_of_the_reasons_table(
    present: tuple[AbuseFlag, ...], extra: list[AbuseFlag], expected: tuple[AbuseFlag, ...]
) -> None:
    assert with_flags(decided(flags=present), extra).flags == expected


def test_a_flag_already_present_is_not_added_again() -> None:
    held = decided(flags=(VELOCITY,))
    again = replace(VELOCITY, detail="4 distinct customers in 60 min, limit 2")
    assert with_flags(held, [again]) == held


def test_no_extra_flags_leave_the_decision_unchanged() -> None:
    pending = decided()
    assert with_flags(pending, []) == pending


def test_a_flag_given_twice_at_once_is_added_once() -> None:
    assert with_flags(decided(), [VELOCITY, VELOCITY]).flags == (VELOCITY,)


def test_an_unattributed_decision_is_returned_unchanged() -> None:
    unattributed = decided(attribution=Attribution("", "none"))
    assert unattributed.ledger is None
    assert with_flags(unattributed, [VELOCITY, SELF]) == unattributed


def test_adding_flags_changes_nothing_but_flags_status_and_amount() -> None:
    pending = decided(of=order(discount_code="SALLY20", discount_amount=Decimal("2.50")))
    rejected = with_flags(pending, [SELF])
    assert pending.ledger is not None and pending.accrual is not None
    assert rejected == replace(
        pending,
        flags=(SELF,),
        ledger=replace(pending.ledger, status="rejected", commission=Decimal("0.00")),
        accrual=replace(pending.accrual, status="rejected", amount=Decimal("0.00")),
    )

