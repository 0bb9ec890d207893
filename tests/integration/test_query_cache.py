"""The query cache against real Redis/PostgreSQL: no stale read after a published update, L2 shared by replicas,
warming, and the degraded modes (Redis down; PostgreSQL down → stale-marked or UNAVAILABLE, then recovery)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import grpc
import psycopg
import pytest
import redis.asyncio as aioredis
from google.api import httpbody_pb2
from optmon.v1 import market_pb2
from optmon.v1 import query_service_pb2 as q
from optmon.v1 import query_service_pb2_grpc as qg
from prometheus_client import REGISTRY

from services.devstack.pg import PgCluster
from services.devstack.redis import RedisServer, free_port
from services.ingest.store import migrations
from services.query.server import create_server, stop_server
from tests.support import query_fixtures
from tests.support.load_bars import load_nifty_day

pytestmark = pytest.mark.integration
settings = query_fixtures.query_settings
# fixtures (module attributes so pytest finds them)
bars_dsn = query_fixtures.bars_dsn
bars_template = query_fixtures.bars_template
DEFAULT = q.GetStrikeDistributionRequest(underlying="NIFTY")


def _count(name: str, layer: str, method: str = "GetStrikeDistribution") -> float:
    return REGISTRY.get_sample_value(name, {"layer": layer, "method": method}) or 0.0


async def _publish(redis_url: str, seq: int, tf: int = 1) -> None:
    """What ingest does after a commit: XADD the BarUpdate, INCR the sequence."""
    r = aioredis.from_url(redis_url)
    upd = market_pb2.BarUpdate(underlying="NIFTY", sequence=seq, timeframe=tf)
    await r.xadd("optmon:bars:NIFTY", {"pb": upd.SerializeToString()})
    await r.set("optmon:seq:NIFTY", seq)
    await r.aclose()


async def _bump_atm_call_oi(dsn: str, expiry_atm: tuple[str, float], value: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        exp, k = expiry_atm
        n = await conn.execute(
            "UPDATE bars_1m SET ce_oi = $1 WHERE underlying = 'NIFTY' AND expiry = $2::text::date AND strike = $3"
            " AND bucket_time = (SELECT max(bucket_time) FROM bars_1m)", value, exp, k)
        assert n == "UPDATE 1"
    finally:
        await conn.close()


def _atm_call_oi(resp: q.GetStrikeDistributionResponse) -> int:
    e = resp.expiries[0]
    return next(b.call.oi for b in e.bars if b.strike == e.atm_strike)


@pytest.mark.parametrize("consume", [True, False], ids=["consumer", "seq-check-only"])
async def test_no_stale_read_after_publish(bars_dsn: str, redis_url: str, consume: bool) -> None:
    server, port = await create_server(settings(bars_dsn, redis_url, query_consume_updates=consume))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            st = qg.QueryServiceStub(ch)
            first = await st.GetStrikeDistribution(DEFAULT)
            hits = _count("optmon_query_cache_hits_total", "l1")
            again = await st.GetStrikeDistribution(DEFAULT)
            assert again == first and _count("optmon_query_cache_hits_total", "l1") == hits + 1
            for seq, value in ((1, 123_456_789), (2, 987_654)):
                await _bump_atm_call_oi(bars_dsn, (first.expiries[0].expiry, first.expiries[0].atm_strike), value)
                await _publish(redis_url, seq)
                assert _atm_call_oi(await st.GetStrikeDistribution(DEFAULT)) == value
    finally:
        await stop_server(server)


async def test_l2_shared_by_replicas_compressed(bars_dsn: str, redis_url: str) -> None:
    a, pa = await create_server(settings(bars_dsn, redis_url, query_consume_updates=False))
    b, pb = await create_server(settings(bars_dsn, redis_url, query_consume_updates=False))
    req = q.GetOptionChainRequest(underlying="NIFTY", expiry="2026-08-25")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{pa}") as ca, \
                grpc.aio.insecure_channel(f"127.0.0.1:{pb}") as cb:
            ra = await qg.QueryServiceStub(ca).GetOptionChain(req)
            await a.optmon_app.cache.drain()
            l2 = _count("optmon_query_cache_hits_total", "l2", "GetOptionChain")
            rb = await qg.QueryServiceStub(cb).GetOptionChain(req)
            assert rb == ra
            assert _count("optmon_query_cache_hits_total", "l2", "GetOptionChain") == l2 + 1
        r = aioredis.from_url(redis_url)
        keys = [k async for k in r.scan_iter("optmon:qc:GetOptionChain:*")]
        blobs = [await r.get(k) for k in keys]
        await r.aclose()
        assert keys and all(bl[:1] == b"\x01" for bl in blobs)  # > 4 KiB: lz4
    finally:
        await stop_server(a)
        await stop_server(b)


async def test_warming_after_update(bars_dsn: str, redis_url: str) -> None:
    server, port = await create_server(settings(bars_dsn, redis_url, query_warm_debounce_ms=10))
    app = server.optmon_app
    try:
        await asyncio.wait_for(app.consumer.ready.wait(), 30)
        await _publish(redis_url, 1)
        while app.warmer.rounds < 1:  # noqa: ASYNC110 - waits for the warmer, asserts nothing about time
            await asyncio.sleep(0.02)
        hits = _count("optmon_query_cache_hits_total", "l1")
        misses = _count("optmon_query_cache_misses_total", "l1")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await qg.QueryServiceStub(ch).GetStrikeDistribution(DEFAULT)
        assert _count("optmon_query_cache_hits_total", "l1") == hits + 1
        assert _count("optmon_query_cache_misses_total", "l1") == misses
    finally:
        await stop_server(server)


async def test_redis_down_still_answers_then_recovers(bars_dsn: str, tmp_path: Path) -> None:
    rs = RedisServer(root=tmp_path / "redis", port=free_port())
    rs.start()
    server, port = await create_server(settings(bars_dsn, rs.url, query_redis_retry_s=0.1))
    app = server.optmon_app
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            st = qg.QueryServiceStub(ch)
            first = await st.GetStrikeDistribution(DEFAULT)
            rs.kill()
            assert await st.GetStrikeDistribution(DEFAULT) == first  # L1
            other = await st.GetStrikeDistribution(q.GetStrikeDistributionRequest(underlying="NIFTY",
                                                                                  strikes_around_atm=2))
            assert len(other.expiries[0].bars) == 5  # PostgreSQL, no Redis
            assert REGISTRY.get_sample_value("optmon_query_redis_up") == 0
            rs.start()
            while not app.gate.up:  # recovers by itself on a later call
                await st.GetStrikeDistribution(q.GetStrikeDistributionRequest(underlying="NIFTY", timeframe=2))
                await asyncio.sleep(0.05)
            assert REGISTRY.get_sample_value("optmon_query_redis_up") == 1
    finally:
        await stop_server(server)
        rs.stop()


async def test_postgres_down_serves_stale_or_unavailable_then_recovers(
        redis_url: str, tmp_root: Path, nifty_1min_csv: Path) -> None:
    root = tmp_root / f"pg-down-{free_port()}"  # tmp_root is world-readable: initdb runs as postgres
    cluster = PgCluster(root=root, port=free_port())
    cluster.init()
    cluster.start()
    try:
        migrations.apply(cluster.dsn)
        await load_nifty_day(cluster.dsn, nifty_1min_csv, minutes=20)
        server, port = await create_server(settings(cluster.dsn, redis_url, query_pg_connect_timeout_s=1.0))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                st = qg.QueryServiceStub(ch)
                fresh = await st.GetStrikeDistribution(DEFAULT)
                assert not fresh.stale
                cluster.stop("fast")
                await _publish(redis_url, 1)  # new data announced while PostgreSQL is down
                stale = await st.GetStrikeDistribution(DEFAULT)
                assert stale.stale and stale.expiries == fresh.expiries
                # the gateway's JSON (never asked before the outage): the protobuf's stale answer, rendered
                stale_json = json.loads(httpbody_pb2.HttpBody.FromString(await ch.unary_unary(
                    "/optmon.v1.QueryService/GetStrikeDistributionJson")(DEFAULT.SerializeToString())).data)
                assert stale_json["stale"] is True and len(stale_json["expiries"]) == len(fresh.expiries)
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await st.GetOptionChain(q.GetOptionChainRequest(underlying="NIFTY"))
                assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and "PostgreSQL" in ei.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await ch.unary_unary("/optmon.v1.QueryService/GetOptionChainJson")(
                        q.GetOptionChainRequest(underlying="NIFTY").SerializeToString())
                assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
                cluster.start()
                back = await st.GetStrikeDistribution(DEFAULT)
                assert not back.stale and back.expiries == fresh.expiries
                back_json = json.loads(httpbody_pb2.HttpBody.FromString(await ch.unary_unary(
                    "/optmon.v1.QueryService/GetStrikeDistributionJson")(DEFAULT.SerializeToString())).data)
                assert back_json["stale"] is False
                assert (await st.GetOptionChain(q.GetOptionChainRequest(underlying="NIFTY"))).rows
        finally:
            await stop_server(server)
    finally:
        cluster.stop("immediate")


def test_template_is_reusable(bars_template: str, pg_cluster: PgCluster) -> None:
    """The loaded template has the whole day (guards the other tests' data)."""
    with psycopg.connect(pg_cluster.dsn.rsplit("/", 1)[0] + "/" + bars_template) as conn:
        assert conn.execute("SELECT count(DISTINCT bucket_time) FROM bars_1m").fetchone() == (288,)
