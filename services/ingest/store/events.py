"""BarUpdate events on Redis: after each commit, one ``BarUpdate`` per (underlying, timeframe) carrying the changed
bars (complete rows), appended to the stream ``optmon:bars:<U>`` (field ``pb``, ``MAXLEN ~ N``) with a per-underlying
sequence from ``INCRBY optmon:seq:<U>`` (strictly increasing by 1 per update).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp
from optmon.v1 import market_pb2

from services.common.domain.timeframes import Timeframe


def bars_key(underlying: str) -> str:
    """Stream of BarUpdates of one underlying."""
    return f"optmon:bars:{underlying}"


def seq_key(underlying: str) -> str:
    """Sequence counter of one underlying's BarUpdates."""
    return f"optmon:seq:{underlying}"


def _ts(value: dt.datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(value)
    return t


def _ts_us(us: int) -> Timestamp:
    return Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


# Positions in a bar row (columns of ``services.ingest.store.pg.BAR_COLUMNS``): 7 key/moneyness columns, then
# per side open, high, low, close, iv, delta, gamma, theta, vega, oi, oi_change, volume, day_volume, close_time.
_CE, _PE = 7, 21
_TS_CACHE: dict[dt.datetime, Timestamp] = {}
_EXPIRY_CACHE: dict[dt.date, str] = {}


def _ts_cached(value: dt.datetime) -> Timestamp:
    t = _TS_CACHE.get(value)
    if t is None:
        if len(_TS_CACHE) > 100_000:
            _TS_CACHE.clear()
        t = _TS_CACHE[value] = _ts(value)
    return t


def _fill_leg(leg: market_pb2.OptionLeg, v: Sequence[Any], i: int) -> None:
    o, h, lo, c, iv, d, g, th, ve, oi, oic, vol = v[i:i + 12]
    if None in (o, h, lo, c, iv, d, g, th, ve, oi, oic, vol):
        for f, x in zip(_LEG_NAMES, (c, o, h, lo, iv, d, g, th, ve, oi, oic, vol), strict=True):
            if x is not None:
                setattr(leg, f, x)
        return
    leg.ltp = c
    leg.open = o
    leg.high = h
    leg.low = lo
    leg.iv = iv
    leg.delta = d
    leg.gamma = g
    leg.theta = th
    leg.vega = ve
    leg.oi = oi
    leg.oi_change = oic
    leg.volume = vol


_LEG_NAMES = ("ltp", "open", "high", "low", "iv", "delta", "gamma", "theta", "vega", "oi", "oi_change", "volume")


def _fill_bar(b: market_pb2.StrikeBar, v: Sequence[Any], tf: int) -> None:
    e = _EXPIRY_CACHE.get(v[1])
    if e is None:
        e = _EXPIRY_CACHE[v[1]] = v[1].isoformat()
    b.underlying = v[0]
    b.expiry = e
    b.strike = v[2]
    b.timeframe = tf  # type: ignore[assignment]
    b.bucket_time.CopyFrom(_ts_cached(v[3]))
    if v[4] is not None:
        b.underlying_close = v[4]
    if v[5] is not None:
        b.atm_strike = v[5]
    if v[6] is not None:
        b.moneyness_level = v[6]
    if v[_CE + 13] is not None:  # close_time: the leg has data in the bucket
        _fill_leg(b.call, v, _CE)
    if v[_PE + 13] is not None:
        _fill_leg(b.put, v, _PE)


def strike_bar(row: Sequence[Any], tf: Timeframe) -> market_pb2.StrikeBar:
    """A bar row (a record or tuple with the columns of ``services.ingest.store.pg.BAR_COLUMNS``, in order) as a
    ``StrikeBar``. NULL underlying close / ATM / level (index value not known yet) are left at 0; a leg without
    data (NULL close time) is absent."""
    b = market_pb2.StrikeBar()
    _fill_bar(b, tuple(row), int(tf))
    return b


def _plan(changed: Mapping[Timeframe, Iterable[Sequence[Any]]]) -> list[tuple[Timeframe, str, list[tuple[Any, ...]]]]:
    """(timeframe, underlying, rows sorted by (bucket_time, expiry, strike), last version of each bar)."""
    out = []
    for tf in sorted(changed):
        per_u: dict[str, dict[tuple[Any, ...], tuple[Any, ...]]] = {}
        for row in changed[tf]:
            v = tuple(row)
            per_u.setdefault(v[0], {})[(v[3], v[1], v[2])] = v
        for u in sorted(per_u):
            d = per_u[u]
            out.append((tf, u, [d[k] for k in sorted(d)]))
    return out


def _header(tf: Timeframe, u: str, rows: list[tuple[Any, ...]], commit_time: dt.datetime | None,
            first_tick_us: Mapping[str, int], first_receive_us: Mapping[str, int],
            underlying_price: Mapping[str, float | None]) -> market_pb2.BarUpdate:
    upd = market_pb2.BarUpdate(underlying=u, timeframe=cast(Any, int(tf)), bucket_time=_ts(rows[-1][3]),
                               underlying_price=underlying_price.get(u) or 0.0)
    if commit_time is not None:
        upd.commit_time.CopyFrom(_ts(commit_time))
    if u in first_tick_us:
        upd.first_tick_time.CopyFrom(_ts_us(first_tick_us[u]))
    if u in first_receive_us:
        upd.first_receive_time.CopyFrom(_ts_us(first_receive_us[u]))
    return upd


def build_updates(changed: Mapping[Timeframe, Iterable[Sequence[Any]]], *, commit_time: dt.datetime | None,
                  first_tick_us: Mapping[str, int], first_receive_us: Mapping[str, int],
                  underlying_price: Mapping[str, float | None]) -> list[market_pb2.BarUpdate]:
    """One BarUpdate (without sequence) per (underlying, timeframe) that has changed rows (columns of
    ``BAR_COLUMNS`` in order), bars sorted by (bucket_time, expiry, strike). Rows of the same bar appearing twice
    keep the last one. ``first_*_us`` are epoch µs per underlying. ``commit_time`` None: set it later
    (:func:`set_commit_time`)."""
    out: list[market_pb2.BarUpdate] = []
    for tf, u, rows in _plan(changed):
        upd = _header(tf, u, rows, commit_time, first_tick_us, first_receive_us, underlying_price)
        add = upd.bars.add
        for bar in rows:
            _fill_bar(add(), bar, int(tf))
        out.append(upd)
    return out


async def build_updates_async(changed: Mapping[Timeframe, Iterable[Sequence[Any]]], *,
                              first_tick_us: Mapping[str, int], first_receive_us: Mapping[str, int],
                              underlying_price: Mapping[str, float | None],
                              yield_every: int = 256) -> list[market_pb2.BarUpdate]:
    """:func:`build_updates` (without commit time) that yields to the event loop every ``yield_every`` bars, so
    that queries of the same call keep PostgreSQL busy meanwhile."""
    out: list[market_pb2.BarUpdate] = []
    n = 0
    for tf, u, rows in _plan(changed):
        upd = _header(tf, u, rows, None, first_tick_us, first_receive_us, underlying_price)
        add = upd.bars.add
        for bar in rows:
            _fill_bar(add(), bar, int(tf))
            n += 1
            if n % yield_every == 0:
                await asyncio.sleep(0)
        out.append(upd)
    return out


def set_commit_time(updates: Iterable[market_pb2.BarUpdate], commit_time: dt.datetime) -> None:
    """Stamp ``commit_time`` on updates built before the commit."""
    ts = _ts(commit_time)
    for upd in updates:
        upd.commit_time.CopyFrom(ts)


async def publish(redis: aioredis.Redis, updates: Sequence[market_pb2.BarUpdate], maxlen: int = 10_000) -> None:
    """Assign sequences (``INCRBY optmon:seq:<U>``) to updates that have none yet and ``XADD`` every update (field
    ``pb``) with approximate trimming. Updates of one underlying keep their order. Raises redis errors; a retry with
    the same update objects keeps the sequences already assigned (no gap, no reuse)."""
    if not updates:
        return
    counts: dict[str, int] = {}
    for upd in updates:
        if not upd.sequence:
            counts[upd.underlying] = counts.get(upd.underlying, 0) + 1
    if counts:
        pipe = redis.pipeline(transaction=False)
        order = sorted(counts)
        for u in order:
            pipe.incrby(seq_key(u), counts[u])
        lasts = await pipe.execute()
        next_seq = {u: int(last) - counts[u] + 1 for u, last in zip(order, lasts, strict=True)}
        for upd in updates:
            if not upd.sequence:
                upd.sequence = next_seq[upd.underlying]
                next_seq[upd.underlying] += 1
    pipe = redis.pipeline(transaction=False)
    for upd in updates:
        pipe.xadd(bars_key(upd.underlying), {"pb": upd.SerializeToString()}, maxlen=maxlen, approximate=True)
    await pipe.execute()
