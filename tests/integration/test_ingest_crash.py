"""Failure tests of ingest on the real 18-Aug NIFTY data:

- kill -9 of ``python -m services.ingest`` in the middle of a replay, restart, SIGTERM half way (the in-flight batch
  is committed and acknowledged, exit 0), restart, finish: every bar table equals an
  uninterrupted run (no missing, no doubled tick), and the restarted process stops cleanly on SIGTERM;
- PostgreSQL (a dedicated cluster, so the shared one is not disturbed) stopped for ~30 s in the middle of a replay:
  ingest turns NOT_SERVING/degraded, stops acknowledging, refuses PublishTicks with UNAVAILABLE once the in-memory
  bound is reached, and after PostgreSQL returns finishes with bars equal to an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from datetime import date
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from optmon.v1 import ingest_service_pb2, ingest_service_pb2_grpc, market_pb2
from prometheus_client import REGISTRY

from services.devstack.pg import PgCluster
from services.devstack.redis import free_port
from services.ingest.server import app_of, create_server
from services.ingest.store import migrations
from tests.integration.ingest_inputs_support import (
    COLUMNS,
    chunked,
    consumer_prefix,
    csv_snapshots,
    describe_diff,
    extra_database,
    fetch_bars,
    group_state,
    kill_all,
    redis_db,
    reference_bars,
    settings_for,
    spawn_ingest,
    subprocess_env,
    wait_acked,
    wait_drained,
    xadd_batches,
)

KEY = "optmon:ticks:NIFTY"
#: Seconds PostgreSQL stays down (issue 3 asks for 30 s).
PG_OUTAGE_S = float(os.environ.get("OPTMON_TEST_PG_OUTAGE_S", "30"))


def _name(consumer: dict[object, object]) -> str:
    n = consumer["name"]
    return n.decode() if isinstance(n, bytes) else str(n)


async def test_kill9_mid_replay_restart_equals_uninterrupted(pg_dsn: str, redis_url: str, pg_cluster: PgCluster,
                                                            tmp_path: Path) -> None:
    batches = chunked(csv_snapshots(14), 100)  # minutes split over several entries and commits
    r = aioredis.from_url(redis_url)
    log = tmp_path / "ingest.log"
    env = subprocess_env(pg_dsn, redis_url, OPTMON_INGEST_STREAM_READ_COUNT="2")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        await xadd_batches(r, KEY, batches)
        # 1. kill -9 a quarter of the way in
        first = spawn_ingest(env, log)
        procs.append(first)
        await wait_acked(r, KEY, first, len(batches) // 4, log)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        acked_at_kill, pending_at_kill = await group_state(r, KEY)
        assert acked_at_kill < len(batches), "the replay finished before the kill"
        # 2. restart; SIGTERM half way: the in-flight batch is committed and acknowledged, exit code 0
        second = spawn_ingest(env, log)
        procs.append(second)
        await wait_acked(r, KEY, second, len(batches) // 2, log)
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0, log.read_text()[-3000:]
        acked_at_term, _ = await group_state(r, KEY)
        # The SIGTERMed consumer leaves nothing of its own pending. (Entries of the kill -9ed one may still be
        # pending if they had not been idle long enough to reclaim; the third run must finish them.)
        own = consumer_prefix(second)
        mine = [c for c in await r.xinfo_consumers(KEY, "ingest") if _name(c).startswith(own)]
        assert mine and int(mine[0]["pending"]) == 0, "SIGTERM left entries pending"
        assert acked_at_term < len(batches), "the replay finished before the SIGTERM"
        # 3. restart and finish
        third = spawn_ingest(env, log)
        procs.append(third)
        await wait_drained(r, KEY, len(batches), limit_s=90)
        third.send_signal(signal.SIGTERM)
        assert third.wait(20) == 0, log.read_text()[-3000:]
        consumers = await r.xinfo_consumers(KEY, "ingest")
        assert sum(int(c["pending"]) for c in consumers) == 0
    finally:
        kill_all(procs)
        await r.aclose()
    got = await fetch_bars(pg_dsn)
    with extra_database(pg_cluster) as ref_dsn:
        ref = await reference_bars(ref_dsn, redis_db(redis_url, 1), batches)
    assert len(got["bars_1m"]) > 1000
    for table in ref:
        assert got[table] == ref[table], (f"after kill -9 (acked {acked_at_kill}, pending {pending_at_kill}): "
                                          + describe_diff(table, got[table], ref[table]))


@pytest.fixture
def private_pg() -> object:
    """A dedicated, migrated PostgreSQL cluster this test may stop and start."""
    root = Path(tempfile.mkdtemp(prefix="optmon-pgdown-"))
    os.chmod(root, 0o755)
    cluster = PgCluster(root=root / "pg", port=free_port())
    cluster.init()
    cluster.start()
    migrations.apply(cluster.dsn)
    yield cluster
    cluster.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)


async def _health(channel: grpc.aio.Channel) -> int:
    resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    return int(resp.status)


async def test_postgres_down_mid_replay_nothing_lost_or_doubled(private_pg: PgCluster, redis_url: str,
                                                                pg_cluster: PgCluster) -> None:
    cluster = private_pg
    batches = chunked(csv_snapshots(10), 10_000)
    half = len(batches) // 2
    settings = settings_for(cluster.dsn, redis_url, ingest_stream_read_count=1, ingest_max_pending_ticks=1000,
                            ingest_retry_max_s=0.5)
    server, port = await create_server(settings)
    app = app_of(server)
    r = aioredis.from_url(redis_url)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await app.wait_ready(30)
        await xadd_batches(r, KEY, batches[:half])
        await wait_drained(r, KEY, half)
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING

        await asyncio.to_thread(cluster.stop, "fast")
        down_at = time.monotonic()
        await xadd_batches(r, KEY, batches[half:])
        while not (app.committer is not None and app.committer.degraded):
            assert time.monotonic() - down_at < 20, "ingest did not notice PostgreSQL is down"
            await asyncio.sleep(0.05)
        assert await _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert REGISTRY.get_sample_value("optmon_ingest_degraded") == 1.0
        acked_down = (await group_state(r, KEY))[0]
        # the in-memory bound: a feeder pushing more than it allows is told UNAVAILABLE
        big = market_pb2.TickBatch(option_ticks=[t for b in csv_snapshots(12)[10:] for t in b.option_ticks][:1000])
        stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.PublishTicks(iter([ingest_service_pb2.PublishTicksRequest(batch=big)]), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # legacy pub/sub meanwhile: buffered within the bound, dropped (and counted) beyond it
        assert app.pubsub is not None
        await app.pubsub.wait_subscribed()
        dropped_before = REGISTRY.get_sample_value("optmon_ingest_pubsub_dropped_total") or 0.0
        for _ in range(2):
            await r.publish("ticker:NIFTY:options", _pubsub_ticks(300))
        while app.pubsub.received < 600:
            assert time.monotonic() - down_at < 20, "pub/sub ticks not received"
            await asyncio.sleep(0.05)
        assert app.pubsub.dropped == 300
        assert REGISTRY.get_sample_value("optmon_ingest_pubsub_dropped_total") == dropped_before + 300
        await asyncio.sleep(max(0.0, PG_OUTAGE_S - (time.monotonic() - down_at)))
        acked_still, pending = await group_state(r, KEY)
        assert acked_still == acked_down, "entries were acknowledged while PostgreSQL was down"
        assert pending >= 1

        await asyncio.to_thread(cluster.start)
        await wait_drained(r, KEY, len(batches), limit_s=60)
        deadline = time.monotonic() + 10
        while await _health(channel) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert REGISTRY.get_sample_value("optmon_ingest_degraded") == 0.0
        while app.pubsub.committed < 300:
            assert time.monotonic() < deadline, "buffered pub/sub ticks not committed"
            await asyncio.sleep(0.05)
    finally:
        await channel.close()
        await app.stop()
        await r.aclose()
    got = await fetch_bars(cluster.dsn)
    ce, pe = COLUMNS["bars_1m"].index("ce_close"), COLUMNS["bars_1m"].index("pe_close")
    pubsub_legs = sum((row[ce] is not None) + (row[pe] is not None) for row in got["bars_1m"]
                      if row[1] == PUBSUB_EXPIRY)
    assert pubsub_legs == 300, "the buffered pub/sub ticks were not all committed"
    got = {t: [row for row in rows if "expiry" not in COLUMNS[t] or row[COLUMNS[t].index("expiry")] != PUBSUB_EXPIRY]
           for t, rows in got.items()}
    with extra_database(pg_cluster) as ref_dsn:
        ref = await reference_bars(ref_dsn, redis_db(redis_url, 1), batches)
    assert len(got["bars_1m"]) > 1000
    for table in ref:
        assert got[table] == ref[table], "after the outage: " + describe_diff(table, got[table], ref[table])


#: Expiry of the pub/sub ticks sent during the outage (kept apart from the replayed data's expiries).
PUBSUB_EXPIRY = date(2026, 12, 29)


def _pubsub_ticks(n: int) -> bytes:
    """``n`` legacy JSON call ticks of distinct strikes of PUBSUB_EXPIRY at 10:45 IST on 18 Aug 2026."""
    return json.dumps([{"expiry": PUBSUB_EXPIRY.isoformat(), "strike": 10_000 + 50 * i, "option_type": "CE",
                        "ltp": 100.0 + i, "volume": 10, "oi": 20, "iv": 15.0,
                        "exchange_time": "2026-08-18T10:45:00+05:30"} for i in range(n)]).encode()


async def test_redis_restart_mid_replay(pg_dsn: str, redis_url: str, pg_cluster: PgCluster) -> None:
    """Redis (a private server with AOF) stopped and restarted between two halves of a replay: ingest survives,
    reconnects and finishes; bars equal an uninterrupted run."""
    from services.devstack.redis import RedisServer

    root = Path(tempfile.mkdtemp(prefix="optmon-redisdown-"))
    server = RedisServer(root=root, port=free_port(), appendonly=True)
    server.start()
    batches = chunked(csv_snapshots(8), 10_000)
    half = len(batches) // 2
    app = None
    r = aioredis.from_url(server.url)
    try:
        grpc_server, _port = await create_server(settings_for(pg_dsn, server.url, ingest_retry_max_s=0.3))
        app = app_of(grpc_server)
        await app.wait_ready(30)
        await xadd_batches(r, KEY, batches[:half])
        await wait_drained(r, KEY, half)
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(1.5)  # ingest now fails to read and backs off
        await asyncio.to_thread(server.start)
        await r.aclose()
        r = aioredis.from_url(server.url)  # the test's own connections died with the server
        await xadd_batches(r, KEY, batches[half:])
        await wait_drained(r, KEY, len(batches), limit_s=60)
        assert app.consumer is not None and app.consumer.running
    finally:
        if app is not None:
            await app.stop()
        await r.aclose()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    got = await fetch_bars(pg_dsn)
    with extra_database(pg_cluster) as ref_dsn:
        ref = await reference_bars(ref_dsn, redis_db(redis_url, 1), batches)
    for table in ref:
        assert got[table] == ref[table], "after the Redis restart: " + describe_diff(table, got[table], ref[table])
