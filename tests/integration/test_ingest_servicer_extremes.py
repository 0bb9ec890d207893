"""Extreme but valid-looking ticks through PublishTicks and the real pipeline: every one is either accepted or
rejected with a reason; none makes the call fail (no service crashes on input)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from optmon.v1 import ingest_service_pb2, ingest_service_pb2_grpc, market_pb2

from services.ingest.server import IngestApp
from tests.integration.ingest_inputs_support import grpc_ingest, settings_for
from tests.unit.test_ingest_validation import good_tick, ts

I64 = 2**63 - 1

EXTREMES: list[tuple[str, dict[str, Any]]] = [
    ("far expiry", {"expiry": "9999-12-31"}),
    ("huge ltp", {"ltp": 1e300}),
    ("tiny ltp", {"ltp": 5e-324}),
    ("max volume", {"volume": I64}),
    ("max oi", {"oi": I64}),
    ("huge greeks", {"delta": 1e308, "gamma": -1e308, "theta": 1e308, "vega": -1e308}),
    ("iv 500", {"iv": 500.0}),
    ("tiny iv", {"iv": 1e-300}),
    ("no iv no greeks", {"iv": None, "delta": None, "gamma": None, "theta": None, "vega": None}),
    ("no iv, huge spot", {"iv": None, "underlying_price": 1e300}),
    ("no iv, tiny futures", {"iv": None, "futures_price": 1e-300}),
    ("max strike", {"strike": 10_000_000.0}),
    ("tiny strike", {"strike": 50.0}),
    ("nanos", {"exchange_time": ts(datetime(2026, 8, 18, 5, 13, 59, 999999, tzinfo=UTC))}),
    ("session edge", {"exchange_time": ts(datetime(2026, 8, 18, 10, 15, tzinfo=UTC))}),
    ("lower-case underlying", {"underlying": "nifty"}),
    ("unicode expiry", {"expiry": "２０２６-08-25"}),
]


@pytest.fixture
async def ingest(pg_dsn: str, redis_url: str) -> AsyncIterator[tuple[IngestApp, grpc.aio.Channel]]:
    settings = settings_for(pg_dsn, redis_url, ingest_streams_enabled=False, ingest_pubsub_enabled=False)
    async with grpc_ingest(settings) as pair:
        yield pair


async def test_extreme_ticks_never_fail_the_call(ingest: tuple[IngestApp, grpc.aio.Channel]) -> None:
    _app, channel = ingest
    stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
    failures = []
    for name, over in EXTREMES:
        tick = good_tick(**over)
        underlying = market_pb2.UnderlyingTick(underlying="NIFTY", price=24200.0, exchange_time=tick.exchange_time)
        req = ingest_service_pb2.PublishTicksRequest(
            batch=market_pb2.TickBatch(option_ticks=[tick], underlying_ticks=[underlying]))
        try:
            resp = await stub.PublishTicks(iter([req]), timeout=30)
        except grpc.aio.AioRpcError as e:
            failures.append((name, e.code(), e.details()))
            continue
        if resp.accepted + resp.rejected != 2:
            failures.append((name, resp))
    assert not failures
