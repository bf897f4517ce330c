"""Rounding of money amounts, the one way every rule does it.

Contract §5: commissions and reversals are rounded half-up to the cent. Rules round once, at the
end of a computation, never on intermediate values.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

CENT = Decimal("0.01")
ZERO = Decimal("0.00")


def round_cents(amount: Decimal) -> Decimal:
    """`amount` rounded half-up to 0.01 (0.125 -> 0.13, -0.125 -> -0.13)."""
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)
