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
from functools import partial

from google.protobuf.timestamp_pb2 import Timestamp
from optmon.v1 import market_pb2, query_service_pb2, stream_service_pb2

from services.common.wire import varint
from services.stream.domain.fixed import pack_leg
from services.stream.domain.model import LEG_FIELDS, Bar, Leg
from services.stream.domain.window import (
    DeltaUpdate,
    Distribution,
    ExpiryBars,
    ExpiryChange,
    LazyBar,
    StrikeChange,
)

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
    until a view uses them (:meth:`lazy_bars`)."""

    underlying: str
    sequence: int
    timeframe: int
    bucket_time: int
    underlying_price: float
    pb_bars: Sequence[market_pb2.StrikeBar]
    receive_time: float | None
    commit_time: float | None

    def lazy_bars(self, expiries: Container[str]) -> list[LazyBar]:
        """The bars of ``expiries`` as :data:`~services.stream.domain.window.LazyBar` (converted when used)."""
        return [(b.expiry, b.strike, b.bucket_time.seconds, partial(_bar_only, b))
                for b in self.pb_bars if b.expiry in expiries]


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


def _bar_only(sb: market_pb2.StrikeBar) -> Bar:
    return bar_from_pb(sb)[1]


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


def _fill_leg(pb: market_pb2.OptionLeg, leg: Sequence[float | int | None]) -> None:
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
    """A domain delta as a Delta message (the bytes :func:`delta_body` writes, parsed; see there)."""
    return stream_service_pb2.Delta.FromString(_delta_bytes(delta, cache=False))


def _change_pb(c: StrikeChange, bucket_time: int, price: float) -> market_pb2.StrikeBar:
    """A change as a StrikeBar entry of ``ExpiryDelta.bars``, every changed value as a double / int64."""
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


def _zigzag(n: int) -> bytes:
    """A sint32 / sint64 value (ZigZag varint)."""
    return varint(n << 1 if n >= 0 else (-n << 1) - 1)


#: ZigZag varints of -8192..8191 (one or two bytes: most fixed-point changes and strike offsets).
_ZZ_MIN = -8192
_ZZ = tuple(_zigzag(n) for n in range(_ZZ_MIN, -_ZZ_MIN))


def _zigzags(values: list[int]) -> bytes:
    t, lo = _ZZ, _ZZ_MIN
    return b"".join([t[v - lo] if lo <= v < -lo else _zigzag(v) for v in values])


#: FixedPointChanges.fields bits: ATM moved, first call field, first put field.
_MOVED, _CALL_BIT, _PUT_BIT = 1, 1, 1 + len(LEG_FIELDS)


def _change_parts(c: StrikeChange, bucket_time: int, price: float, atm: float, step: float
                  ) -> tuple[bytes, bytes, bytes, bytes]:
    """(``bars`` entry, ``changes`` offset, fields, values) of one strike; b"" where the strike has none.

    A held strike goes into ``changes`` when it is on the strike grid (``atm + k × step == strike``) with the
    fields whose held and new values are on the fixed-point grid (:func:`services.stream.domain.fixed.pack_leg`);
    what is left (other fields, a bucket_time / underlying_close different from the Delta's, an ATM move that
    ``changes`` cannot express) goes into a ``bars`` entry. Entering / replaced strikes (``full``) and strikes off
    the strike grid go into ``bars`` whole.
    """
    if c.full or not step:
        return _ld(3, _change_pb(c, bucket_time, price).SerializeToString()), b"", b"", b""
    k = round((c.strike - atm) / step)
    if atm + k * step != c.strike or not -2**31 < k < 2**31:
        return _ld(3, _change_pb(c, bucket_time, price).SerializeToString()), b"", b"", b""
    header = c.bucket_time == bucket_time and c.underlying_close == price
    moved = c.atm_strike is not None
    moved_fixed = moved and c.atm_strike == atm and c.moneyness_level == k
    mask = _MOVED if moved_fixed else 0
    values: list[int] = []
    rest_call = rest_put = None
    if c.call is not None:
        m, values, rest_call = pack_leg(c.call, c.call_held, c.call_fixed)
        mask |= m << _CALL_BIT
    if c.put is not None:
        m, v, rest_put = pack_leg(c.put, c.put_held, c.put_fixed)
        mask |= m << _PUT_BIT
        values += v
    bar = b""
    if rest_call is not None or rest_put is not None or not header or (moved and not moved_fixed):
        pb = market_pb2.StrikeBar(strike=c.strike)
        if c.bucket_time != bucket_time:
            pb.bucket_time.seconds = c.bucket_time
        if c.underlying_close != price:
            pb.underlying_close = c.underlying_close
        if moved and not moved_fixed:
            pb.atm_strike = c.atm_strike  # type: ignore[assignment]
            pb.moneyness_level = c.moneyness_level or 0
        if rest_call is not None:
            _fill_leg(pb.call, rest_call)
        if rest_put is not None:
            _fill_leg(pb.put, rest_put)
        bar = _ld(3, pb.SerializeToString())
    if mask or (header and not bar):  # mask 0: the bar only takes the Delta's bucket_time and underlying_price
        return bar, _zigzags([k]), varint(mask), _zigzags(values)
    return bar, b"", b"", b""


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


def _expiry_delta_bytes(e: ExpiryChange, bt: int, price: float, step: float, cache: bool) -> tuple[bytes, bool]:
    """One encoded ``ExpiryDelta`` (field 3 of Delta, with its tag) and whether it carries fixed-point changes.

    ``bars`` entries and ``changes`` columns in strike order (see :func:`_change_parts`), ``removed_strikes``
    ascending. ``cache``: store each change's parts on it and reuse them (one update's changes are shared by every
    group with the same indicators and mean the same bytes for all of them).
    """
    atm = e.atm_strike
    ep = [_ld(1, e.expiry.encode()), b"\x11" + _DOUBLE.pack(atm)]
    offsets: list[bytes] = []
    fields: list[bytes] = []
    values: list[bytes] = []
    for s in sorted(e.bars):
        c = e.bars[s]
        w = c.wire if cache else None
        if w is None:
            w = _change_parts(c, bt, price, atm, step)
            if cache:
                c.wire = w
        if w[0]:
            ep.append(w[0])
        if w[1]:
            offsets.append(w[1])
            fields.append(w[2])
            values.append(w[3])
    if e.removed:
        rs = sorted(e.removed)
        ep.append(_ld(4, struct.pack(f"<{len(rs)}d", *rs)))
    if offsets:
        v = b"".join(values)
        ep.append(_ld(5, _ld(1, b"".join(offsets)) + _ld(2, b"".join(fields)) + (_ld(3, v) if v else b"")))
    return _ld(3, b"".join(ep)), bool(offsets)


def _delta_bytes(delta: DeltaUpdate, cache: bool) -> bytes:
    """The encoded ``Delta``, written field by field (the bytes protobuf would produce, up to field order).

    ``cache``: the delta's ExpiryChanges come from one update (same bucket, price and ATM for every group): each
    expiry's encoding is stored on it and reused by every group that shows the same expiry view
    (:func:`_expiry_delta_bytes`).
    """
    bt, price, step = delta.bucket_time, delta.underlying_price, delta.strike_step
    parts = [_ld(1, _ts_bytes(bt)), b"\x11" + _DOUBLE.pack(price)]
    any_changes = False
    for e in delta.expiries:
        w = e.wire if cache else None
        if w is None:
            w = _expiry_delta_bytes(e, bt, price, step, cache)
            if cache:
                e.wire = w
        parts.append(w[0])
        any_changes = any_changes or w[1]
    if delta.conflated:
        parts.append(b"\x20" + varint(delta.conflated))
    if any_changes:
        parts.append(b"\x29" + _DOUBLE.pack(step))
    return b"".join(parts)


def delta_body(delta: DeltaUpdate, shared: bool = True) -> bytes:
    """A SubscribeResponse body (no sequence) carrying the delta, send_time now.

    ``shared``: the delta's StrikeChanges come from one update (same bucket, price and ATM for every group), so
    each change's encoded parts are cached on it and reused by every group that includes it. Conflated deltas
    pass False (their changes are relative to another bucket and price).
    """
    return _ld(2, _now_bytes()) + _ld(4, _delta_bytes(delta, cache=shared))


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
