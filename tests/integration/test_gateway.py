"""The gateway through a real Envoy in front of real in-process grpc.aio servers (stub servicers over a synthetic
book, tests/integration/gateway_support.py): JSON GET transcoding, error mapping, SSE framing, CORS, compression,
routing limits, readiness, access logs, rate limit, stream-duration bound, API key and JWT auth."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from services.devstack.envoy import EnvoyProcess
from services.devstack.redis import free_port

from .gateway_support import (
    ATM,
    EXPIRIES,
    StubBackends,
    call_oi,
    gateway_config,
    http_request,
    read_sse,
    start_envoy,
    start_stub_backends,
)

pytestmark = pytest.mark.integration

SD = "/v1/underlyings/NIFTY/strike-distribution"


@pytest.fixture(scope="module")
async def backends() -> AsyncIterator[StubBackends]:
    b = await start_stub_backends(heartbeat_s=0.5)
    yield b
    await b.stop()


@pytest.fixture(scope="module")
async def gw(backends: StubBackends, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EnvoyProcess]:
    env = await start_envoy(tmp_path_factory.mktemp("envoy"), gateway_config(backends.query_port, backends.stream_port))
    yield env
    env.stop()


async def test_query_rpcs_as_json_get(gw: EnvoyProcess) -> None:
    r = await http_request(gw.url, "/v1/underlyings")
    assert r.status == 200 and r.headers["content-type"] == "application/json"
    assert r.json()["underlyings"][0]["underlying"] == "NIFTY"
    # repeated query parameter, Timestamp as RFC 3339, enum by name; proto field names; int64 as JSON strings.
    r = await http_request(gw.url, f"{SD}?expiries={EXPIRIES[0]}&expiries={EXPIRIES[1]}&strikes_around_atm=2"
                                   "&as_of_time=2026-08-18T05:13:00Z&timeframe=TIMEFRAME_1M")
    assert r.status == 200, r.body
    body = r.json()
    assert [e["expiry"] for e in body["expiries"]] == EXPIRIES
    bars = body["expiries"][0]["bars"]
    assert len(bars) == 5 and body["expiries"][0]["atm_strike"] == ATM
    atm_bar = next(b for b in bars if b["strike"] == ATM)
    assert atm_bar["moneyness_level"] == 0  # zero values are printed
    assert atm_bar["call"]["oi"] == str(call_oi(ATM))
    assert body["bucket_time"] == "2026-08-18T05:13:00Z"
    for path in ["/v1/underlyings/NIFTY/expiries", "/v1/underlyings/NIFTY/option-chain",
                 "/v1/underlyings/NIFTY/moneyness-series?levels=2&indicator=INDICATOR_IV",
                 "/v1/underlyings/NIFTY/bars?timeframe=TIMEFRAME_5M"]:
        assert (await http_request(gw.url, path)).status == 200, path


async def test_bad_parameter_is_400_with_field_violation(gw: EnvoyProcess) -> None:
    r = await http_request(gw.url, f"{SD}?strikes_around_atm=80")
    assert r.status == 400 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["code"] == 3
    assert body["details"][0]["field_violations"][0]["field"] == "strikes_around_atm"
    # a malformed value is rejected by the transcoder itself
    r = await http_request(gw.url, f"{SD}?strikes_around_atm=abc")
    assert r.status == 400 and "message" in r.json()


async def test_unknown_underlying_is_404(gw: EnvoyProcess) -> None:
    r = await http_request(gw.url, "/v1/underlyings/BOGUS/expiries")
    assert r.status == 404
    body = r.json()
    assert body["code"] == 5 and body["details"][0]["reason"] == "UNKNOWN_UNDERLYING"


async def test_unknown_query_parameter_is_rejected(gw: EnvoyProcess) -> None:
    r = await http_request(gw.url, "/v1/underlyings?bogus=1")
    assert r.status == 400
    assert "bogus" in r.json()["message"]


@pytest.mark.parametrize("path", [
    "/optmon.v1.IngestService/PublishTicks",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
])
async def test_internal_services_are_not_routed(gw: EnvoyProcess, path: str) -> None:
    for method, headers in [("POST", {"content-type": "application/grpc", "te": "trailers"}), ("GET", {})]:
        r = await http_request(gw.url, path, method, headers=headers, body=b"" if method == "POST" else None)
        # a plain HTTP client gets 404; a gRPC client gets Envoy's gRPC answer UNIMPLEMENTED (route not found)
        assert r.status in (403, 404) or r.headers.get("grpc-status") == "12", (path, method, r.status, r.headers)
        assert r.headers.get("x-envoy-upstream-service-time") is None  # never reached a service


async def test_cors_preflight_and_simple_request(gw: EnvoyProcess) -> None:
    pre = {"origin": "http://desk.example", "access-control-request-method": "GET"}
    r = await http_request(gw.url, SD, "OPTIONS", headers=pre)
    assert r.status == 200
    assert r.headers["access-control-allow-origin"] == "http://desk.example"
    assert "GET" in r.headers["access-control-allow-methods"]
    r = await http_request(gw.url, "/v1/underlyings", headers={"origin": "http://desk.example"})
    assert r.status == 200 and r.headers["access-control-allow-origin"] == "http://desk.example"
    r = await http_request(gw.url, SD, "OPTIONS", headers={**pre, "origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = await http_request(gw.url, "/v1/underlyings", headers={"origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


async def test_json_is_gzipped_on_request(gw: EnvoyProcess) -> None:
    r = await http_request(gw.url, f"{SD}?strikes_around_atm=10", headers={"accept-encoding": "gzip"})
    assert r.status == 200 and r.headers.get("content-encoding") == "gzip"
    assert json.loads(gzip.decompress(r.body))["underlying"] == "NIFTY"
    r = await http_request(gw.url, f"{SD}?strikes_around_atm=10")
    assert "content-encoding" not in r.headers and r.json()["underlying"] == "NIFTY"


async def test_subscribe_is_sse(gw: EnvoyProcess, backends: StubBackends) -> None:
    path = f"/v1/underlyings/NIFTY/subscribe?strikes_around_atm=2&expiries={EXPIRIES[0]}&max_updates_per_second=4"
    backends.stream_servicer.updates.put_nowait((ATM, 123_456))
    status, headers, events = await read_sse(gw.url, path, 3, headers={"accept-encoding": "gzip"})
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    assert "content-encoding" not in headers  # SSE is never compressed
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    msgs = [json.loads(e.removeprefix("data: ")) for e in events]
    assert msgs[0]["sequence"] == "1" and "snapshot" in msgs[0]
    assert len(msgs[0]["snapshot"]["distribution"]["expiries"][0]["bars"]) == 5
    kinds = [next(k for k in ("delta", "heartbeat") if k in m) for m in msgs[1:]]
    assert "delta" in kinds, msgs
    delta = next(m for m in msgs if "delta" in m)
    assert delta["sequence"] == "2"
    assert delta["delta"]["expiries"][0]["bars"][0]["call"]["oi"] == "123456"


async def test_subscribe_error_travels_inside_the_stream(gw: EnvoyProcess) -> None:
    status, _, events = await read_sse(gw.url, "/v1/underlyings/BOGUS/subscribe", 5)
    assert status == 200
    assert json.loads(events[0].removeprefix("data: "))["error"]["code"] == "NOT_FOUND"


async def test_dashboard_is_served(gw: EnvoyProcess) -> None:
    r = await http_request(gw.url, "/")
    assert r.status == 200 and r.headers["content-type"].startswith("text/html") and b"<html" in r.body.lower()
    for path, ctype in [("/app.js", "application/javascript"), ("/app.css", "text/css"),
                        ("/vendor/uPlot.iife.min.js", "application/javascript"), ("/vendor/uPlot.min.css", "text/css")]:
        r = await http_request(gw.url, path, headers={"accept-encoding": "gzip"})
        assert r.status == 200 and r.headers["content-type"].startswith(ctype), path
        assert r.headers.get("content-encoding") == "gzip" and gzip.decompress(r.body), path
    assert (await http_request(gw.url, "/nothing-here")).status == 404


async def test_ready_and_access_log(gw: EnvoyProcess) -> None:
    r = await http_request(gw.url, "/ready")
    assert r.status == 200
    await http_request(gw.url, "/v1/underlyings", headers={"x-request-id": "gw-test-rid-1"})
    for _ in range(100):  # the access log is flushed asynchronously
        recs = [x for x in gw.access_log_lines() if x.get("request_id") == "gw-test-rid-1"]
        if recs:
            break
        await asyncio.sleep(0.05)
    assert recs and recs[0]["path"] == "/v1/underlyings" and recs[0]["status"] == 200
    assert recs[0]["upstream"] == "query" and recs[0]["grpc_status"] == "OK"


async def test_service_down_is_503(tmp_path: Path) -> None:
    dead = free_port()
    env = await start_envoy(tmp_path, gateway_config(dead, dead))
    try:
        r = await http_request(env.url, "/v1/underlyings")
        assert r.status == 503 and r.headers["content-type"] == "application/json"
        assert r.json()["http_status"] == 503
        assert (await http_request(env.url, "/ready")).status == 503
    finally:
        env.stop()


async def test_rate_limit_per_client_is_429(backends: StubBackends, tmp_path: Path) -> None:
    env = await start_envoy(tmp_path, gateway_config(backends.query_port, backends.stream_port,
                                                     rate_limit_rps=1, rate_limit_burst=3))
    try:
        codes = [(await http_request(env.url, "/v1/underlyings")).status for _ in range(6)]
        assert codes[:3] == [200, 200, 200] and 429 in codes[3:], codes
        r = await http_request(env.url, "/v1/underlyings")
        assert r.status == 429 and r.headers.get("x-optmon-rate-limited") == "true"
        assert r.json()["http_status"] == 429
        # the bucket is per client address: another client is still served
        assert (await http_request(env.url, "/v1/underlyings", source="127.0.0.2")).status == 200
    finally:
        env.stop()


async def test_stream_duration_is_bounded(backends: StubBackends, tmp_path: Path) -> None:
    env = await start_envoy(tmp_path, gateway_config(backends.query_port, backends.stream_port,
                                                     stream_max_duration_s=1))
    try:
        # heartbeats come every 0.5 s; the gateway ends the stream after 1 s, long before 50 events.
        status, _, events = await read_sse(env.url, "/v1/underlyings/NIFTY/subscribe", 50)
        assert status == 200 and 1 <= len(events) < 50
    finally:
        env.stop()


async def test_unary_request_time_is_bounded(backends: StubBackends, tmp_path: Path) -> None:
    env = await start_envoy(tmp_path, gateway_config(backends.query_port, backends.stream_port, unary_timeout_s=0.5))
    try:
        r = await http_request(env.url, "/v1/underlyings/NIFTY/bars?page_token=sleep:3")
        assert r.status == 504 and r.json()["http_status"] == 504
    finally:
        env.stop()


async def test_api_key_required_when_enabled(backends: StubBackends, tmp_path: Path) -> None:
    env = await start_envoy(tmp_path, gateway_config(backends.query_port, backends.stream_port, auth="api_key",
                                                     api_keys={"desk-1": "k-0123456789"}))
    try:
        assert (await http_request(env.url, "/v1/underlyings")).status == 401
        assert (await http_request(env.url, "/v1/underlyings", headers={"x-api-key": "wrong"})).status in (401, 403)
        assert (await http_request(env.url, "/v1/underlyings", headers={"x-api-key": "k-0123456789"})).status == 200
        assert (await http_request(env.url, "/v1/underlyings?api_key=k-0123456789")).status == 200
        assert (await http_request(env.url, "/")).status == 200  # the page itself is public
    finally:
        env.stop()


async def test_jwt_required_when_enabled(backends: StubBackends, tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="RS256", use="sig")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    env = await start_envoy(tmp_path / "envoy", gateway_config(backends.query_port, backends.stream_port,
                                                               auth="jwt", jwks_path=str(jwks)))

    def token(signer: rsa.RSAPrivateKey = key, **claims: object) -> str:
        now = int(time.time())
        body = {"iss": "optmon", "aud": "optmon-dashboard", "sub": "trader-1", "iat": now, "exp": now + 300, **claims}
        return jwt.encode(body, signer, algorithm="RS256", headers={"kid": "k1"})

    try:
        r = await http_request(env.url, "/v1/underlyings")
        assert r.status == 401 and r.headers["content-type"] == "application/json"
        for bad in [token(other), token(aud="someone-else"), token(exp=int(time.time()) - 3600), "not-a-jwt"]:
            r = await http_request(env.url, "/v1/underlyings", headers={"authorization": f"Bearer {bad}"})
            assert r.status in (401, 403), bad
        r = await http_request(env.url, "/v1/underlyings", headers={"authorization": f"Bearer {token()}"})
        assert r.status == 200 and r.json()["underlyings"]
        # EventSource cannot send headers: the token rides as ?access_token= (ignored by the transcoder).
        status, headers, events = await read_sse(env.url, f"/v1/underlyings/NIFTY/subscribe?access_token={token()}", 1)
        assert status == 200 and headers["content-type"] == "text/event-stream" and "snapshot" in events[0]
        status, _, _ = await read_sse(env.url, "/v1/underlyings/NIFTY/subscribe", 1)
        assert status == 401
        # CORS preflight, the dashboard and readiness stay public
        pre = {"origin": "http://desk.example", "access-control-request-method": "GET"}
        assert (await http_request(env.url, SD, "OPTIONS", headers=pre)).status == 200
        assert (await http_request(env.url, "/")).status == 200
        assert (await http_request(env.url, "/ready")).status == 200
    finally:
        env.stop()
