"""IV and Greeks (services/ingest/domain/greeks.py) against vollib, on a grid of moneyness × expiry × vol.

vollib conventions (checked in its source): ``vollib.black_scholes_merton.greeks.analytical`` and
``vollib.black.greeks.analytical`` return theta per calendar day (annual / 365) and vega per 1 vol point (× 0.01),
the units of optmon's ``greeks``.
"""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime

import numpy as np
import pytest
from vollib.black import black as v_black
from vollib.black.greeks import analytical as v_black_greeks
from vollib.black.implied_volatility import implied_volatility as v_black_iv
from vollib.black_scholes_merton import black_scholes_merton as v_bsm
from vollib.black_scholes_merton.greeks import analytical as v_bsm_greeks
from vollib.black_scholes_merton.implied_volatility import implied_volatility as v_bsm_iv

from services.ingest.domain import greeks as g

R = 0.065
Q = 0.012
SPOT = 24_000.0
MONEYNESS = np.linspace(0.8, 1.2, 9)  # S/K
EXPIRIES = [1 / 365, 3 / 365, 7 / 365, 30 / 365, 91 / 365, 1.0]  # years
VOLS = [0.05, 0.1, 0.2, 0.35, 0.6, 1.0, 1.5]  # decimal
#: Grid points whose time value is below this many ₹ (per unit, on a 24,000 underlying) are excluded from IV checks:
#: there the price is intrinsic value to ~1e-12 relative and no solver (vollib included) recovers σ.
MIN_TIME_VALUE = 1e-4

GREEK_NAMES = ("delta", "gamma", "theta", "vega")


def _grid() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Strike, T, σ, is_call over the full grid (S/K × T × σ × CE/PE)."""
    rows = list(itertools.product(MONEYNESS, EXPIRIES, VOLS, (True, False)))
    m, t, s, c = (np.array(col) for col in zip(*rows, strict=True))
    return SPOT / m, t.astype(float), s.astype(float), c.astype(bool)


def _flag(is_call: bool) -> str:
    return "c" if is_call else "p"


def test_bsm_iv_matches_vollib_and_true_sigma_on_grid() -> None:
    strike, t, sigma, call = _grid()
    price = np.array(
        [v_bsm(_flag(c), SPOT, k, tt, R, s, Q) for k, tt, s, c in zip(strike, t, sigma, call, strict=True)]
    )
    w = np.where(call, 1.0, -1.0)
    intrinsic = np.maximum(w * (SPOT * np.exp(-Q * t) - strike * np.exp(-R * t)), 0.0)
    keep = price - intrinsic >= MIN_TIME_VALUE
    assert keep.sum() > 0.7 * keep.size  # the rest are ±20 % strikes at low vol / 1-3 days: worth 0 or intrinsic

    iv = g.implied_vol(price[keep], SPOT, strike[keep], t[keep], call[keep], R, Q)
    ref = np.array(
        [
            v_bsm_iv(p, SPOT, k, tt, R, Q, _flag(c))
            for p, k, tt, c in zip(price[keep], strike[keep], t[keep], call[keep], strict=True)
        ]
    )
    assert not np.isnan(iv).any()
    assert np.max(np.abs(iv - ref)) <= 1e-4
    # Against the σ that generated the price: the solver's own accuracy target |ΔIV| ≤ 1e-6.
    assert np.max(np.abs(iv - sigma[keep])) <= 1e-6


def test_black76_iv_matches_vollib_on_grid() -> None:
    strike, t, sigma, call = _grid()
    fut = SPOT * np.exp(R * t)  # a futures price per expiry
    price = np.array(
        [v_black(_flag(c), f, k, tt, R, s) for f, k, tt, s, c in zip(fut, strike, t, sigma, call, strict=True)]
    )
    w = np.where(call, 1.0, -1.0)
    keep = price - np.exp(-R * t) * np.maximum(w * (fut - strike), 0.0) >= MIN_TIME_VALUE
    iv = g.implied_vol(price[keep], np.nan, strike[keep], t[keep], call[keep], R, 0.0, futures=fut[keep])
    ref = np.array(
        [
            v_black_iv(p, f, k, R, tt, _flag(c))
            for p, f, k, tt, c in zip(price[keep], fut[keep], strike[keep], t[keep], call[keep], strict=True)
        ]
    )
    assert not np.isnan(iv).any()
    assert np.max(np.abs(iv - ref)) <= 1e-4
    assert np.max(np.abs(iv - sigma[keep])) <= 1e-6


def _assert_close(ours: np.ndarray, ref: np.ndarray, name: str) -> None:
    """Greeks agree to 1e-9 relative (1e-12 absolute, for values that underflow towards 0)."""
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12, err_msg=name)


def test_bsm_greeks_match_vollib_analytical_units() -> None:
    strike, t, sigma, call = _grid()
    ours = g.greeks(SPOT, strike, t, sigma, call, R, Q, published_precision=False)
    for name in GREEK_NAMES:
        fn = getattr(v_bsm_greeks, name)
        ref = np.array([fn(_flag(c), SPOT, k, tt, R, s, Q) for k, tt, s, c in zip(strike, t, sigma, call, strict=True)])
        _assert_close(ours[name], ref, name)


def test_black76_greeks_match_vollib_analytical_units() -> None:
    strike, t, sigma, call = _grid()
    fut = SPOT * np.exp(R * t) * 1.001
    ours = g.greeks(np.nan, strike, t, sigma, call, R, 0.0, futures=fut, published_precision=False)
    for name in GREEK_NAMES:
        fn = getattr(v_black_greeks, name)
        ref = np.array(
            [fn(_flag(c), f, k, tt, R, s) for f, k, tt, s, c in zip(fut, strike, t, sigma, call, strict=True)]
        )
        _assert_close(ours[name], ref, name)


def test_units_theta_per_calendar_day_and_vega_per_vol_point() -> None:
    """Finite differences in the units the docstrings promise: vega = ΔV per +1 IV point, theta = ΔV per day."""
    k, t, s = 24_200.0, 20 / 365, 0.18
    for call in (True, False):
        out = g.greeks(SPOT, k, t, s, call, R, Q, published_precision=False)
        up = g.option_price(SPOT, k, t, s + 0.005, call, R, Q)
        dn = g.option_price(SPOT, k, t, s - 0.005, call, R, Q)
        assert float(out["vega"]) == pytest.approx(float(up - dn), rel=1e-4)
        later = g.option_price(SPOT, k, t - 1 / 365, s, call, R, Q)
        now = g.option_price(SPOT, k, t, s, call, R, Q)
        assert float(out["theta"]) == pytest.approx(float(later - now), rel=2e-2)
        h = 1.0
        pu = g.option_price(SPOT + h, k, t, s, call, R, Q)
        pd = g.option_price(SPOT - h, k, t, s, call, R, Q)
        assert float(out["delta"]) == pytest.approx(float(pu - pd) / (2 * h), rel=1e-6)
        assert float(out["gamma"]) == pytest.approx(float(pu - 2 * now + pd) / h**2, rel=1e-3)


def test_impossible_prices_give_nan() -> None:
    t = 10 / 365
    k = 23_000.0  # call ITM by ~1,000 points
    intrinsic_call = SPOT * math.exp(-Q * t) - k * math.exp(-R * t)
    cases = [
        (intrinsic_call - 1.0, k, t, True),  # below intrinsic
        (intrinsic_call, k, t, True),  # exactly intrinsic: no positive σ
        (SPOT * math.exp(-Q * t) + 1.0, k, t, True),  # above the call bound S e^{-qT}
        (25_000.0 * math.exp(-R * t) + 1.0, 25_000.0, t, False),  # above the put bound K e^{-rT}
        (0.0, k, t, True),  # zero price
        (-5.0, k, t, False),  # negative price
        (float("nan"), k, t, True),
        (100.0, 0.0, t, True),  # strike 0
        (100.0, -50.0, t, True),
        (100.0, k, 0.0, True),  # no time left
        (100.0, k, -1.0, True),
        (100.0, k, float("nan"), True),
    ]
    price, strike, tt, call = (np.array(c) for c in zip(*cases, strict=True))
    iv = g.implied_vol(price, SPOT, strike, tt, call, R, Q)
    assert np.isnan(iv).all(), iv
    out = g.compute_iv_and_greeks(price, SPOT, strike, tt, call, R, Q)
    assert all(np.isnan(a).all() for a in out)
    # An invalid spot or futures is NaN too, and Greeks of σ ≤ 0 / NaN are NaN.
    assert np.isnan(g.implied_vol(100.0, [0.0, -1.0, np.nan], 24_000.0, t, True, R, Q)).all()
    assert np.isnan(g.implied_vol(100.0, SPOT, 24_000.0, t, True, R, Q, futures=[0.0, -1.0])).all()
    bad = g.greeks(SPOT, 24_000.0, t, [0.0, -0.1, np.nan], True, R, Q)
    assert all(np.isnan(bad[n]).all() for n in GREEK_NAMES)


def test_extreme_but_valid_prices_are_solved() -> None:
    """Deep OTM at the ₹0.05 tick with an hour to expiry, and a near-bound price at 500 % vol."""
    t_hour = 3600.0 / g.SECONDS_PER_YEAR
    iv = g.implied_vol([0.05, 0.05], SPOT, [24_600.0, 23_400.0], t_hour, [True, False], R, 0.0)
    assert np.all(np.isfinite(iv)) and np.all(iv > 0)
    back = g.option_price(SPOT, [24_600.0, 23_400.0], t_hour, iv, [True, False], R, 0.0)
    np.testing.assert_allclose(back, 0.05, rtol=1e-9)
    p = g.option_price(SPOT, 24_000.0, 1.0, 5.0, True, R, 0.0)
    assert float(g.implied_vol(p, SPOT, 24_000.0, 1.0, True, R, 0.0)) == pytest.approx(5.0, abs=1e-6)


def test_vectorized_100k_contracts_round_trip() -> None:
    rng = np.random.default_rng(20260818)
    n = 100_000
    spot = rng.uniform(20_000, 52_000, n)
    strike = np.round(spot * rng.uniform(0.85, 1.15, n) / 50.0) * 50.0
    t = rng.uniform(60.0, 120 * 86_400.0, n) / g.SECONDS_PER_YEAR
    sigma = rng.uniform(0.05, 1.5, n)
    call = rng.random(n) < 0.5
    fut = np.where(rng.random(n) < 0.3, spot * np.exp(R * t), np.nan)  # 30 % of rows priced on futures
    price = g.option_price(spot, strike, t, sigma, call, R, Q, futures=fut)
    iv_pct, delta, gamma, theta, vega = g.compute_iv_and_greeks(price, spot, strike, t, call, R, Q, fut,
                                                                published_precision=False)
    for a in (iv_pct, delta, gamma, theta, vega):
        assert a.shape == (n,) and a.dtype == np.float64
    w = np.where(call, 1.0, -1.0)
    fwd = np.where(np.isfinite(fut), fut, spot * np.exp((R - Q) * t))
    intrinsic = np.exp(-R * t) * np.maximum(w * (fwd - strike), 0.0)
    solvable = price - intrinsic > 1e-6 * spot
    assert solvable.mean() > 0.9
    assert np.max(np.abs(iv_pct[solvable] / 100.0 - sigma[solvable])) <= 1e-6
    assert np.isfinite(delta[solvable]).all() and np.isfinite(vega[solvable]).all()
    # Rows on futures equal a pure Black-76 call; rows with NaN futures a pure BSM call.
    b = np.isfinite(fut)
    iv_b = g.implied_vol(price[b], np.nan, strike[b], t[b], call[b], R, 123.0, futures=fut[b])
    np.testing.assert_allclose(iv_b, iv_pct[b] / 100.0, rtol=1e-14)
    iv_s = g.implied_vol(price[~b], spot[~b], strike[~b], t[~b], call[~b], R, Q)
    np.testing.assert_allclose(iv_s, iv_pct[~b] / 100.0, rtol=1e-14)


def test_broadcasting_and_shapes() -> None:
    strikes = np.array([[23_800.0, 24_000.0, 24_200.0], [23_900.0, 24_100.0, 24_300.0]])
    price = g.option_price(SPOT, strikes, 7 / 365, 0.15, True, R, Q)
    assert price.shape == (2, 3)
    iv = g.implied_vol(price, SPOT, strikes, 7 / 365, True, R, Q)
    assert iv.shape == (2, 3)
    np.testing.assert_allclose(iv, 0.15, atol=1e-9)
    scalar = g.implied_vol(float(price[0, 1]), SPOT, 24_000.0, 7 / 365, True, R, Q)
    assert scalar.shape == () and float(scalar) == pytest.approx(0.15, abs=1e-9)


def test_norm_cdf_matches_math_erfc_with_relative_accuracy_in_tails() -> None:
    x = np.concatenate([np.linspace(-37.0, 8.0, 4001), [0.0, -0.46875, 0.46875, -4.0 * math.sqrt(2)]])
    ours = g.norm_cdf(x)
    ref = np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x])
    np.testing.assert_allclose(ours, ref, rtol=1e-14, atol=0.0)
    assert np.isnan(g.norm_cdf(np.nan))


def test_expiry_close_epoch_is_1530_ist() -> None:
    assert g.expiry_close_epoch("2026-08-18") == datetime(2026, 8, 18, 10, 0, tzinfo=UTC).timestamp()
    with pytest.raises(ValueError):
        g.expiry_close_epoch("18-Aug-2026")


def test_time_to_expiry_years_and_floor() -> None:
    exp = g.expiry_close_epoch("2026-08-25")
    now_1043_ist = datetime(2026, 8, 18, 5, 13, tzinfo=UTC).timestamp()
    t = g.time_to_expiry_years(np.array([now_1043_ist, exp - 30.0, exp, exp + 3600.0]), exp)
    assert t[0] == pytest.approx((7 * 86_400 - (5 * 3600 + 13 * 60) + 10 * 3600) / g.SECONDS_PER_YEAR)
    np.testing.assert_array_equal(t[1:], g.MIN_T_SECONDS / g.SECONDS_PER_YEAR)
    assert np.isnan(g.time_to_expiry_years(np.nan, exp))


def test_results_do_not_depend_on_the_batch() -> None:
    """Bit-identical per contract whether computed alone, in a small batch or inside a big one (ingest replays must
    produce identical rows however ticks were batched)."""
    rng = np.random.default_rng(7)
    n = 5_000
    strike = np.round(SPOT * rng.uniform(0.85, 1.15, n) / 50.0) * 50.0
    t = rng.uniform(60.0, 60 * 86_400.0, n) / g.SECONDS_PER_YEAR
    call = rng.random(n) < 0.5
    ltp = (
        np.maximum(np.round(g.option_price(SPOT, strike, t, rng.uniform(0.08, 0.6, n), call, R, 0.0) / 0.05), 1) * 0.05
    )
    whole = g.compute_iv_and_greeks(ltp, SPOT, strike, t, call, R, 0.0)
    for i in rng.choice(n, 25, replace=False):
        alone = g.compute_iv_and_greeks(ltp[i : i + 1], SPOT, strike[i : i + 1], t[i : i + 1], call[i : i + 1], R, 0.0)
        lo = max(int(i) - 3, 0)
        small = g.compute_iv_and_greeks(
            ltp[lo : i + 4], SPOT, strike[lo : i + 4], t[lo : i + 4], call[lo : i + 4], R, 0.0
        )
        for a, b, c in zip(whole, alone, small, strict=True):
            np.testing.assert_array_equal(a[i : i + 1], b)
            np.testing.assert_array_equal(a[i : i + 1], c[i - lo : i - lo + 1])


def test_published_precision_by_default() -> None:
    """What ingest stores: the exact values (tested above) rounded to NSE's decimals, each the float64 nearest its
    decimal (so the stream can send it as a fixed-point change), −0.0 as 0.0, NaN kept."""
    rng = np.random.default_rng(18)
    n = 20_000
    strike = np.round(SPOT * rng.uniform(0.85, 1.15, n) / 50.0) * 50.0
    t = rng.uniform(60.0, 60 * 86_400.0, n) / g.SECONDS_PER_YEAR
    call = rng.random(n) < 0.5
    price = g.option_price(SPOT, strike, t, rng.uniform(0.08, 0.6, n), call, R, 0.0)
    ltp = np.maximum(np.round(price / 0.05), 1) * 0.05
    ltp[:50] = 1.0  # some below intrinsic: NaN
    exact = g.compute_iv_and_greeks(ltp, SPOT, strike, t, call, R, 0.0, published_precision=False)
    shown = g.compute_iv_and_greeks(ltp, SPOT, strike, t, call, R, 0.0)
    sigma = exact[0] / 100.0
    exact_g = g.greeks(SPOT, strike, t, sigma, call, R, 0.0, published_precision=False)
    shown_g = g.greeks(SPOT, strike, t, sigma, call, R, 0.0)
    names = ("iv_percent", "delta", "gamma", "theta", "vega")
    pairs = list(zip(names, exact, shown, strict=True)) + [(k, exact_g[k], shown_g[k]) for k in GREEK_NAMES]
    for name, a, b in pairs:
        d = g.PUBLISHED_DECIMALS[name]
        assert np.isnan(a).any() and np.array_equal(np.isnan(a), np.isnan(b)), name
        ok = ~np.isnan(a)
        assert np.max(np.abs(a[ok] - b[ok])) <= 0.5 * 10.0**-d * (1 + 1e-9), name
        assert all(round(v * 10**d) / 10**d == v for v in b[ok].tolist()), name
        assert not np.signbit(b[ok][b[ok] == 0.0]).any(), name
    # a deep OTM put's delta (≈ −1e-16) rounds to 0.0, not −0.0
    far = g.greeks(SPOT, 0.93 * SPOT, 2 / 365, 0.12, False, R, 0.0)
    exact_far = g.greeks(SPOT, 0.93 * SPOT, 2 / 365, 0.12, False, R, 0.0, published_precision=False)
    assert -1e-6 < float(exact_far["delta"]) < 0.0
    assert float(far["delta"]) == 0.0 and not np.signbit(far["delta"])
