"""Attribution of an order (contract §4) and the per-visitor touch memory."""

from __future__ import annotations

from datetime import timedelta
from random import Random

from hypothesis import given
from hypothesis import strategies as st

from schemas.events import Click
from schemas.facts import Attribution, Touch
from streams.rules.attribution import (
    MAX_TOUCHES_PER_VISITOR,
    TOUCH_HORIZON_DAYS_DEFAULT,
    attribute,
    latest_touch,
    qualifying_clicks,
    referrer_host,
    remember_touch,
    touch_from_click,
    touch_horizon,
)

from .builders import T0, affiliate, at, order, program, reference, touch

HORIZON = timedelta(days=TOUCH_HORIZON_DAYS_DEFAULT)

SALLY = affiliate("sally", codes=("SALLY20",))
BOB = affiliate("bob", codes=("BOB10",))
REF = reference(affiliates=(SALLY, BOB))


# referrer_host

def test_referrer_host_is_the_lower_cased_host_of_a_url() -> None:
    assert referrer_host("https://WWW.RetailMeNot.com/view/shop?x=1") == "www.retailmenot.com"


def test_referrer_host_drops_the_port_and_the_credentials() -> None:
    assert referrer_host("http://user:pw@Deals.Example.com:8080/a") == "deals.example.com"


def test_referrer_host_reads_a_bare_host_with_or_without_path() -> None:
    assert referrer_host("JoinHoney.com") == "joinhoney.com"
    assert referrer_host("joinhoney.com:443/path") == "joinhoney.com"
    assert referrer_host("//cdn.example.org/x") == "cdn.example.org"


def test_referrer_host_drops_a_trailing_dot() -> None:
    assert referrer_host("https://retailmenot.com./x") == "retailmenot.com"


def test_referrer_host_is_empty_when_there_is_no_host() -> None:
    assert referrer_host("") == ""
    assert referrer_host("   ") == ""
    assert referrer_host("/relative/path") == ""
    assert referrer_host("http://[::1") == ""


def test_touch_from_click_keeps_what_attribution_needs() -> None:
    click = Click(event_id="c-1", ts=T0, visitor_id="v-1", session_id="s-1", affiliate_id="sally",
                  channel="tiktok", referrer="https://www.TikTok.com/@sally")
    assert touch_from_click(click) == Touch("c-1", T0, "sally", "tiktok", "www.tiktok.com")


# remember_touch

def test_remember_touch_keeps_touches_sorted_by_time_then_event_id() -> None:
    touches: tuple[Touch, ...] = ()
    for t in (touch("b", T0), touch("c", at(hours=-1)), touch("a", T0)):
        touches = remember_touch(touches, t, HORIZON)
    assert [t.event_id for t in touches] == ["c", "a", "b"]


def test_remember_touch_ignores_a_repeated_event_id_and_the_first_one_wins() -> None:
    first = touch("c-1", T0, "sally")
    touches = remember_touch((), first, HORIZON)
    assert remember_touch(touches, touch("c-1", at(minutes=1), "bob"), HORIZON) == (first,)


def test_remember_touch_forgets_touches_older_than_the_horizon_before_the_newest() -> None:
    touches = remember_touch((), touch("old", at(days=-30, seconds=-1)), HORIZON)
    touches = remember_touch(touches, touch("edge", at(days=-30)), HORIZON)
    touches = remember_touch(touches, touch("new", T0), HORIZON)
    assert [t.event_id for t in touches] == ["edge", "new"]


def test_remember_touch_does_not_keep_a_late_touch_already_beyond_the_horizon() -> None:
    touches = remember_touch((), touch("new", T0), HORIZON)
    assert remember_touch(touches, touch("late", at(days=-31)), HORIZON) == touches


def test_remember_touch_keeps_only_the_newest_touches_of_a_bot_visitor() -> None:
    touches: tuple[Touch, ...] = ()
    for i in range(MAX_TOUCHES_PER_VISITOR + 5):
        touches = remember_touch(touches, touch(f"c-{i:04d}", at(seconds=i)), HORIZON)
    assert len(touches) == MAX_TOUCHES_PER_VISITOR
    assert touches[0].event_id == "c-0005"
    assert touches[-1].event_id == f"c-{MAX_TOUCHES_PER_VISITOR + 4:04d}"


touch_sets = st.lists(
    st.builds(
        touch,
        event_id=st.text("abcdef", min_size=1, max_size=4),
        ts=st.integers(-40 * 24 * 60, 5 * 24 * 60).map(lambda m: at(minutes=m)),
        affiliate_id=st.sampled_from(["sally", "bob"]),
    ),
    max_size=30,
    unique_by=lambda t: t.event_id,
)


def _remember_all(touches: list[Touch]) -> tuple[Touch, ...]:
    state: tuple[Touch, ...] = ()
    for t in touches:
        state = remember_touch(state, t, HORIZON)
    return state


@given(touch_sets, st.randoms())
def test_remember_touch_gives_the_same_state_whatever_the_arrival_order(
    touches: list[Touch], rng: Random
) -> None:
    shuffled = list(touches)
    rng.shuffle(shuffled)
    assert _remember_all(touches) == _remember_all(shuffled)


@given(touch_sets)
def test_remembering_every_touch_again_changes_nothing(touches: list[Touch]) -> None:
    once = _remember_all(touches)
    twice = once
    for t in touches:
        twice = remember_touch(twice, t, HORIZON)
    assert twice == once


# touch_horizon and latest_touch

def test_touch_horizon_is_the_longest_attribution_window() -> None:
    ref = reference(programs=(program("a", attribution_window_days=7),
                              program("b", attribution_window_days=90)))
    assert touch_horizon(ref) == timedelta(days=90)


def test_touch_horizon_is_never_shorter_than_the_default() -> None:
    ref = reference(programs=(program("a", attribution_window_days=7),))
    assert touch_horizon(ref) == timedelta(days=30)
    assert touch_horizon(reference()) == timedelta(days=30)


def test_latest_touch_is_the_newest_click_not_after_the_order() -> None:
    touches = (touch("a", at(hours=-2)), touch("b", at(hours=-1)), touch("c", at(seconds=1)))
    assert latest_touch(touches, T0) == touches[1]
    assert latest_touch(touches[2:], T0) is None


# qualifying_clicks

def test_a_click_exactly_at_the_window_boundary_qualifies() -> None:
    edge = touch("c-1", at(days=-30))
    assert qualifying_clicks(order(), (edge,), REF) == [edge]


def test_a_click_one_second_beyond_the_window_does_not_qualify() -> None:
    assert qualifying_clicks(order(), (touch("c-1", at(days=-30, seconds=-1)),), REF) == []


def test_a_click_at_the_order_time_qualifies_and_a_later_one_does_not() -> None:
    same, later = touch("c-1", T0), touch("c-2", at(seconds=1))
    assert qualifying_clicks(order(), (same, later), REF) == [same]


def test_the_window_is_the_one_of_the_clicked_affiliates_program() -> None:
    ref = reference(
        affiliates=(affiliate("sally", program_id="short"), affiliate("bob", program_id="long")),
        programs=(program("short", attribution_window_days=7),
                  program("long", attribution_window_days=60)),
    )
    sally_old, bob_old = touch("c-1", at(days=-8), "sally"), touch("c-2", at(days=-59), "bob")
    assert qualifying_clicks(order(), (sally_old, bob_old), ref) == [bob_old]


def test_clicks_of_inactive_unknown_or_programless_affiliates_do_not_qualify() -> None:
    ref = reference(affiliates=(affiliate("gone", status="paused"),
                                affiliate("orphan", program_id="nope")))
    touches = (touch("c-1", at(hours=-1), "gone"), touch("c-2", at(hours=-1), "nobody"),
               touch("c-3", at(hours=-1), "orphan"))
    assert qualifying_clicks(order(), touches, ref) == []


# attribute

def test_a_code_of_an_active_affiliate_without_a_click_is_attributed_by_code() -> None:
    assert attribute(order(discount_code="SALLY20"), (), REF) == Attribution("sally", "code")


def test_codes_match_case_insensitively_after_trimming() -> None:
    assert attribute(order(discount_code="  sally20 "), (), REF) == Attribution("sally", "code")


def test_a_code_with_a_qualifying_click_of_its_owner_is_code_plus_click_on_the_latest_one() -> None:
    touches = (touch("c-1", at(hours=-3), "sally"), touch("c-2", at(hours=-2), "sally"),
               touch("c-3", at(hours=-1), "bob"))
    result = attribute(order(discount_code="SALLY20"), touches, REF)
    assert result == Attribution("sally", "code+click", touches[1])


def test_a_code_beats_a_later_click_of_another_affiliate() -> None:
    touches = (touch("c-1", at(hours=-1), "bob"),)
    assert attribute(order(discount_code="SALLY20"), touches, REF) == Attribution("sally", "code")


def test_a_code_with_only_a_click_outside_the_window_is_code_only() -> None:
    touches = (touch("c-1", at(days=-31), "sally"),)
    assert attribute(order(discount_code="SALLY20"), touches, REF) == Attribution("sally", "code")


def test_a_code_of_an_inactive_affiliate_falls_through_to_the_last_click() -> None:
    ref = reference(affiliates=(affiliate("sally", codes=("SALLY20",), status="inactive"), BOB))
    bob_click = touch("c-1", at(hours=-1), "bob")
    result = attribute(order(discount_code="SALLY20"), (bob_click,), ref)
    assert result == Attribution("bob", "last_click", bob_click)


def test_a_code_whose_owner_has_no_known_program_falls_through() -> None:
    ref = reference(affiliates=(affiliate("sally", codes=("SALLY20",), program_id="gone"),))
    assert attribute(order(discount_code="SALLY20"), (), ref) == Attribution("", "none")


def test_an_unknown_code_falls_through_to_the_last_click() -> None:
    bob_click = touch("c-1", at(hours=-1), "bob")
    result = attribute(order(discount_code="NOPE"), (bob_click,), REF)
    assert result == Attribution("bob", "last_click", bob_click)


def test_the_latest_qualifying_click_wins() -> None:
    touches = (touch("c-1", at(hours=-2), "sally"), touch("c-2", at(hours=-1), "bob"),
               touch("c-3", at(minutes=1), "sally"))
    assert attribute(order(), touches, REF) == Attribution("bob", "last_click", touches[1])


def test_on_a_tie_in_time_the_greater_event_id_wins() -> None:
    touches = (touch("c-b", at(hours=-1), "sally"), touch("c-a", at(hours=-1), "bob"))
    assert attribute(order(), touches, REF) == Attribution("sally", "last_click", touches[0])
    swapped = (touch("c-a", at(hours=-1), "sally"), touch("c-b", at(hours=-1), "bob"))
    assert attribute(order(), swapped, REF) == Attribution("bob", "last_click", swapped[1])


def test_the_latest_click_of_an_inactive_affiliate_gives_way_to_an_older_active_one() -> None:
    ref = reference(affiliates=(SALLY, affiliate("bob", status="banned")))
    touches = (touch("c-1", at(hours=-2), "sally"), touch("c-2", at(hours=-1), "bob"))
    assert attribute(order(), touches, ref) == Attribution("sally", "last_click", touches[0])


def test_an_order_without_code_or_qualifying_click_is_unattributed() -> None:
    touches = (touch("c-1", at(days=-31), "sally"),)
    assert attribute(order(), touches, REF) == Attribution("", "none")
    assert attribute(order(), (), REF) == Attribution("", "none")
