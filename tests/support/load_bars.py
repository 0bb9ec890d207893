"""Test/benchmark data loader: the real 18-Aug-2026 NIFTY 1-minute chain (``nifty-oc-1min-2026-08``, see its
PROVENANCE.md) written straight into the bar tables, without the ingest pipeline.

Each CSV row is one contract at one minute (a snapshot, not OHLC). It becomes part of a 1-minute bar:
  - O = H = L = C = ``ltp`` (₹); IV (percent) and Greeks as given;
  - ``oi`` (contracts); ``oi_change`` = OI − OI of the contract's previous present row (0 for its first row);
  - ``day_volume`` = cumulative day volume (high-water mark); ``volume`` = day_volume − previous day_volume
    (≥ 0; the first row counts its whole cumulative volume);
  - ``underlying_close`` = ``spot``; ``atm_strike`` = strike of that minute's listed strikes of the expiry nearest the
    spot (``services.common.domain.moneyness.atm_strike``); ``moneyness_level`` = (strike − ATM) / 50.
5-minute bars are rolled up in SQL (open = first, close/IV/Greeks/OI = last, high/low = max/min, volume and
oi_change summed; ATM = the ATM of the bucket's last minute of that expiry). ``bars_latest`` and
``underlying_bars`` (1M and 5M) are filled too. This is test support only: the real ingest replaces it end to end.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import numpy as np
import pandas as pd

from services.common.domain.moneyness import atm_strike

UNDERLYING = "NIFTY"
STRIKE_STEP = 50.0

#: Column order of the bar tables (without updated_at).
BAR_COLUMNS = [
    "underlying", "expiry", "strike", "bucket_time", "underlying_close", "atm_strike", "moneyness_level",
    *[f"{s}_{c}" for s in ("ce", "pe") for c in (
        "open", "high", "low", "close", "iv", "delta", "gamma", "theta", "vega", "oi", "oi_change", "volume",
        "day_volume", "close_time")],
]
_LEG = ["open", "high", "low", "close", "iv", "delta", "gamma", "theta", "vega", "oi", "oi_change", "volume",
        "day_volume", "close_time"]


def read_csv(path: Path, minutes: int | None = None) -> pd.DataFrame:
    """The CSV as a DataFrame with ``ts`` (UTC, tz-aware) and ``expiry`` (date); the first ``minutes`` minutes only
    when given."""
    df = pd.read_csv(path)
    df["ts"] = pd.to_datetime(df["ts_ist"]).dt.tz_convert("UTC")
    df["expiry"] = pd.to_datetime(df["expiry"]).dt.date
    if minutes is not None:
        keep = sorted(df["ts"].unique())[:minutes]
        df = df[df["ts"].isin(keep)]
    return df


def bars_1m_frame(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (minute, expiry, strike), columns :data:`BAR_COLUMNS`."""
    df = df.sort_values(["expiry", "strike", "option_type", "ts"]).copy()
    g = df.groupby(["expiry", "strike", "option_type"], sort=False)
    df["day_volume"] = g["volume"].cummax()
    prev = g["day_volume"].shift(1)
    df["bar_volume"] = (df["day_volume"] - prev.fillna(0)).clip(lower=0).astype("int64")
    df["bar_oi_change"] = (df["oi"] - g["oi"].shift(1)).fillna(0).astype("int64")
    # ATM per (minute, expiry) from that minute's listed strikes of the expiry.
    atm = {}
    for (ts, exp), grp in df.groupby(["ts", "expiry"], sort=False):
        strikes = sorted(set(grp["strike"].tolist()))
        atm[(ts, exp)] = atm_strike(strikes, float(grp["spot"].iloc[0]))
    df["atm"] = [atm[(t, e)] for t, e in zip(df["ts"], df["expiry"], strict=True)]
    legs = {}
    for side, ot in (("ce", "CE"), ("pe", "PE")):
        s = df[df["option_type"] == ot]
        legs[side] = pd.DataFrame({
            "ts": s["ts"], "expiry": s["expiry"], "strike": s["strike"], "spot": s["spot"], "atm": s["atm"],
            f"{side}_open": s["ltp"], f"{side}_high": s["ltp"], f"{side}_low": s["ltp"], f"{side}_close": s["ltp"],
            f"{side}_iv": s["iv"], f"{side}_delta": s["delta"], f"{side}_gamma": s["gamma"],
            f"{side}_theta": s["theta"], f"{side}_vega": s["vega"], f"{side}_oi": s["oi"],
            f"{side}_oi_change": s["bar_oi_change"], f"{side}_volume": s["bar_volume"],
            f"{side}_day_volume": s["day_volume"], f"{side}_close_time": s["ts"],
        })
    m = legs["ce"].merge(legs["pe"], on=["ts", "expiry", "strike"], how="outer", suffixes=("", "_p"))
    m["spot"] = m["spot"].fillna(m["spot_p"])
    m["atm"] = m["atm"].fillna(m["atm_p"])
    m["underlying"] = UNDERLYING
    m["bucket_time"] = m["ts"]
    m["underlying_close"] = m["spot"]
    m["atm_strike"] = m["atm"]
    m["moneyness_level"] = np.rint((m["strike"] - m["atm"]) / STRIKE_STEP).astype("int64")
    return m[BAR_COLUMNS]


def _records(frame: pd.DataFrame) -> list[tuple[object, ...]]:
    out = []
    for row in frame.itertuples(index=False, name=None):
        rec: list[object] = []
        for v in row:
            if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NaT:
                rec.append(None)
            elif isinstance(v, pd.Timestamp):
                rec.append(v.to_pydatetime())
            elif isinstance(v, np.integer):
                rec.append(int(v))
            elif isinstance(v, np.floating):
                rec.append(float(v))
            else:
                rec.append(v)
        out.append(tuple(rec))
    return out


_INT_COLS = {f"{s}_{c}" for s in ("ce", "pe") for c in ("oi", "oi_change", "volume", "day_volume")}


async def load_nifty_day(dsn: str, csv_path: Path, minutes: int | None = None) -> dict[str, int]:
    """Load the CSV (first ``minutes`` minutes when given) into bars_1m, bars_5m, bars_latest (1M and 5M) and
    underlying_bars (1M and 5M) of the database at ``dsn``. Returns row counts per table."""
    df = read_csv(csv_path, minutes)
    frame = bars_1m_frame(df)
    for c in _INT_COLS:
        frame[c] = frame[c].astype("Int64").astype(object).where(frame[c].notna(), None)
    conn = await asyncpg.connect(dsn)
    try:
        days = sorted({t.date() for t in frame["bucket_time"]})
        await conn.execute("SELECT optmon_ensure_partitions($1, $2)", days[0], days[-1])
        await conn.copy_records_to_table("bars_1m", records=_records(frame), columns=BAR_COLUMNS)
        spot = df.groupby("ts")["spot"].first().sort_index()
        await conn.copy_records_to_table(
            "underlying_bars",
            records=[(UNDERLYING, 1, t.to_pydatetime(), p, p, p, p, t.to_pydatetime()) for t, p in spot.items()],
            columns=["underlying", "timeframe", "bucket_time", "open", "high", "low", "close", "close_time"],
        )
        await rollup(conn, "bars_5m", 2, 300)
        await refresh_latest(conn)
        counts = {}
        for t in ("bars_1m", "bars_5m", "bars_latest", "underlying_bars"):
            counts[t] = await conn.fetchval(f"SELECT count(*) FROM {t}")
        return counts
    finally:
        await conn.close()


def _leg_rollup(s: str) -> str:
    last = f"(array_agg({{c}} ORDER BY bucket_time DESC) FILTER (WHERE {s}_close IS NOT NULL))[1]"
    first = f"(array_agg({{c}} ORDER BY bucket_time) FILTER (WHERE {s}_close IS NOT NULL))[1]"
    parts = [
        first.format(c=f"{s}_open"), f"max({s}_high)", f"min({s}_low)", last.format(c=f"{s}_close"),
        *[last.format(c=f"{s}_{c}") for c in ("iv", "delta", "gamma", "theta", "vega", "oi")],
        f"sum({s}_oi_change)::bigint", f"sum({s}_volume)::bigint", f"max({s}_day_volume)", f"max({s}_close_time)",
    ]
    return ", ".join(f"{p} AS {s}_{c}" for p, c in zip(parts, _LEG, strict=True))


async def rollup(conn: asyncpg.Connection, table: str, timeframe: int, seconds: int,
                 where: str = "TRUE") -> None:
    """Roll ``bars_1m`` (rows matching ``where``) up into ``table`` (a fixed name) with buckets of ``seconds``, and
    the 1M underlying bars into ``underlying_bars`` with ``timeframe``."""
    bucket = f"to_timestamp(floor(extract(epoch FROM bucket_time) / {seconds}) * {seconds})"
    await conn.execute(f"""
        WITH b AS (SELECT *, {bucket} AS bkt FROM bars_1m WHERE {where}),
        atm AS (SELECT DISTINCT ON (underlying, expiry, bkt) underlying, expiry, bkt, atm_strike, underlying_close
                  FROM b ORDER BY underlying, expiry, bkt, bucket_time DESC),
        agg AS (SELECT underlying, expiry, strike, bkt, {_leg_rollup('ce')}, {_leg_rollup('pe')}
                  FROM b GROUP BY underlying, expiry, strike, bkt)
        INSERT INTO {table} ({", ".join(BAR_COLUMNS)})
        SELECT agg.underlying, agg.expiry, agg.strike, agg.bkt, atm.underlying_close, atm.atm_strike,
               round((agg.strike - atm.atm_strike) / {STRIKE_STEP})::int, agg.*
          FROM agg JOIN atm USING (underlying, expiry, bkt)
    """.replace("agg.*", ", ".join(f"agg.{c}" for c in BAR_COLUMNS[7:])))
    await conn.execute(f"""
        INSERT INTO underlying_bars (underlying, timeframe, bucket_time, open, high, low, close, close_time)
        SELECT underlying, {timeframe}, {bucket},
               (array_agg(open ORDER BY bucket_time))[1], max(high), min(low),
               (array_agg(close ORDER BY bucket_time DESC))[1], max(close_time)
          FROM underlying_bars WHERE timeframe = 1 GROUP BY underlying, {bucket}
        ON CONFLICT (underlying, timeframe, bucket_time) DO NOTHING
    """)


async def refresh_latest(conn: asyncpg.Connection) -> None:
    """Rebuild ``bars_latest`` for 1M and 5M from the bar tables."""
    cols = ", ".join(BAR_COLUMNS)
    await conn.execute("DELETE FROM bars_latest")
    for tf, table in ((1, "bars_1m"), (2, "bars_5m")):
        await conn.execute(f"""
            INSERT INTO bars_latest (timeframe, {cols})
            SELECT DISTINCT ON (underlying, expiry, strike) {tf}, {cols} FROM {table}
             ORDER BY underlying, expiry, strike, bucket_time DESC
        """)


def utc(y: int, mo: int, d: int, h: int, mi: int) -> datetime:
    """A UTC datetime (helper for tests)."""
    return datetime(y, mo, d, h, mi, tzinfo=UTC)
