"""Helpers for the gateway tests: small test servicers in real in-process grpc.aio servers, Envoy in front of them,
and stdlib HTTP/SSE clients that run in a thread (the servers share the test's event loop, so a blocking call on
the loop would deadlock).

The test servicers answer like the real ones for a tiny synthetic NIFTY book: underlying 24,980 index points,
strikes 24,500..25,500 step 50, ATM 25,000, two expiries. Unknown underlyings → NOT_FOUND, out-of-range
``strikes_around_atm`` → INVALID_ARGUMENT with a field violation (services/common/errors.py).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.api import httpbody_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from optmon.v1 import market_pb2, query_service_pb2, query_service_pb2_grpc, stream_service_pb2, stream_service_pb2_grpc

from services.common.errors import FieldViolations, NotFound, abort_with
from services.common.server import bind, new_server, shutdown
from services.devstack.envoy import EnvoyProcess, GatewayConfig
from services.query.jsonbody import CONTENT_TYPE, to_json

UNDERLYING = "NIFTY"
EXPIRIES = ["2026-08-21", "2026-08-28"]
PRICE = 24980.0
ATM = 25000.0
STRIKES = [24500.0 + 50 * i for i in range(21)]
BUCKET = Timestamp(seconds=1_787_029_980)  # 2026-08-18T05:13:00Z


def call_oi(strike: float, expiry_idx: int = 0) -> int:
    """Synthetic call OI of a strike, contracts (grows with the strike)."""
    return int(100_000 + (strike - 24500) * 40 + expiry_idx * 7)


def put_oi(strike: float, expiry_idx: int = 0) -> int:
    """Synthetic put OI of a strike, contracts (falls with the strike)."""
    return int(90_000 + (25500 - strike) * 35 + expiry_idx * 5)


def _bar(expiry: str, strike: float, k: int) -> market_pb2.StrikeBar:
    lvl = int((strike - ATM) / 50)
    return market_pb2.StrikeBar(
        underlying=UNDERLYING, expiry=expiry, strike=strike, timeframe=market_pb2.TIMEFRAME_1M, bucket_time=BUCKET,
        underlying_close=PRICE, moneyness_level=lvl, atm_strike=ATM,
        call=market_pb2.OptionLeg(ltp=max(5.0, 200 - lvl * 40.0), iv=12.0 + abs(lvl) * 0.3, oi=call_oi(strike, k),
                                  oi_change=lvl * 100, volume=1000 + k),
        put=market_pb2.OptionLeg(ltp=max(5.0, 200 + lvl * 40.0), iv=13.0 + abs(lvl) * 0.35, oi=put_oi(strike, k),
                                 oi_change=-lvl * 80, volume=900 + k),
    )


def _check_underlying(u: str) -> None:
    if u != UNDERLYING:
        raise NotFound("UNKNOWN_UNDERLYING", f"no data for underlying {u!r}", underlying=u)


class StubQueryServicer(query_service_pb2_grpc.QueryServiceServicer):
    """QueryService over the synthetic book (see module docstring)."""

    async def ListUnderlyings(self, request: Any, context: Any) -> Any:
        return query_service_pb2.ListUnderlyingsResponse(
            underlyings=[query_service_pb2.UnderlyingInfo(underlying=UNDERLYING, price=PRICE, bucket_time=BUCKET,
                                                          strike_step=50)])

    async def ListExpiries(self, request: Any, context: Any) -> Any:
        try:
            _check_underlying(request.underlying)
        except NotFound as e:
            await abort_with(context, e)
        return query_service_pb2.ListExpiriesResponse(underlying=UNDERLYING, expiries=EXPIRIES)

    async def GetStrikeDistribution(self, request: Any, context: Any) -> Any:
        try:
            fv = FieldViolations()
            n = request.strikes_around_atm or 10
            if not 1 <= n <= 50:
                fv.add("strikes_around_atm", f"must be in 1..50, got {n}")
            fv.raise_if_any()
            _check_underlying(request.underlying)
            exps = list(request.expiries) or EXPIRIES
            for e in exps:
                if e not in EXPIRIES:
                    raise NotFound("UNKNOWN_EXPIRY", f"no data for expiry {e!r}", expiry=e)
        except (FieldViolations, NotFound) as e:
            await abort_with(context, e)
        return query_service_pb2.GetStrikeDistributionResponse(
            underlying=UNDERLYING, timeframe=market_pb2.TIMEFRAME_1M, bucket_time=BUCKET, underlying_price=PRICE,
            expiries=[
                query_service_pb2.ExpiryDistribution(
                    expiry=e, atm_strike=ATM,
                    bars=[_bar(e, s, EXPIRIES.index(e)) for s in STRIKES if abs(s - ATM) <= n * 50])
                for e in exps
            ],
        )

    async def GetOptionChain(self, request: Any, context: Any) -> Any:
        try:
            _check_underlying(request.underlying)
        except NotFound as e:
            await abort_with(context, e)
        exp = request.expiry or EXPIRIES[0]
        rows = []
        for s in STRIKES:
            b = _bar(exp, s, 0)
            rows.append(query_service_pb2.OptionChainRow(strike=s, moneyness_level=b.moneyness_level, call=b.call,
                                                         put=b.put))
        tc, tp = sum(r.call.oi for r in rows), sum(r.put.oi for r in rows)
        return query_service_pb2.GetOptionChainResponse(
            underlying=UNDERLYING, expiry=exp, bucket_time=BUCKET, underlying_price=PRICE, atm_strike=ATM, rows=rows,
            pcr_oi=tp / tc, pcr_volume=0.9, max_pain_strike=25000, atm_straddle_price=400.0, atm_iv=12.5,
            iv_rank=42.0, iv_percentile=40.0, total_call_oi=tc, total_put_oi=tp, iv_history_days=30)

    async def GetMoneynessSeries(self, request: Any, context: Any) -> Any:
        try:
            _check_underlying(request.underlying)
        except NotFound as e:
            await abort_with(context, e)
        n = request.levels or 3
        times = [BUCKET.seconds - 300 * i for i in range(12, -1, -1)]
        series = []
        for exp in list(request.expiries) or EXPIRIES[:1]:
            for lvl in range(-n, n + 1):
                label = "ATM" if lvl == 0 else (f"ITM{-lvl}" if lvl < 0 else f"OTM{lvl}")
                series.append(query_service_pb2.MoneynessSeries(
                    expiry=exp, level=lvl, label=label, times=times,
                    values=[12 + abs(lvl) * 0.3 + 0.01 * i for i in range(len(times))],
                    strikes=[ATM + lvl * 50] * len(times)))
        return query_service_pb2.GetMoneynessSeriesResponse(
            underlying=UNDERLYING, timeframe=request.timeframe or market_pb2.TIMEFRAME_5M,
            indicator=request.indicator or market_pb2.INDICATOR_IV, side=request.side or market_pb2.OPTION_TYPE_CALL,
            start_time=Timestamp(seconds=times[0]), end_time=BUCKET, series=series)

    async def ListBars(self, request: Any, context: Any) -> Any:
        if request.page_token.startswith("sleep:"):  # a slow answer, for the request-timeout test
            await asyncio.sleep(float(request.page_token.removeprefix("sleep:")))
        return query_service_pb2.ListBarsResponse(s="no_data")

    # The JSON twins the gateway binds the REST paths to (like the real service: the protobuf answer as JSON).
    async def ListUnderlyingsJson(self, request: Any, context: Any) -> Any:
        return _json(await self.ListUnderlyings(request, context))

    async def ListExpiriesJson(self, request: Any, context: Any) -> Any:
        return _json(await self.ListExpiries(request, context))

    async def GetStrikeDistributionJson(self, request: Any, context: Any) -> Any:
        return _json(await self.GetStrikeDistribution(request, context))

    async def GetMoneynessSeriesJson(self, request: Any, context: Any) -> Any:
        return _json(await self.GetMoneynessSeries(request, context))

    async def GetOptionChainJson(self, request: Any, context: Any) -> Any:
        return _json(await self.GetOptionChain(request, context))


def _json(resp: Any) -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(content_type=CONTENT_TYPE, data=to_json(resp))


@dataclass
class StubStreamServicer(stream_service_pb2_grpc.StreamServiceServicer):
    """Subscribe: a snapshot (the strike distribution), then one Delta per item put on :attr:`updates`
    (``(strike, call_oi)``), heartbeats every ``heartbeat_s`` seconds; a StreamError for an unknown underlying."""

    heartbeat_s: float = 1.0
    updates: asyncio.Queue[tuple[float, int]] = field(default_factory=asyncio.Queue)
    subscribers: int = 0

    async def Subscribe(self, request: Any, context: Any) -> AsyncIterator[Any]:
        now = Timestamp()
        now.GetCurrentTime()
        if request.underlying != UNDERLYING:
            yield stream_service_pb2.SubscribeResponse(
                send_time=now, error=stream_service_pb2.StreamError(code="NOT_FOUND", message="unknown underlying"))
            return
        dist = await StubQueryServicer().GetStrikeDistribution(
            query_service_pb2.GetStrikeDistributionRequest(underlying=UNDERLYING, expiries=request.expiries,
                                                           strikes_around_atm=request.strikes_around_atm), context)
        seq = request.last_sequence + 1
        self.subscribers += 1
        yield stream_service_pb2.SubscribeResponse(sequence=seq, send_time=now,
                                                   snapshot=stream_service_pb2.Snapshot(distribution=dist))
        try:
            while True:
                try:
                    strike, oi = await asyncio.wait_for(self.updates.get(), self.heartbeat_s)
                except TimeoutError:
                    now.GetCurrentTime()
                    yield stream_service_pb2.SubscribeResponse(
                        sequence=seq, send_time=now, heartbeat=stream_service_pb2.Heartbeat(last_sequence=seq))
                    continue
                seq += 1
                now.GetCurrentTime()
                bt = Timestamp(seconds=BUCKET.seconds + 60)
                yield stream_service_pb2.SubscribeResponse(
                    sequence=seq, send_time=now,
                    delta=stream_service_pb2.Delta(
                        bucket_time=bt, underlying_price=PRICE,
                        expiries=[stream_service_pb2.ExpiryDelta(
                            expiry=EXPIRIES[0], atm_strike=ATM,
                            bars=[market_pb2.StrikeBar(underlying=UNDERLYING, expiry=EXPIRIES[0], strike=strike,
                                                       timeframe=market_pb2.TIMEFRAME_1M, bucket_time=bt,
                                                       call=market_pb2.OptionLeg(oi=oi))])]))
        finally:
            self.subscribers -= 1


@dataclass
class StubBackends:
    """The two in-process servers (query, stream) and their ports."""

    query: grpc.aio.Server
    query_health: Any
    query_port: int
    stream: grpc.aio.Server
    stream_health: Any
    stream_port: int
    stream_servicer: StubStreamServicer

    async def stop(self) -> None:
        await shutdown(self.query, self.query_health, 0)
        await shutdown(self.stream, self.stream_health, 0)


async def start_stub_backends(heartbeat_s: float = 1.0) -> StubBackends:
    """Start the test QueryService and StreamService on 127.0.0.1, free ports."""
    q, qh = new_server(["optmon.v1.QueryService"])
    query_service_pb2_grpc.add_QueryServiceServicer_to_server(StubQueryServicer(), q)
    qport = await bind(q, qh, "127.0.0.1", 0)
    s, sh = new_server(["optmon.v1.StreamService"])
    ss = StubStreamServicer(heartbeat_s=heartbeat_s)
    stream_service_pb2_grpc.add_StreamServiceServicer_to_server(ss, s)
    sport = await bind(s, sh, "127.0.0.1", 0)
    return StubBackends(q, qh, qport, s, sh, sport, ss)


def gateway_config(query_port: int, stream_port: int, **kw: Any) -> GatewayConfig:
    """A test gateway config: free ports, the given upstreams, fast health checks, test origin allowed."""
    base: dict[str, Any] = dict(listen_port=0, admin_port=0, query_addr=f"127.0.0.1:{query_port}",
                                stream_addr=f"127.0.0.1:{stream_port}", health_interval_s=0.5,
                                cors_origins=("http://desk.example",), rate_limit_rps=1000, rate_limit_burst=1000)
    base.update(kw)
    return GatewayConfig(**base)


async def start_envoy(root: Path, cfg: GatewayConfig) -> EnvoyProcess:
    """Start Envoy (in a thread: start() blocks while polling)."""
    env = EnvoyProcess(root=root, cfg=cfg)
    await asyncio.to_thread(env.start)
    return env


@dataclass
class Reply:
    """An HTTP reply: status, lower-cased headers, body bytes."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _request(base: str, path: str, method: str = "GET", headers: dict[str, str] | None = None,
             body: bytes | None = None, source: str | None = None) -> Reply:
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


async def http_request(base: str, path: str, method: str = "GET", headers: dict[str, str] | None = None,
                       body: bytes | None = None, source: str | None = None) -> Reply:
    """One HTTP/1.1 request from a thread; ``source`` picks the client address (e.g. another 127.0.0.x)."""
    return await asyncio.to_thread(_request, base, path, method, headers, body, source)


def _read_sse(base: str, path: str, n_events: int, headers: dict[str, str] | None,
              timeout: float) -> tuple[int, dict[str, str], list[str]]:
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"accept": "text/event-stream", **(headers or {})})
        r = conn.getresponse()
        hdrs = {k.lower(): v for k, v in r.getheaders()}
        events: list[str] = []
        if r.status != 200:
            return r.status, hdrs, [r.read().decode()]
        buf: list[str] = []
        while len(events) < n_events:
            line = r.readline()
            if not line:
                break
            text = line.decode().rstrip("\r\n")
            if text == "":
                if buf:
                    events.append("\n".join(buf))
                    buf = []
            else:
                buf.append(text)
        return r.status, hdrs, events
    finally:
        conn.close()


async def read_sse(base: str, path: str, n_events: int, headers: dict[str, str] | None = None,
                   read_timeout_s: float = 20.0) -> tuple[int, dict[str, str], list[str]]:
    """Open an SSE stream, return (status, headers, the first ``n_events`` raw events, each its lines joined)."""
    return await asyncio.to_thread(_read_sse, base, path, n_events, headers, read_timeout_s)
