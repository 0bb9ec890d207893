"""A synthetic but realistic option-chain session, used when the shared real data is absent (and by tests and
benchmarks that need any number of underlyings or minutes).

Model, per underlying (deterministic for a given ``seed``):

* **Spot**: a geometric random walk, one step per minute, annual volatility ≈ the underlying's ATM IV.
* **Expiries**: 4 — NIFTY the next four weekly Tuesdays (on or after ``day``); BANKNIFTY, FINNIFTY, MIDCPNIFTY the
  next four monthly expiries (last Tuesday of the month). Holidays are ignored.
* **Strikes**: listed once for the day on the strike grid (``DEFAULT_STRIKE_STEPS``) around the opening spot,
  ±40 steps for the two nearest expiries, ±25 for the others.
* **Prices**: Black-Scholes (``services.ingest.domain.greeks``; r = 6.5 %, q = 0) with a volatility smile
  σ(K) = σ_ATM(T) · (1 + skew·x + curvature·x²), x = ln(K/F) / (σ_ATM √T) clipped to ±4 (put skew, both wings above
  ATM), σ_ATM higher for the nearest expiry and drifting slowly; time to expiry to 15:30 IST on the expiry day. LTP is
  rounded up to the ₹0.05 tick, never below intrinsic value nor 0.05. IV (percent) and Greeks of the model are sent.
* **OI** (contracts): a bell around the opening spot, heavier on the OTM side and the nearest expiry, drifting by
  small random changes each minute (never < 0). **Volume**: cumulative day volume from 0 at 09:15 IST, Poisson per
  minute in proportion to OI and closeness to ATM.

Every contract ticks every minute; each snapshot carries one ``UnderlyingTick``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from optmon.v1 import market_pb2

from services.common.settings import DEFAULT_STRIKE_STEPS
from services.replay.sources import IST, Snapshot

try:  # the ingest engineers' vectorized Black-Scholes (the same model ingest uses for IV)
    from services.ingest.domain.greeks import greeks as _bs_greeks
    from services.ingest.domain.greeks import option_price as _bs_price
except ImportError:  # pragma: no cover - fallback only while ingest is absent
    _bs_price = None  # type: ignore[assignment]
    _bs_greeks = None  # type: ignore[assignment]

#: Underlyings of a default synthetic session.
DEFAULT_UNDERLYINGS: tuple[str, ...] = ("NIFTY", "BANKNIFTY", "FINNIFTY", "MIDCPNIFTY")
#: Risk-free rate (annual, continuous) of the synthetic prices.
RATE = 0.065
#: Session start, IST.
SESSION_OPEN_IST = time(9, 15)


@dataclass(frozen=True)
class _Profile:
    spot: float  # opening spot, index points
    atm_vol: float  # ATM IV of the far expiries, decimal
    oi_scale: float  # OI of the nearest-expiry ATM contract, contracts


PROFILES: dict[str, _Profile] = {
    "NIFTY": _Profile(24200.0, 0.12, 120_000),
    "BANKNIFTY": _Profile(55000.0, 0.14, 40_000),
    "FINNIFTY": _Profile(25800.0, 0.13, 8_000),
    "MIDCPNIFTY": _Profile(12800.0, 0.16, 15_000),
}
_OTHER = _Profile(10000.0, 0.15, 10_000)
_SKEW, _CURVATURE = -0.08, 0.06
_TICK = 0.05


def _last_tuesday(year: int, month: int) -> date:
    nxt = date(year + (month == 12), month % 12 + 1, 1)
    d = nxt - timedelta(days=1)
    return d - timedelta(days=(d.weekday() - 1) % 7)


def expiries_for(underlying: str, day: date, n: int = 4) -> list[date]:
    """The ``n`` expiries listed on ``day``: weekly Tuesdays for NIFTY, monthly last Tuesdays for the others."""
    if underlying == "NIFTY":
        first = day + timedelta(days=(1 - day.weekday()) % 7)
        return [first + timedelta(weeks=i) for i in range(n)]
    out: list[date] = []
    y, m = day.year, day.month
    while len(out) < n:
        d = _last_tuesday(y, m)
        if d >= day:
            out.append(d)
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return out


def _norm_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _price_and_greeks(s: float, k: np.ndarray, t: np.ndarray, sig: np.ndarray, call: np.ndarray
                      ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """BS price (₹) and Greeks (delta, gamma per point², theta ₹/calendar day, vega ₹/IV point)."""
    if _bs_price is not None and _bs_greeks is not None:
        return _bs_price(s, k, t, sig, call, RATE, 0.0), _bs_greeks(s, k, t, sig, call, RATE, 0.0)
    sd = sig * np.sqrt(t)
    d1 = (np.log(s / k) + (RATE + 0.5 * sig * sig) * t) / sd
    d2 = d1 - sd
    w = np.where(call, 1.0, -1.0)
    disc = np.exp(-RATE * t)
    price = w * (s * _norm_cdf(w * d1) - k * disc * _norm_cdf(w * d2))
    pdf = np.exp(-0.5 * d1 * d1) / math.sqrt(2 * math.pi)
    g = {
        "delta": w * _norm_cdf(w * d1),
        "gamma": pdf / (s * sd),
        "theta": (-s * pdf * sig / (2 * np.sqrt(t)) - w * RATE * k * disc * _norm_cdf(w * d2)) / 365.0,
        "vega": s * pdf * np.sqrt(t) / 100.0,
    }
    return price, g


def smile_iv(atm: np.ndarray | float, strike: np.ndarray, forward: np.ndarray | float, t_years: np.ndarray
             ) -> np.ndarray:
    """The synthetic smile: σ_ATM · (1 + skew·x + curvature·x²), x = ln(K/F)/(σ_ATM √T) clipped to ±4; decimal."""
    x = np.clip(np.log(strike / forward) / (np.asarray(atm) * np.sqrt(t_years)), -4.0, 4.0)
    return np.asarray(atm * (1.0 + _SKEW * x + _CURVATURE * x * x))


class _Chain:
    """The listed contracts and evolving state of one underlying."""

    def __init__(self, underlying: str, day: date, rng: np.random.Generator, step: float) -> None:
        p = PROFILES.get(underlying, _OTHER)
        self.underlying = underlying
        self.rng = rng
        self.spot = p.spot * float(np.exp(rng.normal(0, 0.01)))
        self.base_vol = p.atm_vol
        self.vol_level = 1.0
        atm = round(self.spot / step) * step
        strikes, exps, calls, rank = [], [], [], []
        for i, e in enumerate(expiries_for(underlying, day)):
            n = 40 if i < 2 else 25
            for j in range(-n, n + 1):
                k = atm + j * step
                if k <= 0:
                    continue
                for c in (True, False):
                    strikes.append(k)
                    exps.append(e)
                    calls.append(c)
                    rank.append(i)
        self.strike = np.array(strikes)
        self.call = np.array(calls)
        self.rank = np.array(rank)
        self.expiry_str = [e.isoformat() for e in exps]
        close = {e: datetime.combine(e, time(10, 0), UTC).timestamp() for e in set(exps)}
        self.expiry_epoch = np.array([close[e] for e in exps])
        # OI bell around the opening spot, heavier on the OTM side and the nearest expiries.
        dist = (self.strike - self.spot) / self.spot
        otm = np.where(self.call, dist > 0, dist < 0)
        bell = np.exp(-((dist / 0.025) ** 2)) + 0.08
        scale = p.oi_scale * np.array([1.0, 0.25, 0.02, 0.004])[self.rank]
        self.oi = np.maximum(0, np.round(scale * bell * np.where(otm, 1.4, 0.6)
                                         * rng.lognormal(0, 0.3, len(self.strike)))).astype(np.int64)
        self.volume = np.zeros(len(self.strike), dtype=np.int64)
        self.per_minute_vol = p.atm_vol / math.sqrt(252 * 375)

    def step(self, epoch: float, first: bool) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Advance one minute; returns (ltp ₹, iv %, greeks)."""
        rng = self.rng
        if not first:
            self.spot *= float(np.exp(rng.normal(0, self.per_minute_vol)))
            self.vol_level = float(np.clip(self.vol_level * np.exp(rng.normal(0, 0.003)), 0.7, 1.5))
        t = np.maximum(self.expiry_epoch - epoch, 60.0) / (365.0 * 86400.0)
        days = t * 365.0
        atm = self.base_vol * self.vol_level * (1.0 + 0.25 * np.exp(-days / 5.0))
        fwd = self.spot * np.exp(RATE * t)
        sig = smile_iv(atm, self.strike, fwd, t)
        price, greeks = _price_and_greeks(self.spot, self.strike, t, sig, self.call)
        intrinsic = np.where(self.call, self.spot - self.strike, self.strike - self.spot).clip(min=0.0)
        ltp = np.maximum(np.ceil(np.maximum(price, intrinsic) / _TICK - 1e-9) * _TICK, _TICK)
        ltp = np.round(ltp, 2)
        if not first:
            dist = (self.strike - self.spot) / self.spot
            activity = np.exp(-((dist / 0.02) ** 2)) + 0.02
            lam = (self.oi + 50) * 0.01 * activity * np.where(self.rank == 0, 1.0, 0.3)
            self.volume += rng.poisson(lam)
            drift = rng.normal(0.0002, 0.002, len(self.oi)) * self.oi + rng.normal(0, 2, len(self.oi))
            self.oi = np.maximum(0, self.oi + np.round(drift).astype(np.int64))
        return ltp, sig * 100.0, greeks


def synthetic_session(
    underlyings: Sequence[str] = DEFAULT_UNDERLYINGS,
    day: date | None = None,
    minutes: int = 375,
    seed: int = 0,
    *,
    strike_steps: dict[str, float] | None = None,
    start: time = SESSION_OPEN_IST,
) -> Iterator[Snapshot]:
    """``minutes`` one-minute snapshots per underlying from ``start`` (IST, default 09:15) on ``day`` (default
    today, UTC), in time order (underlyings in the given order within a minute). Deterministic for a given
    ``seed``. Strike grids from ``strike_steps`` (default ``DEFAULT_STRIKE_STEPS``; unknown underlyings use 50).
    Volume/OI in contracts, IV in percent, prices ₹. Raises ValueError for ``minutes`` < 0 or no underlyings.
    """
    if minutes < 0:
        raise ValueError(f"minutes must be ≥ 0, got {minutes}")
    if not underlyings:
        raise ValueError("no underlyings")
    day = day or datetime.now(UTC).date()
    steps = strike_steps or DEFAULT_STRIKE_STEPS
    rng = np.random.default_rng(seed)
    chains = [_Chain(u.upper(), day, rng, steps.get(u.upper(), 50.0)) for u in underlyings]
    t0 = datetime.combine(day, start, UTC) - IST
    call_t, put_t = market_pb2.OPTION_TYPE_CALL, market_pb2.OPTION_TYPE_PUT
    for i in range(minutes):
        now = t0 + timedelta(minutes=i)
        epoch = now.timestamp()
        ts = Timestamp(seconds=int(epoch))
        for ch in chains:
            ltp, iv, g = ch.step(epoch, i == 0)
            spot = round(ch.spot, 2)
            batch = market_pb2.TickBatch()
            add = batch.option_ticks.add
            cols = zip(ch.strike.tolist(), ch.call.tolist(), ch.expiry_str, ltp.tolist(), ch.volume.tolist(),
                       ch.oi.tolist(), np.round(iv, 2).tolist(), np.round(g["delta"], 4).tolist(),
                       np.round(g["gamma"], 6).tolist(), np.round(g["theta"], 4).tolist(),
                       np.round(g["vega"], 4).tolist(), strict=True)
            for k, c, e, p, v, oi, s, d, ga, th, ve in cols:
                add(underlying=ch.underlying, expiry=e, strike=k, option_type=call_t if c else put_t, ltp=p,
                    volume=v, oi=oi, iv=s, delta=d, gamma=ga, theta=th, vega=ve, exchange_time=ts,
                    underlying_price=spot)
            batch.underlying_ticks.add(underlying=ch.underlying, price=spot, exchange_time=ts)
            yield Snapshot(now, ch.underlying, batch)
