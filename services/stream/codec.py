"""Protobuf ↔ stream domain, and the byte-level framing that lets one encoded message serve a whole group.

A ``SubscribeResponse`` is encoded once per group as a *body* (every field but ``sequence``); each subscriber's
copy is ``sequence_prefix(seq) + body``. Protobuf parsers merge concatenated fields, so the result parses as one
``SubscribeResponse`` with that subscriber's sequence number.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Container, Sequence
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp
from optmon.v1 import market_pb2, query_service_pb2, stream_service_pb2

from services.common.wire import varint
from services.stream.domain.model import LEG_FIELDS, Bar, Leg
from services.stream.domain.window import DeltaUpdate, Distribution, ExpiryBars, StrikeChange

_LEG_INDEX = {name: i for i, name in enumerate(LEG_FIELDS)}
#: OptionLeg field number → index into LEG_FIELDS (a FieldDescriptor's number is cheaper to read than its name).
_LEG_SLOT: list[int] = [0] * (1 + max(f.number for f in market_pb2.OptionLeg.DESCRIPTOR.fields))
for _name, _i in _LEG_INDEX.items():
    _LEG_SLOT[market_pb2.OptionLeg.DESCRIPTOR.fields_by_name[_name].number] = _i
_NONE_LEG: list[float | int | None] = [None] * len(LEG_FIELDS)
_DOUBLE = struct.Struct("<d")


@dataclass(slots=True)
class BarUpdateIn:
    """A decoded ``BarUpdate`` (times UTC epoch seconds, ``receive_time`` None when unset); its bars stay protobuf
    until :meth:`bars` converts those of the expiries that are wanted."""

    underlying: str
    sequence: int
    timeframe: int
    bucket_time: int
    underlying_price: float
    pb_bars: Sequence[market_pb2.StrikeBar]
    receive_time: float | None
    commit_time: float | None

    def bars(self, expiries: Container[str] | None = None) -> list[tuple[str, Bar]]:
        """The bars as ``(expiry, Bar)``, only those of ``expiries`` when given."""
        if expiries is None:
            return [bar_from_pb(b) for b in self.pb_bars]
        return [bar_from_pb(b) for b in self.pb_bars if b.expiry in expiries]


def _ts_seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def leg_from_pb(leg: market_pb2.OptionLeg) -> Leg:
    """An OptionLeg as a domain leg tuple (absent fields None)."""
    out = _NONE_LEG.copy()
    slot = _LEG_SLOT
    for fd, v in leg.ListFields():
        out[slot[fd.number]] = v
    return tuple(out)


def bar_from_pb(sb: market_pb2.StrikeBar) -> tuple[str, Bar]:
    """A StrikeBar as ``(expiry, Bar)``; bucket_time truncated to whole seconds."""
    return sb.expiry, Bar(
        sb.strike, sb.bucket_time.seconds, sb.underlying_close, sb.moneyness_level, sb.atm_strike,
        leg_from_pb(sb.call) if sb.HasField("call") else None,
        leg_from_pb(sb.put) if sb.HasField("put") else None,
    )


def bar_update_from_bytes(data: bytes) -> BarUpdateIn:
    """Decode a BarUpdate payload (Redis field ``pb``). Raises ``google.protobuf.message.DecodeError``."""
    u = market_pb2.BarUpdate.FromString(data)
    return BarUpdateIn(
        u.underlying, u.sequence, u.timeframe or 1, u.bucket_time.seconds, u.underlying_price, u.bars,
        _ts_seconds(u.first_receive_time) if u.HasField("first_receive_time") else None,
        _ts_seconds(u.commit_time) if u.HasField("commit_time") else None,
    )


def distribution_from_pb(resp: query_service_pb2.GetStrikeDistributionResponse) -> Distribution:
    """A GetStrikeDistributionResponse as a domain Distribution."""
    return Distribution(
        resp.underlying, resp.timeframe, resp.bucket_time.seconds, resp.underlying_price,
        [ExpiryBars(e.expiry, e.atm_strike, [bar_from_pb(b)[1] for b in e.bars]) for e in resp.expiries],
    )


def _fill_leg(pb: market_pb2.OptionLeg, leg: Leg) -> None:
    pb.SetInParent()
    for name, v in zip(LEG_FIELDS, leg, strict=True):
        if v is not None:
            setattr(pb, name, v)


def _fill_bar(pb: market_pb2.StrikeBar, bar: Bar, underlying: str, expiry: str, timeframe: int) -> None:
    pb.underlying = underlying
    pb.expiry = expiry
    pb.strike = bar.strike
    pb.timeframe = timeframe  # type: ignore[assignment]
    pb.bucket_time.seconds = bar.bucket_time
    pb.underlying_close = bar.underlying_close
    pb.moneyness_level = bar.moneyness_level
    pb.atm_strike = bar.atm_strike
    if bar.call is not None:
        _fill_leg(pb.call, bar.call)
    if bar.put is not None:
        _fill_leg(pb.put, bar.put)


def distribution_to_pb(dist: Distribution) -> query_service_pb2.GetStrikeDistributionResponse:
    """A domain Distribution as a GetStrikeDistributionResponse (complete StrikeBars)."""
    resp = query_service_pb2.GetStrikeDistributionResponse(
        underlying=dist.underlying, timeframe=dist.timeframe,  # type: ignore[arg-type]
        underlying_price=dist.underlying_price,
    )
    resp.bucket_time.seconds = dist.bucket_time
    for e in dist.expiries:
        pe = resp.expiries.add(expiry=e.expiry, atm_strike=e.atm_strike)
        for bar in e.bars:
            _fill_bar(pe.bars.add(), bar, dist.underlying, e.expiry, dist.timeframe)
    return resp


def _now(ts: Timestamp) -> None:
    ns = time.time_ns()
    ts.seconds, ts.nanos = divmod(ns, 1_000_000_000)


def snapshot_body(dist: Distribution) -> bytes:
    """A SubscribeResponse body (no sequence) carrying the snapshot, send_time now."""
    msg = stream_service_pb2.SubscribeResponse()
    _now(msg.send_time)
    msg.snapshot.distribution.CopyFrom(distribution_to_pb(dist))
    return msg.SerializeToString()


def delta_to_pb(delta: DeltaUpdate) -> stream_service_pb2.Delta:
    """A domain delta as a Delta message.

    Per bar only ``strike`` is always present; ``bucket_time`` / ``underlying_close`` are left out when they equal
    the Delta's (the client takes the Delta's then); ``atm_strike`` + ``moneyness_level`` are sent together when
    either changed (``atm_strike`` present ⇒ ``moneyness_level`` is meaningful, even 0); leg fields only when
    changed (whole bars: all selected fields). ``underlying``, ``expiry`` and ``timeframe`` are left out (known from
    the ExpiryDelta and the subscription).
    """
    d = stream_service_pb2.Delta(underlying_price=delta.underlying_price, conflated=delta.conflated)
    d.bucket_time.seconds = delta.bucket_time
    for e in delta.expiries:
        pe = d.expiries.add(expiry=e.expiry, atm_strike=e.atm_strike)
        if e.removed:
            pe.removed_strikes.extend(sorted(e.removed))
        for s in sorted(e.bars):
            pe.bars.append(_change_pb(e.bars[s], delta.bucket_time, delta.underlying_price))
    return d


def _change_pb(c: StrikeChange, bucket_time: int, price: float) -> market_pb2.StrikeBar:
    pb = market_pb2.StrikeBar(strike=c.strike)
    if c.bucket_time != bucket_time:
        pb.bucket_time.seconds = c.bucket_time
    if c.underlying_close != price:
        pb.underlying_close = c.underlying_close
    if c.atm_strike is not None:
        pb.atm_strike = c.atm_strike
        pb.moneyness_level = c.moneyness_level or 0
    if c.call is not None:
        _fill_leg(pb.call, c.call)
    if c.put is not None:
        _fill_leg(pb.put, c.put)
    return pb


def _ld(field: int, data: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(field << 3 | 2) + varint(len(data)) + data


def _ts_bytes(seconds: int, nanos: int = 0) -> bytes:
    out = b""
    if seconds:
        out += b"\x08" + varint(seconds)
    if nanos:
        out += b"\x10" + varint(nanos)
    return out


def _now_bytes() -> bytes:
    sec, nanos = divmod(time.time_ns(), 1_000_000_000)
    return _ts_bytes(sec, nanos)


def delta_body(delta: DeltaUpdate, shared: bool = True) -> bytes:
    """A SubscribeResponse body (no sequence) carrying the delta, send_time now.

    ``shared``: the delta's StrikeChanges come from one update (same bucket and price for every group), so each
    change's encoded bytes are cached on it and reused by every group that includes it; the message around them is
    written field by field (same bytes protobuf would produce, up to field order). Conflated deltas pass False.
    """
    if not shared:
        msg = stream_service_pb2.SubscribeResponse()
        _now(msg.send_time)
        msg.delta.CopyFrom(delta_to_pb(delta))
        return msg.SerializeToString()
    bt, price = delta.bucket_time, delta.underlying_price
    parts = [_ld(1, _ts_bytes(bt)), b"\x11" + _DOUBLE.pack(price)]
    for e in delta.expiries:
        ep = [_ld(1, e.expiry.encode()), b"\x11" + _DOUBLE.pack(e.atm_strike)]
        for s in sorted(e.bars):
            c = e.bars[s]
            w = c.wire
            if w is None:
                w = c.wire = _ld(3, _change_pb(c, bt, price).SerializeToString())
            ep.append(w)
        if e.removed:
            rs = sorted(e.removed)
            ep.append(_ld(4, struct.pack(f"<{len(rs)}d", *rs)))
        parts.append(_ld(3, b"".join(ep)))
    if delta.conflated:
        parts.append(b"\x20" + varint(delta.conflated))
    return _ld(2, _now_bytes()) + _ld(4, b"".join(parts))




def sequence_prefix(seq: int) -> bytes:
    """The encoded ``sequence`` field (number 1, varint) to put before a shared body; empty for 0."""
    return b"\x08" + varint(seq) if seq > 0 else b""


def heartbeat_message(seq: int) -> bytes:
    """A complete heartbeat SubscribeResponse for a subscriber whose last Snapshot/Delta was ``seq``."""
    msg = stream_service_pb2.SubscribeResponse(sequence=seq)
    _now(msg.send_time)
    msg.heartbeat.last_sequence = seq
    return msg.SerializeToString()


def error_message(seq: int, code: str, message: str, violations: list[tuple[str, str]] = ()) -> bytes:  # type: ignore[assignment]
    """A complete StreamError SubscribeResponse (``code``: gRPC status name; violations as "field: description")."""
    msg = stream_service_pb2.SubscribeResponse(sequence=seq)
    _now(msg.send_time)
    msg.error.code = code
    msg.error.message = message
    msg.error.field_violations.extend(f"{f}: {d}" for f, d in violations)
    return msg.SerializeToString()


def end_message(seq: int, reason: str) -> bytes:
    """A complete EndOfStream SubscribeResponse."""
    msg = stream_service_pb2.SubscribeResponse(sequence=seq)
    _now(msg.send_time)
    msg.end.reason = reason
    return msg.SerializeToString()
