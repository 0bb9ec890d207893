"""Replay into a real Redis (fixture ``redis_url``): every snapshot lands in its stream, in time order."""

from __future__ import annotations

import argparse
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from optmon.v1 import market_pb2

from services.common.settings import CommonSettings
from services.devstack.redis import free_port
from services.replay import cli
from services.replay.publisher import INGEST_GROUP, publish
from services.replay.sources import ErrorLog, open_source
from services.replay.synthetic import synthetic_session
from tests.conftest import INDEX_5MIN_DIR


async def _entries(r: aioredis.Redis, key: str) -> list[tuple[bytes, market_pb2.TickBatch]]:
    out: list[tuple[bytes, market_pb2.TickBatch]] = []
    rows: Any = await r.xrange(key)
    for entry_id, fields in rows:
        out.append((entry_id, market_pb2.TickBatch.FromString(fields[b"pb"])))
    return out


def _batch_time(b: market_pb2.TickBatch) -> datetime:
    return b.option_ticks[0].exchange_time.ToDatetime(tzinfo=UTC)


async def test_real_day_max_speed_lands_in_order(redis_url: str, nifty_1min_csv: Path) -> None:
    r = aioredis.Redis.from_url(redis_url)
    try:
        errors = ErrorLog()
        stats = await publish(open_source(nifty_1min_csv, errors), r, max_speed=True, errors=lambda: errors.count)
        assert (stats.rows, stats.snapshots, stats.underlying_ticks, stats.errors) == (153_990, 288, 288, 0)
        assert stats.rows_per_s > 0 and stats.elapsed > 0
        entries = await _entries(r, "optmon:ticks:NIFTY")
        assert len(entries) == 288
        times = [_batch_time(b) for _, b in entries]
        assert times == sorted(times) and len(set(times)) == 288
        assert sum(len(b.option_ticks) for _, b in entries) == 153_990
        # Identical to what the reader produces.
        expected = [s.batch.SerializeToString() for s in open_source(nifty_1min_csv)]
        assert [b.SerializeToString() for _, b in entries] == expected
        # Ingest's consumer group exists from id 0, so ingest started later misses nothing.
        groups = await r.xinfo_groups("optmon:ticks:NIFTY")
        assert [g["name"] for g in groups] == [INGEST_GROUP.encode()]
        assert groups[0]["lag"] == 288
    finally:
        await r.aclose()


async def test_several_underlyings_global_time_order(redis_url: str) -> None:
    """The 5-minute folder: one stream per underlying; across streams, source times never go backwards."""
    r = aioredis.Redis.from_url(redis_url)
    try:
        stats = await publish(open_source(INDEX_5MIN_DIR, start=time(9, 15), end=time(10, 0)), r, max_speed=True,
                              progress=True)
        merged = []
        for u in ("NIFTY", "BANKNIFTY", "MIDCPNIFTY"):
            entries = await _entries(r, f"optmon:ticks:{u}")
            assert entries and all(b.option_ticks[0].underlying == u for _, b in entries)
            merged += entries
        assert len(merged) == stats.snapshots
        # Entry ids are per stream (ms-seq): entries added in the same millisecond to different streams tie on ms.
        # Global order means: an entry added in a later millisecond never carries an earlier source time.
        keyed = sorted((int(i.split(b"-")[0]), _batch_time(b)) for i, b in merged)
        times = [t for _, t in keyed]
        assert times == sorted(times)
    finally:
        await r.aclose()


async def test_paced_synthetic(redis_url: str) -> None:
    r = aioredis.Redis.from_url(redis_url)
    try:
        snaps = synthetic_session(["NIFTY", "MIDCPNIFTY"], day=date(2026, 8, 18), minutes=3, seed=3)
        stats = await publish(snaps, r, speed=1200.0)  # 2 source minutes → 0.1 s of pacing
        assert stats.snapshots == 6
        for u in ("NIFTY", "MIDCPNIFTY"):
            entries = await _entries(r, f"optmon:ticks:{u}")
            assert len(entries) == 3
            assert [_batch_time(b).minute for _, b in entries] == [45, 46, 47]  # 09:15..09:17 IST
        with pytest.raises(ValueError):
            await publish([], r, speed=0)
    finally:
        await r.aclose()


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


async def test_cli_run_file_with_filters_and_bad_rows(redis_url: str, tmp_path: Path, nifty_1min_csv: Path) -> None:
    settings = CommonSettings(redis_url=redis_url)
    args = _parse([str(nifty_1min_csv), "--max-speed", "--start", "11:00", "--end", "11:04", "--no-progress"])
    stats = await cli.run(args, settings)
    assert stats.snapshots == 5 and stats.errors == 0
    r = aioredis.Redis.from_url(redis_url)
    try:
        assert await r.xlen("optmon:ticks:NIFTY") == 5
        # A file with a malformed row: reported, counted, the replay goes on.
        bad = tmp_path / "bad.csv"
        bad.write_text(
            "ts_ist,symbol,expiry,strike,option_type,spot,ltp,volume,oi,oi_chg,iv,delta,gamma,theta,vega,rho\n"
            "2026-08-18T10:43:00+05:30,NIFTY,2026-08-18,24200.0,CE,24212.8,oops,1,2,0,10,0.5,0.001,-5,3,1\n"
            "2026-08-18T10:44:00+05:30,NIFTY,2026-08-18,24200.0,CE,24212.8,50.0,1,2,0,10,0.5,0.001,-5,3,1\n")
        stats = await cli.run(_parse([str(bad), "--max-speed", "--redis-url", redis_url]), CommonSettings())
        assert (stats.rows, stats.snapshots, stats.errors) == (1, 1, 1)
        assert await r.xlen("optmon:ticks:NIFTY") == 6
        # No PATH: the real 18-Aug day of the shared data.
        stats = await cli.run(_parse(["--max-speed", "--start", "10:43", "--end", "10:43"]), settings)
        assert (stats.rows, stats.snapshots) == (517, 1)
    finally:
        await r.aclose()


async def test_cli_run_synthetic_and_usage_errors(redis_url: str, tmp_path: Path) -> None:
    settings = CommonSettings(redis_url=redis_url)
    args = _parse(["--synthetic", "--minutes", "2", "--underlying", "NIFTY,BANKNIFTY", "--max-speed",
                   "--day", "2026-08-18"])
    stats = await cli.run(args, settings)
    assert stats.snapshots == 4
    r = aioredis.Redis.from_url(redis_url)
    try:
        assert await r.xlen("optmon:ticks:NIFTY") == 2 and await r.xlen("optmon:ticks:BANKNIFTY") == 2
        assert await r.exists("optmon:ticks:FINNIFTY") == 0
    finally:
        await r.aclose()
    for argv in (
        [str(tmp_path / "missing.csv")],
        ["--synthetic", str(INDEX_5MIN_DIR)],
        [str(INDEX_5MIN_DIR), "--start", "12:00", "--end", "11:00"],
    ):
        with pytest.raises(SystemExit):
            await cli.run(_parse(argv), settings)
    junk = tmp_path / "junk.csv"
    junk.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="unknown format"):
        await cli.run(_parse([str(junk)]), settings)
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with pytest.raises(SystemExit, match="unreachable"):
        await cli.run(_parse(["--synthetic", "--minutes", "1", "--max-speed", "--redis-url", dead]), settings)
    with pytest.raises(SystemExit):  # argparse: --speed must be > 0, and --speed excludes --max-speed
        _parse(["--speed", "0"])
    with pytest.raises(SystemExit):
        _parse(["--speed", "2", "--max-speed"])
