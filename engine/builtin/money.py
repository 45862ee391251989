"""Amounts of money and tokens: decimals end to end, never binary floats.

An amount is given as a decimal string ("0.1", "1.000000000000000001") or a JSON number,
validated with every digit, stored as `numeric`, and written into outputs as a string,
so that no client's JSON parser rounds it either. The types that move money read their
input with `Workflow(exact_numbers=True)`, so a JSON number reaches them exactly as it
was stored.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from pydantic import Field

# Token amounts carry up to 18 decimals (an ERC-20's wei); a finer amount is a mistake.
AMOUNT_DECIMALS = 18

# A token's smallest unit (10^-18): fills are rounded to it.
SMALLEST_UNIT = Decimal(1).scaleb(-AMOUNT_DECIMALS)

Amount = Annotated[Decimal, Field(gt=0, decimal_places=AMOUNT_DECIMALS, allow_inf_nan=False)]


def amount_text(amount: Decimal) -> str:
    """An amount as outputs carry it: every digit, no exponent, no trailing zeros."""
    text = format(amount, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text
