"""The JSON twins of the views (``<Rpc>Json`` → ``google.api.HttpBody``) on the real 18-Aug day, through a real
in-process server with real PostgreSQL/Redis: the body is json_format of the protobuf RPC's answer, one PostgreSQL
computation serves both, the JSON lives in L1/L2 under its own key (lz4 above the threshold), no stale JSON after a
published update, and bad input is the same error as the protobuf RPC's."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.api import httpbody_pb2
from google.protobuf import json_format
from optmon.v1 import market_pb2
from optmon.v1 import query_service_pb2 as q
from prometheus_client import REGISTRY

from services.query.server import create_server, stop_server
from tests.support import query_fixtures

from .test_query_cache import _atm_call_oi, _bump_atm_call_oi, _publish

pytestmark = pytest.mark.integration
bars_dsn = query_fixtures.bars_dsn
bars_template = query_fixtures.bars_template
settings = query_fixtures.query_settings
SVC = "/optmon.v1.QueryService/"

#: (protobuf RPC, request, response class): the views with a JSON twin, with non-default parameters too.
VIEWS: list[tuple[str, Any, Any]] = [
    ("ListUnderlyings", q.ListUnderlyingsRequest(), q.ListUnderlyingsResponse),
    ("ListExpiries", q.ListExpiriesRequest(underlying="NIFTY"), q.ListExpiriesResponse),
    ("GetStrikeDistribution", q.GetStrikeDistributionRequest(underlying="NIFTY"), q.GetStrikeDistributionResponse),
    ("GetStrikeDistribution", q.GetStrikeDistributionRequest(
        underlying="NIFTY", timeframe=market_pb2.TIMEFRAME_5M, strikes_around_atm=3,
        indicators=[market_pb2.INDICATOR_OI, market_pb2.INDICATOR_IV]), q.GetStrikeDistributionResponse),
    ("GetMoneynessSeries", q.GetMoneynessSeriesRequest(underlying="NIFTY", levels=2), q.GetMoneynessSeriesResponse),
    ("GetOptionChain", q.GetOptionChainRequest(underlying="NIFTY"), q.GetOptionChainResponse),
]


def _count(name: str, layer: str, method: str) -> float:
    return REGISTRY.get_sample_value(name, {"layer": layer, "method": method}) or 0.0


async def _call(ch: grpc.aio.Channel, rpc: str, req: Any) -> bytes:
    return await ch.unary_unary(SVC + rpc)(req.SerializeToString())  # type: ignore[no-any-return]


def _body(raw: bytes) -> bytes:
    hb = httpbody_pb2.HttpBody.FromString(raw)
    assert hb.content_type == "application/json"
    return hb.data  # type: ignore[no-any-return]


async def test_json_twin_is_json_format_of_the_protobuf_answer(bars_dsn: str, redis_url: str) -> None:
    server, port = await create_server(settings(bars_dsn, redis_url, query_consume_updates=False))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            for rpc, req, cls in VIEWS:
                body = _body(await _call(ch, rpc + "Json", req))  # JSON first: computes the protobuf entry too
                pg_misses = _count("optmon_query_cache_misses_total", "l2", rpc)
                answer = cls.FromString(await _call(ch, rpc, req))
                assert _count("optmon_query_cache_misses_total", "l2", rpc) == pg_misses  # served from L1
                printed = json_format.MessageToJson(answer, always_print_fields_with_no_presence=True,
                                                    preserving_proto_field_name=True, indent=None,
                                                    ensure_ascii=False)
                assert json.loads(body) == json.loads(printed), rpc
                compact = json.dumps(json.loads(body), separators=(",", ":"), ensure_ascii=False).encode()
                assert body == compact  # no whitespace, UTF-8: like the transcoder's output
                # the transcoder's conventions: zero values printed, enums by name, int64 as strings
                text = body.decode()
                if rpc == "GetStrikeDistribution":
                    d = json.loads(text)
                    assert d["stale"] is False and d["timeframe"].startswith("TIMEFRAME_")
                    leg = d["expiries"][0]["bars"][0]["call"]
                    assert isinstance(leg["oi"], str) and "moneyness_level" in d["expiries"][0]["bars"][0]
                assert _body(await _call(ch, rpc + "Json", req)) == body  # L1 hit: the same bytes
    finally:
        await stop_server(server)


async def test_json_in_l2_under_its_own_key_and_fresh_after_publish(bars_dsn: str, redis_url: str) -> None:
    a, pa = await create_server(settings(bars_dsn, redis_url, query_consume_updates=False))
    b, pb = await create_server(settings(bars_dsn, redis_url, query_consume_updates=False))
    req = q.GetStrikeDistributionRequest(underlying="NIFTY")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{pa}") as ca, \
                grpc.aio.insecure_channel(f"127.0.0.1:{pb}") as cb:
            first = _body(await _call(ca, "GetStrikeDistributionJson", req))
            await a.optmon_app.cache.drain()
            r = aioredis.from_url(redis_url)
            keys = [k async for k in r.scan_iter("optmon:qc:GetStrikeDistributionJson:*")]
            blobs = [await r.get(k) for k in keys]
            last = [k async for k in r.scan_iter("optmon:qc:last:GetStrikeDistributionJson:*")]
            await r.aclose()
            assert len(keys) == 1 and isinstance(blobs[0], bytes) and blobs[0][:1] == b"\x01"  # > 4 KiB: lz4
            assert not last  # stale JSON is rendered from the protobuf's last-good copy
            l2 = _count("optmon_query_cache_hits_total", "l2", "GetStrikeDistributionJson")
            assert _body(await _call(cb, "GetStrikeDistributionJson", req)) == first  # replica b: from L2
            assert _count("optmon_query_cache_hits_total", "l2", "GetStrikeDistributionJson") == l2 + 1

            proto = q.GetStrikeDistributionResponse.FromString(await _call(ca, "GetStrikeDistribution", req))
            e = proto.expiries[0]
            await _bump_atm_call_oi(bars_dsn, (e.expiry, e.atm_strike), 424_242)
            await _publish(redis_url, 1)
            for ch in (ca, cb):
                d = json.loads(_body(await _call(ch, "GetStrikeDistributionJson", req)))
                atm = next(x for x in d["expiries"][0]["bars"] if x["strike"] == d["expiries"][0]["atm_strike"])
                assert atm["call"]["oi"] == "424242"
                fresh = q.GetStrikeDistributionResponse.FromString(await _call(ch, "GetStrikeDistribution", req))
                assert _atm_call_oi(fresh) == 424_242
    finally:
        await stop_server(a)
        await stop_server(b)


@pytest.mark.parametrize(("rpc", "req", "code"), [
    ("GetStrikeDistributionJson", q.GetStrikeDistributionRequest(underlying="NIFTY", strikes_around_atm=80),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("GetOptionChainJson", q.GetOptionChainRequest(underlying="NOPE"), grpc.StatusCode.NOT_FOUND),
    ("GetMoneynessSeriesJson", q.GetMoneynessSeriesRequest(underlying="NIFTY", expiries=["2020-01-02"]),
     grpc.StatusCode.NOT_FOUND),
    ("ListExpiriesJson", q.ListExpiriesRequest(underlying=""), grpc.StatusCode.INVALID_ARGUMENT),
])
async def test_json_twin_errors_equal_the_protobuf_rpc(bars_dsn: str, redis_url: str, rpc: str, req: Any,
                                                       code: grpc.StatusCode) -> None:
    server, port = await create_server(settings(bars_dsn, redis_url, query_consume_updates=False))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            errs = []
            for name in (rpc, rpc.removesuffix("Json")):
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await _call(ch, name, req)
                errs.append(ei.value)
            assert errs[0].code() == errs[1].code() == code
            assert errs[0].details() == errs[1].details()
            md = [dict(e.trailing_metadata() or ()) for e in errs]
            assert md[0].get("grpc-status-details-bin") == md[1].get("grpc-status-details-bin") is not None
    finally:
        await stop_server(server)
