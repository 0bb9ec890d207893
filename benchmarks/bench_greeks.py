"""Benchmark ``ingest.iv_contracts_per_s``: contracts/s of ``compute_iv_and_greeks`` (IV + delta, gamma, theta, vega)
on one vectorized call of 100,000 NIFTY-like contracts, against vollib's scalar
``black_scholes_merton.implied_volatility`` called per contract on a 2,000-contract sample in the same run.

Run alone: ``.venv/bin/python -m benchmarks.bench_greeks``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.harness import Result, format_table
from services.ingest.domain.greeks import SECONDS_PER_YEAR, compute_iv_and_greeks, option_price

if TYPE_CHECKING:
    from benchmarks.run import BenchContext

N_CONTRACTS = 100_000
N_BASELINE = 2_000
REPEATS = 5
RATE = 0.065


def make_chain(n: int, seed: int = 18) -> dict[str, np.ndarray]:
    """``n`` random contracts: spot ≈ 24,000, strikes ±20 % on a 50-point grid, T from 1 hour to 90 days,
    σ 8–60 %, CE/PE, LTP = model price rounded to the ₹0.05 tick (floored at one tick)."""
    rng = np.random.default_rng(seed)
    spot = rng.normal(24_000.0, 50.0, n)
    strike = np.round(spot * rng.uniform(0.8, 1.2, n) / 50.0) * 50.0
    t = rng.uniform(3_600.0, 90 * 86_400.0, n) / SECONDS_PER_YEAR
    sigma = rng.uniform(0.08, 0.6, n)
    call = rng.random(n) < 0.5
    ltp = np.maximum(np.round(option_price(spot, strike, t, sigma, call, RATE, 0.0) / 0.05) * 0.05, 0.05)
    return {"ltp": ltp, "spot": spot, "strike": strike, "t": t, "call": call}


def _optmon_rate(chain: dict[str, np.ndarray]) -> tuple[float, int]:
    """Median contracts/s over REPEATS calls, and how many contracts got an IV."""
    n = chain["ltp"].size
    rates = []
    iv = np.empty(0)
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        iv, *_ = compute_iv_and_greeks(
            chain["ltp"], chain["spot"], chain["strike"], chain["t"], chain["call"], RATE, 0.0
        )
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates), int(np.isfinite(iv).sum())


def _vollib_rate(chain: dict[str, np.ndarray]) -> float:
    """Contracts/s of vollib's scalar BSM implied_volatility, one Python call per contract (errors count as done)."""
    from vollib.black_scholes_merton.implied_volatility import implied_volatility

    rows = list(
        zip(
            chain["ltp"][:N_BASELINE].tolist(),
            chain["spot"][:N_BASELINE].tolist(),
            chain["strike"][:N_BASELINE].tolist(),
            chain["t"][:N_BASELINE].tolist(),
            ["c" if c else "p" for c in chain["call"][:N_BASELINE]],
            strict=True,
        )
    )
    t0 = time.perf_counter()
    for price, s, k, t, flag in rows:
        try:
            implied_volatility(price, s, k, t, RATE, 0.0, flag)
        except Exception:  # below intrinsic / above bound after tick rounding
            pass
    return len(rows) / (time.perf_counter() - t0)


def _measure() -> list[Result]:
    chain = make_chain(N_CONTRACTS)
    compute_iv_and_greeks(chain["ltp"][:1000], chain["spot"][:1000], chain["strike"][:1000], chain["t"][:1000],
                          chain["call"][:1000], RATE, 0.0)  # fmt: skip  # warm-up
    value, solved = _optmon_rate(chain)
    baseline = _vollib_rate(chain)
    return [
        Result(
            name="ingest.iv_contracts_per_s",
            value=value,
            unit="1/s",
            baseline=baseline,
            goal="vectorized IV+Greeks must not limit ingest (≥ 50,000 ticks/s)",
            note=(
                f"compute_iv_and_greeks on {N_CONTRACTS:,} contracts (median of {REPEATS}; {solved:,} got an IV); "
                f"baseline vollib scalar implied_volatility on {N_BASELINE:,}"
            ),
        )
    ]


async def run(ctx: BenchContext | None = None) -> list[Result]:
    """Benchmark entry point (``benchmarks/harness.py`` protocol); ``ctx`` is unused (no PostgreSQL/Redis needed)."""
    return await asyncio.to_thread(_measure)


if __name__ == "__main__":
    print(format_table(asyncio.run(run())))
