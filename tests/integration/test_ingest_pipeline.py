"""The ingest pipeline on real PostgreSQL and Redis with the real 18-Aug-2026 NIFTY data: idempotency, order
independence (late ticks), restart recovery, BarUpdate events, DatabaseUnavailable atomicity, IV/Greeks for ticks
without them, retention."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import asyncpg
import pytest
from optmon.v1 import market_pb2
from vollib.black_scholes_merton import black_scholes_merton as bsm
from vollib.black_scholes_merton.greeks.analytical import delta as bsm_delta

from services.ingest.pipeline import DatabaseUnavailable
from services.ingest.store.events import bars_key, seq_key
from tests.integration.test_ingest_pipeline_support import (
    CuttingProxy,
    dump,
    pipeline,
    proxy_dsn,
    run_batches,
    snapshots,
    utc,
)

MINUTES = 12


async def _truncate(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("TRUNCATE bars_1m, bars_5m, bars_15m, bars_1h, bars_latest, underlying_bars, "
                           "ingest_writers")
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def batches(nifty_1min_csv: Path) -> list[market_pb2.TickBatch]:
    """The first 12 minutes (10:43–10:54 IST) of the real day, one TickBatch per minute."""
    return snapshots(nifty_1min_csv, MINUTES)


async def test_replay_twice_gives_identical_rows_and_no_events(pg_dsn: str, redis_url: str,
                                                               batches: list[market_pb2.TickBatch]) -> None:
    async with pipeline(pg_dsn, redis_url) as (p, _pool, r):
        first = await run_batches(p, batches, per_call=4)
        assert all(x.bar_updates == 4 for x in first)  # one BarUpdate per timeframe and call
        reference = await dump(pg_dsn)
        n_events = await r.xlen(bars_key("NIFTY"))
        again = await run_batches(p, batches, per_call=4)
        assert [x.bar_updates for x in again] == [0, 0, 0]
        assert await dump(pg_dsn) == reference
    # After a restart (state recovered from PostgreSQL), with other call sizes and in reverse order.
    async with pipeline(pg_dsn, redis_url) as (p, _pool, r):
        await run_batches(p, batches, per_call=5)
        await run_batches(p, batches[::-1], per_call=3)
        assert await dump(pg_dsn) == reference
        assert await r.xlen(bars_key("NIFTY")) == n_events


async def test_out_of_order_and_restart_equal_in_order(pg_dsn: str, redis_url: str,
                                                       batches: list[market_pb2.TickBatch]) -> None:
    async with pipeline(pg_dsn, redis_url) as (p, _pool, _r):
        await run_batches(p, batches, per_call=1)
    reference = await dump(pg_dsn)
    assert len(reference["bars_1m"]) > 3000

    # Late minutes: 0, 2, 1, 4, 3, ... one per call (every odd minute arrives after the next one).
    await _truncate(pg_dsn)
    order = [0]
    for i in range(1, MINUTES - 1, 2):
        order += [i + 1, i]
    order += [i for i in range(MINUTES) if i not in order]
    async with pipeline(pg_dsn, redis_url) as (p, _pool, _r):
        await run_batches(p, [batches[i] for i in order], per_call=1)
    assert await dump(pg_dsn) == reference

    # Restart in the middle: the second process recovers volume / ΔOI continuity from PostgreSQL.
    await _truncate(pg_dsn)
    async with pipeline(pg_dsn, redis_url) as (p, _pool, _r):
        await run_batches(p, batches[:5], per_call=2)
    async with pipeline(pg_dsn, redis_url) as (p, _pool, _r):
        await run_batches(p, batches[5:], per_call=3)
    assert await dump(pg_dsn) == reference


async def test_two_replicas_alternating_equal_one_process(pg_dsn: str, redis_url: str,
                                                          batches: list[market_pb2.TickBatch]) -> None:
    """Replicas of a consumer group get entries of the same stream in turn: each detects the other's commits
    (ingest_writers version under an advisory lock) and reloads the touched legs' state before deriving bars."""
    async with pipeline(pg_dsn, redis_url) as (p, _pool, _r):
        await run_batches(p, batches, per_call=1)
    reference = await dump(pg_dsn)
    await _truncate(pg_dsn)
    async with pipeline(pg_dsn, redis_url) as (a, _pa, _ra), pipeline(pg_dsn, redis_url) as (b, _pb, _rb):
        for i, batch in enumerate(batches):
            await (a if i % 3 else b).process([(batch, "stream")])
    assert await dump(pg_dsn) == reference


async def test_bar_updates_carry_changed_bars_with_increasing_sequence(pg_dsn: str, redis_url: str,
                                                                       batches: list[market_pb2.TickBatch]) -> None:
    async with pipeline(pg_dsn, redis_url) as (p, pool, r):
        results = await run_batches(p, batches[:6], per_call=2)
        entries = await r.xrange(bars_key("NIFTY"))
        assert int(await r.get(seq_key("NIFTY"))) == len(entries) == sum(x.bar_updates for x in results) == 12
        updates = []
        for _id, fields in entries:
            u = market_pb2.BarUpdate()
            u.ParseFromString(fields[b"pb"])
            updates.append(u)
        assert [u.sequence for u in updates] == list(range(1, 13))
        assert [u.timeframe for u in updates] == [1, 2, 3, 4] * 3
        last_1m = updates[-4]
        assert last_1m.underlying == "NIFTY" and last_1m.underlying_price > 0
        # The last call held minutes 4 and 5: its 1M update has both minutes' bars, complete.
        minute4, minute5 = utc("2026-08-18 10:47"), utc("2026-08-18 10:48")
        assert {b.bucket_time.ToDatetime(dt.UTC) for b in last_1m.bars} == {minute4, minute5}
        assert last_1m.bucket_time.ToDatetime(dt.UTC) == minute5
        assert last_1m.first_tick_time.ToDatetime(dt.UTC) == minute4
        assert last_1m.commit_time.ToDatetime(dt.UTC) >= last_1m.first_receive_time.ToDatetime(dt.UTC)
        n_ticks = len(batches[4].option_ticks) + len(batches[5].option_ticks)
        assert sum((b.HasField("call") + b.HasField("put")) for b in last_1m.bars) == n_ticks
        async with pool.acquire() as conn:
            rows = {(r["expiry"].isoformat(), r["strike"]): r for r in await conn.fetch(
                "SELECT * FROM bars_1m WHERE bucket_time = $1", minute5)}
        for b in last_1m.bars:
            if b.bucket_time.ToDatetime(dt.UTC) != minute5:
                continue
            row = rows[(b.expiry, b.strike)]
            assert b.moneyness_level == row["moneyness_level"] and b.atm_strike == row["atm_strike"]
            if b.HasField("call"):
                assert (b.call.ltp, b.call.oi, b.call.oi_change, b.call.volume, b.call.iv) == (
                    row["ce_close"], row["ce_oi"], row["ce_oi_change"], row["ce_volume"], row["ce_iv"])
            else:
                assert row["ce_close"] is None


async def test_database_unavailable_commits_nothing_and_retry_completes(
        pg_dsn: str, redis_url: str, batches: list[market_pb2.TickBatch]) -> None:
    async with pipeline(pg_dsn, redis_url) as (p, _pool, _r):
        await run_batches(p, batches[:6], per_call=3)
    reference = await dump(pg_dsn)
    await _truncate(pg_dsn)

    proxy = CuttingProxy(int(pg_dsn.rsplit(":", 1)[1].split("/", 1)[0]))
    await proxy.start()
    try:
        # No statement cache: every statement's SQL crosses the proxy, so it can cut at the 5M rollup, i.e. after
        # the 1M upsert and before COMMIT.
        async with pipeline(pg_dsn, redis_url, dsn=proxy_dsn(pg_dsn, proxy.port), statement_cache_size=0) as (
                p, _pool, r):
            await p.process([(b, "grpc") for b in batches[:3]])
            after_first = await dump(pg_dsn)
            seq = await r.get(seq_key("NIFTY"))
            proxy.cut_on = b"INSERT INTO bars_5m"
            with pytest.raises(DatabaseUnavailable):
                await p.process([(b, "grpc") for b in batches[3:6]])
            assert proxy.cuts == 1
            assert await dump(pg_dsn) == after_first  # nothing half-written
            assert await r.get(seq_key("NIFTY")) == seq  # nothing published
            proxy.cut_on = None
            proxy.stop_postgres()
            with pytest.raises(DatabaseUnavailable):
                await p.process([(b, "grpc") for b in batches[3:6]])
            proxy.down = False
            await p.process([(b, "grpc") for b in batches[3:6]])  # the caller's retry
            assert await dump(pg_dsn) == reference
    finally:
        await proxy.close()


async def test_iv_and_greeks_computed_for_ticks_without_them(pg_dsn: str, redis_url: str) -> None:
    t = utc("2026-08-18 11:00")
    expiry_close = utc("2026-08-25 15:30")
    tau = (expiry_close - t).total_seconds() / (365 * 86400)
    spot, r = 24200.0, 0.065
    batch = market_pb2.TickBatch()
    batch.underlying_ticks.add(underlying="NIFTY", price=spot).exchange_time.FromDatetime(t)
    for strike, flag, ot in ((24200.0, "c", market_pb2.OPTION_TYPE_CALL), (24300.0, "p", market_pb2.OPTION_TYPE_PUT)):
        tick = batch.option_ticks.add(underlying="NIFTY", expiry="2026-08-25", strike=strike, option_type=ot,
                                      ltp=bsm(flag, spot, strike, tau, r, 0.15, 0.0), volume=10, oi=100)
        tick.exchange_time.FromDatetime(t)
    # A call priced below intrinsic value has no IV: stored as NULL, the bar is still written.
    bad = batch.option_ticks.add(underlying="NIFTY", expiry="2026-08-25", strike=24000.0,
                                 option_type=market_pb2.OPTION_TYPE_CALL, ltp=100.0, volume=1, oi=1)
    bad.exchange_time.FromDatetime(t)
    async with pipeline(pg_dsn, redis_url) as (p, pool, _r):
        res = await p.process([(batch, "grpc")])
        assert res.accepted == 4
        async with pool.acquire() as conn:
            rows = {r["strike"]: r for r in await conn.fetch("SELECT * FROM bars_1m")}
    assert rows[24200.0]["ce_iv"] == pytest.approx(15.0, abs=1e-4)
    # stored at NSE's published precision (IV 0.01 %, delta 1e-4: docs/greeks.md)
    ce_delta = rows[24200.0]["ce_delta"]
    assert ce_delta == pytest.approx(bsm_delta("c", spot, 24200.0, tau, r, 0.15, 0.0), abs=5.1e-5)
    pe_iv = rows[24300.0]["pe_iv"]
    assert round(ce_delta * 1e4) / 1e4 == ce_delta and round(pe_iv * 100) / 100 == pe_iv
    assert rows[24300.0]["pe_iv"] == pytest.approx(15.0, abs=1e-4)
    assert rows[24000.0]["ce_iv"] is None and rows[24000.0]["ce_close"] == 100.0


async def test_retention_drops_partitions_older_than_newest_data(pg_dsn: str, redis_url: str,
                                                                 batches: list[market_pb2.TickBatch]) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("SELECT optmon_ensure_partitions('2026-07-01', '2026-07-01')")
        async with pipeline(pg_dsn, redis_url) as (p, _pool, _r):
            await p.process([(batches[0], "grpc")])
            p._settings = p._settings.model_copy(update={"ingest_retention_days": 30})
            assert await p.enforce_retention() == 4  # the four bar tables of 1 July
        names = {r[0] for r in await conn.fetch("SELECT relname FROM pg_class WHERE relname LIKE 'bars_1m_2026%'")}
        assert "bars_1m_20260701" not in names and "bars_1m_20260818" in names
    finally:
        await conn.close()


async def test_rejects_are_counted_dead_lettered_and_not_written(pg_dsn: str, redis_url: str) -> None:
    from prometheus_client import REGISTRY

    t = utc("2026-08-18 11:00")
    batch = market_pb2.TickBatch()
    batch.underlying_ticks.add(underlying="NIFTY", price=24200.0).exchange_time.FromDatetime(t)
    good = batch.option_ticks.add(underlying="NIFTY", expiry="2026-08-25", strike=24200.0,
                                  option_type=market_pb2.OPTION_TYPE_CALL, ltp=150.0, volume=5, oi=10, iv=12.0,
                                  delta=0.5, gamma=0.001, theta=-5.0, vega=10.0)
    good.exchange_time.FromDatetime(t)
    bad = batch.option_ticks.add()
    bad.CopyFrom(good)
    bad.strike, bad.ltp = 24250.0, -1.0
    before = REGISTRY.get_sample_value("optmon_ingest_rejected_total", {"reason": "NON_POSITIVE_LTP"}) or 0.0
    async with pipeline(pg_dsn, redis_url, validator=True) as (p, pool, r):
        res = await p.process([(batch, "stream:optmon:ticks:NIFTY:1786941000000-0")])
        assert (res.accepted, res.rejected, res.bar_updates) == (2, {"NON_POSITIVE_LTP": 1}, 4)
        dead = await r.xrange("optmon:deadletter")
        assert len(dead) == 1 and dead[0][1][b"reason"] == b"NON_POSITIVE_LTP"
        async with pool.acquire() as conn:
            assert [r["strike"] for r in await conn.fetch("SELECT strike FROM bars_1m")] == [24200.0]
        upd = market_pb2.BarUpdate()
        upd.ParseFromString((await r.xrange(bars_key("NIFTY")))[0][1][b"pb"])
        # first_receive_time comes from the stream entry id (ms since epoch).
        assert upd.first_receive_time.ToMilliseconds() == 1786941000000
    after = REGISTRY.get_sample_value("optmon_ingest_rejected_total", {"reason": "NON_POSITIVE_LTP"})
    assert after == before + 1
