"""Bar building (pure domain, services/ingest/domain/bars.py): OHLC, close-time values, day volume high-water mark,
per-bar volume and ΔOI across calls, late ticks, sessions, listed strikes / ATM, underlying carry-forward."""

from __future__ import annotations

from services.ingest.domain import bars as B

T0 = 1_786_940_580  # 2026-08-18 05:03:00 UTC (10:33 IST), a minute boundary
US = 1_000_000


def _tick(bb: B.BarBuilder, sec: float, ltp: float, vol: int = 0, oi: int = 0, *, strike: float = 24200.0,
          call: bool = True, iv: float | None = 10.0) -> None:
    bb.add_option("NIFTY", "2026-08-25", strike, call, int(sec * US), ltp, vol, oi, iv, 0.5, 0.001, -1.0, 10.0)


def _legs(bb: B.BarBuilder, call: bool = True) -> dict[int, list[float]]:
    return bb.legs[("NIFTY", "2026-08-25", 24200.0, call)]


def test_ohlc_by_exchange_time_not_arrival_order() -> None:
    bb = B.BarBuilder()
    _tick(bb, T0 + 30, 101.0, oi=5)
    _tick(bb, T0 + 10, 100.0, oi=4)  # earlier tick arriving later: becomes the open
    _tick(bb, T0 + 50, 99.0, oi=6)
    _tick(bb, T0 + 40, 105.0, oi=7)
    a = _legs(bb)[T0]
    assert (a[B.OPEN], a[B.HIGH], a[B.LOW], a[B.CLOSE]) == (100.0, 105.0, 99.0, 99.0)
    assert a[B.OPEN_US] == (T0 + 10) * US and a[B.CLOSE_US] == (T0 + 50) * US
    assert a[B.OI] == 6  # OI at the latest tick


def test_ticks_split_into_minute_buckets_and_legs() -> None:
    bb = B.BarBuilder()
    _tick(bb, T0 + 59.999, 100.0)
    _tick(bb, T0 + 60, 101.0)
    _tick(bb, T0 + 1, 50.0, call=False)
    assert sorted(_legs(bb)) == [T0, T0 + 60]
    assert sorted(_legs(bb, call=False)) == [T0]
    assert bb.first_tick_us["NIFTY"] == (T0 + 1) * US
    assert bb.dates() == {T0 // B.DAY_S}


def test_volume_and_oi_change_chain_with_downward_restatement() -> None:
    bb = B.BarBuilder()
    _tick(bb, T0 + 5, 100.0, vol=1000, oi=50)
    _tick(bb, T0 + 65, 100.0, vol=1200, oi=55)
    _tick(bb, T0 + 125, 100.0, vol=1150, oi=53)  # feed restates volume down
    _tick(bb, T0 + 185, 100.0, vol=1300, oi=60)
    bars, state = B.derive_leg(_legs(bb), None)
    got = [(bars[b].day_volume, bars[b].volume, bars[b].oi_change) for b in sorted(bars)]
    # first bar of the session: volume = whole day volume, ΔOI = 0; restatement counts 0 and is not re-counted.
    assert got == [(1000, 1000, 0), (1200, 200, 5), (1200, 0, -2), (1300, 100, 7)]
    assert state is not None
    assert (state.bucket, state.oi, state.day_volume) == (T0 + 180, 60, 1300)
    assert (state.prior_bucket, state.prior_oi, state.prior_day_volume) == (T0 + 120, 53, 1200)


def test_same_bucket_over_two_calls_merges_with_committed_state() -> None:
    bb1 = B.BarBuilder()
    _tick(bb1, T0 + 5, 100.0, vol=1000, oi=50)
    _tick(bb1, T0 + 65, 100.0, vol=1200, oi=55)
    _, st = B.derive_leg(_legs(bb1), None)
    bb2 = B.BarBuilder()
    _tick(bb2, T0 + 90, 100.0, vol=1250, oi=58)  # same minute as the last committed bar
    bars, st2 = B.derive_leg(_legs(bb2), st)
    lb = bars[T0 + 60]
    assert not lb.late
    assert (lb.day_volume, lb.volume, lb.oi_change) == (1250, 250, 8)  # against the prior bar (T0)
    assert st2 is not None and (st2.bucket, st2.close_us, st2.oi, st2.prior_bucket) == (T0 + 60, (T0 + 90) * US,
                                                                                         58, T0)
    # An older tick of the same minute: close values stay with the committed later tick.
    bb3 = B.BarBuilder()
    _tick(bb3, T0 + 70, 100.0, vol=1100, oi=51)
    bars3, st3 = B.derive_leg(_legs(bb3), st2)
    assert (bars3[T0 + 60].oi_change, bars3[T0 + 60].day_volume, bars3[T0 + 60].volume) == (8, 1250, 250)
    assert st3 == st2


def test_late_bucket_is_left_to_sql_recompute() -> None:
    bb = B.BarBuilder()
    _tick(bb, T0 + 5, 100.0, vol=1000, oi=50)
    _tick(bb, T0 + 125, 100.0, vol=1200, oi=55)
    _, st = B.derive_leg(_legs(bb), None)
    late = B.BarBuilder()
    _tick(late, T0 + 65, 100.0, vol=1100, oi=52)
    bars, st2 = B.derive_leg(_legs(late), st)
    assert bars[T0 + 60].late and bars[T0 + 60].volume is None and bars[T0 + 60].oi_change is None
    assert bars[T0 + 60].day_volume == 1100  # raw max, merged with GREATEST in SQL
    assert st2 == st


def test_new_session_starts_fresh_and_horizon_marks_unknown_sessions_late() -> None:
    bb = B.BarBuilder()
    _tick(bb, T0 + 5, 100.0, vol=1000, oi=50)
    _, st = B.derive_leg(_legs(bb), None)
    nxt = B.BarBuilder()
    _tick(nxt, T0 + B.DAY_S + 5, 100.0, vol=30, oi=70)
    bars, _ = B.derive_leg(_legs(nxt), st)
    lb = bars[T0 + B.DAY_S]
    assert (lb.day_volume, lb.volume, lb.oi_change) == (30, 30, 0)
    # Without a state, a bucket of a session older than the horizon is late (its session is not in memory).
    bars2, st2 = B.derive_leg(_legs(bb), None, horizon_s=(T0 // B.DAY_S + 1) * B.DAY_S)
    assert bars2[T0].late and st2 is None


def test_underlying_bars_and_carry_forward() -> None:
    bb = B.BarBuilder()
    bb.add_underlying("NIFTY", (T0 + 10) * US, 24200.0)
    bb.add_underlying("NIFTY", (T0 + 50) * US, 24210.0)
    bb.add_underlying("NIFTY", (T0 + 20) * US, 24190.0, is_tick=False)
    assert bb.underlying["NIFTY"][T0] == [(T0 + 10) * US, 24200.0, 24210.0, 24190.0, (T0 + 50) * US, 24210.0]
    assert bb.first_tick_us["NIFTY"] == (T0 + 10) * US
    closes = B.UnderlyingCloses()
    closes.merge("NIFTY", T0, (T0 + 50) * US, 24210.0)
    closes.merge("NIFTY", T0 + 120, (T0 + 130) * US, 24220.0)
    assert closes.price_at("NIFTY", T0 - 60) is None
    assert closes.price_at("NIFTY", T0 + 60) == 24210.0  # carried forward
    assert closes.price_at("NIFTY", T0 + 180) == 24220.0
    copy = closes.copy_for(["NIFTY"])
    copy.merge("NIFTY", T0 + 60, (T0 + 61) * US, 1.0)
    assert closes.price_at("NIFTY", T0 + 60) == 24210.0 and copy.price_at("NIFTY", T0 + 60) == 1.0
    closes.merge("NIFTY", T0, (T0 + 40) * US, 0.5)  # an older close of the same minute does not win
    assert closes.price_at("NIFTY", T0) == 24210.0


def test_listed_strikes_atm_is_deterministic_in_time() -> None:
    ls = B.ListedStrikes()
    ls.observe("NIFTY", "2026-08-25", 24200.0, T0)
    ls.observe("NIFTY", "2026-08-25", 24300.0, T0)
    ls.observe("NIFTY", "2026-08-25", 24250.0, T0 + 120)  # listed only from T0+120
    assert ls.atm("NIFTY", "2026-08-25", T0 + 60, 24240.0) == 24200.0
    assert ls.atm("NIFTY", "2026-08-25", T0 + 120, 24240.0) == 24250.0
    assert ls.atm("NIFTY", "2026-08-25", T0 + 60, 24250.0) == 24200.0  # tie → lower strike
    assert ls.atm("NIFTY", "2026-08-25", T0, None) is None
    assert ls.atm("NIFTY", "2026-09-01", T0, 24200.0) is None
    assert B.moneyness(24300.0, 24200.0, 50.0) == 2 and B.moneyness(24300.0, None, 50.0) is None
    ls.observe("NIFTY", "2026-08-25", 24250.0, T0 + 300)  # a later sighting does not move the first one
    assert ls.listed("NIFTY", "2026-08-25", T0 + 120) == [24200.0, 24250.0, 24300.0]


def test_underlying_closes_prune_keeps_newer_buckets() -> None:
    closes = B.UnderlyingCloses()
    for i in range(5):
        closes.merge("NIFTY", T0 + 60 * i, (T0 + 60 * i) * US, 100.0 + i)
    closes.prune_before(T0 + 120)
    assert closes.price_at("NIFTY", T0 + 60) is None
    assert closes.price_at("NIFTY", T0 + 240) == 104.0
    assert sorted(closes.bars["NIFTY"]) == [T0 + 120, T0 + 180, T0 + 240]
