"""At-least-once BarUpdates and the delivery cap of the tick streams, on real PostgreSQL and Redis:

- ``python -m services.ingest`` dies (``OPTMON_INGEST_FAULT_EXIT_AFTER_COMMITS``: ``os._exit`` right after a commit,
  before its publish); another ingest process takes the pending entry over and publishes BarUpdates for exactly the
  bars that commit wrote, with the committed values, without changing a row (no double counting);
- an entry delivered more often than ``OPTMON_INGEST_MAX_DELIVERIES`` is dead-lettered as POISON (counted, bytes
  kept) and acknowledged, and the entries around it are processed;
- an entry that kills ingest every time it is processed stops doing so at the cap;
- PublishTicks batches resent with ``resend`` after a failed call get their bars published even though the failed
  call committed them.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import redis.asyncio as aioredis
from optmon.v1 import ingest_service_pb2, ingest_service_pb2_grpc, market_pb2
from prometheus_client import REGISTRY

from services.common.domain.timeframes import Timeframe
from services.devstack.pg import PgCluster
from services.ingest.inputs.committer import count_ticks
from services.ingest.inputs.streams import GROUP
from services.ingest.server import app_of, create_server
from tests.integration.ingest_inputs_support import (
    bar_events,
    bars_of_ticks,
    csv_snapshots,
    extra_database,
    fetch_bars,
    group_state,
    grpc_ingest,
    kill_all,
    last_event_id,
    redis_db,
    reference_bars,
    reference_pipeline,
    settings_for,
    spawn_ingest,
    stored_strike_bars,
    subprocess_env,
    wait_drained,
    wait_exit,
    xadd_batches,
)

KEY = "optmon:ticks:NIFTY"
#: Exit code of the fault-injection exit (services/ingest/pipeline.py ``_fault_exit``).
FAULT_EXIT = 70


async def _dead_letters(r: aioredis.Redis) -> list[tuple[bytes, ingest_service_pb2.DeadLetter]]:
    return [(f[b"reason"], ingest_service_pb2.DeadLetter.FromString(f[b"pb"]))
            for _, f in await r.xrange("optmon:deadletter")]


def _rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("optmon_ingest_rejected_total", {"reason": reason}) or 0.0


async def test_died_between_commit_and_publish_bars_go_out_after_takeover(
        pg_dsn: str, redis_url: str, pg_cluster: PgCluster, tmp_path: Path) -> None:
    snaps = list(csv_snapshots(4))  # one whole minute per entry, one entry per commit
    r = aioredis.from_url(redis_url)
    log = tmp_path / "ingest.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        await xadd_batches(r, KEY, snaps)
        dying = spawn_ingest(subprocess_env(pg_dsn, redis_url, OPTMON_INGEST_STREAM_READ_COUNT="1",
                                            OPTMON_INGEST_FAULT_EXIT_AFTER_COMMITS="4"), log)
        procs.append(dying)
        assert await wait_exit(dying, log) == FAULT_EXIT
        assert await group_state(r, KEY) == (3, 1), "the 4th entry should be committed, unacknowledged"
        committed = await stored_strike_bars(pg_dsn)
        rows_at_death = await fetch_bars(pg_dsn)
        lost = bars_of_ticks([snaps[3]])
        lost_1m = {k for k in lost if k[0] == Timeframe.M1}
        assert len(lost_1m) > 100 and lost <= committed.keys(), "the 4th minute was not committed"
        _, published = await bar_events(r)
        assert not lost_1m & published.keys(), "the 4th minute's bars were published before the exit"
        mark = await last_event_id(r)

        taker = spawn_ingest(subprocess_env(pg_dsn, redis_url, OPTMON_INGEST_STREAM_READ_COUNT="1"), log)
        procs.append(taker)
        await wait_drained(r, KEY, len(snaps))  # BarUpdates go out before the XACK
        taker.send_signal(signal.SIGTERM)
        assert await wait_exit(taker, log) == 0
        updates, republished = await bar_events(r, mark)
        all_updates, _ = await bar_events(r)
    finally:
        kill_all(procs)
        await r.aclose()
    # BarUpdates for exactly the 1M bars of the lost commit (and every rollup containing them), committed values
    assert {k for k in republished if k[0] == Timeframe.M1} == lost_1m
    assert not lost - republished.keys()
    wrong = sorted(k for k, b in republished.items() if committed.get(k) != b)
    assert not wrong, f"published bars differ from the committed ones, e.g. {wrong[:3]}"
    assert updates and {u.timeframe for u in updates} == {int(tf) for tf in Timeframe}
    assert [u.sequence for u in all_updates] == list(range(1, len(all_updates) + 1)), "sequence gap or reuse"
    # nothing counted twice: rows as at the death, and as in one uninterrupted run
    rows = await fetch_bars(pg_dsn)
    assert rows == rows_at_death
    with extra_database(pg_cluster) as ref_dsn:
        assert rows == await reference_bars(ref_dsn, redis_db(redis_url, 1), snaps)


async def test_entry_over_the_delivery_cap_is_dead_lettered(pg_dsn: str, redis_url: str) -> None:
    snaps = list(csv_snapshots(3))
    r = aioredis.from_url(redis_url)
    app = None
    try:
        await r.xgroup_create(KEY, GROUP, id="0", mkstream=True)
        ids = await xadd_batches(r, KEY, snaps)
        # Consumers that died: every entry delivered once, the middle one reclaimed four more times (5 deliveries).
        await r.xreadgroup(GROUP, "died-1", {KEY: ">"}, count=10)
        for i in range(4):
            await r.xclaim(KEY, GROUP, f"died-{i + 2}", 0, [ids[1]])
        counts = [int(p["times_delivered"]) for p in await r.xpending_range(KEY, GROUP, "-", "+", 10)]
        assert counts == [1, 5, 1]
        await asyncio.sleep(1.1)  # idle beyond ingest_claim_idle_ms
        before = _rejected("POISON")
        server, _port = await create_server(settings_for(pg_dsn, redis_url, ingest_pubsub_enabled=False,
                                                         ingest_max_deliveries=5))
        app = app_of(server)
        await app.wait_ready(30)
        await wait_drained(r, KEY, len(snaps))
        dls = await _dead_letters(r)
        _, published = await bar_events(r)
    finally:
        if app is not None:
            await app.stop()
        await r.aclose()
    assert len(dls) == 1
    label, dl = dls[0]
    assert (label, dl.reason, dl.source) == (b"POISON", ingest_service_pb2.REJECT_REASON_POISON,
                                             f"stream:{KEY}:{ids[1]}")
    assert "delivered 6 times" in dl.detail and "OPTMON_INGEST_MAX_DELIVERIES=5" in dl.detail
    assert market_pb2.TickBatch.FromString(dl.raw) == snaps[1]
    assert _rejected("POISON") - before == count_ticks(snaps[1])
    # the poison entry was not processed; the re-delivered entries around it were, and their bars published
    minutes = [s.underlying_ticks[0].exchange_time.seconds // 60 * 60 for s in snaps]
    stored_1m = {k[3] for k in await stored_strike_bars(pg_dsn) if k[0] == Timeframe.M1}
    assert stored_1m == {minutes[0], minutes[2]}
    assert {k[3] for k in published if k[0] == Timeframe.M1} == {minutes[0], minutes[2]}


async def test_entry_that_kills_ingest_every_time_stops_at_the_cap(pg_dsn: str, redis_url: str,
                                                                   tmp_path: Path) -> None:
    snap = csv_snapshots(1)[0]
    r = aioredis.from_url(redis_url)
    log = tmp_path / "ingest.log"
    # every process dies after its first commit: the entry's processing "crashes" ingest each time
    env = subprocess_env(pg_dsn, redis_url, OPTMON_INGEST_FAULT_EXIT_AFTER_COMMITS="1",
                         OPTMON_INGEST_MAX_DELIVERIES="2")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        (eid,) = await xadd_batches(r, KEY, [snap])
        for delivery in (1, 2):
            proc = spawn_ingest(env, log)
            procs.append(proc)
            assert await wait_exit(proc, log) == FAULT_EXIT
            assert [int(p["times_delivered"]) for p in await r.xpending_range(KEY, GROUP, "-", "+", 10)] == [delivery]
        third = spawn_ingest(env, log)
        procs.append(third)
        await wait_drained(r, KEY, 1)  # delivery 3 > 2: dead-lettered and acknowledged without processing
        assert third.poll() is None, "the capped entry was processed again"
        third.send_signal(signal.SIGTERM)
        assert await wait_exit(third, log) == 0
        dls = await _dead_letters(r)
    finally:
        kill_all(procs)
        await r.aclose()
    assert [(label, dl.reason, dl.source) for label, dl in dls] == [
        (b"POISON", ingest_service_pb2.REJECT_REASON_POISON, f"stream:{KEY}:{eid}")]
    assert "delivered 3 times" in dls[0][1].detail


async def test_publish_ticks_resend_publishes_bars_a_failed_call_committed(pg_dsn: str, redis_url: str) -> None:
    snaps = list(csv_snapshots(2))
    # The failed call: committed by an ingest that died before publishing (its events go to another Redis database).
    async with reference_pipeline(pg_dsn, redis_db(redis_url, 1)) as p:
        await p.process([(b, "grpc") for b in snaps])
    committed = await stored_strike_bars(pg_dsn)
    settings = settings_for(pg_dsn, redis_url, ingest_streams_enabled=False, ingest_pubsub_enabled=False)
    r = aioredis.from_url(redis_url)
    try:
        for resend in (False, True):  # a new ingest process each time (a live one would see DUPLICATEs)
            async with grpc_ingest(settings) as (_app, channel):
                mark = await last_event_id(r)
                resp = await ingest_service_pb2_grpc.IngestServiceStub(channel).PublishTicks(
                    iter([ingest_service_pb2.PublishTicksRequest(batch=b, resend=resend) for b in snaps]))
                assert resp.accepted == sum(count_ticks(b) for b in snaps)
                _, published = await bar_events(r, mark)
            if not resend:
                assert published == {}, "a plain resend changes no bar: nothing is published"
    finally:
        await r.aclose()
    assert published.keys() == committed.keys()
    assert all(published[k] == b for k, b in committed.items())
    assert await stored_strike_bars(pg_dsn) == committed
