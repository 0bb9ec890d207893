"""The per-(underlying, timeframe) book of latest bars, and a group's view: the window of strikes it shows, which
follows each expiry's ATM (or stays on an explicit strike range), and the deltas between successive views.

Delta semantics (documented for clients in docs/stream.md): per expiry, first drop ``removed`` strikes, then for each
change: a strike not held is inserted whole; a held strike gets the fields present in the change (the codec sends
them as fixed-point changes relative to the held values it records, or as doubles). A change with ``full=True`` for
a strike the client may hold is also listed in ``removed`` (a replacement), so the client never keeps a value the
server no longer has.
"""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from services.common.domain.moneyness import atm_strike, moneyness_level
from services.stream.domain.filters import StreamFilter
from services.stream.domain.fixed import leg_changes
from services.stream.domain.model import ALL_INDICATORS, LEG_FIELDS, Bar, Leg, field_mask, project_bar

_EPS = 1e-6
_ALL_MASK = field_mask(ALL_INDICATORS)
_N = len(LEG_FIELDS)


@dataclass(slots=True)
class ExpiryBars:
    """One expiry of a distribution: ATM strike (index points) and bars ascending by strike."""

    expiry: str
    atm_strike: float
    bars: list[Bar]


@dataclass(slots=True)
class Distribution:
    """A strike distribution: bucket start (UTC epoch s), underlying price (index points), per-expiry bars."""

    underlying: str
    timeframe: int
    bucket_time: int
    underlying_price: float
    expiries: list[ExpiryBars]


@dataclass(slots=True)
class StrikeChange:
    """One strike in a delta.

    ``full``: a whole bar (legs None = absent side). Otherwise only the non-None leg values changed (a leg None =
    unchanged), and ``atm_strike``/``moneyness_level`` are None when unchanged. ``bucket_time`` (UTC epoch s) and
    ``underlying_close`` (index points) are always the bar's current values. ``call_held``/``put_held`` (changes
    only, not full ones): the values the client holds for the changed fields, at the same positions as the non-None
    values of ``call``/``put`` (None elsewhere, and None where the client holds no value); the codec sends a change
    relative to them (fixed point, :mod:`services.stream.domain.fixed`).
    """

    strike: float
    full: bool
    bucket_time: int
    underlying_close: float
    atm_strike: float | None
    moneyness_level: int | None
    call: Leg | None
    put: Leg | None
    call_held: Leg | None = None
    put_held: Leg | None = None
    #: Per LEG_FIELDS entry, the fixed-point change of the whole leg's field from the held bar to the new one
    #: (:func:`services.stream.domain.fixed.leg_changes`; computed once per strike and update for every indicator
    #: set), None when not computed: the codec then works it out from ``call``/``call_held``.
    call_fixed: list[int | None] | None = None
    put_fixed: list[int | None] | None = None
    #: Encoded form cached by the codec for the update that produced this change (shared by every group):
    #: (StrikeBar entry, fixed-point offset, fields, values), each b"" when absent.
    wire: tuple[bytes, bytes, bytes, bytes] | None = None


@dataclass(slots=True)
class ExpiryChange:
    """One expiry's changes: ATM now, changed/entering strikes, strikes that left (or are replaced)."""

    expiry: str
    atm_strike: float
    bars: dict[float, StrikeChange] = field(default_factory=dict)
    removed: set[float] = field(default_factory=set)
    #: Encoded ExpiryDelta cached by the codec for the update that produced this change (shared by every group
    #: holding the same :class:`ExpiryView`): (bytes, whether it has fixed-point changes).
    wire: tuple[bytes, bool] | None = None


@dataclass(slots=True)
class DeltaUpdate:
    """Changes of a group's view. ``receive_time``: earliest ingest receive time (UTC epoch s) of the updates
    included, None when unknown; ``conflated``: updates merged into this one; ``strike_step``: the underlying's strike
    step, index points (0 = unknown: the codec then keys no change by offset)."""

    bucket_time: int
    underlying_price: float
    expiries: list[ExpiryChange]
    conflated: int = 0
    receive_time: float | None = None
    strike_step: float = 0.0


#: A bar received but not converted yet: (expiry, strike, bucket_time UTC epoch s, a function returning the Bar).
LazyBar = tuple[str, float, int, Callable[[], Bar]]


def _given(bar: Bar) -> Callable[[], Bar]:
    """A LazyBar's function for a bar already converted."""
    return lambda: bar


class Book:
    """Latest complete bar per (expiry, strike) of one underlying and timeframe.

    Same rules as QueryService's strike distribution: a strike is *listed* when its newest bar started within the
    last ``carry_s`` seconds up to the book's bucket (all strikes when 0); an expiry's ATM is the listed strike
    nearest the underlying price (ties to the lower); shown bars carry that ATM and their level relative to it.
    ``step`` is the strike step, index points.
    """

    def __init__(self, step: float, carry_s: int = 0) -> None:
        self.step = step
        self.carry_s = carry_s
        self.bars: dict[str, dict[float, Bar]] = {}
        self.strikes: dict[str, list[float]] = {}
        self.atm: dict[str, float] = {}
        self.listed: dict[str, list[float]] = {}
        self.bucket_time = 0
        self.underlying_price = 0.0
        #: Expiries whose snapshot was loaded (``""`` = the default nearest ones were asked for).
        self.seeded: set[str] = set()
        #: The nearest expiries QueryService chose when none were asked for.
        self.default_expiries: list[str] = []
        #: Bars of BarUpdates not converted yet (:meth:`apply_lazy`): expiry → strike → (bucket_time, make); they
        #: stand for ``bars[expiry][strike]`` (stale or absent then) and are converted on first use.
        self._pending: dict[str, dict[float, tuple[int, Callable[[], Bar]]]] = {}
        #: Projections of the current bars, per (expiry, strike) and indicator set, shared by groups.
        self._proj: dict[tuple[str, float], dict[tuple[int, ...], Bar]] = {}
        #: :meth:`base` bars computed so far, per expiry and strike (forgotten with the projections).
        self._base: dict[str, dict[float, Bar]] = {}
        #: Updates applied so far (:meth:`apply`).
        self.updates = 0
        #: Per-expiry views shared by the groups that show the same expiry, window and indicators.
        self._views: weakref.WeakValueDictionary[tuple[object, ...], ExpiryView] = weakref.WeakValueDictionary()

    def wanted_expiries(self) -> set[str]:
        """Expiries whose bars the book keeps: the seeded ones (explicit, and the resolved default ones). Bars of
        other expiries can be skipped: a group asking for one later seeds it from a snapshot first."""
        out = set(self.seeded)
        out.update(self.default_expiries)
        out.discard("")
        return out

    def _expiry(self, expiry: str) -> tuple[dict[float, Bar], dict[float, tuple[int, Callable[[], Bar]]]]:
        d = self.bars.get(expiry)
        if d is None:
            d = self.bars[expiry] = {}
            self.strikes[expiry] = []
            self._pending[expiry] = {}
        return d, self._pending[expiry]

    def _forget(self, expiry: str, strike: float) -> None:
        self._proj.pop((expiry, strike), None)
        base = self._base.get(expiry)
        if base:
            base.pop(strike, None)

    def _store(self, expiry: str, strike: float, bucket_time: int, make: Callable[[], Bar]) -> bool:
        """Hold a bar (unconverted until used) unless the one held is of a later bucket; True when held."""
        d, pending = self._expiry(expiry)
        pend = pending.get(strike)
        if pend is not None:
            if pend[0] > bucket_time:
                return False
        else:
            held = d.get(strike)
            if held is None:
                bisect.insort(self.strikes[expiry], strike)
            elif held.bucket_time > bucket_time:
                return False
        pending[strike] = (bucket_time, make)
        self._forget(expiry, strike)
        return True

    def bar(self, expiry: str, strike: float) -> Bar:
        """The latest bar of (expiry, strike) as received (converted now if it came lazily). KeyError if none."""
        pending = self._pending.get(expiry)
        if pending:
            hit = pending.pop(strike, None)
            if hit is not None:
                self.bars[expiry][strike] = hit[1]()
        return self.bars[expiry][strike]

    def _relist(self) -> None:
        """Recompute listed strikes and ATM per expiry; forget projections of expiries whose ATM moved."""
        cut = self.bucket_time - self.carry_s if self.carry_s else None
        for e, strikes in self.strikes.items():
            bars = self.bars[e]
            pending = self._pending[e]
            listed = strikes if cut is None else [
                s for s in strikes if (pending[s][0] if s in pending else bars[s].bucket_time) > cut]
            self.listed[e] = listed
            atm = atm_strike(listed, self.underlying_price) if listed and self.underlying_price else 0.0
            if atm != self.atm.get(e):
                self.atm[e] = atm
                for s in strikes:
                    self._proj.pop((e, s), None)
                self._base.pop(e, None)

    def project(self, expiry: str, strike: float, indicators: tuple[int, ...], mask: tuple[bool, ...],
                full_mask: bool) -> Bar:
        """The bar of (expiry, strike) as shown: restricted to ``indicators``, with the expiry's current ATM and the
        level relative to it (one shared object per indicator set until the bar or the ATM changes)."""
        d = self._proj.get((expiry, strike))
        if d is None:
            d = self._proj[(expiry, strike)] = {}
        b = d.get(indicators)
        if b is None:
            src = self.bar(expiry, strike)
            atm = self.atm.get(expiry, 0.0)
            level = moneyness_level(strike, atm, self.step) if atm else src.moneyness_level
            if atm and (src.atm_strike != atm or src.moneyness_level != level):
                src = Bar(src.strike, src.bucket_time, src.underlying_close, level, atm, src.call, src.put)
            b = d[indicators] = project_bar(src, mask, full_mask)
        return b

    def base(self, expiry: str, strike: float) -> Bar:
        """The whole bar of (expiry, strike) with the expiry's current ATM and the level relative to it (what
        :meth:`project` restricts to an indicator set; one shared object until the bar or the ATM changes)."""
        d = self._base.get(expiry)
        if d is None:
            d = self._base[expiry] = {}
        b = d.get(strike)
        if b is None:
            b = d[strike] = self.project(expiry, strike, ALL_INDICATORS, _ALL_MASK, True)
        return b

    def bases(self, expiry: str) -> dict[float, Bar]:
        """The :meth:`base` bars of ``expiry`` computed so far, by strike (a strike missing here: call
        :meth:`base`). Read-only for callers."""
        d = self._base.get(expiry)
        if d is None:
            d = self._base[expiry] = {}
        return d

    def apply(
        self, bars: Iterable[tuple[str, Bar]], bucket_time: int, underlying_price: float
    ) -> dict[str, set[float]]:
        """:meth:`apply_lazy` for bars already converted."""
        return self.apply_lazy([(e, b.strike, b.bucket_time, _given(b)) for e, b in bars], bucket_time,
                               underlying_price)

    def apply_lazy(
        self, bars: Iterable[LazyBar], bucket_time: int, underlying_price: float
    ) -> dict[str, set[float]]:
        """Apply the complete bars of one BarUpdate, each converted only when first used (:data:`LazyBar`): most
        strikes of a BarUpdate are outside every window, and converting a protobuf bar costs ≈ 5 µs. A bar older
        (by bucket) than the one held is ignored. Returns the strikes that got a bar, per expiry (changed or not:
        unchanged ones give no change when compared).

        Bars still unconverted from the previous update and not replaced now are converted here, so that no more
        than one update's protobuf message is kept alive by unconverted bars."""
        touched: dict[str, set[float]] = {}
        left = [(e, list(p)) for e, p in self._pending.items() if p]
        for expiry, strike, bt, make in bars:
            if self._store(expiry, strike, bt, make):
                t = touched.get(expiry)
                if t is None:
                    t = touched[expiry] = set()
                t.add(strike)
        for e, strikes in left:
            now = touched.get(e, ())
            for s in strikes:
                if s not in now:
                    self.bar(e, s)
        return self._finish(touched, bucket_time, underlying_price)

    def _finish(self, touched: dict[str, set[float]], bucket_time: int, underlying_price: float
                ) -> dict[str, set[float]]:
        if bucket_time >= self.bucket_time:
            self.bucket_time = bucket_time
            if underlying_price:
                self.underlying_price = underlying_price
        self._relist()
        self.updates += 1
        return touched

    def expiry_view(self, expiry: str, flt: StreamFilter) -> ExpiryView:
        """The view of ``expiry`` for ``flt``'s window and indicators, shared with every other group that shows the
        same (one computation and one encoding per update for all of them). A new view, or one that missed an
        update (no group held it then), is rebuilt from the book."""
        key = (expiry, flt.strikes_around_atm, flt.strike_min, flt.strike_max, flt.indicators)
        v = self._views.get(key)
        if v is None:
            v = self._views[key] = ExpiryView(expiry, flt)
            v.rebuild(self)
        elif v.applied != self.updates:
            v.rebuild(self)
        return v

    def seed(self, dist: Distribution, asked: Iterable[str]) -> None:
        """Load a snapshot (bars not older than the held ones win) and mark ``asked`` expiries as seeded."""
        for e in dist.expiries:
            for bar in e.bars:
                self._store(e.expiry, bar.strike, bar.bucket_time, _given(bar))
            self._expiry(e.expiry)
            self.seeded.add(e.expiry)
        if dist.bucket_time >= self.bucket_time:
            self.bucket_time = dist.bucket_time
            self.underlying_price = dist.underlying_price
        self.seeded.update(asked)
        self._relist()

    def window(self, expiry: str, flt: StreamFilter) -> list[float]:
        """Listed strikes of ``expiry`` in the filter's window now, ascending (empty when the expiry has none)."""
        strikes = self.listed.get(expiry)
        if not strikes:
            return []
        if flt.explicit_range:
            lo, hi = flt.strike_min, flt.strike_max
        else:
            atm = self.atm.get(expiry)
            if not atm:
                return []
            lo, hi = atm - flt.strikes_around_atm * self.step, atm + flt.strikes_around_atm * self.step
        return strikes[bisect.bisect_left(strikes, lo - _EPS): bisect.bisect_right(strikes, hi + _EPS)]


def full_change(bar: Bar) -> StrikeChange:
    """A whole-bar change (entering or replaced strike)."""
    return StrikeChange(bar.strike, True, bar.bucket_time, bar.underlying_close, bar.atm_strike, bar.moneyness_level,
                        bar.call, bar.put)


@dataclass(slots=True)
class _LegDiff:
    """How one leg of a whole bar changed: ``replace`` when the leg appeared or vanished; else the fields whose value
    changed (``o != n``, as indices and as a bit set), the bits of those that are not the identical object (what
    makes restricted legs unequal) and of those that became absent, and their fixed-point changes
    (:func:`~services.stream.domain.fixed.leg_changes`)."""

    replace: bool
    changed: list[int]
    distinct: int
    nulled: int
    fixed: list[int | None] | None


_REPLACE_LEG = _LegDiff(True, [], 0, 0, None)


def _leg_diff(old: Leg | None, new: Leg | None) -> _LegDiff | None:
    if old == new:
        return None
    if old is None or new is None:
        return _REPLACE_LEG
    changed = [i for i in range(_N) if not old[i] == new[i]]
    distinct = nulled = 0
    for i in changed:
        n = new[i]
        if old[i] is not n:
            distinct |= 1 << i
        if n is None:
            nulled |= 1 << i
    return _LegDiff(False, changed, distinct, nulled, leg_changes(new, old, changed))


@dataclass(slots=True)
class BarDiff:
    """The change of one strike's whole bar in one update (held → new, both :meth:`Book.base` bars), from which
    every indicator set's :class:`StrikeChange` is derived (:meth:`project`) without comparing or packing again."""

    old: Bar
    new: Bar
    header: bool
    moved: bool
    call: _LegDiff | None
    put: _LegDiff | None

    @staticmethod
    def of(old: Bar, new: Bar) -> BarDiff | None:
        """The diff of two bars of the same strike; None when equal."""
        if old == new:
            return None
        moved = old.atm_strike != new.atm_strike or old.moneyness_level != new.moneyness_level
        header = moved or old.bucket_time != new.bucket_time or old.underlying_close != new.underlying_close
        return BarDiff(old, new, header, moved, _leg_diff(old.call, new.call), _leg_diff(old.put, new.put))

    def project(self, mask: int) -> tuple[bool, StrikeChange | None]:
        """The change as seen by an indicator set (``mask``: bit i set when it selects LEG_FIELDS[i]): exactly what
        comparing the two bars restricted to it field by field gives (the reference in
        tests/unit/test_stream_fixed_point.py), as ``(False, change or None when equal)``, or ``(True, None)`` for
        a replacement (the change is then the whole new bar so restricted, :func:`full_change`).
        """
        rc, call, call_held, call_fixed = self._leg(self.call, self.old.call, self.new.call, mask)
        rp, put, put_held, put_fixed = self._leg(self.put, self.old.put, self.new.put, mask)
        if rc or rp:
            return True, None
        if call is None and put is None and not self.header:
            return False, None
        n = self.new
        return False, StrikeChange(n.strike, False, n.bucket_time, n.underlying_close,
                            n.atm_strike if self.moved else None, n.moneyness_level if self.moved else None,
                            call, put, call_held, put_held, call_fixed, put_fixed)

    @staticmethod
    def _leg(d: _LegDiff | None, old: Leg | None, new: Leg | None, mask: int
             ) -> tuple[bool, Leg | None, Leg | None, list[int | None] | None]:
        if d is None:
            return False, None, None, None
        if d.replace:
            return True, None, None, None
        if not d.distinct & mask:  # the restricted legs are equal
            return False, None, None, None
        if d.nulled & mask:
            return True, None, None, None
        assert old is not None and new is not None
        out: list[float | int | None] = [None] * _N
        held: list[float | int | None] = [None] * _N
        for i in d.changed:
            if mask >> i & 1:
                out[i] = new[i]
                held[i] = old[i]
        return False, tuple(out), tuple(held), d.fixed


#: One update's strike changes shared by every view: (expiry, strike, indicators) → (held bar, new bar, change),
#: (expiry, -strike-1, indicators) → the whole-bar change of an entering strike, and (expiry, strike, None) →
#: (held bar, new bar, BarDiff | None) for the whole bars.
ChangeCache = dict[tuple[str, float, tuple[int, ...] | None], tuple[Bar, Bar, Any]]


class ExpiryView:
    """One expiry as its subscribers hold it: the bars of the window (ATM±N, following the ATM, or an explicit strike
    range), restricted to the filter's indicators. Shared by every group with the same expiry, window and indicators
    (:meth:`Book.expiry_view`): all of them hold the same bars after every update, so the change of an update is
    computed (and encoded, :attr:`ExpiryChange.wire`) once for all of them.

    ``held`` keeps the whole bars (:meth:`Book.base`); what the subscribers hold is their restriction to the
    indicators (:meth:`bars`). Comparing whole bars once per strike and update serves every indicator set
    (:class:`BarDiff`)."""

    __slots__ = ("__weakref__", "applied", "atm", "bits", "change", "expiry", "filter", "full_mask", "held", "mask",
                 "window")

    def __init__(self, expiry: str, flt: StreamFilter) -> None:
        self.expiry = expiry
        self.filter = flt
        self.mask = field_mask(flt.indicators)
        self.bits = sum(1 << i for i, m in enumerate(self.mask) if m)
        self.full_mask = all(self.mask)
        self.held: dict[float, Bar] = {}
        self.atm = 0.0
        self.window: list[float] = []
        #: ``Book.updates`` when the view was last advanced or rebuilt, and the change it produced then.
        self.applied = -1
        self.change: ExpiryChange | None = None

    def _proj(self, book: Book, s: float) -> Bar:
        return book.project(self.expiry, s, self.filter.indicators, self.mask, self.full_mask)

    def rebuild(self, book: Book) -> None:
        """Reset from the book (first snapshot, resync, or a view that missed updates)."""
        self.window = book.window(self.expiry, self.filter)
        self.held = {s: book.base(self.expiry, s) for s in self.window}
        self.atm = book.atm.get(self.expiry, 0.0)
        self.applied = book.updates
        self.change = None

    def bars(self) -> list[Bar]:
        """The bars the subscribers hold, ascending by strike (restricted to the indicators)."""
        mask, full = self.mask, self.full_mask
        return [project_bar(self.held[s], mask, full) for s in self.window]

    def advance(self, book: Book, touched: dict[str, set[float]], cache: ChangeCache) -> ExpiryChange | None:
        """Advance to the book's current update (once per update: later calls return the same change); None when
        nothing changed for this view. ``cache`` (one per update, shared by all views) reuses the whole-bar diff of
        a strike and its change per indicator set, computed for another view holding the same bar object."""
        if self.applied == book.updates:
            return self.change
        self.applied = book.updates
        self.change = None
        e = self.expiry
        inds = self.filter.indicators
        t = touched.get(e)
        atm = book.atm.get(e, 0.0)
        moved = atm != self.atm
        old_w = self.window
        new_w = book.window(e, self.filter)
        if not t and not moved and new_w == old_w:
            return None
        held = self.held
        bases = book.bases(e)
        ch = ExpiryChange(e, atm)
        if new_w != old_w:
            new_set = set(new_w)
            for s in old_w:
                if s not in new_set:
                    ch.removed.add(s)
                    del held[s]
        for s in new_w:
            old = held.get(s)
            if old is None:
                b = held[s] = book.base(e, s)
                fkey = (e, -s - 1.0, inds)  # entering strikes: whole-bar changes, shared too
                hit = cache.get(fkey)
                if hit is None or hit[1] is not b:
                    hit = cache[fkey] = (b, b, full_change(self._proj(book, s)))
                ch.bars[s] = hit[2]
                continue
            if not moved and (t is None or s not in t):
                continue
            b = bases.get(s) or book.base(e, s)
            if b is old:
                continue
            key = (e, s, inds)
            hit = cache.get(key)
            if hit is not None and hit[0] is old and hit[1] is b:
                c = hit[2]
            else:
                dkey = (e, s, None)
                dhit = cache.get(dkey)
                if dhit is not None and dhit[0] is old and dhit[1] is b:
                    diff = dhit[2]
                else:
                    diff = BarDiff.of(old, b)
                    if dhit is None:
                        cache[dkey] = (old, b, diff)
                c = None
                if diff is not None:
                    replace, c = diff.project(self.bits)
                    if replace:
                        c = full_change(self._proj(book, s))
                if hit is None:
                    cache[key] = (old, b, c)
            held[s] = b
            if c is not None:
                ch.bars[s] = c
                if c.full:
                    ch.removed.add(s)
        self.window = new_w
        self.atm = atm
        if ch.bars or ch.removed or moved:
            self.change = ch
        return self.change


class GroupView:
    """What the subscribers of one filter hold: one shared :class:`ExpiryView` per expiry.

    ``expiries`` is the resolved expiry list (the filter's, or the nearest ones from the first snapshot).
    """

    def __init__(self, flt: StreamFilter, expiries: list[str]) -> None:
        self.filter = flt
        self.expiries = expiries
        self.views: list[ExpiryView] = []

    @property
    def windows(self) -> dict[str, list[float]]:
        """Strikes shown per expiry, ascending."""
        return {v.expiry: v.window for v in self.views}

    def rebuild(self, book: Book) -> None:
        """Take the expiries' views from the book (first snapshot, resync)."""
        self.views = [book.expiry_view(e, self.filter) for e in self.expiries]

    def snapshot(self, book: Book, underlying: str) -> Distribution:
        """The current view as a distribution (bars ascending by strike)."""
        return Distribution(underlying, self.filter.timeframe, book.bucket_time, book.underlying_price,
                            [ExpiryBars(v.expiry, v.atm, v.bars()) for v in self.views])

    def apply(self, book: Book, touched: dict[str, set[float]], cache: ChangeCache | None = None) -> DeltaUpdate | None:
        """Advance the view after ``book`` took an update that changed ``touched`` strikes; None when the view is
        unchanged (then nothing is sent). ``cache``: one dict per update, shared by the groups."""
        if cache is None:
            cache = {}
        changes = [c for v in self.views if (c := v.advance(book, touched, cache)) is not None]
        if not changes:
            return None
        return DeltaUpdate(book.bucket_time, book.underlying_price, changes, strike_step=book.step)
