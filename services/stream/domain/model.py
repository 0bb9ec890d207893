"""Domain types of the stream: one strike's bar with its CE and PE legs as plain tuples.

A leg is a tuple of :data:`LEG_FIELDS` values (``None`` = absent), in ``optmon.v1.OptionLeg`` field order:
prices in ₹, IV in percent, Greeks per market.proto, OI / ΔOI / volume in contracts.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Names of the OptionLeg fields, in the order legs are stored.
LEG_FIELDS: tuple[str, ...] = (
    "ltp", "open", "high", "low", "iv", "delta", "gamma", "theta", "vega", "oi", "oi_change", "oi_change_percent",
    "volume",
)
#: Fields holding integers (contracts).
INT_LEG_FIELDS = frozenset({"oi", "oi_change", "volume"})

#: A leg: one value per LEG_FIELDS entry, None = absent.
Leg = tuple[float | int | None, ...]

#: Indicator number (``optmon.v1.Indicator``) → indices into LEG_FIELDS it selects.
INDICATOR_FIELDS: dict[int, tuple[int, ...]] = {
    1: (0, 1, 2, 3),  # LTP: close, open, high, low (₹)
    2: (4,),  # IV
    3: (5,),  # DELTA
    4: (6,),  # GAMMA
    5: (7,),  # THETA
    6: (8,),  # VEGA
    7: (9,),  # OI
    8: (10, 11),  # OI_CHANGE (contracts, percent)
    9: (12,),  # VOLUME
}
#: Every indicator number.
ALL_INDICATORS: tuple[int, ...] = tuple(sorted(INDICATOR_FIELDS))


@dataclass(frozen=True, slots=True)
class Bar:
    """One strike of one expiry in one bucket (the expiry is the key it is stored under).

    ``strike``/``atm_strike``/``underlying_close`` in index points, ``bucket_time`` = bucket start, UTC epoch
    seconds; ``call``/``put`` are legs or None when that side has no data.
    """

    strike: float
    bucket_time: int
    underlying_close: float
    moneyness_level: int
    atm_strike: float
    call: Leg | None
    put: Leg | None


def field_mask(indicators: tuple[int, ...]) -> tuple[bool, ...]:
    """Per LEG_FIELDS entry, whether one of ``indicators`` (``optmon.v1.Indicator`` numbers) selects it."""
    keep = {i for ind in indicators for i in INDICATOR_FIELDS[ind]}
    return tuple(i in keep for i in range(len(LEG_FIELDS)))


def project_leg(leg: Leg | None, mask: tuple[bool, ...]) -> Leg | None:
    """The leg with unselected fields set to None (None stays None)."""
    if leg is None:
        return None
    return tuple(v if m else None for v, m in zip(leg, mask, strict=True))


def project_bar(bar: Bar, mask: tuple[bool, ...], full_mask: bool) -> Bar:
    """The bar restricted to the selected leg fields (``full_mask``: all selected, returns ``bar`` itself)."""
    if full_mask:
        return bar
    return Bar(bar.strike, bar.bucket_time, bar.underlying_close, bar.moneyness_level, bar.atm_strike,
               project_leg(bar.call, mask), project_leg(bar.put, mask))
