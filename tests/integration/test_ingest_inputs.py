"""Ingest inputs against real PostgreSQL and Redis, ingest running in process (create_server on port 0):
Redis Stream → bars end to end, undecodable entries → dead letters, legacy pub/sub JSON, reclaiming a dead
consumer's entries, and trimming that never drops unacknowledged entries."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from optmon.v1 import ingest_service_pb2

from services.devstack.pg import PgCluster
from services.ingest.inputs.committer import Committer
from services.ingest.inputs.streams import GROUP, StreamConsumer
from services.ingest.server import IngestApp, app_of, create_server
from services.ingest.settings import IngestSettings
from tests.integration.ingest_inputs_support import (
    chunked,
    csv_snapshots,
    extra_database,
    fetch_bars,
    redis_db,
    reference_bars,
    settings_for,
    wait_drained,
    xadd_batches,
)

KEY = "optmon:ticks:NIFTY"


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.from_url(redis_url)
    yield r
    await r.aclose()


async def start_ingest(settings: IngestSettings) -> IngestApp:
    server, _port = await create_server(settings)
    app = app_of(server)
    await app.wait_ready(30)
    return app


async def dead_letters(r: aioredis.Redis) -> list[ingest_service_pb2.DeadLetter]:
    return [ingest_service_pb2.DeadLetter.FromString(f[b"pb"]) for _, f in await r.xrange("optmon:deadletter")]


async def test_stream_to_bars_end_to_end(pg_dsn: str, redis_url: str, redis_client: aioredis.Redis,
                                         pg_cluster: PgCluster) -> None:
    batches = chunked(csv_snapshots(6), 150)
    await xadd_batches(redis_client, KEY, batches)
    await redis_client.xadd(KEY, {"pb": b"\x0a\xff\xff\xff garbage"})  # not a TickBatch
    await redis_client.xadd(KEY, {"other": b"x"})  # no pb field
    app = await start_ingest(settings_for(pg_dsn, redis_url, ingest_pubsub_enabled=False))
    try:
        await wait_drained(redis_client, KEY, len(batches) + 2)
        got = await fetch_bars(pg_dsn)
    finally:
        await app.stop()
    n_contract_minutes = sum(len(b.option_ticks) for b in csv_snapshots(6))
    assert n_contract_minutes > 3000
    assert got["bars_1m"] and got["bars_5m"] and got["bars_latest"] and got["underlying_bars"]
    conn = await asyncpg.connect(pg_dsn)
    try:
        legs = await conn.fetchval(
            "SELECT count(ce_close) + count(pe_close) FROM bars_1m WHERE underlying='NIFTY'")
    finally:
        await conn.close()
    assert legs == n_contract_minutes
    dls = await dead_letters(redis_client)
    assert [d.reason for d in dls] == [ingest_service_pb2.REJECT_REASON_MALFORMED] * 2
    assert all(d.source.startswith(f"stream:{KEY}:") for d in dls)
    assert dls[0].raw.startswith(b"\x0a\xff")
    # the same ticks through the pipeline directly, in other batch sizes, give identical rows
    with extra_database(pg_cluster) as ref_dsn:
        ref = await reference_bars(ref_dsn, redis_db(redis_url, 1), batches, per_call=7)
    assert got == ref


async def test_dead_consumer_entries_are_reclaimed(pg_dsn: str, redis_url: str,
                                                   redis_client: aioredis.Redis) -> None:
    batches = chunked(csv_snapshots(2), 300)
    await redis_client.xgroup_create(KEY, GROUP, id="0", mkstream=True)
    await xadd_batches(redis_client, KEY, batches)
    # a consumer reads everything and dies without acknowledging
    await redis_client.xreadgroup(GROUP, "crashed-1", {KEY: ">"}, count=1000)
    assert (await redis_client.xpending(KEY, GROUP))["pending"] == len(batches)
    await asyncio.sleep(1.1)  # idle beyond ingest_claim_idle_ms
    app = await start_ingest(settings_for(pg_dsn, redis_url, ingest_pubsub_enabled=False))
    try:
        await wait_drained(redis_client, KEY, len(batches))
        # The crashed consumer's entries were reclaimed (XAUTOCLAIM) and acknowledged: nothing of it is pending.
        crashed = [c for c in await redis_client.xinfo_consumers(KEY, GROUP)
                   if c["name"] in ("crashed-1", b"crashed-1")]
        assert not crashed or int(crashed[0]["pending"]) == 0
        assert app.consumer is not None
    finally:
        await app.stop()
    conn = await asyncpg.connect(pg_dsn)
    try:
        legs = await conn.fetchval("SELECT count(ce_close) + count(pe_close) FROM bars_1m")
    finally:
        await conn.close()
    assert legs == sum(len(b.option_ticks) for b in batches)


async def test_trim_never_drops_unacknowledged_entries(redis_url: str, redis_client: aioredis.Redis) -> None:
    settings = settings_for("postgresql://unused/x", redis_url, ingest_stream_maxlen=100)
    consumer = StreamConsumer(redis_client, Committer(object(), max_pending_ticks=10),  # type: ignore[arg-type]
                              settings, consumer_name="trimmer")
    await consumer.ensure_groups()
    ids = [await redis_client.xadd(KEY, {"pb": b""}) for _ in range(600)]
    resp = await redis_client.xreadgroup(GROUP, "reader", {KEY: ">"}, count=400)
    read = [eid for _, items in resp for eid, _ in items]
    await redis_client.xack(KEY, GROUP, *read[:150])  # 150 acked, 250 pending, 200 never delivered
    await consumer.trim()
    left = {eid for eid, _ in await redis_client.xrange(KEY)}
    assert set(ids[150:]) <= left, "an unacknowledged entry was trimmed"
    assert len(left) < 600, "nothing trimmed"
    # everything acknowledged and nothing left unread: trimming may go up to the last delivered entry only
    await redis_client.xack(KEY, GROUP, *read[150:])
    rest = await redis_client.xreadgroup(GROUP, "reader", {KEY: ">"}, count=1000)
    await redis_client.xack(KEY, GROUP, *[eid for _, items in rest for eid, _ in items])
    newer = [await redis_client.xadd(KEY, {"pb": b""}) for _ in range(150)]  # undelivered
    await consumer.trim()
    left = {eid for eid, _ in await redis_client.xrange(KEY)}
    assert set(newer) <= left
    assert await redis_client.xlen(KEY) < 450


def _json_ticks(batch: Any) -> tuple[bytes, bytes]:
    opts = [{
        "expiry": t.expiry, "strike": t.strike, "option_type": "CE" if t.option_type == 1 else "PE", "ltp": t.ltp,
        "volume": t.volume, "oi": t.oi, "iv": t.iv if t.HasField("iv") else None,
        "exchange_time": t.exchange_time.ToJsonString(),
    } for t in batch.option_ticks]
    (u,) = batch.underlying_ticks
    return json.dumps(opts).encode(), json.dumps({"price": u.price, "ts": u.exchange_time.seconds}).encode()


async def test_legacy_pubsub_json(pg_dsn: str, redis_url: str, redis_client: aioredis.Redis) -> None:
    snaps = csv_snapshots(2)
    app = await start_ingest(settings_for(pg_dsn, redis_url, ingest_streams_enabled=False))
    try:
        assert app.pubsub is not None
        await app.pubsub.wait_subscribed()
        expected = 0
        for snap in snaps:
            options, underlying = _json_ticks(snap)
            await redis_client.publish("ticker:NIFTY:underlying", underlying)
            await redis_client.publish("ticker:NIFTY:options", options)
            expected += len(snap.option_ticks) + 1
        await redis_client.publish("ticker:NIFTY:options", b"{broken")
        await redis_client.publish("ticker:NIFTY:options", b'{"expiry": "2026-08-25", "option_type": "CE"}')
        deadline = time.monotonic() + 30
        while app.pubsub.committed < expected:
            assert time.monotonic() < deadline, f"{app.pubsub.committed}/{expected} committed"
            await asyncio.sleep(0.05)
    finally:
        await app.stop()
    conn = await asyncpg.connect(pg_dsn)
    try:
        legs = await conn.fetchval("SELECT count(ce_close) + count(pe_close) FROM bars_1m")
        t = snaps[0].option_ticks[0]
        ltp = await conn.fetchval(
            f"SELECT {'ce' if t.option_type == 1 else 'pe'}_close FROM bars_1m WHERE expiry=$1::text::date "
            "AND strike=$2 AND bucket_time=to_timestamp($3)", t.expiry, t.strike, t.exchange_time.seconds)
        spots = await conn.fetchval("SELECT count(*) FROM underlying_bars")
    finally:
        await conn.close()
    assert legs == sum(len(s.option_ticks) for s in snaps)
    assert ltp == t.ltp
    assert spots >= 2
    dls = await dead_letters(redis_client)
    assert len(dls) == 2
    assert {d.source for d in dls} == {"pubsub:ticker:NIFTY:options"}
    assert {d.reason for d in dls} == {ingest_service_pb2.REJECT_REASON_MALFORMED}


async def test_dead_consumer_names_are_forgotten(redis_url: str, redis_client: aioredis.Redis) -> None:
    settings = settings_for("postgresql://unused/x", redis_url, ingest_claim_idle_ms=100)
    consumer = StreamConsumer(redis_client, Committer(object(), max_pending_ticks=10),  # type: ignore[arg-type]
                              settings, consumer_name="me")
    await consumer.ensure_groups()
    await redis_client.xgroup_createconsumer(KEY, GROUP, "long-gone")
    await redis_client.xadd(KEY, {"pb": b""})
    await redis_client.xreadgroup(GROUP, "still-pending", {KEY: ">"}, count=1)  # has a pending entry: kept
    await asyncio.sleep(1.1)
    assert await consumer.forget_dead_consumers() == 1
    names = {c["name"].decode() for c in await redis_client.xinfo_consumers(KEY, GROUP)}
    assert names == {"still-pending"}
