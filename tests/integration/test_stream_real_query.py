"""Stream against the real QueryService (services.query) over PostgreSQL holding the real 18-Aug-2026 NIFTY day:
the snapshot is the query's answer for the same filter, and after more minutes (written to PostgreSQL, then
announced as BarUpdates like ingest does) applying snapshot + deltas equals the query's latest answer, value for
value."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from optmon.v1 import query_service_pb2, query_service_pb2_grpc, stream_service_pb2, stream_service_pb2_grpc

from services.query.server import create_server as create_query_server
from services.query.server import stop_server as stop_query_server
from services.query.settings import QuerySettings
from services.stream.server import create_server
from services.stream.settings import StreamSettings
from services.stream.testing import BarPublisher, ReferenceClient
from tests.support.load_bars import load_nifty_day

U = "NIFTY"
FIRST = datetime(2026, 8, 18, 5, 13, tzinfo=UTC)  # 10:43 IST, the file's first minute


async def _latest(qstub: query_service_pb2_grpc.QueryServiceStub, req: stream_service_pb2.SubscribeRequest,
                  want_bucket: int) -> query_service_pb2.GetStrikeDistributionResponse:
    q = query_service_pb2.GetStrikeDistributionRequest(underlying=U, expiries=req.expiries,
                                                       strikes_around_atm=req.strikes_around_atm,
                                                       indicators=req.indicators)
    async with asyncio.timeout(20):
        while True:  # the query's cache follows the BarUpdates it consumes: wait until it shows the last bucket
            resp = await qstub.GetStrikeDistribution(q, timeout=20)
            if resp.bucket_time.seconds >= want_bucket:
                return resp
            await asyncio.sleep(0.05)


async def test_reconstruction_against_real_query(pg_dsn: str, redis_url: str, nifty_1min_csv: Path) -> None:
    await load_nifty_day(pg_dsn, nifty_1min_csv, minutes=20)
    qserver, qport = await create_query_server(QuerySettings(pg_dsn=pg_dsn, redis_url=redis_url, query_port=0))
    server, port = await create_server(StreamSettings(redis_url=redis_url, query_addr=f"127.0.0.1:{qport}",
                                                      stream_port=0, stream_block_ms=200))
    qch = grpc.aio.insecure_channel(f"127.0.0.1:{qport}")
    sch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    qstub = query_service_pb2_grpc.QueryServiceStub(qch)
    sstub = stream_service_pb2_grpc.StreamServiceStub(sch)
    pub = BarPublisher(redis_url, None)
    calls = []
    try:
        expiries = list((await qstub.ListExpiries(query_service_pb2.ListExpiriesRequest(underlying=U),
                                                  timeout=20)).expiries)
        reqs = [
            stream_service_pb2.SubscribeRequest(underlying=U, strikes_around_atm=10, max_updates_per_second=20),
            stream_service_pb2.SubscribeRequest(underlying=U, expiries=[expiries[1]], strikes_around_atm=3,
                                                indicators=[7, 2], max_updates_per_second=20),  # type: ignore[list-item]
        ]
        clients = [ReferenceClient(U) for _ in reqs]
        calls = [sstub.Subscribe(r) for r in reqs]
        first_bucket = int((FIRST + timedelta(minutes=19)).timestamp())
        for c, call, req in zip(clients, calls, reqs, strict=True):
            async with asyncio.timeout(20):
                c.apply(await call.read())
            assert c.kinds == ["snapshot"]
            assert c.distribution() == await _latest(qstub, req, first_bucket)

        # five more minutes: "commit" them to PostgreSQL, then publish each minute's bars as a BarUpdate
        conn = await asyncpg.connect(pg_dsn)
        for table in ("bars_1m", "bars_5m", "bars_latest", "underlying_bars"):  # DELETE: no lock on readers
            await conn.execute(f"DELETE FROM {table}")
        await conn.close()
        await load_nifty_day(pg_dsn, nifty_1min_csv, minutes=25)
        last = 0
        for k in range(20, 25):
            ts = Timestamp()
            ts.FromDatetime(FIRST + timedelta(minutes=k))
            snap = await qstub.GetStrikeDistribution(query_service_pb2.GetStrikeDistributionRequest(
                underlying=U, expiries=expiries, strikes_around_atm=50, as_of_time=ts), timeout=20)
            last = snap.bucket_time.seconds
            await pub.publish(U, 1, last, snap.underlying_price, [b for e in snap.expiries for b in e.bars])

        for c, call, req in zip(clients, calls, reqs, strict=True):
            async with asyncio.timeout(20):
                while c.bucket_time < last:
                    c.apply(await call.read())
            assert set(c.kinds[1:]) <= {"delta", "heartbeat"}
            assert c.distribution() == await _latest(qstub, req, last)
    finally:
        for call in calls:
            call.cancel()
        # Every clean-up step is bounded: a slow one must not hang the suite (the assertions above are the test).
        for step in (pub.close(), sch.close(), qch.close(), server.stream_close(),  # type: ignore[attr-defined]
                     server.stop(None), stop_query_server(qserver)):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(step, 20)
