"""Conflation: merging successive deltas of one subscriber into one, the latest value per strike winning.

The merged delta, applied with the client rules of :mod:`services.stream.domain.window`, gives the same state as
applying the deltas one by one. Its size is bounded by the window (one change per strike), whatever the number of
updates merged. A merged change keeps, per field, the value the lagging client holds (the held value before the
first delta that changed the field), so the codec's fixed-point changes are relative to what that client has; a
field whose value came back to the held one is dropped.
"""

from __future__ import annotations

from services.stream.domain.model import LEG_FIELDS, Leg
from services.stream.domain.window import DeltaUpdate, ExpiryChange, StrikeChange

_NONE_LEG: Leg = (None,) * len(LEG_FIELDS)


def _overlay_leg(base: Leg | None, top: Leg | None) -> Leg | None:
    if top is None:
        return base
    if base is None:
        base = _NONE_LEG
    return tuple(t if t is not None else b for b, t in zip(base, top, strict=True))


def _merge_leg(a: Leg | None, a_held: Leg | None, b: Leg | None, b_held: Leg | None
               ) -> tuple[Leg | None, Leg | None]:
    """Changed values and held values of one leg after the changes ``a`` then ``b`` (neither full)."""
    if a is None:
        return b, b_held
    if b is None:
        return a, a_held
    a_held = a_held or _NONE_LEG
    b_held = b_held or _NONE_LEG
    new: list[float | int | None] = []
    held: list[float | int | None] = []
    for av, ah, bv, bh in zip(a, a_held, b, b_held, strict=True):
        v, h = (bv, ah if av is not None else bh) if bv is not None else (av, ah)
        if v is not None and v == h:  # back to what the client holds: nothing to send
            v = h = None
        new.append(v)
        held.append(h)
    return tuple(new), tuple(held)


def merge_change(a: StrikeChange, b: StrikeChange) -> StrikeChange:
    """``a`` then ``b`` for one strike, as one change."""
    if b.full:
        return b
    moved = b.atm_strike is not None
    atm = b.atm_strike if moved else a.atm_strike
    level = b.moneyness_level if moved else a.moneyness_level
    if a.full:  # the client gets the whole bar: b's values over a's
        return StrikeChange(b.strike, True, b.bucket_time, b.underlying_close, atm, level,
                            _overlay_leg(a.call, b.call), _overlay_leg(a.put, b.put))
    call, call_held = _merge_leg(a.call, a.call_held, b.call, b.call_held)
    put, put_held = _merge_leg(a.put, a.put_held, b.put, b.put_held)
    return StrikeChange(b.strike, False, b.bucket_time, b.underlying_close, atm, level, call, put,
                        call_held, put_held)


def _merge_expiry(a: ExpiryChange, b: ExpiryChange) -> ExpiryChange:
    out = ExpiryChange(b.expiry, b.atm_strike, dict(a.bars), set(a.removed))
    for s in b.removed:
        out.removed.add(s)
        out.bars.pop(s, None)
    for s, c in b.bars.items():
        prev = out.bars.get(s)
        out.bars[s] = c if prev is None or s in b.removed else merge_change(prev, c)
    return out


def merge(a: DeltaUpdate, b: DeltaUpdate) -> DeltaUpdate:
    """``a`` then ``b`` as one delta; ``conflated`` counts the updates merged in (a + b + 1)."""
    by_exp = {e.expiry: e for e in a.expiries}
    order = [e.expiry for e in a.expiries]
    for e in b.expiries:
        prev = by_exp.get(e.expiry)
        if prev is None:
            order.append(e.expiry)
            by_exp[e.expiry] = e
        else:
            by_exp[e.expiry] = _merge_expiry(prev, e)
    times = [t for t in (a.receive_time, b.receive_time) if t is not None]
    return DeltaUpdate(b.bucket_time, b.underlying_price, [by_exp[x] for x in order],
                       a.conflated + b.conflated + 1, min(times) if times else None, b.strike_step or a.strike_step)
