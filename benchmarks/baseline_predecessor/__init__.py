"""The predecessor's read path, rebuilt on the same data for the query benchmark's baseline (benchmarks only).

Its design (as described in issue 4): one row per contract-minute (``pred_option_1m``), a 5-minute aggregate table
without OI (``pred_agg_5m``, like a continuous aggregate), an *enriched view* that JOINs the 5-minute aggregate back
to the 1-minute rows to get OI and spot at the bucket's last minute, a "latest" CTE with ``MAX(bucket)``, and the
moneyness classification done row by row in Python; answers are encoded as JSON.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

import asyncpg

SCHEMA = """
CREATE TABLE pred_option_1m (
  symbol text NOT NULL, ts timestamptz NOT NULL, expiry date NOT NULL, strike double precision NOT NULL,
  option_type text NOT NULL, spot double precision, ltp double precision, iv double precision,
  oi bigint, volume bigint);
CREATE INDEX pred_option_1m_ts ON pred_option_1m (symbol, ts);
CREATE INDEX pred_option_1m_contract ON pred_option_1m (symbol, expiry, strike, option_type, ts);
CREATE TABLE pred_agg_5m (
  symbol text NOT NULL, bucket timestamptz NOT NULL, expiry date NOT NULL, strike double precision NOT NULL,
  option_type text NOT NULL, open double precision, high double precision, low double precision,
  close double precision, iv double precision, volume bigint, last_ts timestamptz);
CREATE INDEX pred_agg_5m_bucket ON pred_agg_5m (symbol, bucket);
CREATE VIEW pred_enriched_5m AS
  SELECT a.symbol, a.bucket, a.expiry, a.strike, a.option_type, a.open, a.high, a.low, a.close, a.iv, a.volume,
         o.oi, o.spot
    FROM pred_agg_5m a
    JOIN pred_option_1m o ON o.symbol = a.symbol AND o.expiry = a.expiry AND o.strike = a.strike
                         AND o.option_type = a.option_type AND o.ts = a.last_ts;
"""

FILL = """
INSERT INTO pred_option_1m
SELECT b.underlying, b.bucket_time, b.expiry, b.strike, s.ot, b.underlying_close, s.ltp, s.iv, s.oi, s.vol
  FROM bars_1m b
 CROSS JOIN LATERAL (VALUES ('CE', b.ce_close, b.ce_iv, b.ce_oi, b.ce_day_volume),
                            ('PE', b.pe_close, b.pe_iv, b.pe_oi, b.pe_day_volume)) AS s(ot, ltp, iv, oi, vol)
 WHERE s.ltp IS NOT NULL;
INSERT INTO pred_agg_5m
SELECT symbol, to_timestamp(floor(extract(epoch FROM ts) / 300) * 300) AS bucket, expiry, strike, option_type,
       (array_agg(ltp ORDER BY ts))[1], max(ltp), min(ltp), (array_agg(ltp ORDER BY ts DESC))[1], avg(iv),
       max(volume) - min(volume), max(ts)
  FROM pred_option_1m GROUP BY 1, 2, 3, 4, 5;
ANALYZE pred_option_1m;
ANALYZE pred_agg_5m;
"""


async def build(conn: asyncpg.Connection) -> None:
    """Create the predecessor's schema and fill it from our ``bars_1m`` (same data)."""
    await conn.execute(SCHEMA)
    await conn.execute(FILL)


def _atm(strikes: list[float], spot: float) -> float:
    return min(sorted(strikes), key=lambda k: abs(k - spot))


async def strike_distribution(conn: asyncpg.Connection, symbol: str, n: int = 10, step: float = 50.0) -> bytes:
    """The predecessor's strike distribution: latest 5-minute bucket via the MAX CTE over the enriched view,
    nearest 3 expiries, ATM±N selected in Python, JSON-encoded."""
    rows = await conn.fetch("""
        WITH latest AS (SELECT max(bucket) AS b FROM pred_enriched_5m WHERE symbol = $1)
        SELECT e.* FROM pred_enriched_5m e, latest WHERE e.symbol = $1 AND e.bucket = latest.b
         ORDER BY e.expiry, e.strike, e.option_type""", symbol)
    by_exp: dict[Any, list[Any]] = defaultdict(list)
    for r in rows:
        by_exp[r["expiry"]].append(r)
    out = []
    for exp in sorted(by_exp)[:3]:
        rs = by_exp[exp]
        spot = rs[0]["spot"]
        atm = _atm(list({r["strike"] for r in rs}), spot)
        bars: dict[float, dict[str, Any]] = {}
        for r in rs:
            if abs(r["strike"] - atm) / step <= n:
                bars.setdefault(r["strike"], {"strike": r["strike"]})[r["option_type"]] = {
                    "ltp": r["close"], "iv": r["iv"], "oi": r["oi"], "volume": r["volume"]}
        out.append({"expiry": exp.isoformat(), "atm_strike": atm, "bars": list(bars.values())})
    return json.dumps({"underlying": symbol, "expiries": out}).encode()


async def moneyness_series(conn: asyncpg.Connection, symbol: str, end: datetime, expiries: list[Any],
                           levels: int = 10, step: float = 50.0) -> bytes:
    """The predecessor's moneyness series: 6 h of enriched 5-minute rows, every row classified in Python (ATM per
    bucket and expiry from the spot and the strikes present), JSON-encoded."""
    rows = await conn.fetch(
        "SELECT bucket, expiry, strike, option_type, iv, spot FROM pred_enriched_5m WHERE symbol = $1"
        " AND bucket > $2 AND bucket <= $3 AND expiry = ANY($4) ORDER BY bucket", symbol,
        end - timedelta(hours=6), end, expiries)
    groups: dict[tuple[Any, Any], list[Any]] = defaultdict(list)
    for r in rows:
        groups[(r["bucket"], r["expiry"])].append(r)
    series: dict[tuple[Any, int], dict[str, list[Any]]] = defaultdict(lambda: {"t": [], "v": [], "k": []})
    for (bucket, exp), rs in sorted(groups.items()):
        atm = _atm(list({r["strike"] for r in rs}), rs[0]["spot"])
        for r in rs:
            if r["option_type"] != "CE" or r["iv"] is None:
                continue
            lvl = round((r["strike"] - atm) / step)
            if abs(lvl) <= levels:
                s = series[(exp, lvl)]
                s["t"].append(int(bucket.timestamp()))
                s["v"].append(r["iv"])
                s["k"].append(r["strike"])
    return json.dumps([{"expiry": e.isoformat(), "level": lvl, **v} for (e, lvl), v in sorted(series.items())]).encode()
