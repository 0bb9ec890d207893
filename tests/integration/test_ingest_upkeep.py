"""Ingest upkeep on real PostgreSQL and Redis: daily partitions created ahead by a long-running (even idle) ingest,
two sessions creating the same partition at once, and the LTP-jump rule across a restart."""

from __future__ import annotations

import asyncio
import datetime as dt

import asyncpg
from optmon.v1 import market_pb2

from services.ingest.store import pg as store
from tests.integration.ingest_inputs_support import grpc_ingest, settings_for
from tests.integration.test_ingest_pipeline_support import pipeline, utc

#: A wall-clock "today" far from the test data (18 Aug 2026) and from the real today.
FAKE_TODAY = dt.date(2031, 3, 10)
FAKE_DAY = FAKE_TODAY.toordinal() - dt.date(1970, 1, 1).toordinal()


async def _partitions(dsn: str, day: dt.date) -> dict[str, list[str] | None]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT relname, reloptions FROM pg_class WHERE relname LIKE $1",
                                f"bars_%_{day:%Y%m%d}")
        return {r["relname"]: r["reloptions"] for r in rows}
    finally:
        await conn.close()


async def test_idle_ingest_creates_the_next_days_partitions_ahead(pg_dsn: str, redis_url: str) -> None:
    settings = settings_for(pg_dsn, redis_url, ingest_retention_interval_s=0.2, ingest_pubsub_enabled=False)
    async with grpc_ingest(settings) as (app, _channel):
        assert await _partitions(pg_dsn, FAKE_TODAY) == {}
        app.pipeline._today = lambda: FAKE_DAY  # the clock crossed into a new UTC day; no tick arrives
        deadline = asyncio.get_running_loop().time() + 10
        while len(await _partitions(pg_dsn, FAKE_TODAY + dt.timedelta(days=1))) < 4:
            assert asyncio.get_running_loop().time() < deadline, "tomorrow's partitions were not created ahead"
            await asyncio.sleep(0.1)
    today = await _partitions(pg_dsn, FAKE_TODAY)
    tomorrow = await _partitions(pg_dsn, FAKE_TODAY + dt.timedelta(days=1))
    assert sorted(today) == [f"bars_{t}_20310310" for t in ("15m", "1h", "1m", "5m")]
    assert all(opts == [f"fillfactor={store.PARTITION_FILLFACTOR}"] for opts in (*today.values(), *tomorrow.values()))


async def test_concurrent_creation_of_the_same_partitions_is_retried(pg_dsn: str) -> None:
    day = dt.date(2031, 1, 1)
    winner = await asyncpg.connect(pg_dsn)
    loser = await asyncpg.connect(pg_dsn)
    try:
        tx = winner.transaction()
        await tx.start()
        await winner.execute("SELECT optmon_ensure_partitions($1::date, $1::date)", day)
        racing = asyncio.create_task(store.ensure_partitions(loser, day, day))
        await asyncio.sleep(0.5)
        assert not racing.done(), "the second CREATE did not wait for the first"
        await tx.commit()  # the loser's CREATE now fails on the committed catalog rows; the call retries
        assert await asyncio.wait_for(racing, 10) == 0
    finally:
        await winner.close()
        await loser.close()
    assert len(await _partitions(pg_dsn, day)) == 4


def _tick(ltp: float, ts_ist: str) -> market_pb2.TickBatch:
    batch = market_pb2.TickBatch()
    t = batch.option_ticks.add(underlying="NIFTY", expiry="2026-08-25", strike=24200.0,
                               option_type=market_pb2.OPTION_TYPE_CALL, ltp=ltp, volume=5, oi=10, iv=12.0,
                               delta=0.5, gamma=0.001, theta=-5.0, vega=10.0)
    t.exchange_time.FromDatetime(utc(ts_ist))
    return batch


async def test_ltp_jump_is_flagged_across_a_restart(pg_dsn: str, redis_url: str) -> None:
    async with pipeline(pg_dsn, redis_url, validator=True) as (p, _pool, _r):
        assert (await p.process([(_tick(100.0, "2026-08-18 11:00"), "grpc")])).suspicious == 0
    # a new process: the contract's previous tick is known from its last committed close
    async with pipeline(pg_dsn, redis_url, validator=True) as (p, _pool, _r):
        res = await p.process([(_tick(150.0, "2026-08-18 11:01"), "grpc")])
        assert (res.accepted, res.suspicious) == (1, 1)
        assert (await p.process([(_tick(152.0, "2026-08-18 11:02"), "grpc")])).suspicious == 0
