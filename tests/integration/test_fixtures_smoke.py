"""The fixtures give a migrated PostgreSQL and a working Redis."""

import asyncpg
import redis.asyncio as aioredis


async def test_pg_is_migrated(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
        assert {"bars_latest", "underlying_bars"} <= tables
        assert await conn.fetchval("SELECT optmon_ensure_partitions('2026-08-18', '2026-08-18')") == 4
    finally:
        await conn.close()


async def test_redis_roundtrip(redis_url: str) -> None:
    r = aioredis.from_url(redis_url)
    await r.xadd("optmon:ticks:NIFTY", {"pb": b"x"})
    assert await r.xlen("optmon:ticks:NIFTY") == 1
    await r.aclose()
