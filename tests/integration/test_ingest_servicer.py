"""IngestService.PublishTicks through a real in-process grpc.aio server (real pipeline, PostgreSQL, Redis): counts,
every reject reason end to end (reason out, counter +1, dead-letter entry), INVALID_ARGUMENT, health, reflection."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from optmon.v1 import ingest_service_pb2, ingest_service_pb2_grpc, market_pb2
from prometheus_client import REGISTRY

from services.ingest.domain import validation as v
from services.ingest.server import IngestApp, app_of, create_server
from tests.integration.ingest_inputs_support import csv_snapshots, grpc_ingest, settings_for
from tests.unit.test_ingest_validation import CASES, good_tick


@pytest.fixture
async def ingest(pg_dsn: str, redis_url: str, request: pytest.FixtureRequest,
                 ) -> AsyncIterator[tuple[IngestApp, grpc.aio.Channel]]:
    """Ingest with gRPC only; ``indirect`` parametrization passes the jump policy (default "keep")."""
    policy = getattr(request, "param", "keep")
    settings = settings_for(pg_dsn, redis_url, ingest_streams_enabled=False, ingest_pubsub_enabled=False,
                            ingest_jump_policy=policy, ingest_publish_commit_ticks=500)
    async with grpc_ingest(settings) as pair:
        yield pair


async def publish(channel: grpc.aio.Channel, batches: list[market_pb2.TickBatch]) -> Any:
    stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
    return await stub.PublishTicks(iter([ingest_service_pb2.PublishTicksRequest(batch=b) for b in batches]))


def rejected_total(reason: str) -> float:
    return REGISTRY.get_sample_value("optmon_ingest_rejected_total", {"reason": reason}) or 0.0


async def test_publish_real_ticks(ingest: tuple[IngestApp, grpc.aio.Channel], pg_dsn: str) -> None:
    _app, channel = ingest
    snaps = list(csv_snapshots(3))
    resp = await publish(channel, snaps)
    n = sum(len(s.option_ticks) + len(s.underlying_ticks) for s in snaps)
    assert (resp.accepted, resp.rejected, dict(resp.rejected_by_reason)) == (n, 0, {})
    # the same ticks again: every one an exact duplicate, nothing new committed
    again = await publish(channel, snaps[:1])
    assert again.rejected_by_reason["DUPLICATE"] == len(snaps[0].option_ticks)


@pytest.mark.parametrize("ingest", ["reject"], indirect=True)
async def test_every_reject_reason_end_to_end(ingest: tuple[IngestApp, grpc.aio.Channel], redis_url: str) -> None:
    _app, channel = ingest
    r = aioredis.from_url(redis_url)
    table: list[tuple[str, list[market_pb2.OptionTick], int]] = [
        (name, [good_tick(**over)], reason) for name, over, reason in CASES
    ]
    table.append(("duplicate", [good_tick(strike=21000.0), good_tick(strike=21000.0)], v.DUPLICATE))
    table.append(("jump", [good_tick(strike=21050.0, ltp=100.0), good_tick(strike=21050.0, ltp=300.0)],
                  v.SUSPICIOUS_JUMP))
    failures = []
    try:
        for name, ticks, reason in table:
            label = v.reason_name(reason)
            before = rejected_total(label)
            dl_before = await r.xlen("optmon:deadletter")
            resp = await publish(channel, [market_pb2.TickBatch(option_ticks=[t]) for t in ticks])
            got = (dict(resp.rejected_by_reason), resp.accepted, rejected_total(label) - before)
            if got != ({label: 1}, len(ticks) - 1, 1.0):
                failures.append((name, got))
                continue
            entries = await r.xrange("optmon:deadletter", min="-", max="+")
            if len(entries) != dl_before + 1:
                failures.append((name, "dead letters", len(entries) - dl_before))
                continue
            _, fields = entries[-1]
            dl = ingest_service_pb2.DeadLetter.FromString(fields[b"pb"])
            if (fields[b"reason"].decode(), dl.reason, dl.source, dl.option_tick) != (
                    label, reason, "grpc", ticks[-1]) or not dl.detail:
                failures.append((name, "dead letter content", fields[b"reason"], dl.detail))
    finally:
        await r.aclose()
    assert not failures


async def test_underlying_reject_through_grpc(ingest: tuple[IngestApp, grpc.aio.Channel]) -> None:
    _app, channel = ingest
    bad = market_pb2.UnderlyingTick(underlying="NIFTY", price=-1.0, exchange_time=good_tick().exchange_time)
    resp = await publish(channel, [market_pb2.TickBatch(underlying_ticks=[bad])])
    assert dict(resp.rejected_by_reason) == {"NON_POSITIVE_LTP": 1}


async def test_request_without_batch_is_invalid_argument(ingest: tuple[IngestApp, grpc.aio.Channel]) -> None:
    _app, channel = ingest
    stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.PublishTicks(iter([ingest_service_pb2.PublishTicksRequest()]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err.value)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "batch"


async def test_health_and_reflection(ingest: tuple[IngestApp, grpc.aio.Channel]) -> None:
    _app, channel = ingest
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "optmon.v1.IngestService"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    names: set[str] = set()
    async for resp in refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
        names |= {s.name for s in resp.list_services_response.service}
    assert "optmon.v1.IngestService" in names


async def test_port_answers_before_postgres_is_reachable(redis_url: str) -> None:
    """Start-up does no heavy work before the port answers: with PostgreSQL unreachable, health says NOT_SERVING
    and PublishTicks UNAVAILABLE (instead of hanging or crashing); stopping still works."""
    from services.devstack.redis import free_port

    settings = settings_for(f"postgresql://optmon@127.0.0.1:{free_port()}/nowhere", redis_url,
                            ingest_pubsub_enabled=False)
    server, port = await create_server(settings)
    app = app_of(server)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await publish(channel, list(csv_snapshots(1)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not app.ready.is_set()
    finally:
        await channel.close()
        await app.stop(grace=1)
