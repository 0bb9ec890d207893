"""Subscription filters: validation and normalisation of a SubscribeRequest's fields.

Two requests with the same normalised :class:`StreamFilter` form one fan-out group (one encoding per update).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.stream.domain.model import ALL_INDICATORS, INDICATOR_FIELDS

#: Limits from stream_service.proto.
MAX_EXPIRIES = 6
DEFAULT_STRIKES_AROUND_ATM = 10
MAX_STRIKES_AROUND_ATM = 50
DEFAULT_MAX_UPDATES_PER_SECOND = 4.0
MIN_MAX_UPDATES_PER_SECOND = 0.1
MAX_MAX_UPDATES_PER_SECOND = 20.0
#: Widest explicit strike range, in strike steps (snapshots cover ATM±50 steps).
MAX_RANGE_STEPS = 100


class InvalidFilter(ValueError):
    """A malformed subscription; ``violations`` lists ``(field, description)`` pairs (the servicer maps them to
    INVALID_ARGUMENT field violations)."""

    def __init__(self) -> None:
        super().__init__("invalid subscription")
        self.violations: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        """Record one violation."""
        self.violations.append((field, description))

    def raise_if_any(self) -> None:
        """Raise ``self`` when a violation was recorded."""
        if self.violations:
            raise self


@dataclass(frozen=True, slots=True)
class StreamFilter:
    """What one subscriber wants, normalised (hashable: the group key).

    ``expiries`` empty = the nearest 3 (resolved when the group forms); ``strikes_around_atm`` N is 0 when an
    explicit inclusive range ``strike_min..strike_max`` (index points) is used; ``indicators`` are sorted
    ``optmon.v1.Indicator`` numbers (all when none were asked). The rate limit is per subscriber, not part of the
    filter.
    """

    underlying: str
    timeframe: int
    expiries: tuple[str, ...]
    strikes_around_atm: int
    strike_min: float
    strike_max: float
    indicators: tuple[int, ...]

    @property
    def explicit_range(self) -> bool:
        """True when the window is a fixed strike range rather than ATM±N."""
        return self.strike_max > 0


def _valid_date(s: str) -> bool:
    if len(s) != 10 or s[4] != "-" or s[7] != "-":
        return False
    try:
        from datetime import date

        date.fromisoformat(s)
    except ValueError:
        return False
    return True


def normalize(
    *,
    underlying: str,
    timeframe: int,
    expiries: list[str],
    strikes_around_atm: int,
    strike_min: float,
    strike_max: float,
    indicators: list[int],
    max_updates_per_second: float,
    last_sequence: int,
    strike_steps: dict[str, float],
) -> tuple[StreamFilter, float]:
    """Validate a subscription and return ``(filter, max_updates_per_second)``.

    Defaults: timeframe 1 (1M), N 10, indicators all, rate 4/s. ``strike_steps`` maps the configured underlyings to
    their strike step (index points). Raises :class:`InvalidFilter` naming every bad field.
    """
    errs = InvalidFilter()
    u = underlying.strip().upper()
    if not u:
        errs.add("underlying", "required")
    elif u not in strike_steps:
        errs.add("underlying", f"unknown underlying {underlying!r}; one of {', '.join(sorted(strike_steps))}")
    tf = timeframe or 1
    if tf not in (1, 2, 3, 4):
        errs.add("timeframe", f"unknown timeframe {timeframe}")
    exps: list[str] = []
    for e in expiries:
        if not _valid_date(e):
            errs.add("expiries", f"{e!r} is not a YYYY-MM-DD date")
        elif e not in exps:
            exps.append(e)
    if len(exps) > MAX_EXPIRIES:
        errs.add("expiries", f"at most {MAX_EXPIRIES} expiries, got {len(exps)}")
    n = strikes_around_atm
    smin, smax = float(strike_min), float(strike_max)
    if not (math.isfinite(smin) and math.isfinite(smax)):
        errs.add("strike_min", "must be finite")
        smin, smax = 0.0, 0.0
    if smax > 0:
        n = 0
        if smin < 0 or smin > smax:
            errs.add("strike_min", f"must be in 0..strike_max ({smax:g}), got {smin:g}")
        step = strike_steps.get(u)
        if step and smax - smin > MAX_RANGE_STEPS * step:
            errs.add("strike_max", f"range wider than {MAX_RANGE_STEPS} strike steps ({MAX_RANGE_STEPS * step:g})")
    else:
        if smin != 0 or smax < 0:
            errs.add("strike_max", "must be > 0 for an explicit range (or both 0 for ATM±N)")
        if n == 0:
            n = DEFAULT_STRIKES_AROUND_ATM
        if not 1 <= n <= MAX_STRIKES_AROUND_ATM:
            errs.add("strikes_around_atm", f"must be in 1..{MAX_STRIKES_AROUND_ATM}, got {strikes_around_atm}")
        smin = smax = 0.0
    inds: set[int] = set()
    for i in indicators:
        if i == 0:
            continue
        if i not in INDICATOR_FIELDS:
            errs.add("indicators", f"unknown indicator {i}")
        inds.add(i)
    rate = max_updates_per_second or DEFAULT_MAX_UPDATES_PER_SECOND
    if not (math.isfinite(rate) and MIN_MAX_UPDATES_PER_SECOND <= rate <= MAX_MAX_UPDATES_PER_SECOND):
        errs.add("max_updates_per_second",
                 f"must be in {MIN_MAX_UPDATES_PER_SECOND:g}..{MAX_MAX_UPDATES_PER_SECOND:g}, got {rate:g}")
    if last_sequence < 0:
        errs.add("last_sequence", f"must be >= 0, got {last_sequence}")
    errs.raise_if_any()
    ind_t = tuple(sorted(inds)) if inds else ALL_INDICATORS
    return StreamFilter(u, tf, tuple(exps), n, smin, smax, ind_t), float(rate)
