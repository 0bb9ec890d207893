"""BarUpdate events on Redis: after each commit, one ``BarUpdate`` per (underlying, timeframe) carrying the changed
bars (complete rows), appended to the stream ``optmon:bars:<U>`` (field ``pb``, ``MAXLEN ~ N``) with a per-underlying
sequence from ``INCRBY optmon:seq:<U>`` (strictly increasing by 1 per update).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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


_LEG_MAP = (("close", "ltp"), ("open", "open"), ("high", "high"), ("low", "low"), ("iv", "iv"), ("delta", "delta"),
            ("gamma", "gamma"), ("theta", "theta"), ("vega", "vega"), ("oi", "oi"), ("oi_change", "oi_change"),
            ("volume", "volume"))
_LEG_COLS = {s: [(f"{s}_{c}", f) for c, f in _LEG_MAP] for s in ("ce", "pe")}


def _leg(row: Mapping[str, Any], side: str) -> market_pb2.OptionLeg | None:
    if row[f"{side}_close_time"] is None:
        return None
    kw = {f: v for c, f in _LEG_COLS[side] if (v := row[c]) is not None}
    return market_pb2.OptionLeg(**kw)


def strike_bar(row: Mapping[str, Any], tf: Timeframe) -> market_pb2.StrikeBar:
    """A bar row (columns of ``services.ingest.store.pg.BAR_COLUMNS``) as a ``StrikeBar``. NULL underlying close /
    ATM / level (index value not known yet) become 0."""
    return market_pb2.StrikeBar(
        underlying=row["underlying"], expiry=row["expiry"].isoformat(), strike=row["strike"], timeframe=int(tf),
        bucket_time=_ts(row["bucket_time"]), underlying_close=row["underlying_close"] or 0.0,
        moneyness_level=row["moneyness_level"] or 0, atm_strike=row["atm_strike"] or 0.0,
        call=_leg(row, "ce"), put=_leg(row, "pe"))


def build_updates(changed: Mapping[Timeframe, Iterable[Mapping[str, Any]]], *, commit_time: dt.datetime,
                  first_tick_us: Mapping[str, int], first_receive_us: Mapping[str, int],
                  underlying_price: Mapping[str, float | None]) -> list[market_pb2.BarUpdate]:
    """One BarUpdate (without sequence) per (underlying, timeframe) that has changed rows. Rows of the same bar
    appearing twice keep the last one. ``first_*_us`` are epoch µs per underlying."""
    out: list[market_pb2.BarUpdate] = []
    commit_ts = _ts(commit_time)
    for tf in sorted(changed):
        per_u: dict[str, dict[tuple[Any, ...], Mapping[str, Any]]] = {}
        for row in changed[tf]:
            per_u.setdefault(row["underlying"], {})[(row["expiry"], row["strike"], row["bucket_time"])] = row
        for u in sorted(per_u):
            rows = sorted(per_u[u].values(), key=lambda r: (r["bucket_time"], r["expiry"], r["strike"]))
            upd = market_pb2.BarUpdate(
                underlying=u, timeframe=int(tf), bucket_time=_ts(rows[-1]["bucket_time"]),
                underlying_price=underlying_price.get(u) or 0.0, bars=[strike_bar(r, tf) for r in rows],
                commit_time=commit_ts)
            if u in first_tick_us:
                upd.first_tick_time.CopyFrom(_ts_us(first_tick_us[u]))
            if u in first_receive_us:
                upd.first_receive_time.CopyFrom(_ts_us(first_receive_us[u]))
            out.append(upd)
    return out


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
