"""How much an attributed order earns its affiliate (contract §3).

Pure arithmetic on Decimals: no Faust, Kafka or ClickHouse, never a binary float. Whether the
affiliate may earn at all (active, known program) is attribution's business, not this module's.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from schemas.events import Order
from schemas.reference import Affiliate, Program

from .money import ZERO, round_cents


def rate_for(affiliate: Affiliate, program: Program) -> Decimal:
    """The affiliate's percent rate: its tier's rate when the program has one, else the program's."""
    if affiliate.tier and affiliate.tier in program.tier_rates:
        return program.tier_rates[affiliate.tier]
    return program.commission.rate


def _category_key(category: str) -> str:
    # Categories are matched like codes, case-insensitively after trimming: "Gift-Cards " in an
    # order is the "gift-cards" of the program.
    return category.strip().lower()


def commission_for(order: Order, affiliate: Affiliate, program: Program) -> Decimal:
    """The commission of `order`, rounded half-up to 0.01.

    - fixed: `amount` per order with total > 0 in the commission's currency, else 0.00. Tier and category rates are rates, so
      they do not apply to a fixed amount.
    - percent: total x rate (the tier's rate replaces the program's when present).
    - percent with `category_rates` and items: each item's share of the total,
      total x (quantity x price) / sum(quantity x price), earns its category's rate or the
      plain rate. When the items sum to 0 there are no shares: the plain rate applies to all.

    Rounded once, at the end: rounding each item's share would let a many-item order drift by up
    to half a cent per item.
    """
    if program.commission.type == "fixed":
        if program.commission.currency and order.currency != program.commission.currency:
            return ZERO  # held with flag currency_mismatch (contract v2 §3)
        return round_cents(program.commission.amount) if order.total > 0 else ZERO

    rate = rate_for(affiliate, program)
    if program.category_rates and order.items:
        category_rates: Mapping[str, Decimal] = {
            _category_key(name): r for name, r in program.category_rates.items()
        }
        weights = [item.quantity * item.price for item in order.items]
        weights_total = sum(weights, Decimal(0))
        if weights_total > 0:
            weighted_rate = sum(
                (
                    weight * category_rates.get(_category_key(item.category), rate)
                    for item, weight in zip(order.items, weights)
                ),
                Decimal(0),
            )
            # total x sum(w_i x r_i) / sum(w_i): one division, so no intermediate rounding.
            return round_cents(order.total * weighted_rate / weights_total)
    return round_cents(order.total * rate)
