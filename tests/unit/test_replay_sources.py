"""Replay readers on the real shared data and on small malformed files written in tmp."""

from __future__ import annotations

import gzip
import itertools
import math
import shutil
from datetime import UTC, datetime, time
from pathlib import Path

import pytest
from optmon.v1 import market_pb2

from services.common.settings import DEFAULT_LOT_SIZES
from services.replay.sources import (
    KITE_OC_5MIN,
    KITE_TICKS,
    NSE_OC_1MIN,
    ErrorLog,
    SourceError,
    UnknownFormat,
    detect_format,
    open_source,
    parity_spot,
)
from tests.conftest import INDEX_5MIN_DIR, SHARED_DATA

CALL, PUT = market_pb2.OPTION_TYPE_CALL, market_pb2.OPTION_TYPE_PUT
KITE_30JAN = INDEX_5MIN_DIR / "index_oc_2026-01-30.csv.gz"
TICKS_DIR = SHARED_DATA / "banknifty-ticks-2021-08-20"

NSE_HEADER = "ts_ist,symbol,expiry,strike,option_type,spot,ltp,volume,oi,oi_chg,iv,delta,gamma,theta,vega,rho"
KITE_HEADER = ("Symbol,Expiry,Strike,CE_LTP,CE_OI,CE_Volume,PE_LTP,PE_OI,PE_Volume,Spot,%Change,timestamp,"
               "Max_Pain")


def _write(path: Path, lines: list[str]) -> Path:
    text = "\n".join(lines) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ detect_format


def test_detect_format_real_files(nifty_1min_csv: Path) -> None:
    assert detect_format(nifty_1min_csv) == NSE_OC_1MIN
    assert detect_format(KITE_30JAN) == KITE_OC_5MIN
    assert detect_format(INDEX_5MIN_DIR) == KITE_OC_5MIN  # a directory: its first data file (PROVENANCE.md ignored)
    assert detect_format(next(TICKS_DIR.glob("*CE*.jsonl.gz"))) == KITE_TICKS


def test_detect_format_unknown_names_missing_columns(tmp_path: Path) -> None:
    p = _write(tmp_path / "x.csv", [NSE_HEADER.replace("option_type", "opt_type"), "a,b"])
    with pytest.raises(UnknownFormat, match="option_type"):
        detect_format(p)
    with pytest.raises(UnknownFormat):
        detect_format(_write(tmp_path / "y.csv", ["foo,bar", "1,2"]))
    with pytest.raises(UnknownFormat):
        list(open_source(p))
    with pytest.raises(FileNotFoundError):
        list(open_source(tmp_path / "missing.csv"))


# ------------------------------------------------------------------------------------------------ nse-oc-1min


def test_nse_1min_real_day(nifty_1min_csv: Path) -> None:
    errors = ErrorLog()
    snaps = list(open_source(nifty_1min_csv, errors))
    assert errors.count == 0
    assert len(snaps) == 288  # one per minute, 10:43..15:30 IST
    assert sum(len(s.batch.option_ticks) for s in snaps) == 153_990  # every CSV row is one tick
    assert all(len(s.batch.underlying_ticks) == 1 for s in snaps)
    assert [s.time for s in snaps] == sorted(s.time for s in snaps)
    assert snaps[0].time == datetime(2026, 8, 18, 5, 13, tzinfo=UTC)  # 10:43 IST
    assert snaps[-1].time == datetime(2026, 8, 18, 10, 0, tzinfo=UTC)  # 15:30 IST
    assert {s.underlying for s in snaps} == {"NIFTY"}
    first = snaps[0].batch
    assert first.underlying_ticks[0].price == pytest.approx(24212.8)
    assert first.underlying_ticks[0].exchange_time.ToDatetime(tzinfo=UTC) == snaps[0].time
    # The file's first row: 22000 CE of the 18-Aug expiry.
    t = first.option_ticks[0]
    assert (t.underlying, t.expiry, t.strike, t.option_type) == ("NIFTY", "2026-08-18", 22000.0, CALL)
    assert (t.ltp, t.volume, t.oi) == (2235.0, 18, 52)  # contracts, unchanged
    assert (t.iv, t.delta, t.gamma, t.theta, t.vega) == (75.38, 0.9997, 2e-06, -4.6058, 0.0091)
    assert t.underlying_price == pytest.approx(24212.8)
    assert t.exchange_time.ToDatetime(tzinfo=UTC) == snaps[0].time
    assert first.option_ticks[1].option_type == PUT and first.option_ticks[1].oi == 26471
    assert snaps[-1].batch.underlying_ticks[0].price == pytest.approx(24154.9)


def test_nse_1min_filters(nifty_1min_csv: Path) -> None:
    snaps = list(open_source(nifty_1min_csv, start=time(15, 0), end=time(15, 9)))
    assert len(snaps) == 10
    assert snaps[0].time == datetime(2026, 8, 18, 9, 30, tzinfo=UTC)
    assert list(open_source(nifty_1min_csv, underlyings=["BANKNIFTY"])) == []


def test_nse_1min_malformed_rows_reported_and_skipped(tmp_path: Path) -> None:
    good = "2026-08-18T10:43:00+05:30,NIFTY,2026-08-18,24200.0,{ot},24212.8,{ltp},100,200,5,10.5,0.5,0.001,-5.0,3.0,1.0"
    lines = [
        NSE_HEADER,
        good.format(ot="CE", ltp="50.0"),  # line 2 ok
        good.format(ot="CE", ltp="abc"),  # line 3 bad number
        good.format(ot="XX", ltp="50.0"),  # line 4 unknown option type
        "2026-08-18T10:43:00+05:30,NIFTY,2026-08-18,24200.0,PE,24212.8,50.0,100",  # line 5 missing columns
        good.format(ot="PE", ltp="nan"),  # line 6 not finite
        good.format(ot="PE", ltp="40.0").replace("2026-08-18,24200", "2026-13-45,24200"),  # line 7 bad expiry
        good.format(ot="PE", ltp="41.0"),  # line 8 ok
        "not-a-time,NIFTY,2026-08-18,24200.0,CE,24212.8,1,1,1,1,1,1,1,1,1,1",  # line 9 bad time
        good.format(ot="PE", ltp="42.0").replace("10:43", "10:44").replace(",100,200,", ",1.5,200,"),  # 10 bad int
        good.format(ot="PE", ltp="43.0").replace("10:43", "10:44"),  # line 11 ok, replay goes on
    ]
    path = _write(tmp_path / "bad.csv.gz", lines)
    errors = ErrorLog()
    snaps = list(open_source(path, errors))
    assert [len(s.batch.option_ticks) for s in snaps] == [2, 1]
    assert [t.ltp for s in snaps for t in s.batch.option_ticks] == [50.0, 41.0, 43.0]
    assert errors.count == 7
    by_line = {e.line: e for e in errors.errors}
    assert set(by_line) == {3, 4, 5, 6, 7, 9, 10}
    assert all(e.file == str(path) for e in errors.errors)
    assert "ltp" in by_line[3].reason and "abc" in by_line[3].reason
    assert "option_type" in by_line[4].reason and "XX" in by_line[4].reason
    assert "expected 16 fields, got 8" in by_line[5].reason
    assert "finite" in by_line[6].reason
    assert "expiry" in by_line[7].reason
    assert "ts_ist" in by_line[9].reason
    assert "volume" in by_line[10].reason


def test_on_error_callback_and_blank_optional_fields(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.csv", [
        NSE_HEADER,
        "2026-08-18T10:43:00+05:30,NIFTY,2026-08-18,24200.0,CE,,50.0,100,200,5,,,,,,",  # no spot, no IV/Greeks
        "2026-08-18T10:43:00+05:30,NIFTY,2026-08-18,24250.0,CE,,x,100,200,5,,,,,,",
    ])
    seen: list[SourceError] = []
    (snap,) = list(open_source(path, seen.append))
    assert seen == [SourceError(str(path), 3, "ltp: not a number 'x'")]
    t = snap.batch.option_ticks[0]
    assert not t.HasField("iv") and not t.HasField("delta") and not t.HasField("underlying_price")
    assert len(snap.batch.underlying_ticks) == 0


# ------------------------------------------------------------------------------------------------ kite-oc-5min


def test_kite_5min_real_day_and_provenance_cross_check() -> None:
    errors = ErrorLog()
    snaps = list(open_source(KITE_30JAN, errors))
    assert errors.count == 0
    assert len(snaps) == 213  # 71 timestamps × NIFTY, BANKNIFTY, MIDCPNIFTY
    assert [s.time for s in snaps] == sorted(s.time for s in snaps)
    assert all(len(s.batch.underlying_ticks) == 1 for s in snaps)  # MIDCPNIFTY's spot from parity
    # 24,282 rows, two sides each, minus the untraded sides (LTP 0 and OI 0).
    assert sum(len(s.batch.option_ticks) for s in snaps) == 2 * 24_282 - 2_461 - 2_776
    (snap,) = [s for s in snaps if s.underlying == "NIFTY" and s.time == datetime(2026, 1, 30, 9, 56, 7, tzinfo=UTC)]
    ticks = {(t.strike, t.option_type): t for t in snap.batch.option_ticks}
    ce, pe = ticks[(25600.0, CALL)], ticks[(25600.0, PUT)]
    # PROVENANCE: LTP 94.0, volume 122,158,010 units = 1,879,354 contracts (lot 65).
    assert (ce.expiry, ce.ltp, ce.volume, ce.oi) == ("2026-02-03", 94.0, 1_879_354, 4_691_830 // 65)
    assert (pe.ltp, pe.volume, pe.oi) == (346.45, 5_044_715 // 65, 567_840 // 65)
    assert not ce.HasField("iv")  # ingest computes it
    assert snap.batch.underlying_ticks[0].price == 25320.5 == ce.underlying_price
    assert ce.exchange_time.ToDatetime(tzinfo=UTC) == snap.time


def test_kite_5min_parity_spot_close_to_real_spot(tmp_path: Path) -> None:
    """Zero NIFTY/BANKNIFTY Spot in a copy of the real 30-Jan file; the parity estimate stays within two strikes."""
    import pandas as pd

    df = pd.read_csv(KITE_30JAN)
    true = df.groupby(["Symbol", "timestamp"]).Spot.first()
    df["Spot"] = 0.0
    path = tmp_path / "nospot.csv"
    df.to_csv(path, index=False)
    snaps = list(open_source(path, underlyings=["NIFTY", "BANKNIFTY"]))
    assert len(snaps) == 142
    for s in snaps:
        ts = (s.time + (datetime(2000, 1, 1, 5, 30) - datetime(2000, 1, 1))).strftime("%Y-%m-%d %H:%M:%S")
        err = abs(s.batch.underlying_ticks[0].price - true[(s.underlying, ts)])
        assert err < (60 if s.underlying == "NIFTY" else 200), (s.underlying, ts, err)


def test_parity_spot_formula() -> None:
    # C − P + K·e^(−rT) at the strikes with the smallest |C − P|; r = 0 gives K + C − P.
    assert parity_spot([(100.0, 5.0, 3.0)], 0.0) == 102.0
    assert parity_spot([(100.0, 5.0, 3.0), (110.0, 1.0, 9.0), (90.0, 12.0, 1.0)], 0.5, rate=0.0) == 102.0
    assert parity_spot([], 0.1) is None


def test_kite_5min_untraded_side_units_and_malformed_rows(tmp_path: Path) -> None:
    ts = "2026-01-30 09:16:49"
    lines = [
        KITE_HEADER,
        f"NIFTY,2026-02-03,25300.0,0.0,0.0,0.0,80.0,130,650,25278.9,-0.5,{ts},1",  # 2: CE untraded → PE only
        f"NIFTY,2026-02-03,25350.0,100.0,1300.0,65,70.0,bad,650,25278.9,-0.5,{ts},1",  # 3: bad number
        f"NIFTY,2026-02-03,25400.0,90.0,100,65,60.0,130,650,25278.9,-0.5,{ts},1",  # 4: 100 units not whole lots
        f"NIFTY,2026-02-03,25450.0,80.0,130,65,50.0,130,650,25278.9,-0.5,{ts}",  # 5: missing column
        f"NIFTY,2026-02-03,25500.0,2015.0,1105.0,0.0,40.0,65.0,130.0,25278.9,-0.5,{ts},1",  # 6: floats ok
        f"MIDCPNIFTY,2026-02-24,13000.0,110.0,120,0,90.0,240,0,0.0,0.0,{ts},1",  # 7: spot from parity
        f"MIDCPNIFTY,2026-02-24,13025.0,100.0,120,0,104.0,240,0,0.0,0.0,{ts},1",  # 8
        f"SENSEX,2026-02-03,80000.0,80.0,130,65,50.0,130,650,1.0,-0.5,{ts},1",  # 9: no lot size
        "NIFTY,2026-02-03,25300.0,1.0,65,65,1.0,65,65,25278.9,-0.5,2026-01-30 9h,1",  # 10: bad timestamp
    ]
    path = _write(tmp_path / "k.csv", lines)
    errors = ErrorLog()
    snaps = list(open_source(path, errors))
    assert {e.line for e in errors.errors} == {3, 4, 5, 9, 10}
    reasons = {e.line: e.reason for e in errors.errors}
    assert "PE_OI" in reasons[3] and "bad" in reasons[3]
    assert "CE_OI: 100 units is not a multiple of the lot size 65" == reasons[4]
    assert "expected 13 fields, got 12" == reasons[5]
    assert "SENSEX" in reasons[9] and "timestamp" in reasons[10]
    nifty, mid = snaps
    assert [(t.strike, t.option_type) for t in nifty.batch.option_ticks] == [
        (25300.0, PUT), (25500.0, CALL), (25500.0, PUT)]
    put = nifty.batch.option_ticks[0]
    assert (put.ltp, put.oi, put.volume) == (80.0, 2, 10)
    ce = nifty.batch.option_ticks[1]
    assert (ce.ltp, ce.oi, ce.volume) == (2015.0, 17, 0)
    assert nifty.time == mid.time == datetime(2026, 1, 30, 3, 46, 49, tzinfo=UTC)
    # Both strikes have both sides: the median of the two is their mean.
    d = math.exp(-0.065 * ((datetime(2026, 2, 24, 10, 0, tzinfo=UTC) - mid.time).total_seconds() / (365 * 86400)))
    expected = ((110 - 90 + 13000 * d) + (100 - 104 + 13025 * d)) / 2
    assert mid.batch.underlying_ticks[0].price == pytest.approx(expected, abs=0.01)
    assert [t.oi for t in mid.batch.option_ticks] == [1, 2, 1, 2]  # lot 120


def test_lot_sizes_parameter(tmp_path: Path) -> None:
    path = _write(tmp_path / "k.csv", [KITE_HEADER, "NIFTY,2026-02-03,25300.0,10.0,150,75,8.0,300,0,25278.9,0,"
                                                    "2026-01-30 09:16:49,1"])
    (snap,) = open_source(path, lot_sizes={**DEFAULT_LOT_SIZES, "NIFTY": 75})
    assert [t.oi for t in snap.batch.option_ticks] == [2, 4]


# ------------------------------------------------------------------------------------------------ directories, order


def test_directory_merges_files_in_time_order(tmp_path: Path) -> None:
    """Two files whose snapshots interleave in time come out merged; non-data files are ignored."""
    row = "{u},2026-02-03,25300.0,10.0,390,390,8.0,390,390,25278.9,0,{ts},1"
    _write(tmp_path / "b.csv", [KITE_HEADER, row.format(u="NIFTY", ts="2026-01-30 09:20:00"),
                                row.format(u="NIFTY", ts="2026-01-30 09:30:00")])
    _write(tmp_path / "a.csv.gz", [KITE_HEADER, row.format(u="BANKNIFTY", ts="2026-01-30 09:25:00"),
                                   row.format(u="BANKNIFTY", ts="2026-01-30 09:35:00")])
    (tmp_path / "PROVENANCE.md").write_text("# notes\n")
    snaps = list(open_source(tmp_path))
    assert [(s.underlying, (s.time.hour, s.time.minute)) for s in snaps] == [
        ("NIFTY", (3, 50)), ("BANKNIFTY", (3, 55)), ("NIFTY", (4, 0)), ("BANKNIFTY", (4, 5))]


def test_snapshot_out_of_time_order_is_reported(tmp_path: Path) -> None:
    row = "NIFTY,2026-02-03,25300.0,10.0,130,65,8.0,130,65,25278.9,0,{ts},1"
    path = _write(tmp_path / "k.csv", [KITE_HEADER, row.format(ts="2026-01-30 09:30:00"),
                                       row.format(ts="2026-01-30 09:20:00"), row.format(ts="2026-01-30 09:40:00")])
    errors = ErrorLog()
    snaps = list(open_source(path, errors))
    assert [s.time.minute for s in snaps] == [0, 10]
    assert errors.count == 1 and errors.errors[0].line == 3 and "time order" in errors.errors[0].reason


def test_directory_with_unknown_file_reports_and_goes_on(tmp_path: Path, nifty_1min_csv: Path) -> None:
    shutil.copy(nifty_1min_csv, tmp_path / nifty_1min_csv.name)
    _write(tmp_path / "junk.csv", ["foo,bar", "1,2"])
    errors = ErrorLog()
    n = sum(1 for _ in open_source(tmp_path, errors, start=time(10, 43), end=time(10, 45)))
    assert n == 3
    assert errors.count == 1 and errors.errors[0].line == 0 and "junk.csv" in errors.errors[0].file


def test_whole_shared_5min_folder_in_time_order() -> None:
    errors = ErrorLog()
    snaps = list(open_source(INDEX_5MIN_DIR, errors))
    assert errors.count == 0
    # 1,194 (symbol, timestamp) groups minus four all-zero glitch groups (27 Jan 10:03 ×3, NIFTY 22 Jan 09:57).
    assert len(snaps) == 1190
    assert all(a.time <= b.time for a, b in itertools.pairwise(snaps))
    assert {s.underlying for s in snaps} == {"NIFTY", "BANKNIFTY", "MIDCPNIFTY"}


# ------------------------------------------------------------------------------------------------ kite-ticks


def test_kite_ticks_real_files() -> None:
    errors = ErrorLog()
    snaps = list(open_source(TICKS_DIR, errors))
    # 3,654 + 15,504 ticks minus the two epoch-0 pre-open records, which are reported.
    assert len(snaps) == 3_654 + 15_504 - 2
    assert errors.count == 2 and all(e.line == 1 and "epoch-0" in e.reason for e in errors.errors)
    assert all(a.time <= b.time for a, b in itertools.pairwise(snaps))
    t = snaps[0].batch.option_ticks[0]
    assert (t.underlying, t.expiry, t.strike) == ("BANKNIFTY", "2021-09-30", 35300.0)
    assert snaps[0].time == datetime(2021, 8, 20, 3, 45, 0, tzinfo=UTC)  # 09:15:00 IST, the PE's first tick
