"""Implied volatility and Greeks of European index options, vectorized with numpy (pure domain: no I/O).

Every function takes numpy arrays (or scalars) that broadcast together and returns float64 arrays of the broadcast
shape; one call prices a whole batch of contracts. Nothing raises for bad market data: an impossible input (price at
or below intrinsic value, above the no-arbitrage bound, non-positive price / underlying / strike / time, NaN) gives
NaN in that element only.

Models
------
* **Black-Scholes-Merton on the spot** (Black & Scholes 1973; Merton 1973, continuous dividend yield ``q``):
  ``C = S e^{-qT} N(d1) - K e^{-rT} N(d2)``, ``P = K e^{-rT} N(-d2) - S e^{-qT} N(-d1)``,
  ``d1 = [ln(S/K) + (r - q + σ²/2) T] / (σ√T)``, ``d2 = d1 - σ√T``.
* **Black-76 on a futures price** (Black 1976) for the elements where ``futures`` is finite:
  ``C = e^{-rT} [F N(d1) - K N(d2)]``, ``d1 = [ln(F/K) + σ²T/2] / (σ√T)``.

Both are evaluated in Black's form with forward ``F`` (``S e^{(r-q)T}`` for BSM, the futures price for Black-76) and
discount factor ``D = e^{-rT}``; the implied volatility is solved in Jäckel's normalised coordinates (P. Jäckel,
"Let's be rational", Wilmott 2015): ``x = ln(F/K)``, ``s = σ√T``, ``β = price / (D √(F K))``.

Units and conventions (those of vollib, ``vollib.black_scholes_merton`` and ``vollib.black``)
------------------------------------------------------------------------------------------
* ``price`` / LTP in ₹ per unit, ``underlying`` (spot), ``futures`` and ``strike`` in index points
  (₹ per unit of the index).
* ``t_years``: ACT/365 calendar time, seconds / (365 × 86,400).
* ``r``, ``q``: continuously compounded annual rates, decimal (0.065 = 6.5 %).
* σ: annualised volatility, decimal (0.15 = 15 %); ``compute_iv_and_greeks`` returns IV in percent (15.0).
* delta: ∂V/∂S per index point (∂V/∂F for Black-76 rows), gamma: ∂²V/∂S² per index point², theta: ∂V/∂t in ₹ per
  **calendar day** (annual theta / 365), vega: ∂V/∂σ in ₹ per 1 IV percentage point (∂V/∂σ / 100).
  These equal vollib's analytical Greeks (``vollib.*.greeks.analytical``), which divide theta by 365 and multiply
  vega by 0.01. Greek formulas: Hull, *Options, Futures, and Other Derivatives*, ch. 19 ("The Greek Letters"), the
  table of Greeks for an asset paying a yield q, with F for S and r for q for futures options (Black's model).

Settings the ingest pipeline passes in (``services/ingest/settings.py``): ``iv_rate`` (env ``OPTMON_IV_RATE``, default
0.065) → ``r`` and ``iv_dividend_yield`` (``OPTMON_IV_DIVIDEND_YIELD``, default 0.0) → ``q``. docs/greeks.md compares
the result with NSE's published IV.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime
from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "DEFAULT_DIVIDEND_YIELD",
    "DEFAULT_RATE",
    "MIN_T_SECONDS",
    "PUBLISHED_DECIMALS",
    "SECONDS_PER_YEAR",
    "compute_iv_and_greeks",
    "expiry_close_epoch",
    "greeks",
    "implied_vol",
    "norm_cdf",
    "option_price",
    "time_to_expiry_years",
]

F64 = NDArray[np.float64]

#: Seconds in the ACT/365 year used for ``t_years``.
SECONDS_PER_YEAR: float = 365.0 * 86_400.0
#: Floor of the time to expiry, seconds (one minute). At and after 15:30 IST on expiry day the option is worth its
#: intrinsic value and has no implied volatility; flooring keeps T > 0 so that the last 1-minute bucket of an expiring
#: series still gets a (very short-dated) IV instead of a division by zero.
MIN_T_SECONDS: float = 60.0
#: Default risk-free rate (setting ``iv_rate``), decimal per year, continuously compounded.
DEFAULT_RATE: float = 0.065
#: Default dividend yield of the index (setting ``iv_dividend_yield``), decimal per year.
DEFAULT_DIVIDEND_YIELD: float = 0.0

#: Decimal places NSE publishes in its option chain: IV in percent to 0.01, delta/theta/vega to 1e-4, gamma to 1e-6.
#: ``compute_iv_and_greeks`` and ``greeks`` round to them by default (``published_precision``): digits beyond are
#: false precision (the inputs are ₹0.05 prices), and values on this decimal grid are what the stream sends as small
#: fixed-point changes (docs/stream.md) instead of doubles.
PUBLISHED_DECIMALS: dict[str, int] = {"iv_percent": 2, "delta": 4, "gamma": 6, "theta": 4, "vega": 4}

#: Expiry instant: 15:30 IST = 10:00 UTC on the expiry date.
_EXPIRY_UTC_HOUR = 10
#: Iteration cap of the safeguarded Halley solver (bisection alone would need ~60 steps from a bracket of 1e3 to
#: 1e-15; Halley converges in 3-6).
_MAX_ITER = 100
#: Convergence: stop when a step changes s = σ√T (hence σ) by less than this relative amount.
_S_RTOL = 1e-12
#: ... or when an accepted Halley step is below this relative size (the next step would be ≲ 1e-13 relative).
_S_EARLY = 1e-7
#: Time value (price - intrinsic) at or below this fraction of the price counts as "price at intrinsic" (no IV): it is
#: below the rounding error of the inputs (2^-46 ≈ 1.4e-14), and any volatility would reproduce it.
_TIME_VALUE_RTOL = 2.0**-46

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_LN_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------------------------
# Time to expiry
# --------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def expiry_close_epoch(expiry: str) -> float:
    """Epoch seconds (UTC) of 15:30 IST (10:00 UTC) on the expiry date ``expiry`` ('YYYY-MM-DD', an IST calendar date).

    Cached per string. Raises ``ValueError`` for a string that is not an ISO date.
    """
    d = date.fromisoformat(expiry)
    return datetime(d.year, d.month, d.day, _EXPIRY_UTC_HOUR, 0, tzinfo=UTC).timestamp()


def time_to_expiry_years(now_epoch_s: ArrayLike, expiry_epoch_s: ArrayLike) -> F64:
    """Time to expiry in ACT/365 years: ``max(expiry - now, MIN_T_SECONDS) / SECONDS_PER_YEAR``.

    ``now_epoch_s``: tick times, epoch seconds UTC; ``expiry_epoch_s``: expiry instants (``expiry_close_epoch``), epoch
    seconds UTC; arrays that broadcast together. The result is floored at one minute (``MIN_T_SECONDS``), so ticks at or
    after the expiry instant get T = 1 minute rather than 0 or a negative time. NaN inputs give NaN.
    """
    now = np.asarray(now_epoch_s, dtype=np.float64)
    exp = np.asarray(expiry_epoch_s, dtype=np.float64)
    return np.asarray(np.maximum(exp - now, MIN_T_SECONDS) / SECONDS_PER_YEAR, dtype=np.float64)


# --------------------------------------------------------------------------------------------------------------
# Normal distribution (W. J. Cody, "Rational Chebyshev approximations for the error function", Math. Comp. 23, 1969,
# as in Jäckel's LetsBeRational erf_cody.cpp): erfc to full double precision, with relative accuracy in the far tail.
# --------------------------------------------------------------------------------------------------------------

_A = (3.1611237438705656, 113.864154151050156, 377.485237685302021, 3209.37758913846947, 0.185777706184603153)
_B = (23.6012909523441209, 244.024637934444173, 1282.61652607737228, 2844.23683343917062)
_C = (0.564188496988670089, 8.88314979438837594, 66.1191906371416295, 298.635138197400131, 881.95222124176909,
      1712.04761263407058, 2051.07837782607147, 1230.33935479799725, 2.15311535474403846e-8)  # fmt: skip
_D = (15.7449261107098347, 117.693950891312499, 537.181101862009858, 1621.38957456669019, 3290.79923573345963,
      4362.61909014324716, 3439.36767414372164, 1230.33935480374942)  # fmt: skip
_P = (0.305326634961232344, 0.360344899949804439, 0.125781726111229246, 0.0160837851487422766,
      6.58749161529837803e-4, 0.0163153871373020978)  # fmt: skip
_Q = (2.56852019228982242, 1.87295284992346047, 0.527905102951428412, 0.0605183413124413191, 0.00233520497626869185)
_SQRPI = 0.56418958354775628695  # 1/√π
_XBIG = 26.543  # erfc(x) underflows to 0 beyond this


def _exp_minus_sq(y: F64) -> F64:
    """exp(-y²) computed as exp(-ysq²)·exp(-(y-ysq)(y+ysq)) with ysq = y rounded down to 1/16 (Cody's trick)."""
    ysq = np.trunc(y * 16.0) / 16.0
    return np.exp(-ysq * ysq) * np.exp(-(y - ysq) * (y + ysq))


def _erfc(x: F64) -> F64:
    """Complementary error function of a 1-D float64 array (Cody 1969)."""
    y = np.abs(x)
    out = np.empty_like(y)
    m1 = y <= 0.46875
    m3 = y > 4.0
    m2 = ~(m1 | m3)
    if m1.any():
        xs = x[m1]
        ysq = xs * xs
        num = _A[4] * ysq
        den = ysq
        for i in range(3):
            num = (num + _A[i]) * ysq
            den = (den + _B[i]) * ysq
        out[m1] = 1.0 - xs * (num + _A[3]) / (den + _B[3])
    if m2.any():
        ys = y[m2]
        num = _C[8] * ys
        den = ys
        for i in range(7):
            num = (num + _C[i]) * ys
            den = (den + _D[i]) * ys
        out[m2] = (num + _C[7]) / (den + _D[7]) * _exp_minus_sq(ys)
    if m3.any():
        ys = np.minimum(y[m3], _XBIG)
        z = 1.0 / (ys * ys)
        num = _P[5] * z
        den = z
        for i in range(4):
            num = (num + _P[i]) * z
            den = (den + _Q[i]) * z
        res = (_SQRPI - z * (num + _P[4]) / (den + _Q[4])) / ys * _exp_minus_sq(ys)
        out[m3] = np.where(y[m3] >= _XBIG, 0.0, res)
    neg = (x < 0.0) & ~m1
    out[neg] = 2.0 - out[neg]
    out[np.isnan(x)] = np.nan
    return out


def norm_cdf(x: ArrayLike) -> F64:
    """Standard normal CDF N(x) = erfc(-x/√2)/2, elementwise, accurate to a few ulps (relative, also in the lower
    tail down to ~1e-300). Any shape; NaN propagates."""
    a = np.asarray(x, dtype=np.float64)
    flat = np.ravel(a)
    return (0.5 * _erfc(-flat / _SQRT2)).reshape(a.shape)


def _norm_pdf(x: F64) -> F64:
    """Standard normal density φ(x)."""
    return np.asarray(_INV_SQRT_2PI * np.exp(-0.5 * x * x), dtype=np.float64)


# --------------------------------------------------------------------------------------------------------------
# Inputs: broadcasting and the model per element
# --------------------------------------------------------------------------------------------------------------


class _Model:
    """Broadcast inputs in Black form: forward F, discount D = e^{-rT}, and per-element Greek scalings."""

    def __init__(
        self,
        underlying: ArrayLike,
        strike: ArrayLike,
        t_years: ArrayLike,
        is_call: ArrayLike,
        r: ArrayLike,
        q: ArrayLike,
        futures: ArrayLike | None,
        *extra: ArrayLike,
    ) -> None:
        fut = np.nan if futures is None else futures
        arrays = np.broadcast_arrays(
            *(np.asarray(a, dtype=np.float64) for a in (underlying, strike, t_years, r, q, fut, *extra)),
            np.asarray(is_call, dtype=bool),
        )
        self.shape: tuple[int, ...] = arrays[0].shape
        flat = [np.ravel(a) for a in arrays]
        s, k, t, r_, q_, f_ = flat[:6]
        self.extra = flat[6:-1]
        self.is_call = flat[-1]
        self.black = np.isfinite(f_)
        with np.errstate(over="ignore", invalid="ignore"):
            self.forward = np.where(self.black, f_, s * np.exp((r_ - q_) * t))
            self.discount = np.exp(-r_ * t)
        self.spot = s
        self.strike = k
        self.t = t
        self.r = r_
        self.q = q_
        #: Price of the underlying the delta/gamma refer to: spot (BSM) or futures (Black-76).
        self.delta_underlying = np.where(self.black, f_, s)
        #: delta = ω·G·N(ω d1): G = e^{-qT} (BSM, Hull ch. 19) or e^{-rT} (Black-76 delta w.r.t. F).
        #: theta's carry term uses the yield q (BSM) or r (Black-76, the futures price has no drift).
        with np.errstate(over="ignore", invalid="ignore"):
            self.delta_scale = np.where(self.black, self.discount, np.exp(-q_ * t))
        self.carry = np.where(self.black, r_, q_)
        with np.errstate(invalid="ignore"):
            self.valid = (
                (k > 0.0)
                & (t > 0.0)
                & np.isfinite(t)
                & np.isfinite(r_)
                & np.isfinite(q_)
                & (self.forward > 0.0)
                & np.isfinite(self.forward)
                & np.isfinite(self.discount)
                & (self.discount > 0.0)
                & np.where(self.black, True, (s > 0.0) & np.isfinite(s))
            )


# --------------------------------------------------------------------------------------------------------------
# Prices
# --------------------------------------------------------------------------------------------------------------


def option_price(
    underlying: ArrayLike,
    strike: ArrayLike,
    t_years: ArrayLike,
    sigma: ArrayLike,
    is_call: ArrayLike,
    r: ArrayLike,
    q: ArrayLike,
    *,
    futures: ArrayLike | None = None,
) -> F64:
    """Option price in ₹ per unit: Black-Scholes-Merton on ``underlying`` (spot) with rate ``r`` and dividend yield
    ``q`` (Merton 1973), or Black-76 on ``futures`` where it is finite (Black 1976); ``sigma`` decimal annual vol.
    NaN where an input is invalid (non-positive strike / time / forward, σ < 0, NaN)."""
    m = _Model(underlying, strike, t_years, is_call, r, q, futures, sigma)
    (sig,) = m.extra
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        sd = sig * np.sqrt(m.t)
        x = np.log(m.forward / m.strike)
        d1 = x / sd + 0.5 * sd
        d2 = d1 - sd
        w = np.where(m.is_call, 1.0, -1.0)
        price = m.discount * w * (m.forward * norm_cdf(w * d1) - m.strike * norm_cdf(w * d2))
        intrinsic = m.discount * np.maximum(w * (m.forward - m.strike), 0.0)
        price = np.where(sd == 0.0, intrinsic, price)
    price = np.where(m.valid & (sig >= 0.0), price, np.nan)
    return np.asarray(price, dtype=np.float64).reshape(m.shape)


# --------------------------------------------------------------------------------------------------------------
# Implied volatility
# --------------------------------------------------------------------------------------------------------------


def _normalised_otm_call(x: F64, s: F64) -> tuple[F64, F64]:
    """Normalised out-of-the-money Black call b(x, s) = e^{x/2} N(x/s + s/2) - e^{-x/2} N(x/s - s/2) for x ≤ 0,
    s > 0, and its vega ∂b/∂s = e^{x/2} φ(x/s + s/2) = exp(-x²/(2s²) - s²/8)/√(2π) (Jäckel 2015, §2)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        h = x / s
        t = 0.5 * s
        ex = np.exp(0.5 * x)
        n = norm_cdf(np.concatenate((h + t, h - t)))  # one call for both: halves the fixed cost on small batches
        b = ex * n[: h.size] - n[h.size :] / ex
        vega = _INV_SQRT_2PI * np.exp(-0.5 * (h * h + t * t))
    return np.maximum(b, 0.0), vega


def _solve_normalised(x: F64, beta: F64) -> F64:
    """Solve b(x, s) = β for s > 0, with x ≤ 0 and 0 < β < e^{x/2} (an out-of-the-money normalised call).

    Safeguarded Halley iteration (Jäckel 2015, §3-4 for the regions and objectives): b(x, ·) is convex below the
    inflection point s_c = √(2|x|) and concave above it. Below it ("lower region", β < b(x, s_c)) the iteration runs
    on ln b - ln β as a function of u = 1/s² (nearly linear there), started from the larger of Corrado-Miller and the
    asymptotic expansion b ≈ φ(x/s)·s³/x²; above it on b(s) - β in s, started from Corrado-Miller but not below s_c.
    Each element keeps a bracket [lo, hi] around the root; a step leaving it is replaced by bisection (or doubling
    while hi is unbounded), so the solver converges (typically in 3-4 steps); NaN after _MAX_ITER steps.
    """
    n = x.size
    s_out = np.full(n, np.nan)
    s_c = np.sqrt(-2.0 * x)
    b_c = np.zeros(n)
    pos = s_c > 0.0
    if pos.any():
        b_c[pos], _ = _normalised_otm_call(x[pos], s_c[pos])
    lower = beta < b_c
    # Start: lower region from the asymptotic expansion b ≈ exp(-x²/(2s²))·s³/(x²√(2π)) (two fixed-point steps),
    # upper region at the inflection point (Newton/Halley on the concave part from the left does not overshoot).
    with np.errstate(divide="ignore", invalid="ignore"):
        log_beta = np.log(beta)
        ax = np.abs(x)
        u = np.maximum(-log_beta, 1.0)
        s0 = ax / np.sqrt(2.0 * u)
        for _ in range(2):
            u = np.maximum(-log_beta + 3.0 * np.log(s0) - 2.0 * np.log(ax) - _LN_SQRT_2PI, 0.5)
            s0 = ax / np.sqrt(2.0 * u)
        # Upper region: Corrado & Miller (1996) in normalised form (forward F = e^{x/2}, strike K = e^{-x/2}, D = 1),
        # never below the inflection point.
        eh = np.exp(0.5 * x)
        half_moneyness = 0.5 * (eh - 1.0 / eh)
        a = beta - half_moneyness
        root = np.sqrt(np.maximum(a * a - 4.0 * half_moneyness**2 / math.pi, 0.0))
        cm = math.sqrt(2.0 * math.pi) / (eh + 1.0 / eh) * (a + root)
        s_up = np.where(np.isfinite(cm), np.maximum(cm, s_c), s_c)
    # Lower region: Corrado-Miller, which is good near the money, but never below the asymptotic guess (an
    # underestimate that is good far from the money) and inside the bracket (0, s_c).
    s_low = np.clip(np.where(np.isfinite(cm), np.maximum(cm, s0), s0), 1e-3 * s_c, s_c * (1.0 - 1e-12))
    s = np.where(lower, s_low, np.maximum(s_up, 1e-8))
    s = np.where(np.isfinite(s), s, 0.5 * s_c)
    lo = np.zeros(n)
    hi = np.where(lower, s_c, np.inf)
    target = np.where(lower, log_beta, beta)

    idx = np.arange(n)
    for _ in range(_MAX_ITER):
        if idx.size == 0:
            break
        xs, ss, low, tg = x[idx], s[idx], lower[idx], target[idx]
        b, v = _normalised_otm_call(xs, ss)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # Derivatives of b: b' = v, b'' = v (x²/s³ - s/4)  (Jäckel 2015, §2).
            b2 = v * (xs * xs / (ss * ss * ss) - 0.25 * ss)
            f = np.where(low, np.log(b), b) - tg
            f1 = np.where(low, v / b, v)
            f2 = np.where(low, b2 / b - f1 * f1, b2)
            # Lower region: iterate in u = 1/s², where ln b ≈ -x² u / 2 + O(ln u) is almost linear (chain rule:
            # ds/du = -s³/2, d²s/du² = 3 s⁵ / 4).
            s3 = ss * ss * ss
            g1 = np.where(low, -0.5 * s3 * f1, f1)
            g2 = np.where(low, 0.25 * s3 * s3 * f2 + 0.75 * s3 * ss * ss * f1, f2)
            newton = -f / g1
            denom = 1.0 + 0.5 * newton * g2 / g1
            step = np.where((denom > 0.5) & np.isfinite(denom), newton / denom, newton)
            u_new = 1.0 / (ss * ss) + step
            step = np.where(low, np.where(u_new > 0.0, 1.0 / np.sqrt(u_new) - ss, np.inf), step)
        lo_i = np.where(f < 0.0, ss, lo[idx])
        hi_i = np.where(f > 0.0, ss, hi[idx])
        lo[idx], hi[idx] = lo_i, hi_i
        s_new = ss + step
        # A correction below _S_RTOL·s is at the root within rounding: take it even if rounding put it a hair outside
        # the bracket (bisecting from the far end of the bracket would only crawl back).
        tiny = np.abs(step) <= _S_RTOL * ss
        bad = (~np.isfinite(s_new) | (s_new <= lo_i) | (s_new >= hi_i)) & ~tiny
        fallback = np.where(np.isfinite(hi_i), 0.5 * (lo_i + hi_i), 2.0 * ss)
        s_new = np.where(bad, fallback, s_new)
        s[idx] = s_new
        with np.errstate(invalid="ignore"):
            narrow = np.isfinite(hi_i) & (hi_i - lo_i <= 4e-16 * hi_i)
        # A Halley/Newton step below _S_EARLY·s leaves an error of order step² (Newton) or step³ (Halley): done.
        moved = np.abs(s_new - ss)
        done = (tiny | ((moved <= _S_EARLY * ss) & ~bad) | (f == 0.0) | narrow) & np.isfinite(s_new)
        s_out[idx[done]] = s_new[done]
        idx = idx[~done]
    return s_out


def implied_vol(
    price: ArrayLike,
    underlying: ArrayLike,
    strike: ArrayLike,
    t_years: ArrayLike,
    is_call: ArrayLike,
    r: ArrayLike,
    q: ArrayLike,
    *,
    futures: ArrayLike | None = None,
) -> F64:
    """Implied volatility (annualised, decimal: 0.15 = 15 %) of option prices, elementwise.

    Arguments (broadcasting arrays or scalars): ``price`` ₹ per unit (LTP), ``underlying`` spot index points,
    ``strike`` index points, ``t_years`` ACT/365 years (``time_to_expiry_years``), ``is_call`` True for CE / False for
    PE, ``r`` rate and ``q`` dividend yield (decimal, continuous), ``futures`` optional array of futures prices with
    NaN for "no futures": finite elements are solved with Black-76 on the futures (Black 1976), the others with
    Black-Scholes-Merton on the spot (Merton 1973). Both are reduced to Black's normalised form and solved with a
    bracketed Halley iteration to a relative step in σ below 1e-12 (see ``_solve_normalised``).

    Returns NaN where no positive volatility reproduces the price: price ≤ intrinsic value (forward intrinsic,
    discounted), price ≥ the upper bound (D·F for a call, D·K for a put), or any invalid input.
    """
    m = _Model(underlying, strike, t_years, is_call, r, q, futures, price)
    return _implied_vol(m, m.extra[0]).reshape(m.shape)


def _implied_vol(m: _Model, p: F64) -> F64:
    """Flat implied volatility (decimal) of the flat prices ``p`` under model ``m``; NaN where unsolvable."""
    sigma = np.full(p.shape, np.nan)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ok = m.valid & (p > 0.0) & np.isfinite(p)
        f, k, d = m.forward[ok], m.strike[ok], m.discount[ok]
        x = np.log(f / k)
        beta = p[ok] / (d * np.sqrt(f * k))
        theta = np.where(m.is_call[ok], 1.0, -1.0)
        # In-the-money → out-of-the-money by put-call parity: c - p = e^{x/2} - e^{-x/2} (normalised).
        ex2 = np.exp(0.5 * x)
        intrinsic = np.maximum(theta * (ex2 - 1.0 / ex2), 0.0)
        beta_otm = beta - intrinsic
        x_otm = -np.abs(x)
        upper = np.exp(0.5 * x_otm)
        # A time value below _TIME_VALUE_RTOL of the price is rounding noise of "price == intrinsic": no IV.
        solvable = (beta_otm > _TIME_VALUE_RTOL * beta) & (beta_otm < upper) & np.isfinite(beta_otm)
    s = np.full(x.shape, np.nan)
    if solvable.any():
        s[solvable] = _solve_normalised(x_otm[solvable], beta_otm[solvable])
    sigma[ok] = s / np.sqrt(m.t[ok])
    return sigma


# --------------------------------------------------------------------------------------------------------------
# Greeks
# --------------------------------------------------------------------------------------------------------------


def greeks(
    underlying: ArrayLike,
    strike: ArrayLike,
    t_years: ArrayLike,
    sigma: ArrayLike,
    is_call: ArrayLike,
    r: ArrayLike,
    q: ArrayLike,
    *,
    futures: ArrayLike | None = None,
    published_precision: bool = True,
) -> dict[str, F64]:
    """Analytical Greeks, elementwise; keys ``delta``, ``gamma``, ``theta``, ``vega`` (arrays of the broadcast shape).

    ``published_precision`` (default): rounded to :data:`PUBLISHED_DECIMALS` (see :func:`_published`); False gives
    the exact model values (the tests compare those with vollib).

    Inputs as in :func:`implied_vol`, with ``sigma`` the decimal annual volatility. Formulas (Hull ch. 19;
    ω = +1 call / -1 put, G = e^{-qT} (BSM) or e^{-rT} (Black-76), U = spot (BSM) or futures (Black-76), a = q (BSM)
    or r (Black-76)):

    * delta = ω G N(ω d1)                       — per index point of U (Black-76: w.r.t. the futures price)
    * gamma = G φ(d1) / (U σ √T)                — per index point²
    * theta = [-D F φ(d1) σ / (2√T) + ω (a D F N(ω d1) - r D K N(ω d2))] / 365 — ₹ per calendar day
    * vega  = D F φ(d1) √T / 100                — ₹ per 1 IV percentage point

    with D F = S e^{-qT} for BSM and F e^{-rT} for Black-76. Identical to vollib's ``black_scholes_merton.greeks.
    analytical`` / ``black.greeks.analytical``. NaN where σ ≤ 0 or an input is invalid.
    """
    m = _Model(underlying, strike, t_years, is_call, r, q, futures, sigma)
    out = _greeks(m, m.extra[0])
    if published_precision:
        out = {name: _published(arr, PUBLISHED_DECIMALS[name]) for name, arr in out.items()}
    return {name: arr.reshape(m.shape) for name, arr in out.items()}


def _published(x: F64, decimals: int) -> F64:
    """``x`` rounded to ``decimals`` places (numpy's round: half to even on x × 10^decimals, then ÷ 10^decimals), so
    every result is the float64 nearest a ``decimals``-place decimal and ``round(v × 10^d) / 10^d == v`` holds;
    −0.0 becomes 0.0 and NaN stays NaN."""
    return np.asarray(np.round(x, decimals) + 0.0, dtype=np.float64)


def _greeks(m: _Model, sig: F64) -> dict[str, F64]:
    """Flat Greeks for the flat volatilities ``sig`` under model ``m`` (see :func:`greeks`)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        sqrt_t = np.sqrt(m.t)
        sd = sig * sqrt_t
        d1 = np.log(m.forward / m.strike) / sd + 0.5 * sd
        d2 = d1 - sd
        w = np.where(m.is_call, 1.0, -1.0)
        n12 = norm_cdf(np.concatenate((w * d1, w * d2)))
        n1, n2 = n12[: d1.size], n12[d1.size :]
        pdf1 = _norm_pdf(d1)
        df = m.discount * m.forward
        delta = w * m.delta_scale * n1
        gamma = m.delta_scale * pdf1 / (m.delta_underlying * sd)
        theta = (-df * pdf1 * sig / (2.0 * sqrt_t) + w * (m.carry * df * n1 - m.r * m.discount * m.strike * n2)) / 365.0
        vega = df * pdf1 * sqrt_t / 100.0
    ok = m.valid & (sig > 0.0) & np.isfinite(sig)
    return {
        name: np.where(ok, arr, np.nan)
        for name, arr in (("delta", delta), ("gamma", gamma), ("theta", theta), ("vega", vega))
    }


def compute_iv_and_greeks(
    ltp: ArrayLike,
    underlying: ArrayLike,
    strike: ArrayLike,
    t_years: ArrayLike,
    is_call: ArrayLike,
    r: ArrayLike,
    q: ArrayLike,
    futures: ArrayLike | None = None,
    published_precision: bool = True,
) -> tuple[F64, F64, F64, F64, F64]:
    """IV and Greeks from last traded prices, for ticks that lack them: ``(iv_percent, delta, gamma, theta, vega)``.

    ``published_precision`` (default): each rounded to NSE's published decimals (:data:`PUBLISHED_DECIMALS`: IV
    0.01 %, delta/theta/vega 1e-4, gamma 1e-6), after solving (the solver itself works to |ΔIV| ≤ 1e-6); False
    gives the solver's and the model's exact values.

    Inputs as in :func:`implied_vol` (``ltp`` ₹ per unit). ``iv_percent`` is the implied volatility in percent
    (15.0 = 15 %); the Greeks are in the units of :func:`greeks` (delta per index point, gamma per index point²,
    theta ₹ per calendar day, vega ₹ per IV point). Elements without an implied volatility (LTP at/below intrinsic,
    above the bound, invalid input) are NaN in all five arrays, which the validator then rejects or stores as
    "no IV".
    """
    m = _Model(underlying, strike, t_years, is_call, r, q, futures, ltp)
    sigma = _implied_vol(m, m.extra[0])
    g = _greeks(m, sigma)
    iv = sigma * 100.0
    if published_precision:
        iv = _published(iv, PUBLISHED_DECIMALS["iv_percent"])
        g = {name: _published(arr, PUBLISHED_DECIMALS[name]) for name, arr in g.items()}
    shape = m.shape
    return (
        iv.reshape(shape),
        g["delta"].reshape(shape),
        g["gamma"].reshape(shape),
        g["theta"].reshape(shape),
        g["vega"].reshape(shape),
    )
