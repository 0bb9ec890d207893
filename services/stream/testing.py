"""Test and benchmark helpers: a QueryService stand-in that serves strike distributions from bars you control, a
BarUpdate publisher that (like ingest) "commits" into it and then XADDs to Redis, and a synthetic NIFTY chain.

Not used by the service itself. The stand-in's GetStrikeDistribution follows query_service.proto: per expiry the
latest bars with |strike − ATM| ≤ N strike steps, ascending; default expiries = the nearest 3; NOT_FOUND for an
unknown underlying or expiry; indicators select leg fields as :data:`services.stream.domain.model.INDICATOR_FIELDS`.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, date, datetime

import grpc
import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp
from optmon.v1 import market_pb2, query_service_pb2, query_service_pb2_grpc, stream_service_pb2

from services.common.domain.moneyness import atm_strike, moneyness_level
from services.common.domain.timeframes import IST
from services.common.errors import NotFound, not_found_status
from services.query.domain.selection import nearest_expiries
from services.stream.domain.fixed import LEG_SCALES, apply_change
from services.stream.domain.model import LEG_FIELDS, field_mask
from services.stream.store.bars import bars_key


class StubQueryServicer(query_service_pb2_grpc.QueryServiceServicer):
    """Serves GetStrikeDistribution from ``data[(underlying, timeframe)][expiry][strike] = StrikeBar``."""

    def __init__(self, strike_steps: dict[str, float]) -> None:
        self.strike_steps = strike_steps
        self.data: dict[tuple[str, int], dict[str, dict[float, market_pb2.StrikeBar]]] = {}
        self.price: dict[tuple[str, int], tuple[int, float]] = {}
        self.calls = 0

    def commit(self, update: market_pb2.BarUpdate) -> None:
        """Store the complete bars of an update (as ingest commits them before publishing)."""
        key = (update.underlying, update.timeframe)
        d = self.data.setdefault(key, {})
        for b in update.bars:
            d.setdefault(b.expiry, {})[b.strike] = b
        self.price[key] = (update.bucket_time.seconds, update.underlying_price)

    def distribution(self, req: query_service_pb2.GetStrikeDistributionRequest
                     ) -> query_service_pb2.GetStrikeDistributionResponse:
        """The answer to ``req`` (raises NotFound)."""
        tf = req.timeframe or 1
        key = (req.underlying, tf)
        d = self.data.get(key)
        if not d:
            raise NotFound("UNKNOWN_UNDERLYING", f"no data for {req.underlying}", underlying=req.underlying)
        bucket, price = self.price[key]
        # QueryService's rule: the 3 nearest expiries not before the bucket's IST date (expired ones fill up)
        today = (datetime.fromtimestamp(bucket, UTC) + IST).date()
        expiries = list(req.expiries) or [
            e.isoformat() for e in nearest_expiries([date.fromisoformat(x) for x in d], today, 3)]
        n = req.strikes_around_atm or 10
        step = self.strike_steps[req.underlying]
        mask = field_mask(tuple(req.indicators)) if req.indicators else None
        resp = query_service_pb2.GetStrikeDistributionResponse(
            underlying=req.underlying, timeframe=tf, underlying_price=price)  # type: ignore[arg-type]
        resp.bucket_time.seconds = bucket
        for e in expiries:
            bars = d.get(e)
            if not bars:
                raise NotFound("UNKNOWN_EXPIRY", f"no data for expiry {e}", expiry=e)
            latest = max(bars.values(), key=lambda b: b.bucket_time.seconds)
            atm = latest.atm_strike
            pe = resp.expiries.add(expiry=e, atm_strike=atm)
            for s in sorted(bars):
                if abs(s - atm) <= n * step + 1e-6:
                    b = pe.bars.add()
                    b.CopyFrom(bars[s])
                    if mask is not None:
                        for leg in (b.call, b.put):
                            for name, keep in zip(LEG_FIELDS, mask, strict=True):
                                if not keep:
                                    leg.ClearField(name)
        return resp

    async def GetStrikeDistribution(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        try:
            return self.distribution(request)
        except NotFound as exc:
            await context.abort_with_status(not_found_status(exc))


async def start_stub_query(strike_steps: dict[str, float]) -> tuple[grpc.aio.Server, int, StubQueryServicer]:
    """A real in-process grpc.aio server on 127.0.0.1:0 serving the stand-in; returns (server, port, servicer)."""
    servicer = StubQueryServicer(strike_steps)
    server = grpc.aio.server()
    query_service_pb2_grpc.add_QueryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, servicer


def _ts(t: float) -> Timestamp:
    ts = Timestamp()
    ts.seconds, ts.nanos = int(t), int((t - int(t)) * 1e9)
    return ts


class BarPublisher:
    """Publishes BarUpdates like ingest: commit into the stand-in (when given), then XADD to ``optmon:bars:<U>``
    with the next per-underlying sequence number."""

    def __init__(self, redis_url: str, stub: StubQueryServicer | None) -> None:
        self.redis = aioredis.from_url(redis_url)
        self.stub = stub
        self.seq: dict[str, int] = {}

    def build(self, underlying: str, timeframe: int, bucket_time: int, price: float,
              bars: list[market_pb2.StrikeBar]) -> market_pb2.BarUpdate:
        """A BarUpdate with the next sequence, first_receive_time and commit_time = now."""
        seq = self.seq[underlying] = self.seq.get(underlying, 0) + 1
        now = time.time()
        upd = market_pb2.BarUpdate(underlying=underlying, sequence=seq, timeframe=timeframe,  # type: ignore[arg-type]
                                   underlying_price=price, bars=bars)
        upd.bucket_time.seconds = bucket_time
        upd.commit_time.CopyFrom(_ts(now))
        upd.first_receive_time.CopyFrom(_ts(now))
        return upd

    async def publish(self, underlying: str, timeframe: int, bucket_time: int, price: float,
                      bars: list[market_pb2.StrikeBar]) -> market_pb2.BarUpdate:
        """Commit + XADD one update; returns it."""
        upd = self.build(underlying, timeframe, bucket_time, price, bars)
        if self.stub is not None:
            self.stub.commit(upd)
        await self.redis.xadd(bars_key(underlying), {"pb": upd.SerializeToString()}, maxlen=10000, approximate=True)
        return upd

    async def close(self) -> None:
        """Close the Redis client."""
        await self.redis.aclose()


def synthetic_chain(underlying: str, expiries: list[str], strikes: list[float], bucket_time: int, price: float,
                    step: float, timeframe: int = 1, minute: int = 0) -> list[market_pb2.StrikeBar]:
    """Complete StrikeBars of a made-up chain at ``price`` (index points): deterministic in (expiry, strike,
    minute), some fields unchanged from minute to minute (like real data), ATM/moneyness from ``price``."""
    out: list[market_pb2.StrikeBar] = []
    atm = atm_strike(strikes, price)
    for ei, e in enumerate(expiries):
        for s in strikes:
            b = market_pb2.StrikeBar(underlying=underlying, expiry=e, strike=s, timeframe=timeframe,  # type: ignore[arg-type]
                                     underlying_close=price, atm_strike=atm,
                                     moneyness_level=moneyness_level(s, atm, step))
            b.bucket_time.seconds = bucket_time
            for side, leg in ((1, b.call), (-1, b.put)):
                intrinsic = max(0.0, side * (price - s))
                ltp = round(intrinsic + 40 * (ei + 1) * math.exp(-abs(price - s) / 400) + 0.05 * (minute // 2), 2)
                leg.ltp = leg.open = leg.high = leg.low = ltp
                leg.iv = round(12 + abs(price - s) / 500 + 0.01 * (minute // 3), 2)
                leg.delta = round(side * 0.5 * math.exp(-abs(price - s) / 300), 4)
                leg.gamma = 0.0005
                leg.theta = -5.0
                leg.vega = 10.0
                leg.oi = int(100000 + s + 37 * minute * (1 if s % 100 else 0))
                leg.oi_change = 37 * (1 if s % 100 else 0)
                leg.volume = int(1000 + (s % 7) * minute)
            out.append(b)
    return out


def apply_fixed_changes(held: dict[float, market_pb2.StrikeBar], atm: float, step: float,
                        changes: stream_service_pb2.FixedPointChanges, bucket_time: int, price: float) -> None:
    """Apply one ExpiryDelta's ``changes`` to the held bars of its expiry (``atm``: the ExpiryDelta's atm_strike,
    ``step``: the Delta's strike_step, index points; ``bucket_time`` UTC epoch s and ``price`` of the Delta).
    Raises KeyError / ValueError when a change names a strike or a value the client does not hold."""
    vals = iter(changes.values)
    for off, mask in zip(changes.offsets, changes.fields, strict=True):
        bar = held[atm + off * step]
        bar.bucket_time.seconds = bucket_time
        bar.underlying_close = price
        if mask & 1:
            bar.atm_strike, bar.moneyness_level = atm, off
        for bit, leg in ((1, bar.call), (1 + len(LEG_FIELDS), bar.put)):
            for i, (name, scale) in enumerate(zip(LEG_FIELDS, LEG_SCALES, strict=True)):
                if mask >> (bit + i) & 1:
                    if scale is None or not leg.HasField(name):
                        raise ValueError(f"fixed-point change of {name} that is not held")
                    setattr(leg, name, apply_change(getattr(leg, name), next(vals), scale))
    if next(vals, None) is not None:
        raise ValueError("more fixed-point values than fields")


class ReferenceClient:
    """A subscriber's side, as docs/stream.md specifies it: holds the window per expiry and applies messages.

    Snapshot: replace everything. Delta, per ExpiryDelta: drop ``removed_strikes``; apply ``changes`` (fixed-point
    changes of held strikes, which also take the Delta's bucket_time and underlying_price); then each bar is inserted
    whole when its strike is not held, else merged (present fields win); a bar without ``bucket_time`` /
    ``underlying_close`` takes the Delta's; ``atm_strike`` present ⇒ ``moneyness_level`` is set too.
    """

    def __init__(self, underlying: str, timeframe: int = 1) -> None:
        self.underlying = underlying
        self.timeframe = timeframe
        self.order: list[str] = []
        self.state: dict[str, dict[float, market_pb2.StrikeBar]] = {}
        self.atm: dict[str, float] = {}
        self.bucket_time = 0
        self.price = 0.0
        self.last_sequence = 0
        self.kinds: list[str] = []
        self.conflated = 0

    def apply(self, msg: stream_service_pb2.SubscribeResponse) -> None:
        """Apply one message (any kind)."""
        kind = msg.WhichOneof("kind") or ""
        self.kinds.append(kind)
        if kind in ("snapshot", "delta"):
            self.last_sequence = msg.sequence
        if kind == "snapshot":
            d = msg.snapshot.distribution
            self.order = [e.expiry for e in d.expiries]
            self.state = {e.expiry: {b.strike: b for b in e.bars} for e in d.expiries}
            self.atm = {e.expiry: e.atm_strike for e in d.expiries}
            self.bucket_time, self.price = d.bucket_time.seconds, d.underlying_price
        elif kind == "delta":
            dl = msg.delta
            self.conflated += dl.conflated
            self.bucket_time, self.price = dl.bucket_time.seconds, dl.underlying_price
            for e in dl.expiries:
                held = self.state.setdefault(e.expiry, {})
                self.atm[e.expiry] = e.atm_strike
                for s in e.removed_strikes:
                    held.pop(s, None)
                if e.HasField("changes"):
                    apply_fixed_changes(held, e.atm_strike, dl.strike_step, e.changes, dl.bucket_time.seconds,
                                        dl.underlying_price)
                for b in e.bars:
                    cur = held.get(b.strike)
                    if cur is None:
                        cur = market_pb2.StrikeBar()
                        cur.CopyFrom(b)
                        cur.underlying, cur.expiry = self.underlying, e.expiry
                        cur.timeframe = self.timeframe  # type: ignore[assignment]
                        held[b.strike] = cur
                    else:
                        if b.atm_strike:
                            cur.atm_strike, cur.moneyness_level = b.atm_strike, b.moneyness_level
                        if b.HasField("call"):
                            cur.call.MergeFrom(b.call)
                        if b.HasField("put"):
                            cur.put.MergeFrom(b.put)
                    bt = b.bucket_time if b.HasField("bucket_time") else dl.bucket_time
                    cur.bucket_time.seconds = bt.seconds
                    cur.underlying_close = b.underlying_close or dl.underlying_price

    def distribution(self) -> query_service_pb2.GetStrikeDistributionResponse:
        """The held state as a GetStrikeDistributionResponse (bars ascending by strike)."""
        resp = query_service_pb2.GetStrikeDistributionResponse(
            underlying=self.underlying, timeframe=self.timeframe, underlying_price=self.price)  # type: ignore[arg-type]
        resp.bucket_time.seconds = self.bucket_time
        for e in self.order:
            pe = resp.expiries.add(expiry=e, atm_strike=self.atm.get(e, 0.0))
            pe.bars.extend(self.state[e][s] for s in sorted(self.state[e]))
        return resp
