"""The synthetic session: a plausible chain (grid, expiries, no-arbitrage floor, smile, OI/volume) and determinism."""

from __future__ import annotations

import itertools
from collections import defaultdict
from datetime import UTC, date, datetime

import pytest
from optmon.v1 import market_pb2

from services.common.domain.moneyness import on_grid
from services.common.settings import DEFAULT_STRIKE_STEPS
from services.replay.synthetic import expiries_for, synthetic_session

DAY = date(2026, 8, 17)  # a Monday: NIFTY's weekly expiry is the next day
CALL = market_pb2.OPTION_TYPE_CALL


@pytest.fixture(scope="module")
def session() -> list:  # type: ignore[type-arg]
    return list(synthetic_session(day=DAY, minutes=30, seed=7))


def test_shape_and_time_order(session: list) -> None:  # type: ignore[type-arg]
    assert len(session) == 4 * 30
    assert [s.underlying for s in session[:4]] == ["NIFTY", "BANKNIFTY", "FINNIFTY", "MIDCPNIFTY"]
    assert session[0].time == datetime(2026, 8, 17, 3, 45, tzinfo=UTC)  # 09:15 IST
    assert session[-1].time == datetime(2026, 8, 17, 4, 14, tzinfo=UTC)
    assert all(a.time <= b.time for a, b in itertools.pairwise(session))
    for s in session:
        assert len(s.batch.underlying_ticks) == 1
        u = s.batch.underlying_ticks[0]
        assert u.underlying == s.underlying and u.price > 0
        assert u.exchange_time.ToDatetime(tzinfo=UTC) == s.time
        assert len({t.expiry for t in s.batch.option_ticks}) == 4


def test_expiries() -> None:
    assert [d.isoformat() for d in expiries_for("NIFTY", DAY)] == [
        "2026-08-18", "2026-08-25", "2026-09-01", "2026-09-08"]
    assert [d.isoformat() for d in expiries_for("BANKNIFTY", DAY)] == [
        "2026-08-25", "2026-09-29", "2026-10-27", "2026-11-24"]


def test_prices_grid_and_no_arbitrage_floor(session: list) -> None:  # type: ignore[type-arg]
    for s in session:
        spot = s.batch.underlying_ticks[0].price
        step = DEFAULT_STRIKE_STEPS[s.underlying]
        for t in s.batch.option_ticks:
            assert on_grid(t.strike, step)
            intrinsic = max(0.0, (spot - t.strike) if t.option_type == CALL else (t.strike - spot))
            assert t.ltp >= intrinsic - 1e-9 and t.ltp >= 0.05
            assert abs(t.ltp * 20 - round(t.ltp * 20)) < 1e-6  # ₹0.05 tick
            assert 0 < t.iv <= 500 and t.oi >= 0 and t.volume >= 0
            assert t.underlying_price == spot
            assert (0 <= t.delta <= 1) if t.option_type == CALL else (-1 <= t.delta <= 0)


def test_smile_wings_above_atm(session: list) -> None:  # type: ignore[type-arg]
    for s in session[-4:]:
        spot = s.batch.underlying_ticks[0].price
        by_exp: dict[str, list] = defaultdict(list)  # type: ignore[type-arg]
        for t in s.batch.option_ticks:
            if t.option_type == CALL:
                by_exp[t.expiry].append(t)
        for i, (_, ticks) in enumerate(sorted(by_exp.items())):
            ticks.sort(key=lambda t: t.strike)
            atm = min(ticks, key=lambda t: abs(t.strike - spot))
            assert ticks[0].iv > atm.iv  # put wing above ATM on every expiry
            assert ticks[0].iv > ticks[-1].iv  # skew: low strikes richer
            if i == 0:  # the nearest expiry spans many σ√T: the call wing rises above ATM too (smile)
                assert ticks[-1].iv > atm.iv


def test_oi_and_cumulative_volume_evolve(session: list) -> None:  # type: ignore[type-arg]
    last: dict[tuple[str, str, float, int], tuple[int, int]] = {}
    oi_changed = vol_grew = 0
    for s in session:
        for t in s.batch.option_ticks:
            key = (t.underlying, t.expiry, t.strike, t.option_type)
            if key in last:
                oi0, v0 = last[key]
                assert t.volume >= v0  # cumulative day volume
                oi_changed += t.oi != oi0
                vol_grew += t.volume > v0
            last[key] = (t.oi, t.volume)
    assert oi_changed > 1000 and vol_grew > 1000


def test_deterministic_per_seed() -> None:
    a = [s.batch.SerializeToString() for s in synthetic_session(["NIFTY"], day=DAY, minutes=3, seed=1)]
    b = [s.batch.SerializeToString() for s in synthetic_session(["NIFTY"], day=DAY, minutes=3, seed=1)]
    c = [s.batch.SerializeToString() for s in synthetic_session(["NIFTY"], day=DAY, minutes=3, seed=2)]
    assert a == b and a != c


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        list(synthetic_session(["NIFTY"], day=DAY, minutes=-1))
    with pytest.raises(ValueError):
        list(synthetic_session([], day=DAY, minutes=1))
