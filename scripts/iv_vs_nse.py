"""Report: optmon's implied volatility recomputed from LTP and spot vs the IV NSE published, 18 Aug 2026 NIFTY chain.

Usage::

    .venv/bin/python scripts/iv_vs_nse.py [CSV] [--rate 0.065] [--no-by-expiry] [--fit-rates 0,0.065,0.10]

CSV defaults to ../shared/data/nifty-oc-1min-2026-08/nifty_oc_1min_2026-08-18.csv.gz beside the checkout.

Data: /work/shared/data/nifty-oc-1min-2026-08 (see its PROVENANCE.md): 1-minute snapshots, ``spot`` = NIFTY 50,
``ltp`` ₹, ``iv`` percent from NSE, ``delta`` computed by the collector (BS, r = 6.5 %, T = max(calendar days, 1)/365).

Liquid contracts: ``volume > 0``, ``0.05 ≤ |delta| ≤ 0.95`` (the collector's delta) and ``iv != 0.1`` (NSE's floor /
failure value). IV is recomputed with :func:`services.ingest.domain.greeks.implied_vol` (Black-Scholes-Merton on the
spot, r = ``--rate``, q = 0) under two time conventions:

* **optmon**: T to 15:30 IST on the expiry date, in seconds / (365 × 86,400), floored at one minute;
* **collector**: T = max(calendar days from the snapshot date to the expiry date, 1) / 365.

Prints, per convention, the distribution of |optmon − NSE| in IV points (count, median, p90, p99, max) and how many
liquid rows had no solution (LTP at/below intrinsic).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.ingest.domain.greeks import expiry_close_epoch, implied_vol, time_to_expiry_years  # noqa: E402

DEFAULT_CSV = ROOT.parent / "shared" / "data" / "nifty-oc-1min-2026-08" / "nifty_oc_1min_2026-08-18.csv.gz"


def load(path: Path) -> pd.DataFrame:
    """The CSV with ``ts_epoch`` (UTC epoch seconds), ``is_call`` and both T conventions added."""
    df = pd.read_csv(path)
    ts = pd.to_datetime(df["ts_ist"], format="ISO8601")
    # Resolution-independent (pandas 3 may parse to s/us/ns): seconds since the Unix epoch, UTC.
    df["ts_epoch"] = (ts - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    df["is_call"] = df["option_type"].eq("CE")
    expiry_epoch = df["expiry"].map(expiry_close_epoch).to_numpy(dtype=np.float64)
    df["t_optmon"] = time_to_expiry_years(df["ts_epoch"].to_numpy(), expiry_epoch)
    days = (pd.to_datetime(df["expiry"]) - ts.dt.tz_localize(None).dt.normalize()).dt.days.to_numpy()
    df["t_collector"] = np.maximum(days, 1) / 365.0
    return df


def liquid(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with volume > 0, 0.05 ≤ |delta| ≤ 0.95 and iv != 0.1."""
    d = df["delta"].abs()
    return df[(df["volume"] > 0) & (d >= 0.05) & (d <= 0.95) & (df["iv"] != 0.1)]


def distribution(abs_diff: np.ndarray) -> dict[str, float]:
    """count, median, p90, p99, max of the finite values."""
    x = abs_diff[np.isfinite(abs_diff)]
    if x.size == 0:
        return {"count": 0, "median": np.nan, "p90": np.nan, "p99": np.nan, "max": np.nan}
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"count": int(x.size), "median": p50, "p90": p90, "p99": p99, "max": float(x.max())}


def report(df: pd.DataFrame, rate: float, by_expiry: bool) -> str:
    """The printed report."""
    rows = liquid(df)
    lines = [
        f"rows {len(df):,}; liquid (volume>0, 0.05<=|delta|<=0.95, iv!=0.1): {len(rows):,}; r={rate}, q=0, BSM on spot",
        f"{'T convention':28} {'count':>7} {'no IV':>6} {'median':>8} {'p90':>8} {'p99':>8} {'max':>8}   (IV points)",
    ]
    groups: list[tuple[str, pd.DataFrame]] = [("all expiries", rows)]
    if by_expiry:
        groups += [(f"expiry {e}", g) for e, g in rows.groupby("expiry")]
    for label, g in groups:
        for conv in ("optmon", "collector"):
            iv = implied_vol(
                g["ltp"].to_numpy(),
                g["spot"].to_numpy(),
                g["strike"].to_numpy(),
                g[f"t_{conv}"].to_numpy(),
                g["is_call"].to_numpy(),
                rate,
                0.0,
            )
            diff = np.abs(iv * 100.0 - g["iv"].to_numpy())
            s = distribution(diff)
            name = f"{label}: {conv}"
            lines.append(
                f"{name:28} {s['count']:7d} {int(np.isnan(iv).sum()):6d} {s['median']:8.3f} {s['p90']:8.3f} "
                f"{s['p99']:8.3f} {s['max']:8.3f}"
            )
    return "\n".join(lines)


def rate_fit(df: pd.DataFrame, rates: list[float]) -> str:
    """Median |optmon − NSE| (IV points, optmon T) on the liquid rows of the non-expiring series, per rate: shows which
    rate NSE's own IV calculation is closest to."""
    rows = liquid(df)
    rows = rows[rows["t_optmon"] > 1.0 / 365.0]
    lines = [
        f"rate fit on non-expiring series ({len(rows):,} liquid rows, optmon T): rate -> median / p90 |Δ| (IV pts)"
    ]
    for r in rates:
        iv = implied_vol(
            rows["ltp"].to_numpy(),
            rows["spot"].to_numpy(),
            rows["strike"].to_numpy(),
            rows["t_optmon"].to_numpy(),
            rows["is_call"].to_numpy(),
            r,
            0.0,
        )
        s = distribution(np.abs(iv * 100.0 - rows["iv"].to_numpy()))
        lines.append(f"  r={r:5.3f}: median {s['median']:.3f}  p90 {s['p90']:.3f}  (no IV: {int(np.isnan(iv).sum())})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints the report to stdout."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", nargs="?", type=Path, default=DEFAULT_CSV)
    ap.add_argument("--rate", type=float, default=0.065, help="risk-free rate, decimal (default 0.065)")
    ap.add_argument("--no-by-expiry", action="store_true", help="omit the per-expiry breakdown")
    ap.add_argument(
        "--fit-rates",
        default="0,0.05,0.065,0.08,0.09,0.10,0.11,0.12",
        help="comma-separated rates for the rate-fit table ('' to skip)",
    )
    args = ap.parse_args(argv)
    df = load(args.csv)
    print(report(df, args.rate, not args.no_by_expiry))
    if args.fit_rates:
        print(rate_fit(df, [float(x) for x in args.fit_rates.split(",")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
