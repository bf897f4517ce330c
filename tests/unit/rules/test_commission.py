"""Commission of an attributed order (contract §3)."""

from __future__ import annotations

from decimal import Decimal

from schemas.reference import Commission
from streams.rules.commission import commission_for, rate_for

from .builders import affiliate, item, order, program

PERCENT_10 = program(
    tier_rates={"macro": Decimal("0.20"), "mega": Decimal("0.30")},
    category_rates={"gift-cards": Decimal("0.02")},
)
FIXED_5 = program(commission=Commission("fixed", amount=Decimal("5.00")),
                  tier_rates={"macro": Decimal("0.20")},
                  category_rates={"gift-cards": Decimal("0.02")})


def test_a_percent_program_earns_rate_times_total() -> None:
    assert commission_for(order(total=Decimal("129.90")), affiliate(), PERCENT_10) == Decimal("12.99")


def test_the_tier_rate_replaces_the_program_rate() -> None:
    result = commission_for(order(total=Decimal("100")), affiliate(tier="macro"), PERCENT_10)
    assert result == Decimal("20.00")
    assert rate_for(affiliate(tier="mega"), PERCENT_10) == Decimal("0.30")


def test_a_tier_without_a_tier_rate_earns_the_program_rate() -> None:
    assert rate_for(affiliate(tier="micro"), PERCENT_10) == Decimal("0.10")
    assert rate_for(affiliate(tier=""), PERCENT_10) == Decimal("0.10")


def test_the_commission_is_rounded_half_up_to_the_cent() -> None:
    assert commission_for(order(total=Decimal("1.25")), affiliate(), program()) == Decimal("0.13")
    assert commission_for(order(total=Decimal("1.24")), affiliate(), program()) == Decimal("0.12")


def test_a_total_of_zero_earns_zero_cents() -> None:
    result = commission_for(order(total=Decimal("0")), affiliate(), PERCENT_10)
    assert result == Decimal("0.00") and str(result) == "0.00"


def test_a_fixed_program_earns_its_amount_per_order_whatever_the_total() -> None:
    assert commission_for(order(total=Decimal("0.01")), affiliate(), FIXED_5) == Decimal("5.00")
    assert commission_for(order(total=Decimal("9999")), affiliate(), FIXED_5) == Decimal("5.00")


def test_a_fixed_program_earns_nothing_on_an_order_with_total_zero() -> None:
    assert str(commission_for(order(total=Decimal("0")), affiliate(), FIXED_5)) == "0.00"


def test_a_fixed_program_ignores_tier_and_category_rates() -> None:
    gift = order(total=Decimal("50"), items=(item("gift-cards", "1", "50"),))
    assert commission_for(gift, affiliate(tier="macro"), FIXED_5) == Decimal("5.00")


def test_each_item_earns_its_category_rate_on_its_share_of_the_total() -> None:
    # 80 of shoes at 10 %, 20 of gift cards at 2 %: 8.00 + 0.40
    basket = order(total=Decimal("100"),
                   items=(item("shoes", "2", "40"), item("gift-cards", "1", "20")))
    assert commission_for(basket, affiliate(), PERCENT_10) == Decimal("8.40")


def test_item_shares_are_of_the_net_total_not_of_the_item_prices() -> None:
    # Items sum to 200 but the net total is 100 (a discount): shares are 50 and 50.
    basket = order(total=Decimal("100"),
                   items=(item("shoes", "1", "100"), item("gift-cards", "1", "100")))
    assert commission_for(basket, affiliate(), PERCENT_10) == Decimal("6.00")


def test_items_without_a_category_rate_earn_the_tier_rate() -> None:
    basket = order(total=Decimal("100"),
                   items=(item("shoes", "1", "50"), item("gift-cards", "1", "50")))
    # 50 at the macro tier's 20 % + 50 at the gift-card 2 %
    assert commission_for(basket, affiliate(tier="macro"), PERCENT_10) == Decimal("11.00")


def test_categories_match_case_insensitively_after_trimming() -> None:
    basket = order(total=Decimal("100"), items=(item(" Gift-Cards ", "1", "100"),))
    assert commission_for(basket, affiliate(), PERCENT_10) == Decimal("2.00")


def test_category_shares_are_rounded_once_at_the_end_half_up() -> None:
    # 0.625 at 10 % + 0.625 at 10 % = 0.125 -> 0.13; rounding each share first gives 0.12.
    basket = order(total=Decimal("1.25"),
                   items=(item("shoes", "1", "3"), item("hats", "1", "3")))
    assert commission_for(basket, affiliate(), PERCENT_10) == Decimal("0.13")


def test_category_shares_that_do_not_divide_evenly_are_exact_before_rounding() -> None:
    # Thirds of 10.00: 3.333.. at 2 % + 6.666.. at 10 % = 0.0666.. + 0.666.. = 0.7333.. -> 0.73
    basket = order(total=Decimal("10.00"),
                   items=(item("gift-cards", "1", "1"), item("shoes", "2", "1")))
    assert commission_for(basket, affiliate(), PERCENT_10) == Decimal("0.73")


def test_items_summing_to_zero_fall_back_to_the_plain_rate() -> None:
    basket = order(total=Decimal("100"), items=(item("gift-cards", "0", "20"),
                                                item("shoes", "1", "0")))
    assert commission_for(basket, affiliate(), PERCENT_10) == Decimal("10.00")


def test_an_order_without_items_earns_the_plain_rate_even_with_category_rates() -> None:
    assert commission_for(order(total=Decimal("100")), affiliate(), PERCENT_10) == Decimal("10.00")


def test_items_are_ignored_when_the_program_has_no_category_rates() -> None:
    basket = order(total=Decimal("100"), items=(item("gift-cards", "1", "100"),))
    assert commission_for(basket, affiliate(), program()) == Decimal("10.00")


def test_a_fixed_commission_is_paid_only_on_orders_in_its_currency() -> None:
    flat = program(commission=Commission("fixed", amount=Decimal("5.00"), currency="EUR"))
    assert commission_for(order(total=Decimal("80"), currency="EUR"), affiliate(), flat) == Decimal("5.00")
    assert commission_for(order(total=Decimal("80"), currency="USD"), affiliate(), flat) == Decimal("0.00")
