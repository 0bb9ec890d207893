"""Bar building: ticks → partial 1-minute bars per (underlying, expiry, strike), CE and PE legs side by side, plus the
per-contract state that turns cumulative day volume and OI into per-bar volume and ΔOI.

Pure domain logic (no grpc, asyncpg or redis). Times are integers: exchange times in epoch **microseconds** (UTC),
bucket starts in epoch **seconds** (UTC, aligned like :mod:`services.common.domain.timeframes`). Prices in ₹,
strikes and underlying values in index points, OI and volume in contracts, IV in percent.

Field definitions of a 1-minute bar leg (the contract's ticks with exchange time in the minute):

- ``open`` / ``high`` / ``low`` / ``close``: LTP of the earliest tick / max / min / LTP of the latest tick (ties on
  exchange time: the tick processed last wins ``close``, the one processed first keeps ``open``);
- ``iv``, ``delta``, ``gamma``, ``theta``, ``vega``, ``oi``: values of the latest tick (``close_time``);
- ``day_volume``: high-water mark of the cumulative day volume over the session (UTC day = IST trading day) up to
  and including this bar, so a downward restatement by the feed never lowers it;
- ``volume``: ``day_volume`` − ``day_volume`` of the leg's previous bar of the same session (the first bar of a
  session counts its whole ``day_volume``); never negative (restatements count 0);
- ``oi_change``: ``oi`` − ``oi`` of the leg's previous bar of the same session; 0 for the first bar of a session.

The "previous bar" is the leg's latest earlier 1-minute bar *that has data for that leg*. In-order ticks (the normal
case) are resolved from :class:`LegState` in memory; a tick older than the leg's last committed bar is "late" and
its session is recomputed in SQL (see ``services/ingest/store/pg.py``) with the same definitions.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from services.common.domain.moneyness import atm_strike, moneyness_level
from services.common.domain.timeframes import Timeframe

#: Seconds per session key (sessions are UTC days; the NSE session 09:15–15:30 IST lies inside one UTC day).
DAY_S = 86_400

#: Index of each field in a :class:`LegAgg` value list (a list, not an object, for speed on the hot path).
OPEN_US, OPEN, HIGH, LOW, CLOSE_US, CLOSE, IV, DELTA, GAMMA, THETA, VEGA, OI, VOL_MAX = range(13)


def session_of(bucket_s: int) -> int:
    """Session key (UTC day number) of a bucket start in epoch seconds."""
    return bucket_s // DAY_S


#: ``(underlying, expiry 'YYYY-MM-DD', strike)`` — one row of the bar tables per bucket.
StrikeKey = tuple[str, str, float]
#: ``(underlying, expiry, strike, is_call)`` — one leg.
LegKey = tuple[str, str, float, bool]


@dataclass(slots=True)
class LegState:
    """What a leg's next bar needs from its committed past: the last committed bar (``bucket``, ``close_us``,
    ``oi``, ``day_volume``) and the one before it (``prior_*``; ``prior_bucket`` is None when there is none).
    Buckets in epoch seconds, close_us in epoch µs, OI/volume in contracts."""

    bucket: int
    close_us: int
    oi: int
    day_volume: int
    prior_bucket: int | None = None
    prior_oi: int = 0
    prior_day_volume: int = 0


@dataclass(slots=True)
class LegBar:
    """A leg's values for one bucket, from the ticks of one pipeline call.

    ``agg`` is the raw aggregate (see the ``OPEN_US`` .. ``VOL_MAX`` indices). For in-order legs (``late`` False),
    ``day_volume``, ``volume`` and ``oi_change`` are final (they already account for the committed part of the same
    bucket); for late legs they are None except ``day_volume`` = the max cumulative volume of the new ticks, and the
    session is recomputed in SQL."""

    agg: list[Any]
    late: bool
    day_volume: int
    volume: int | None
    oi_change: int | None


class BarBuilder:
    """Accumulates ticks of one pipeline call into partial 1-minute bars.

    ``legs[(underlying, expiry, strike, is_call)][bucket_s]`` is the raw leg aggregate (a list indexed by
    ``OPEN_US`` .. ``VOL_MAX``); ``underlying[(underlying)][bucket_s]`` is ``[open_us, open, high, low, close_us,
    close]`` of the index value (from UnderlyingTicks and from OptionTick.underlying_price).
    """

    __slots__ = ("first_tick_us", "legs", "underlying")

    def __init__(self) -> None:
        self.legs: dict[LegKey, dict[int, list[Any]]] = {}
        self.underlying: dict[str, dict[int, list[float]]] = {}
        #: Earliest exchange time (µs) of an accepted tick, per underlying.
        self.first_tick_us: dict[str, int] = {}

    def add_option(self, underlying: str, expiry: str, strike: float, is_call: bool, ts_us: int, ltp: float,
                   volume: int, oi: int, iv: float | None, delta: float | None, gamma: float | None,
                   theta: float | None, vega: float | None) -> None:
        """Add one option tick (exchange time ``ts_us`` epoch µs; ltp ₹; cumulative day volume and OI contracts)."""
        key = (underlying, expiry, strike, is_call)
        buckets = self.legs.get(key)
        if buckets is None:
            buckets = self.legs[key] = {}
        sec = ts_us // 1_000_000
        bucket = sec - sec % 60
        a = buckets.get(bucket)
        if a is None:
            buckets[bucket] = [ts_us, ltp, ltp, ltp, ts_us, ltp, iv, delta, gamma, theta, vega, oi, volume]
        else:
            if ts_us < a[OPEN_US]:
                a[OPEN_US] = ts_us
                a[OPEN] = ltp
            if ltp > a[HIGH]:
                a[HIGH] = ltp
            if ltp < a[LOW]:
                a[LOW] = ltp
            if ts_us >= a[CLOSE_US]:
                a[CLOSE_US] = ts_us
                a[CLOSE] = ltp
                a[IV] = iv
                a[DELTA] = delta
                a[GAMMA] = gamma
                a[THETA] = theta
                a[VEGA] = vega
                a[OI] = oi
            if volume > a[VOL_MAX]:
                a[VOL_MAX] = volume
        first = self.first_tick_us.get(underlying)
        if first is None or ts_us < first:
            self.first_tick_us[underlying] = ts_us

    def add_underlying(self, underlying: str, ts_us: int, price: float, *, is_tick: bool = True) -> None:
        """Add one observation of the index value (index points) at ``ts_us`` (epoch µs). ``is_tick`` False for an
        OptionTick's ``underlying_price`` (does not count as the earliest tick of the underlying)."""
        buckets = self.underlying.get(underlying)
        if buckets is None:
            buckets = self.underlying[underlying] = {}
        sec = ts_us // 1_000_000
        bucket = sec - sec % 60
        a = buckets.get(bucket)
        if a is None:
            buckets[bucket] = [ts_us, price, price, price, ts_us, price]
        else:
            if ts_us < a[0]:
                a[0] = ts_us
                a[1] = price
            if price > a[2]:
                a[2] = price
            if price < a[3]:
                a[3] = price
            if ts_us >= a[4]:
                a[4] = ts_us
                a[5] = price
        if is_tick:
            first = self.first_tick_us.get(underlying)
            if first is None or ts_us < first:
                self.first_tick_us[underlying] = ts_us

    def dates(self) -> set[int]:
        """Session keys (UTC day numbers) of every bucket seen."""
        out: set[int] = set()
        for buckets in self.legs.values():
            out.update(b // DAY_S for b in buckets)
        for ub in self.underlying.values():
            out.update(b // DAY_S for b in ub)
        return out


def derive_leg(buckets: dict[int, list[Any]], state: LegState | None,
               horizon_s: int = 0) -> tuple[dict[int, LegBar], LegState | None]:
    """Turn one leg's raw aggregates (``{bucket_s: agg}``) into :class:`LegBar` s, in bucket order, chaining the
    leg's state. Returns the bars and the leg's state after these bars are committed (the input is not mutated).

    A bucket older than the state's last committed bucket is *late*: its derived fields are left to the SQL
    recompute and the returned state keeps the in-order part only. A bucket before ``horizon_s`` (start of the newest
    session whose states are in memory) is late too unless the state is of its own session.
    """
    out: dict[int, LegBar] = {}
    for bucket in sorted(buckets):
        a = buckets[bucket]
        vmax = int(a[VOL_MAX])
        if (state is not None and bucket < state.bucket) or (
                bucket < horizon_s and (state is None or state.bucket // DAY_S != bucket // DAY_S)):
            out[bucket] = LegBar(a, True, vmax, None, None)
            continue
        sess = bucket // DAY_S
        if state is not None and bucket == state.bucket:
            # More ticks for the bar committed last: merge with it; the previous bar is the prior one.
            if a[CLOSE_US] >= state.close_us:
                close_us, oi = int(a[CLOSE_US]), int(a[OI])
            else:
                close_us, oi = state.close_us, state.oi
            dv = max(state.day_volume, vmax)
            has_prev = state.prior_bucket is not None and state.prior_bucket // DAY_S == sess
            prev_oi, prev_dv = (state.prior_oi, state.prior_day_volume) if has_prev else (oi, 0)
            new = LegState(bucket, close_us, oi, dv, state.prior_bucket, state.prior_oi, state.prior_day_volume)
        else:
            has_prev = state is not None and state.bucket // DAY_S == sess
            oi = int(a[OI])
            if state is not None and has_prev:
                prev_oi, prev_dv = state.oi, state.day_volume
            else:
                prev_oi, prev_dv = oi, 0
            dv = max(prev_dv, vmax)
            if state is None:
                new = LegState(bucket, int(a[CLOSE_US]), oi, dv)
            else:
                new = LegState(bucket, int(a[CLOSE_US]), oi, dv, state.bucket, state.oi, state.day_volume)
        out[bucket] = LegBar(a, False, dv, dv - prev_dv, oi - prev_oi)
        state = new
    return out, state


@dataclass
class UnderlyingCloses:
    """The index's 1-minute closes per underlying: ``bars[u][bucket_s] = (close_us, close)``, with a sorted bucket
    list for carry-forward look-ups. Used for ``underlying_close`` of strike bars (the latest index value known at
    the bar's close)."""

    bars: dict[str, dict[int, tuple[int, float]]] = field(default_factory=dict)
    _sorted: dict[str, list[int]] = field(default_factory=dict)

    def copy_for(self, underlyings: Iterable[str]) -> UnderlyingCloses:
        """A copy in which the given underlyings may be changed without touching this object."""
        out = UnderlyingCloses(dict(self.bars), dict(self._sorted))
        for u in underlyings:
            out.bars[u] = dict(self.bars.get(u, {}))
            out._sorted[u] = list(self._sorted.get(u, []))
        return out

    def merge(self, underlying: str, bucket: int, close_us: int, close: float) -> None:
        """Merge a 1-minute close observation (the later ``close_us`` wins; ties: the new one)."""
        ub = self.bars.setdefault(underlying, {})
        old = ub.get(bucket)
        if old is None:
            ub[bucket] = (close_us, close)
            bisect.insort(self._sorted.setdefault(underlying, []), bucket)
        elif close_us >= old[0]:
            ub[bucket] = (close_us, close)

    def prune_before(self, bucket: int) -> None:
        """Forget closes of buckets before ``bucket`` (epoch s)."""
        for u, buckets in self._sorted.items():
            i = bisect.bisect_left(buckets, bucket)
            if i:
                ub = self.bars[u]
                for b in buckets[:i]:
                    del ub[b]
                del buckets[:i]

    def price_at(self, underlying: str, bucket: int) -> float | None:
        """The close of the latest 1-minute bucket ≤ ``bucket`` (epoch s), or None when nothing is known."""
        buckets = self._sorted.get(underlying)
        if not buckets:
            return None
        i = bisect.bisect_right(buckets, bucket)
        if i == 0:
            return None
        return self.bars[underlying][buckets[i - 1]][1]

    def latest(self, underlying: str) -> float | None:
        """The newest known index value, or None."""
        buckets = self._sorted.get(underlying)
        return self.bars[underlying][buckets[-1]][1] if buckets else None


@dataclass
class ListedStrikes:
    """Strikes seen per (underlying, expiry, session): ``first[(u, expiry, session)][strike] = first bucket_s``.

    The strikes *listed* at bucket B are those first seen in B's session at or before B — deterministic whatever
    the processing order, so a replay gives the same ATM strikes."""

    first: dict[tuple[str, str, int], dict[float, int]] = field(default_factory=dict)

    def copy_for(self, keys: Iterable[tuple[str, str, int]]) -> ListedStrikes:
        """A copy in which the given keys may be changed without touching this object."""
        out = ListedStrikes(dict(self.first))
        for k in keys:
            out.first[k] = dict(self.first.get(k, {}))
        return out

    def observe(self, underlying: str, expiry: str, strike: float, bucket: int) -> None:
        """Record that ``strike`` traded in ``bucket`` (epoch s)."""
        d = self.first.setdefault((underlying, expiry, bucket // DAY_S), {})
        old = d.get(strike)
        if old is None or bucket < old:
            d[strike] = bucket

    def expiries(self, underlying: str) -> list[tuple[str, int]]:
        """(expiry, session) pairs with listed strikes of ``underlying``."""
        return [(e, d) for (u, e, d) in self.first if u == underlying]

    def listed(self, underlying: str, expiry: str, bucket: int) -> list[float]:
        """Sorted strikes of the expiry listed at ``bucket`` (epoch s)."""
        d = self.first.get((underlying, expiry, bucket // DAY_S), {})
        return sorted(s for s, b in d.items() if b <= bucket)

    def atm(self, underlying: str, expiry: str, bucket: int, price: float | None) -> float | None:
        """ATM strike at ``bucket`` for index value ``price`` (None when either is unknown)."""
        if price is None:
            return None
        strikes = self.listed(underlying, expiry, bucket)
        return atm_strike(strikes, price) if strikes else None


def moneyness(strike: float, atm: float | None, step: float) -> int | None:
    """Moneyness level of ``strike`` against ``atm`` (None when the ATM strike is unknown)."""
    return None if atm is None else moneyness_level(strike, atm, step)


def last_minute_of(bucket: int, tf: Timeframe) -> int:
    """Start (epoch s) of the last 1-minute bucket inside the ``tf`` bucket starting at ``bucket``."""
    return bucket + tf.seconds - 60
