"""Moneyness: ATM strike and level of a strike.

Definitions (optmon, as documented on ``StrikeBar.moneyness_level`` in ``market.proto``):
  - ATM strike = the listed strike (of one expiry) nearest the underlying price; a tie goes to the lower strike.
  - level = (strike − ATM strike) / strike step, an integer for strikes on the grid.
  - level < 0: ITM for a call, OTM for a put; level > 0: OTM for a call, ITM for a put; 0: ATM.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


def atm_strike(listed_strikes: Sequence[float], underlying_price: float) -> float:
    """The listed strike nearest ``underlying_price`` (index points); ties go to the lower strike.

    ``listed_strikes`` must be sorted ascending and non-empty; raises ValueError when empty.
    """
    if not listed_strikes:
        raise ValueError("no listed strikes")
    i = bisect.bisect_left(listed_strikes, underlying_price)
    if i == 0:
        return float(listed_strikes[0])
    if i == len(listed_strikes):
        return float(listed_strikes[-1])
    lo, hi = listed_strikes[i - 1], listed_strikes[i]
    return float(lo if underlying_price - lo <= hi - underlying_price else hi)


def moneyness_level(strike: float, atm: float, strike_step: float) -> int:
    """(strike − atm) / strike_step rounded to the nearest integer (exact for strikes on the grid)."""
    if strike_step <= 0:
        raise ValueError("strike_step must be > 0")
    return round((strike - atm) / strike_step)


def moneyness_label(level: int, is_call: bool) -> str:
    """"ATM", "ITM<k>" or "OTM<k>" for a level seen from a call (``is_call``) or a put."""
    if level == 0:
        return "ATM"
    itm = (level < 0) if is_call else (level > 0)
    return f"{'ITM' if itm else 'OTM'}{abs(level)}"


def on_grid(strike: float, strike_step: float, tol: float = 1e-6) -> bool:
    """True when ``strike`` is a positive multiple of ``strike_step``."""
    if strike <= 0 or strike_step <= 0:
        return False
    q = strike / strike_step
    return abs(q - round(q)) < tol
