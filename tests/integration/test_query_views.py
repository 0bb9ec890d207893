"""QueryService views over the real 18-Aug-2026 NIFTY day, checked against values computed independently from the
CSV inside the test (pandas / DuckDB), through a real in-process grpc.aio server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import grpc
import numpy as np
import pandas as pd
import pytest
from optmon.v1 import query_service_pb2 as q
from optmon.v1 import query_service_pb2_grpc as qg

from tests.support import query_fixtures

pytestmark = pytest.mark.integration
# fixtures (module attributes so pytest finds them)
bars_dsn = query_fixtures.bars_dsn
bars_template = query_fixtures.bars_template
query_server = query_fixtures.query_server
CARRY = timedelta(minutes=5)


@pytest.fixture(scope="module")
def csv(nifty_1min_csv: Path) -> pd.DataFrame:
    df = pd.read_csv(nifty_1min_csv)
    df["ts"] = pd.to_datetime(df["ts_ist"]).dt.tz_convert("UTC")
    return df


def _atm(strikes: list[float], spot: float) -> float:
    s = sorted(strikes)
    return min(s, key=lambda k: (abs(k - spot), k))


def _snapshot(csv: pd.DataFrame, bucket: pd.Timestamp, expiry: str) -> pd.DataFrame:
    """Newest row-minute per strike within the carry window, with CE/PE columns of that minute."""
    w = csv[(csv["ts"] > bucket - CARRY) & (csv["ts"] <= bucket) & (csv["expiry"] == expiry)]
    newest = w.groupby("strike")["ts"].max().rename("newest")
    w = w.merge(newest, left_on="strike", right_index=True)
    w = w[w["ts"] == w["newest"]]
    ce = w[w["option_type"] == "CE"].set_index("strike")
    pe = w[w["option_type"] == "PE"].set_index("strike")
    return ce.join(pe, how="outer", suffixes=("_ce", "_pe")).sort_index()


def _epoch(ts: pd.Series) -> pd.Series:
    return (ts - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)


def _stub(addr: str) -> tuple[grpc.aio.Channel, qg.QueryServiceStub]:
    ch = grpc.aio.insecure_channel(addr)
    return ch, qg.QueryServiceStub(ch)


async def _check_distribution(csv: pd.DataFrame, resp: q.GetStrikeDistributionResponse, bucket: pd.Timestamp,
                              expiries: list[str], n: int, full: bool) -> None:
    spot = float(csv[csv["ts"] == bucket]["spot"].iloc[0])
    assert resp.bucket_time.ToDatetime(tzinfo=UTC) == bucket.to_pydatetime()
    assert resp.underlying_price == pytest.approx(spot)
    assert [e.expiry for e in resp.expiries] == expiries
    for ed in resp.expiries:
        snap = _snapshot(csv, bucket, ed.expiry)
        atm = _atm(list(snap.index), spot)
        assert ed.atm_strike == atm
        want = [k for k in snap.index if abs(k - atm) / 50 <= n]
        assert [b.strike for b in ed.bars] == want
        for b in ed.bars:
            row = snap.loc[b.strike]
            assert b.moneyness_level == round((b.strike - atm) / 50)
            for leg, sfx in ((b.call, "_ce"), (b.put, "_pe")):
                if pd.isna(row["oi" + sfx]):
                    assert not leg.HasField("oi")
                    continue
                assert leg.oi == int(row["oi" + sfx])
                if full:
                    assert leg.ltp == pytest.approx(row["ltp" + sfx])
                    assert leg.iv == pytest.approx(row["iv" + sfx])
                else:
                    assert not leg.HasField("ltp") and not leg.HasField("iv")


async def test_strike_distribution_latest_matches_csv(query_server, csv: pd.DataFrame) -> None:
    _, addr = query_server
    ch, st = _stub(addr)
    async with ch:
        resp = await st.GetStrikeDistribution(q.GetStrikeDistributionRequest(underlying="NIFTY"))
    bucket = csv["ts"].max()
    await _check_distribution(csv, resp, bucket, ["2026-08-18", "2026-08-25", "2026-09-01"], 10, True)
    assert not resp.stale


async def test_strike_distribution_as_of_snapshot_and_indicator_filter(query_server, csv: pd.DataFrame) -> None:
    _, addr = query_server
    ch, st = _stub(addr)
    as_of = datetime(2026, 8, 18, 6, 30, 40, tzinfo=UTC)  # 12:00:40 IST → bucket 12:00 IST
    req = q.GetStrikeDistributionRequest(underlying="nifty", expiries=["2026-09-01", "2026-08-25"],
                                         strikes_around_atm=3, indicators=[7])
    req.as_of_time.FromDatetime(as_of)
    async with ch:
        resp = await st.GetStrikeDistribution(req)
    await _check_distribution(csv, resp, pd.Timestamp("2026-08-18T06:30:00Z"), ["2026-09-01", "2026-08-25"], 3,
                              False)


async def test_option_chain_analytics_match_csv(query_server, csv: pd.DataFrame) -> None:
    _, addr = query_server
    ch, st = _stub(addr)
    req = q.GetOptionChainRequest(underlying="NIFTY", expiry="2026-08-25")
    req.as_of_time.FromDatetime(datetime(2026, 8, 18, 7, 30, tzinfo=UTC))  # 13:00 IST
    async with ch:
        resp = await st.GetOptionChain(req)
    bucket = pd.Timestamp("2026-08-18T07:30:00Z")
    exp = "2026-08-25"
    day = csv[(csv["expiry"] == exp) & (csv["ts"] <= bucket)].sort_values("ts")
    spot = float(csv[csv["ts"] == bucket]["spot"].iloc[0])
    snap = _snapshot(csv, bucket, exp)
    atm = _atm(list(snap.index), spot)
    assert resp.expiry == exp and resp.atm_strike == atm and resp.underlying_price == pytest.approx(spot)
    assert [r.strike for r in resp.rows] == list(snap.index)
    # ΔOI since the contract's first bar of the session; day volume = running max of cumulative volume
    first_oi = day.groupby(["strike", "option_type"])["oi"].first()
    day = day.assign(day_vol=day.groupby(["strike", "option_type"])["volume"].cummax())
    for r in resp.rows:
        for leg, ot, sfx in ((r.call, "CE", "_ce"), (r.put, "PE", "_pe")):
            row = snap.loc[r.strike]
            if pd.isna(row["oi" + sfx]):
                assert not leg.HasField("ltp")
                continue
            oi0 = int(first_oi[(r.strike, ot)])
            assert leg.oi_change == int(row["oi" + sfx]) - oi0
            if oi0:
                assert leg.oi_change_percent == pytest.approx((int(row["oi" + sfx]) - oi0) / oi0 * 100)
            else:
                assert not leg.HasField("oi_change_percent")
            dv = day[(day["strike"] == r.strike) & (day["option_type"] == ot) & (day["ts"] == row["ts" + sfx])]
            assert leg.volume == int(dv["day_vol"].iloc[0])
    ce_oi = snap["oi_ce"].fillna(0).to_numpy()
    pe_oi = snap["oi_pe"].fillna(0).to_numpy()
    ks = snap.index.to_numpy()
    assert resp.total_call_oi == int(ce_oi.sum()) and resp.total_put_oi == int(pe_oi.sum())
    assert resp.pcr_oi == pytest.approx(pe_oi.sum() / ce_oi.sum())
    vols = {}
    for ot, sfx in (("CE", "_ce"), ("PE", "_pe")):
        tot = 0
        for k, t in snap["ts" + sfx].dropna().items():
            d = day[(day["strike"] == k) & (day["option_type"] == ot) & (day["ts"] == t)]
            tot += int(d["day_vol"].iloc[0])
        vols[ot] = tot
    assert resp.pcr_volume == pytest.approx(vols["PE"] / vols["CE"])
    pain = [(ce_oi * np.maximum(0, k - ks)).sum() + (pe_oi * np.maximum(0, ks - k)).sum() for k in ks]
    assert resp.max_pain_strike == ks[int(np.argmin(pain))]
    a = snap.loc[atm]
    assert resp.atm_straddle_price == pytest.approx(a["ltp_ce"] + a["ltp_pe"])
    assert resp.atm_iv == pytest.approx((a["iv_ce"] + a["iv_pe"]) / 2)
    # IV history: ATM (per minute, nearest listed strike of that minute) IV of this expiry up to the bucket
    hist = []
    for _t, g in day.groupby("ts"):
        s = float(g["spot"].iloc[0])
        k = _atm(sorted(set(g["strike"])), s)
        ivs = g[g["strike"] == k]["iv"].tolist()
        hist.append(sum(ivs) / len(ivs))
    h = np.array(hist)
    cur = resp.atm_iv
    assert resp.iv_rank == pytest.approx((cur - h.min()) / (h.max() - h.min()) * 100)
    assert resp.iv_percentile == pytest.approx((h < cur - 1e-12).sum() / len(h) * 100)


async def test_moneyness_series_matches_duckdb(query_server, csv: pd.DataFrame) -> None:
    _, addr = query_server
    ch, st = _stub(addr)
    async with ch:
        resp = await st.GetMoneynessSeries(q.GetMoneynessSeriesRequest(underlying="NIFTY"))
    assert resp.end_time.ToDatetime(tzinfo=UTC) == datetime(2026, 8, 18, 10, 0, tzinfo=UTC)
    assert resp.start_time.ToDatetime(tzinfo=UTC) == datetime(2026, 8, 18, 4, 0, tzinfo=UTC)
    con = duckdb.connect()
    con.register("raw", csv.assign(epoch=_epoch(csv["ts"]))[
        ["epoch", "expiry", "strike", "option_type", "spot", "iv"]])
    # ATM of each (minute, expiry) from the strikes listed that minute, then the 5-minute bucket's last minute.
    expected = con.execute("""
        WITH m AS (SELECT epoch, expiry, any_value(spot) AS spot, list(DISTINCT strike) AS strikes
                     FROM raw GROUP BY epoch, expiry),
        atm AS (SELECT epoch, expiry,
                       (SELECT s FROM (SELECT unnest(strikes) AS s) ORDER BY abs(s - spot), s LIMIT 1) AS atm
                  FROM m),
        b AS (SELECT *, epoch - epoch % 300 AS bkt FROM raw),
        last_min AS (SELECT expiry, bkt, max(epoch) AS e FROM b GROUP BY expiry, bkt),
        batm AS (SELECT l.expiry, l.bkt, a.atm FROM last_min l JOIN atm a ON a.epoch = l.e AND a.expiry = l.expiry),
        ce AS (SELECT expiry, strike, bkt, arg_max(iv, epoch) AS iv FROM b WHERE option_type = 'CE'
                GROUP BY expiry, strike, bkt)
        SELECT ce.expiry, CAST(round((ce.strike - batm.atm) / 50) AS INTEGER) AS level, ce.bkt, ce.iv, ce.strike
          FROM ce JOIN batm USING (expiry, bkt)
         WHERE ce.expiry IN ('2026-08-18', '2026-08-25', '2026-09-01')
           AND abs(round((ce.strike - batm.atm) / 50)) <= 10
         ORDER BY 1, 2, 3
    """).df()
    got = [(s.expiry, s.level, t, v, k) for s in resp.series for t, v, k in zip(s.times, s.values, s.strikes,
                                                                                  strict=True)]
    want = [(str(r.expiry), int(r.level), int(r.bkt), float(r.iv), float(r.strike))
            for r in expected.itertuples()]
    assert len(got) == len(want) > 1000
    for g, w in zip(got, want, strict=True):
        assert g[:3] == w[:3] and g[3] == pytest.approx(w[3]) and g[4] == w[4]
    labels = {(s.level, s.label) for s in resp.series}
    assert (0, "ATM") in labels and (-2, "ITM2") in labels and (3, "OTM3") in labels


async def test_list_bars_pages_and_lists(query_server, csv: pd.DataFrame) -> None:
    _, addr = query_server
    ch, st = _stub(addr)
    rows = csv[(csv["expiry"] == "2026-08-25") & (csv["strike"] == 24200.0) & (csv["option_type"] == "PE")]
    async with ch:
        t: list[int] = []
        c: list[float] = []
        oi: list[int] = []
        token = ""
        pages = 0
        while True:
            req = q.ListBarsRequest(underlying="NIFTY", expiry="2026-08-25", strike=24200, option_type=2,
                                    page_size=100, page_token=token)
            req.start_time.FromDatetime(datetime(2026, 8, 18, tzinfo=UTC))
            req.end_time.FromDatetime(datetime(2026, 8, 19, tzinfo=UTC))
            r = await st.ListBars(req)
            pages += 1
            assert r.s == "ok"
            t += r.t
            c += r.c
            oi += r.oi
            token = r.next_page_token
            if not token:
                break
        assert pages == -(-len(rows) // 100)
        assert t == list(_epoch(rows["ts"]))
        assert c == pytest.approx(list(rows["ltp"])) and oi == list(rows["oi"])
        ub = q.ListBarsRequest(underlying="NIFTY", timeframe=2)
        ub.start_time.FromDatetime(datetime(2026, 8, 18, tzinfo=UTC))
        ub.end_time.FromDatetime(datetime(2026, 8, 19, tzinfo=UTC))
        r = await st.ListBars(ub)
        assert r.s == "ok" and r.c[-1] == pytest.approx(24154.9) and len(r.t) == len(r.v) == len(r.iv)
        ub.start_time.FromDatetime(datetime(2026, 8, 20, tzinfo=UTC))
        ub.end_time.FromDatetime(datetime(2026, 8, 21, tzinfo=UTC))
        assert (await st.ListBars(ub)).s == "no_data"
        ex = await st.ListExpiries(q.ListExpiriesRequest(underlying="NIFTY"))
        assert list(ex.expiries) == ["2026-08-18", "2026-08-25", "2026-09-01", "2026-09-08"]
        un = await st.ListUnderlyings(q.ListUnderlyingsRequest())
        assert [(u.underlying, u.price, u.strike_step) for u in un.underlyings] == [("NIFTY", 24154.9, 50.0)]
        assert un.underlyings[0].bucket_time.ToDatetime(tzinfo=UTC) == csv["ts"].max().to_pydatetime()
        assert not un.stale and not ex.stale and not r.stale
