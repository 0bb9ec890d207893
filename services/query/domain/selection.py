"""Which expiries and strikes a snapshot view shows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date

from services.common.domain.moneyness import atm_strike, moneyness_level


def nearest_expiries(available: Iterable[date], today: date, count: int) -> list[date]:
    """The ``count`` nearest expiries not before ``today`` (IST date of the bucket), ascending; when fewer exist,
    the most recent expired ones complete the list (still ascending)."""
    avail = sorted(set(available))
    live = [e for e in avail if e >= today]
    if len(live) >= count:
        return live[:count]
    dead = [e for e in avail if e < today][-(count - len(live)):] if count > len(live) else []
    return sorted(dead + live)


def order_expiries(available: Iterable[date], today: date) -> list[date]:
    """Nearest first: live expiries ascending, then expired ones newest first."""
    avail = sorted(set(available))
    return [e for e in avail if e >= today] + [e for e in reversed(avail) if e < today]


def window(listed: Sequence[float], price: float, step: float, n: int) -> tuple[float, list[tuple[float, int]]]:
    """ATM strike (nearest listed strike to ``price``) and the listed strikes with |level| ≤ n as
    ``(strike, level)`` ascending. ``listed`` ascending, non-empty (ValueError otherwise)."""
    atm = atm_strike(listed, price)
    out = []
    for s in listed:
        lvl = moneyness_level(s, atm, step)
        if -n <= lvl <= n:
            out.append((float(s), lvl))
    return atm, out
