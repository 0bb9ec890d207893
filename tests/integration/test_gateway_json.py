"""The gateway's JSON of the hot views, now printed by the query service (``<Rpc>Json`` → ``google.api.HttpBody``),
equals what Envoy's transcoder printed before for the same answer.

Real QueryService over the real 18-Aug day, two real Envoys in front of it: the committed descriptor (REST paths
bound to the JSON twins) and the previous one (the same descriptor with the HTTP bindings moved back onto the
protobuf RPCs, so Envoy transcodes their answers with ``print_options``). Same status, content type and JSON for
successes and errors (400/404); gzip still applies."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from services.devstack.envoy import GATEWAY_DIR, EnvoyProcess
from services.devstack.redis import free_port
from services.query.server import create_server, stop_server
from tests.support import query_fixtures

from .gateway_support import gateway_config, http_request, start_envoy

pytestmark = pytest.mark.integration
bars_dsn = query_fixtures.bars_dsn
bars_template = query_fixtures.bars_template
settings = query_fixtures.query_settings

U = "/v1/underlyings/NIFTY"
PATHS = [
    "/v1/underlyings",
    f"{U}/expiries",
    f"{U}/strike-distribution",
    f"{U}/strike-distribution?expiries=2026-08-25&strikes_around_atm=3&indicators=INDICATOR_OI"
    "&indicators=INDICATOR_IV&timeframe=TIMEFRAME_5M&as_of_time=2026-08-18T05:13:00Z",
    f"{U}/moneyness-series?levels=2&side=OPTION_TYPE_PUT",
    f"{U}/option-chain",
    f"{U}/option-chain?expiry=2026-08-25&as_of_time=2026-08-18T05:13:00Z",
    f"{U}/bars?timeframe=TIMEFRAME_5M&start_time=2026-08-18T04:00:00Z&end_time=2026-08-18T05:00:00Z",  # transcoded
    # errors
    f"{U}/strike-distribution?strikes_around_atm=80",
    "/v1/underlyings/NOPE/option-chain",
    f"{U}/moneyness-series?expiries=2020-01-02",
    "/v1/underlyings/NOPE/expiries",
]


def previous_descriptor(dst: Path) -> Path:
    """The committed descriptor with each ``<Rpc>Json`` twin's HTTP binding moved back onto ``<Rpc>`` (the gateway
    as it was before the twins)."""
    fds = descriptor_pb2.FileDescriptorSet.FromString((GATEWAY_DIR / "optmon.pb").read_bytes())
    f = next(f for f in fds.file if f.name == "optmon/v1/query_service.proto")
    svc = next(s for s in f.service if s.name == "QueryService")
    by_name = {m.name: m for m in svc.method}
    moved = 0
    for m in svc.method:
        if m.name.endswith("Json"):
            base = by_name[m.name.removesuffix("Json")]
            base.options.Extensions[annotations_pb2.http].CopyFrom(m.options.Extensions[annotations_pb2.http])
            m.options.ClearExtension(annotations_pb2.http)
            moved += 1
    assert moved == 5
    dst.write_bytes(fds.SerializeToString())
    return dst


@pytest.fixture
async def gateways(bars_dsn: str, redis_url: str, tmp_path: Path) -> AsyncIterator[tuple[EnvoyProcess, EnvoyProcess]]:
    server, port = await create_server(settings(bars_dsn, redis_url, query_consume_updates=False))
    stream_port = free_port()  # no stream service: only the query routes are used
    new = await start_envoy(tmp_path / "new", gateway_config(port, stream_port))
    old = await start_envoy(tmp_path / "old", gateway_config(
        port, stream_port, descriptor_path=str(previous_descriptor(tmp_path / "previous.pb"))))
    try:
        yield new, old
    finally:
        new.stop()
        old.stop()
        await stop_server(server)


async def test_json_bodies_equal_the_transcoders(gateways: tuple[EnvoyProcess, EnvoyProcess]) -> None:
    new, old = gateways
    for path in PATHS:
        a, b = await http_request(new.url, path), await http_request(old.url, path)
        assert (a.status, a.headers.get("content-type")) == (b.status, b.headers.get("content-type")), path
        assert a.headers["content-type"] == "application/json", path
        assert a.json() == b.json(), path
        if a.status == 200 and "bars" not in path:
            assert "grpc-status" not in a.headers or a.headers["grpc-status"] == "0"
    statuses = {p: (await http_request(new.url, p)).status for p in PATHS[-4:]}
    assert list(statuses.values()) == [400, 404, 404, 404], statuses


async def test_json_body_is_gzipped_when_accepted(gateways: tuple[EnvoyProcess, EnvoyProcess]) -> None:
    new, _ = gateways
    plain = await http_request(new.url, f"{U}/strike-distribution")
    z = await http_request(new.url, f"{U}/strike-distribution", headers={"accept-encoding": "gzip"})
    assert z.status == 200 and z.headers.get("content-encoding") == "gzip"
    assert gzip.decompress(z.body) == plain.body
    assert json.loads(plain.body)["underlying"] == "NIFTY"
