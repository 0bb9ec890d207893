"""Fixed-point leg values: the compact form of a Delta's changes (``ExpiryDelta.changes``, docs/stream.md).

The figures NSE publishes are decimal fixed point: LTP (and so open/high/low) on the ₹0.05 tick, IV in 0.01 %,
delta/theta/vega to 1e-4, gamma to 1e-6, OI and volume whole contracts. A changed field is then sent as a small
integer, its *change in grid units*, instead of a 9-byte double.

Exactness does not trust the data. A value ``v`` is *on the grid* of scale ``s`` when ``n = round(v × s)`` satisfies
``n / s == v`` in float64 (and ``|n| < 2^50``, ``v`` not −0.0, NaN or ±∞); for the integer fields (scale 1) every
int below 2^50 in magnitude is on the grid. A field goes the fixed-point way only when both the value the client
holds and the new value are on the grid and the change ``n_new − n_held`` fits a sint32. The client computes
``new = (round(held × s) + change) / s``; IEEE division is correctly rounded, so that is the server's value bit for
bit (``held × s`` is within a few ulps of the integer ``n_held``, far from a rounding tie). Integer fields:
``new = held + change``. Everything else travels as before, as a double or int64 in a ``StrikeBar``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from services.stream.domain.model import LEG_FIELDS, Leg

#: Grid units per unit of each LEG_FIELDS entry (None = never sent in fixed point): ltp/open/high/low 20 (₹0.05
#: ticks), iv 100 (0.01 %), delta 1e4, gamma 1e6, theta 1e4 (₹0.0001 per day), vega 1e4 (₹0.0001 per IV point),
#: oi / oi_change / volume 1 (contracts), oi_change_percent None.
LEG_SCALES: tuple[int | None, ...] = (20, 20, 20, 20, 100, 10_000, 1_000_000, 10_000, 10_000, 1, 1, None, 1)
assert len(LEG_SCALES) == len(LEG_FIELDS)

#: Grid values must stay below this magnitude (so ``held × scale`` is far from a rounding tie in float64).
_LIMIT = 2**50
#: A change must fit a sint32.
_CHANGE_LIMIT = 2**31


def on_grid(v: float | int, scale: int) -> int | None:
    """``v`` in grid units of ``scale`` (the integer ``n`` with ``n / scale == v`` exactly), None when off the grid.

    An int is always on the grid (below 2^50 grid units); a float must round-trip through
    ``round(v × scale) / scale`` bit for bit (−0.0, NaN and ±∞ are off the grid).
    """
    if type(v) is int:
        n = v * scale
        return n if -_LIMIT < n < _LIMIT else None
    x = v * scale
    if not -_LIMIT < x < _LIMIT:  # also False for NaN
        return None
    n = round(x)
    if n / scale != v or (n == 0 and math.copysign(1.0, v) < 0):
        return None
    return n


def fixed_change(held: float | int | None, new: float | int, scale: int | None) -> int | None:
    """The change from ``held`` to ``new`` in grid units of ``scale``; None when it cannot be sent that way (no
    scale, nothing held, either value off the grid, or a change beyond a sint32)."""
    if scale is None or held is None:
        return None
    a = on_grid(held, scale)
    if a is None:
        return None
    b = on_grid(new, scale)
    if b is None:
        return None
    c = b - a
    return c if -_CHANGE_LIMIT < c < _CHANGE_LIMIT else None


def apply_change(held: float | int, change: int, scale: int) -> float | int:
    """What a client computes: ``held`` (a value on the grid) moved by ``change`` grid units. Scale 1 (integer
    fields): ``held + change``; otherwise ``(round(held × scale) + change) / scale`` (float64)."""
    if scale == 1:
        return int(held) + change
    return (round(held * scale) + change) / scale


#: LEG_SCALES with their LEG_FIELDS index, for the fixed-point fields only.
_SCALED: tuple[tuple[int, int], ...] = tuple((i, s) for i, s in enumerate(LEG_SCALES) if s is not None)
_N = len(LEG_FIELDS)
_NONE: Leg = (None,) * _N


def leg_changes(new: Leg, held: Leg, fields: Iterable[int]) -> list[int | None]:
    """Per LEG_FIELDS entry, the fixed-point change from ``held`` to ``new`` for the ``fields`` indices (None where
    it cannot be sent that way, and for every other field). Same rule as :func:`fixed_change`, inlined: computed
    once per strike and update from the whole legs, and shared by every indicator set (:func:`pack_leg`'s
    ``fixed``)."""
    out: list[int | None] = [None] * _N
    lim, clim, rnd, sign = _LIMIT, _CHANGE_LIMIT, round, math.copysign
    for i in fields:
        scale = LEG_SCALES[i]
        v = new[i]
        h = held[i]
        if scale is None or v is None or h is None:
            continue
        x = v * scale
        y = h * scale
        if -lim < x < lim and -lim < y < lim:
            b = rnd(x)
            a = rnd(y)
            c = b - a
            if (b / scale == v and a / scale == h and -clim < c < clim
                    and (b or sign(1.0, v) > 0) and (a or sign(1.0, h) > 0)):
                out[i] = c
    return out


def pack_leg(new: Leg, held: Leg | None, fixed: Sequence[int | None] | None = None
             ) -> tuple[int, list[int], list[float | int | None] | None]:
    """Split one leg's changed values (``new``: None = unchanged) into fixed-point changes and the rest.

    ``held``: the client's values of those fields (None where it has none). Returns ``(mask, changes, rest)``: bit
    ``i`` of ``mask`` set for each LEG_FIELDS entry sent as a fixed-point change, ``changes`` in field order, and
    ``rest`` a leg of the values that must travel as they are (None when there are none). Same rule as
    :func:`fixed_change`, inlined (the codec calls this for every changed leg of every update; tested equal).
    ``fixed``: the changes already computed by :func:`leg_changes` for these held and new values (then only
    looked up).
    """
    if held is None:
        held = _NONE
    if fixed is None:
        fixed = leg_changes(new, held, [i for i, _ in _SCALED if new[i] is not None])
    mask = 0
    changes: list[int] = []
    rest: list[float | int | None] | None = None
    for i in range(_N):
        v = new[i]
        if v is None:
            continue
        c = fixed[i]
        if c is not None:
            mask |= 1 << i
            changes.append(c)
            continue
        if rest is None:
            rest = [None] * _N
        rest[i] = v
    return mask, changes, rest
