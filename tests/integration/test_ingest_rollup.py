"""Rollup exactness on the real 18-Aug-2026 NIFTY data: 1M, 5M, 15M and 1H bars written by the pipeline equal an
independent aggregation of the CSV in pandas (no ingest code used for the expectation)."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import numpy as np
import pandas as pd

from tests.integration.test_ingest_pipeline_support import pipeline, run_batches, snapshots

MINUTES = 62  # 10:43 .. 11:44 IST: crosses 5M, 15M and the 11:30 IST 1H boundary
STEP = 50.0
TF_SECONDS = {"bars_1m": 60, "bars_5m": 300, "bars_15m": 900, "bars_1h": 3600}
TF_NUMBER = {"bars_1m": 1, "bars_5m": 2, "bars_15m": 3, "bars_1h": 4}
LAST = ["close", "iv", "delta", "gamma", "theta", "vega", "oi", "day_volume"]


def _epoch_s(ts_ist: pd.Series) -> pd.Series:
    """ISO times with offset → epoch seconds (independent of pandas' datetime resolution)."""
    return (pd.to_datetime(ts_ist, utc=True) - pd.Timestamp("1970-01-01", tz="UTC")) // pd.Timedelta(seconds=1)


def expected_bars(csv: Path, minutes: int) -> dict[str, pd.DataFrame]:
    """Per table: one row per (expiry, strike, side, bucket) with the leg values, plus underlying_close, atm_strike
    and moneyness_level per (expiry, strike, bucket)."""
    df = pd.read_csv(csv)
    df["t"] = _epoch_s(df["ts_ist"])
    keep = sorted(df["t"].unique())[:minutes]
    df = df[df["t"].isin(keep)].sort_values(["expiry", "strike", "option_type", "t"]).copy()
    g = df.groupby(["expiry", "strike", "option_type"], sort=False)
    df["day_volume"] = g["volume"].cummax()
    df["bar_volume"] = df["day_volume"] - g["day_volume"].shift(1).fillna(0).astype("int64")
    df["bar_oi_change"] = (df["oi"] - g["oi"].shift(1)).fillna(0).astype("int64")
    spot = df.groupby("t")["spot"].first().sort_index()
    first_seen = df.groupby(["expiry", "strike"])["t"].min().reset_index()
    out = {}
    for table, sec in TF_SECONDS.items():
        d = df.assign(b=df["t"] - df["t"] % sec)
        gg = d.groupby(["expiry", "strike", "option_type", "b"], sort=True)
        bars = gg.agg(open=("ltp", "first"), high=("ltp", "max"), low=("ltp", "min"), close=("ltp", "last"),
                      iv=("iv", "last"), delta=("delta", "last"), gamma=("gamma", "last"), theta=("theta", "last"),
                      vega=("vega", "last"), oi=("oi", "last"), day_volume=("day_volume", "last"),
                      volume=("bar_volume", "sum"), oi_change=("bar_oi_change", "sum"), close_t=("t", "max"))
        bars = bars.reset_index()
        # Index close of the bucket = spot of its last snapshot; ATM = nearest strike of the expiry first seen at
        # or before that snapshot (ties: the lower strike).
        last_t = {b: spot.index[spot.index < b + sec].max() for b in bars["b"].unique()}
        atm = {}
        for (exp, b), _ in bars.groupby(["expiry", "b"]):
            lt = last_t[b]
            ks = np.sort(first_seen[(first_seen["expiry"] == exp) & (first_seen["t"] <= lt)]["strike"].to_numpy())
            atm[(exp, b)] = float(ks[np.argmin(np.abs(ks - spot[lt]))])
        bars["underlying_close"] = [float(spot[last_t[b]]) for b in bars["b"]]
        bars["atm_strike"] = [atm[(e, b)] for e, b in zip(bars["expiry"], bars["b"], strict=True)]
        bars["moneyness_level"] = ((bars["strike"] - bars["atm_strike"]) / STEP).round().astype(int)
        out[table] = bars
    return out


async def actual_bars(pg_dsn: str, table: str) -> pd.DataFrame:
    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = await conn.fetch(f"SELECT * FROM {table}")
    finally:
        await conn.close()
    recs = []
    for r in rows:
        for side, ot in (("ce", "CE"), ("pe", "PE")):
            if r[f"{side}_close_time"] is None:
                continue
            rec = {"expiry": r["expiry"].isoformat(), "strike": r["strike"], "option_type": ot,
                   "b": int(r["bucket_time"].timestamp()), "underlying_close": r["underlying_close"],
                   "atm_strike": r["atm_strike"], "moneyness_level": r["moneyness_level"],
                   "close_t": int(r[f"{side}_close_time"].timestamp())}
            for f in ("open", "high", "low", *LAST, "volume", "oi_change"):
                rec[f] = r[f"{side}_{f}"]
            recs.append(rec)
    return pd.DataFrame(recs)


def assert_same(exp: pd.DataFrame, act: pd.DataFrame, table: str) -> None:
    key = ["expiry", "strike", "option_type", "b"]
    assert len(act) == len(exp), f"{table}: {len(act)} legs written, {len(exp)} expected"
    m = exp.merge(act, on=key, how="outer", suffixes=("_exp", "_act"), indicator=True)
    assert (m["_merge"] == "both").all(), f"{table}: key mismatch\n{m[m['_merge'] != 'both'].head()}"
    for f in ("open", "high", "low", *LAST, "volume", "oi_change", "close_t", "underlying_close", "atm_strike",
              "moneyness_level"):
        a, e = m[f"{f}_act"].to_numpy(dtype=float), m[f"{f}_exp"].to_numpy(dtype=float)
        bad = ~np.isclose(a, e, rtol=0, atol=1e-9)
        sample = m.loc[bad, [*key, f + "_exp", f + "_act"]].head()
        assert not bad.any(), f"{table}.{f}: {bad.sum()} mismatches, e.g.\n{sample}"


async def test_rollups_equal_independent_aggregation_of_csv(pg_dsn: str, redis_url: str, nifty_1min_csv: Path) -> None:
    batches = snapshots(nifty_1min_csv, MINUTES)
    assert len(batches) == MINUTES
    async with pipeline(pg_dsn, redis_url, validator=True) as (p, _pool, _r):
        # Uneven call sizes: buckets of every timeframe are completed over several commits.
        results = await run_batches(p, batches, per_call=7)
    assert sum(r.accepted for r in results) == sum(len(b.option_ticks) + len(b.underlying_ticks) for b in batches)
    assert all(not r.rejected for r in results)
    expected = expected_bars(nifty_1min_csv, MINUTES)
    for table in TF_SECONDS:
        assert_same(expected[table], await actual_bars(pg_dsn, table), table)

    conn = await asyncpg.connect(pg_dsn)
    try:
        # bars_latest = newest bar of each (timeframe, expiry, strike), identical to the bar table's row.
        for table, tf in TF_NUMBER.items():
            diff = await conn.fetchval(
                f"SELECT count(*) FROM (SELECT DISTINCT ON (expiry, strike) * FROM {table} "
                f"ORDER BY expiry, strike, bucket_time DESC) b FULL JOIN (SELECT * FROM bars_latest WHERE timeframe = "
                f"{tf}) l USING (underlying, expiry, strike) WHERE l.bucket_time IS DISTINCT FROM b.bucket_time "
                f"OR l.ce_close IS DISTINCT FROM b.ce_close OR l.pe_oi IS DISTINCT FROM b.pe_oi "
                f"OR l.moneyness_level IS DISTINCT FROM b.moneyness_level "
                f"OR l.pe_volume IS DISTINCT FROM b.pe_volume")
            assert diff == 0, table
        # Underlying bars: 1M close = spot of the minute; 1H high = max spot of the hour.
        ub = await conn.fetch("SELECT timeframe, extract(epoch FROM bucket_time)::int8 AS b, open, high, low, close "
                              "FROM underlying_bars")
    finally:
        await conn.close()
    df = pd.read_csv(nifty_1min_csv, usecols=["ts_ist", "spot"]).drop_duplicates("ts_ist")
    df["t"] = _epoch_s(df["ts_ist"])
    df = df.sort_values("t").head(MINUTES)
    for tf, sec in ((1, 60), (4, 3600)):
        exp = df.assign(b=df["t"] - df["t"] % sec).groupby("b")["spot"].agg(["first", "max", "min", "last"])
        got = {r["b"]: (r["open"], r["high"], r["low"], r["close"]) for r in ub if r["timeframe"] == tf}
        assert got == {b: tuple(v) for b, v in zip(exp.index, exp.itertuples(index=False), strict=True)}
