"""Fixed-point Delta changes (services/stream/domain/fixed.py, codec, ReferenceClient): exact on the real 18-Aug-2026
NIFTY day, off-grid values fall back to doubles exactly, and conflated (merged) deltas are relative to what the
lagging client holds. Exactness is checked bit for bit (deterministic serialization), not only with ``==`` (which
takes −0.0 for 0.0)."""

from __future__ import annotations

import csv
import gzip
import math
import random
import struct
from collections import defaultdict
from functools import partial
from pathlib import Path

import pytest
from optmon.v1 import query_service_pb2, stream_service_pb2

from services.common.domain.moneyness import atm_strike, moneyness_level
from services.common.settings import DEFAULT_STRIKE_STEPS
from services.stream import codec
from services.stream.domain.conflation import merge
from services.stream.domain.filters import normalize
from services.stream.domain.fixed import LEG_SCALES, apply_change, fixed_change, leg_changes, on_grid, pack_leg
from services.stream.domain.model import INDICATOR_FIELDS, LEG_FIELDS, Bar, Leg, field_mask, project_bar
from services.stream.domain.window import BarDiff, Book, ChangeCache, DeltaUpdate, GroupView, StrikeChange, full_change
from services.stream.testing import ReferenceClient

U = "NIFTY"
STEP = 50.0
T0 = 1_787_038_380  # 2026-08-18 10:43 IST
CALL_BIT, PUT_BIT = 1, 1 + len(LEG_FIELDS)


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _norm(**kw):  # type: ignore[no-untyped-def]
    args = dict(underlying=U, timeframe=0, expiries=[], strikes_around_atm=0, strike_min=0.0, strike_max=0.0,
                indicators=[], max_updates_per_second=0.0, last_sequence=0, strike_steps=dict(DEFAULT_STRIKE_STEPS))
    args.update(kw)
    return normalize(**args)[0]


def _resp(seq: int, body: bytes) -> stream_service_pb2.SubscribeResponse:
    return stream_service_pb2.SubscribeResponse.FromString(codec.sequence_prefix(seq) + body)


def _same(a: query_service_pb2.GetStrikeDistributionResponse, b: query_service_pb2.GetStrikeDistributionResponse
          ) -> bool:
    """Equal value for value and bit for bit."""
    return a == b and a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


# ---------------------------------------------------------------------------------------------------------------
# the grid itself


def test_on_grid_and_change_round_trip_bit_for_bit() -> None:
    rnd = random.Random(18)
    for i, scale in enumerate(LEG_SCALES):
        if scale is None:
            continue
        for _ in range(2000):
            if scale == 1:
                held, new = rnd.randrange(0, 10**7), rnd.randrange(0, 10**7)
            else:
                lim = 10**7 if i < 4 else 10**4  # prices up to ₹500,000; IV / Greeks smaller
                held, new = rnd.randrange(-lim, lim) / scale, rnd.randrange(-lim, lim) / scale
            ch = fixed_change(held, new, scale)
            assert ch is not None, (LEG_FIELDS[i], held, new)
            got = apply_change(held, ch, scale)
            assert type(got) is type(new) and _bits(float(got)) == _bits(float(new)), (LEG_FIELDS[i], held, new)


@pytest.mark.parametrize("value, scale", [
    (0.1 + 0.2, 100), (1 / 3, 100), (100.013, 20), (100.01, 20), (0.00001, 10_000), (1e-7, 1_000_000),
    (-0.0, 10_000), (math.nan, 100), (math.inf, 20), (-math.inf, 1), (1e300, 100), (2.0**50, 1), (2**50, 1),
])
def test_off_grid_values(value: float, scale: int) -> None:
    assert on_grid(value, scale) is None
    assert fixed_change(value, 1.0, scale) is None and fixed_change(1.0, value, scale) is None


def test_change_limits() -> None:
    assert fixed_change(0, 2**31 - 1, 1) == 2**31 - 1
    assert fixed_change(0, 2**31, 1) is None  # beyond a sint32: sent as int64 in a StrikeBar
    assert fixed_change(None, 5, 1) is None  # nothing held
    assert fixed_change(1.0, 2.0, None) is None  # oi_change_percent: never in fixed point
    assert on_grid(24_212.85, 20) == 484_257 and on_grid(75.38, 100) == 7538 and on_grid(2e-06, 1_000_000) == 2


def _random_value(rnd: random.Random, i: int) -> float | int | None:
    scale = LEG_SCALES[i] or 100
    if rnd.random() < 0.3:
        return rnd.choice([None, -0.0, 0.0, math.nan, 1 / 3, 2**40, 2**50, 1e300, 7, -12])
    n = rnd.randrange(-10**6, 10**6)
    return n if scale == 1 else n / scale


def test_pack_leg_follows_fixed_change_field_by_field() -> None:
    rnd = random.Random(7)
    for _ in range(3000):
        new = tuple(_random_value(rnd, i) for i in range(len(LEG_FIELDS)))
        held = tuple(_random_value(rnd, i) for i in range(len(LEG_FIELDS)))
        mask, changes, rest = pack_leg(new, held)
        want_changes = []
        for i, (v, h) in enumerate(zip(new, held, strict=True)):
            ch = fixed_change(h, v, LEG_SCALES[i]) if v is not None else None
            assert bool(mask >> i & 1) == (ch is not None), (LEG_FIELDS[i], v, h)
            if ch is not None:
                want_changes.append(ch)
            assert (rest[i] if rest else None) is (v if ch is None else None), (LEG_FIELDS[i], v, h)
        assert changes == want_changes


def test_pack_leg_with_shared_leg_changes_equals_pack_leg_alone() -> None:
    """The codec packs each indicator set's change with the fixed-point changes computed once from the whole legs
    (``leg_changes``); the result must be what packing that change on its own gives."""
    rnd = random.Random(11)
    n = len(LEG_FIELDS)
    for _ in range(3000):
        old = tuple(_random_value(rnd, i) for i in range(n))
        new = tuple(_random_value(rnd, i) if rnd.random() < 0.6 else old[i] for i in range(n))
        changed = [i for i in range(n) if not old[i] == new[i]]
        shared = leg_changes(new, old, changed)
        keep = {i for i in changed if rnd.random() < 0.5 and new[i] is not None}
        part = tuple(new[i] if i in keep else None for i in range(n))
        held = tuple(old[i] if i in keep else None for i in range(n))
        assert pack_leg(part, held, shared) == pack_leg(part, held)


def _diff_leg(old: Leg | None, new: Leg | None) -> tuple[bool, Leg | None, Leg | None]:
    """Reference: (needs replacement, partial leg of changed values or None when unchanged, their held values)."""
    if old == new:
        return False, None, None
    if old is None or new is None:
        return True, None, None
    out: list[float | int | None] = []
    held: list[float | int | None] = []
    for o, n in zip(old, new, strict=True):
        if o == n:
            out.append(None)
            held.append(None)
        elif n is None:
            return True, None, None
        else:
            out.append(n)
            held.append(o)
    return False, tuple(out), tuple(held)


def diff_bar(old: Bar, new: Bar) -> StrikeChange | None:
    """Reference definition of a strike's change between two bars restricted alike (None when equal): what the
    client must apply to go from ``old`` to ``new`` (docs/stream.md, delta semantics)."""
    if old == new:
        return None
    rc, call, call_held = _diff_leg(old.call, new.call)
    rp, put, put_held = _diff_leg(old.put, new.put)
    if rc or rp:
        return full_change(new)
    moved = old.atm_strike != new.atm_strike or old.moneyness_level != new.moneyness_level
    return StrikeChange(new.strike, False, new.bucket_time, new.underlying_close,
                        new.atm_strike if moved else None, new.moneyness_level if moved else None, call, put,
                        call_held, put_held)


def test_bar_diff_projects_to_what_diffing_the_restricted_bars_gives() -> None:
    """One whole-bar diff per strike and update serves every indicator set: for random bar pairs (fields changed,
    became absent, NaN, legs appearing or vanishing, ATM moves) and every indicator set, ``BarDiff.project`` must
    equal ``diff_bar`` of the two bars restricted to the set, field for field."""
    rnd = random.Random(5)
    n = len(LEG_FIELDS)
    sets = [(i,) for i in INDICATOR_FIELDS] + [(1, 7, 8), (2, 7), (1, 2, 3, 4, 5, 6), tuple(INDICATOR_FIELDS)]

    def leg(base: tuple[float | int | None, ...] | None) -> tuple[float | int | None, ...] | None:
        if rnd.random() < 0.05:
            return None
        if base is None:
            return tuple(_random_value(rnd, i) for i in range(n))
        return tuple(_random_value(rnd, i) if rnd.random() < 0.3 else base[i] for i in range(n))

    seen = {"none": 0, "replace": 0, "change": 0}
    for _ in range(4000):
        call, put = leg(None), leg(None)
        old = Bar(24000.0, 60, 24010.5, 0, 24000.0, call, put)
        moved = rnd.random() < 0.2
        new = Bar(24000.0, 60 if rnd.random() < 0.8 else 120, 24010.5 if rnd.random() < 0.7 else 24011.0,
                  1 if moved else 0, 23950.0 if moved else 24000.0,
                  leg(call) if rnd.random() < 0.9 else call, leg(put) if rnd.random() < 0.9 else put)
        d = BarDiff.of(old, new)
        for inds in sets:
            mask = field_mask(inds)
            full = all(mask)
            want = diff_bar(project_bar(old, mask, full), project_bar(new, mask, full))
            if d is None:
                assert want is None
                continue
            replace, got = d.project(sum(1 << i for i, m in enumerate(mask) if m))
            if replace:
                got = full_change(project_bar(new, mask, full))
            seen["none" if want is None else "replace" if want.full else "change"] += 1
            if want is None or got is None:
                assert want is got, (inds, old, new)
                continue
            fields = ("strike", "full", "bucket_time", "underlying_close", "atm_strike", "moneyness_level", "call",
                      "put", "call_held", "put_held")
            # NaN compares unequal: compare reprs
            assert [repr(getattr(got, f)) for f in fields] == [repr(getattr(want, f)) for f in fields], inds
    assert min(seen.values()) > 100, seen


# ---------------------------------------------------------------------------------------------------------------
# the real day


def _real_minutes(path: Path, n: int) -> list[tuple[int, float, list[tuple[str, Bar]]]]:
    """The first ``n`` minutes of the real day as (bucket_time, spot, bars): O = H = L = C = LTP, IV and Greeks as
    published, OI, ΔOI and bar volume from the previous minute, ATM per expiry from that minute's strikes."""
    rows: dict[str, list[dict[str, str]]] = defaultdict(list)
    with gzip.open(path, "rt", newline="") as f:
        for r in csv.DictReader(f):
            if len(rows) == n and r["ts_ist"] not in rows:
                break
            rows[r["ts_ist"]].append(r)
    prev: dict[tuple[str, float, str], tuple[int, int]] = {}
    out = []
    for k, ts in enumerate(sorted(rows)):
        chain: dict[tuple[str, float], dict[str, tuple[float | int | None, ...]]] = defaultdict(dict)
        spot = float(rows[ts][0]["spot"])
        for r in rows[ts]:
            e, s, side = r["expiry"], float(r["strike"]), r["option_type"]
            oi, vol = int(float(r["oi"])), int(float(r["volume"]))
            p_oi, p_vol = prev.get((e, s, side), (oi, vol))
            prev[(e, s, side)] = (oi, vol)
            ltp = float(r["ltp"])
            chain[(e, s)][side] = (ltp, ltp, ltp, ltp, float(r["iv"]), float(r["delta"]), float(r["gamma"]),
                                   float(r["theta"]), float(r["vega"]), oi, oi - p_oi, None, max(0, vol - p_vol))
        listed: dict[str, list[float]] = defaultdict(list)
        for e, s in sorted(chain):
            listed[e].append(s)
        bt = T0 + 60 * k
        bars = []
        for (e, s), legs in sorted(chain.items()):
            atm = atm_strike(listed[e], spot)
            bars.append((e, Bar(s, bt, spot, moneyness_level(s, atm, STEP), atm, legs.get("CE"), legs.get("PE"))))
        out.append((bt, spot, bars))
    return out


@pytest.fixture(scope="module")
def real_minutes(nifty_1min_csv: Path) -> list[tuple[int, float, list[tuple[str, Bar]]]]:
    return _real_minutes(nifty_1min_csv, 60)


def _views(book: Book) -> list[GroupView]:
    expiries = sorted(book.bars)
    filters = [
        _norm(expiries=expiries[:3]),  # all indicators, ATM±10
        _norm(expiries=[expiries[1]], strikes_around_atm=3, indicators=[7, 2]),
        _norm(expiries=expiries[:2], strikes_around_atm=15, indicators=[1, 2, 3, 4, 5, 6]),
        _norm(expiries=[expiries[2]], strike_min=24000, strike_max=24500, indicators=[1, 8, 9]),
    ]
    views = []
    for f in filters:
        v = GroupView(f, list(f.expiries))
        v.rebuild(book)
        views.append(v)
    return views


def _first_minute(real_minutes, n_clients: int = 1):  # type: ignore[no-untyped-def]
    """Book and views at the first real minute, and ``n_clients`` reference clients per view holding its snapshot."""
    bt, spot, bars = real_minutes[0]
    book = Book(STEP, 300)
    book.apply(bars, bt, spot)
    views = _views(book)
    clients = [[ReferenceClient(U) for _ in views] for _ in range(n_clients)]
    for i, v in enumerate(views):
        snap = _resp(1, codec.snapshot_body(v.snapshot(book, U)))
        for cs in clients:
            cs[i].apply(snap)
    return book, views, clients


def test_real_day_reconstructs_bit_for_bit_and_mostly_in_fixed_point(real_minutes) -> None:  # type: ignore[no-untyped-def]
    book, views, (clients,) = _first_minute(real_minutes)
    packed = doubles = fixed_bytes = delta_bytes = 0
    seq = 1
    for bt, spot, bars in real_minutes[1:]:
        touched = book.apply(bars, bt, spot)
        cache: ChangeCache = {}
        seq += 1
        for v, c in zip(views, clients, strict=True):
            d = v.apply(book, touched, cache)
            assert d is not None
            body = codec.delta_body(d)
            msg = _resp(seq, body)
            assert msg.delta == _resp(seq, codec.delta_body(d, shared=False)).delta  # cached parts = fresh ones
            held_before = {e: set(bars) for e, bars in c.state.items()}
            c.apply(msg)
            assert _same(c.distribution(), codec.distribution_to_pb(v.snapshot(book, U))), (bt, v.filter)
            delta_bytes += len(body)
            for e in msg.delta.expiries:
                packed += len(e.changes.values)
                fixed_bytes += e.changes.ByteSize()
                merged = held_before[e.expiry] - set(e.removed_strikes)  # bars merged into held ones
                doubles += sum(len(b.call.ListFields()) + len(b.put.ListFields()) for b in e.bars if b.strike in merged)
    # NSE's figures are on the grid: changed values of held strikes travel as small integers (doubles only for
    # strikes entering the window), and the fixed-point part is most of the bytes
    assert packed > 20_000
    assert doubles < 0.05 * packed, (doubles, packed)
    assert fixed_bytes > 0.5 * delta_bytes


def test_real_day_lazy_bars_convert_only_what_views_use(real_minutes) -> None:  # type: ignore[no-untyped-def]
    """Fan-out applies BarUpdates with bars converted only when a view uses them (``Book.apply_lazy``). Over the
    real minutes: fewer than half of the bars get converted, every bar the book answers is the newest one received
    (a dict of the latest bar per strike as reference), and no older update's bars stay unconverted."""
    book = Book(STEP, 300)
    made = [0]
    latest: dict[tuple[str, float], Bar] = {}

    def lazily(bars):  # type: ignore[no-untyped-def]
        def make(bar: Bar) -> Bar:
            made[0] += 1
            return bar
        return [(e, b.strike, b.bucket_time, partial(make, b)) for e, b in bars]

    bt0, spot0, bars0 = real_minutes[0]
    book.apply_lazy(lazily(bars0), bt0, spot0)
    latest.update(((e, b.strike), b) for e, b in bars0)
    views = _views(book)
    total = len(bars0)
    for bt, spot, bars in real_minutes[1:]:
        total += len(bars)
        touched = book.apply_lazy(lazily(bars), bt, spot)
        latest.update(((e, b.strike), b) for e, b in bars)
        cache: ChangeCache = {}
        for v in views:
            v.apply(book, touched, cache)
    assert made[0] < total / 2, (made[0], total)
    pending = {(e, s) for e, p in book._pending.items() for s in p}
    assert pending and all(latest[k].bucket_time == real_minutes[-1][0] for k in pending)
    assert all(book.bar(e, s) == b for (e, s), b in latest.items())
    # a strike missing from the next update is converted then (no older update stays referenced)
    e, s0 = next(iter(pending))
    bt, spot, bars = real_minutes[-1]
    book.apply_lazy(lazily([(x, b) for x, b in bars if (x, b.strike) != (e, s0)]), bt + 60, spot)
    assert s0 not in book._pending[e] and book.bars[e][s0].bucket_time == bt


def test_real_day_conflated_delta_is_relative_to_what_the_lagging_client_holds(real_minutes) -> None:  # type: ignore[no-untyped-def]
    book, views, (fast, slow) = _first_minute(real_minutes, 2)
    pending: list[DeltaUpdate | None] = [None] * len(views)
    merged_lags = 0
    rnd = random.Random(5)
    for k, (bt, spot, bars) in enumerate(real_minutes[1:], start=2):
        touched = book.apply(bars, bt, spot)
        cache: ChangeCache = {}
        for i, v in enumerate(views):
            d = v.apply(book, touched, cache)
            assert d is not None
            fast[i].apply(_resp(k, codec.delta_body(d)))
            p = pending[i]
            pending[i] = d if p is None else merge(p, d)
            if rnd.random() < 0.25:  # the slow client catches up with the merged delta now and then
                m = pending[i]
                assert m is not None
                merged_lags += m.conflated
                slow[i].apply(_resp(k, codec.delta_body(m, shared=False)))
                pending[i] = None
                assert _same(slow[i].distribution(), fast[i].distribution()), (bt, v.filter)
    assert merged_lags > 20


# ---------------------------------------------------------------------------------------------------------------
# what does not fit the grid


def _leg(**kw: float | int | None) -> tuple[float | int | None, ...]:
    base: dict[str, float | int | None] = dict(ltp=100.0, open=99.5, high=101.0, low=98.0, iv=14.25, delta=0.5123,
                                               gamma=0.000812, theta=-5.4321, vega=12.3456, oi=1000, oi_change=10,
                                               oi_change_percent=None, volume=50)
    base.update(kw)
    return tuple(base[f] for f in LEG_FIELDS)


def _one_delta(old: list[Bar], new: list[Bar], price: float, old_price: float = 24_210.0
               ) -> tuple[DeltaUpdate, GroupView, Book, ReferenceClient]:
    """A view over ``old`` bars (bucket 60, underlying at ``old_price``), a client that took its snapshot, and the
    delta to ``new`` bars (bucket 120, ``price``), applied by the client and checked bit for bit."""
    book = Book(STEP)
    e = "2026-08-25"
    book.apply([(e, b) for b in old], 60, old_price)
    view = GroupView(_norm(expiries=[e], strikes_around_atm=5), [e])
    view.rebuild(book)
    client = ReferenceClient(U)
    client.apply(_resp(1, codec.snapshot_body(view.snapshot(book, U))))
    d = view.apply(book, book.apply([(e, b) for b in new], 120, price))
    assert d is not None
    client.apply(_resp(2, codec.delta_body(d)))
    assert _same(client.distribution(), codec.distribution_to_pb(view.snapshot(book, U)))
    return d, view, book, client


def test_off_grid_fields_go_as_doubles_in_bars_and_the_rest_in_fixed_point() -> None:
    old = [Bar(24_200.0, 60, 24_210.0, 0, 24_200.0, _leg(), _leg(iv=None)),
           Bar(24_250.0, 60, 24_210.0, 1, 24_200.0, _leg(), _leg())]
    new = [Bar(24_200.0, 120, 24_210.0, 0, 24_200.0,
               _leg(ltp=100.013, iv=1 / 3, delta=-0.0, theta=-5.4322, oi=1001), _leg(iv=15.5, vega=12.3457)),
           Bar(24_250.0, 120, 24_210.0, 1, 24_200.0, _leg(volume=2**40, gamma=0.000813), _leg())]
    d, _, _, _ = _one_delta(old, new, 24_210.0)
    e = codec.delta_to_pb(d).expiries[0]
    assert codec.delta_to_pb(d).strike_step == STEP
    by_strike = {b.strike: b for b in e.bars}
    # 24200: off-grid ltp / iv / −0.0 delta, and a put IV that had no value, as doubles; theta and OI in fixed point
    assert {f.name for f, _ in by_strike[24_200.0].call.ListFields()} == {"ltp", "iv", "delta"}
    assert math.copysign(1.0, by_strike[24_200.0].call.delta) < 0
    assert {f.name for f, _ in by_strike[24_200.0].put.ListFields()} == {"iv"}
    # 24250: a volume change beyond a sint32 as int64, gamma in fixed point
    assert {f.name for f, _ in by_strike[24_250.0].call.ListFields()} == {"volume"}
    assert not by_strike[24_250.0].HasField("put")
    assert list(e.changes.offsets) == [0, 1]
    assert list(e.changes.fields) == [
        1 << (CALL_BIT + 7) | 1 << (CALL_BIT + 9) | 1 << (PUT_BIT + 8),  # theta, oi; put vega
        1 << (CALL_BIT + 6),  # gamma
    ]
    assert list(e.changes.values) == [-1, 1, 1, 1]


def test_strike_off_the_grid_and_header_different_from_the_delta() -> None:
    old = [Bar(24_225.0, 60, 24_210.0, 0, 24_200.0, _leg(), None),  # between grid strikes: always a StrikeBar
           Bar(24_200.0, 60, 24_210.0, 0, 24_200.0, _leg(), None),
           Bar(24_300.0, 60, 24_210.0, 2, 24_200.0, _leg(), None)]
    new = [Bar(24_225.0, 120, 24_210.0, 0, 24_200.0, _leg(ltp=101.0), None),
           Bar(24_200.0, 120, 24_215.5, 0, 24_200.0, _leg(ltp=101.0), None),  # own underlying_close
           Bar(24_300.0, 120, 24_210.0, 2, 24_200.0, _leg(ltp=102.0), None)]
    d, _, _, client = _one_delta(old, new, 24_210.0)
    e = codec.delta_to_pb(d).expiries[0]
    by_strike = {b.strike: b for b in e.bars}
    assert by_strike[24_225.0].call.ltp == 101.0  # the double, as before
    assert by_strike[24_200.0].underlying_close == 24_215.5 and not by_strike[24_200.0].HasField("call")
    assert 24_300.0 not in by_strike
    assert list(e.changes.offsets) == [0, 2] and list(e.changes.values) == [20, 40]  # ₹1 and ₹2 in ₹0.05 ticks
    assert client.state["2026-08-25"][24_200.0].underlying_close == 24_215.5


def test_atm_move_is_a_flag_per_held_strike() -> None:
    legs = _leg()
    old = [Bar(s, 60, 24_210.0, moneyness_level(s, 24_200.0, STEP), 24_200.0, legs, legs)
           for s in (24_100.0, 24_150.0, 24_200.0, 24_250.0, 24_300.0)]
    new = [Bar(24_250.0, 120, 24_240.0, 0, 24_250.0, _leg(ltp=90.0), legs)]  # only the new ATM strike traded
    d, _, _, client = _one_delta(old, new, 24_240.0)
    e = codec.delta_to_pb(d).expiries[0]
    assert e.atm_strike == 24_250.0 and not e.removed_strikes  # nothing entered, nothing left (ATM±5)
    assert list(e.changes.offsets) == [-3, -2, -1, 0, 1]
    assert [f & 1 for f in e.changes.fields] == [1] * 5  # every held bar takes the new ATM and its level
    assert e.changes.fields[3] == 1 | 1 << CALL_BIT  # moved, and the call's LTP
    assert list(e.changes.values) == [-200]  # ₹100 → ₹90 in ₹0.05 ticks
    assert client.state["2026-08-25"][24_100.0].moneyness_level == -3
    # the bars that did not trade this minute keep their own bucket and close: a StrikeBar with just those
    for b in e.bars:
        assert b.strike != 24_250.0
        assert {f.name for f, _ in b.ListFields()} == {"strike", "bucket_time", "underlying_close"}
        assert b.bucket_time.seconds == 60 and b.underlying_close == 24_210.0
    assert len(e.bars) == 4
