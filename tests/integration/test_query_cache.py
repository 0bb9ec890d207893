"""The query cache against real Redis/PostgreSQL: no stale read after a published update, L2 shared by replicas,
warming, and the degraded modes (Redis down; PostgreSQL down → stale-marked or UNAVAILABLE, then recovery)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psycopg
import pytest
import redis.asyncio as aioredis
import structlog.testing
from google.api import httpbody_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from optmon.v1 import market_pb2
from optmon.v1 import query_service_pb2 as q
from optmon.v1 import query_service_pb2_grpc as qg
from prometheus_client import REGISTRY

from services.devstack.pg import PgCluster
from services.devstack.redis import RedisServer, free_port
from services.ingest.store import migrations
from services.query.cache import core as cache_core
from services.query.cache import redis_gate, seqwatch
from services.query.jsonbody import to_json
from services.query.server import create_server, stop_server
from services.query.servicer import JSON_TWINS
from tests.support import query_fixtures
from tests.support.load_bars import load_nifty_day

from .gateway_support import gateway_config, http_request, start_envoy

pytestmark = pytest.mark.integration
settings = query_fixtures.query_settings
# fixtures (module attributes so pytest finds them)
bars_dsn = query_fixtures.bars_dsn
bars_template = query_fixtures.bars_template
DEFAULT = q.GetStrikeDistributionRequest(underlying="NIFTY")


def _count(name: str, layer: str, method: str = "GetStrikeDistribution") -> float:
    return REGISTRY.get_sample_value(name, {"layer": layer, "method": method}) or 0.0


def _latency_count(layer: str) -> float:
    """Observations of optmon_query_layer_latency_seconds for ``layer`` (l1, l2, pg)."""
    return REGISTRY.get_sample_value("optmon_query_layer_latency_seconds_count", {"layer": layer}) or 0.0


async def _publish(redis_url: str, seq: int, tf: int = 1) -> None:
    """What ingest does after a commit: XADD the BarUpdate, INCR the sequence."""
    r = aioredis.from_url(redis_url)
    upd = market_pb2.BarUpdate(underlying="NIFTY", sequence=seq, timeframe=tf)
    await r.xadd("optmon:bars:NIFTY", {"pb": upd.SerializeToString()})
    await r.set("optmon:seq:NIFTY", seq)
    await r.aclose()


async def _bump_atm_call_oi(dsn: str, expiry_atm: tuple[str, float], value: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        exp, k = expiry_atm
        n = await conn.execute(
            "UPDATE bars_1m SET ce_oi = $1 WHERE underlying = 'NIFTY' AND expiry = $2::text::date AND strike = $3"
            " AND bucket_time = (SELECT max(bucket_time) FROM bars_1m)", value, exp, k)
        assert n == "UPDATE 1"
    finally:
        await conn.close()


def _atm_call_oi(resp: q.GetStrikeDistributionResponse) -> int:
    e = resp.expiries[0]
    return next(b.call.oi for b in e.bars if b.strike == e.atm_strike)


@pytest.mark.parametrize(("consume", "watch"), [(True, True), (False, True), (False, False)],
                         ids=["consumer+watch", "watch-only", "seq-check-only"])
async def test_no_stale_read_after_publish(bars_dsn: str, redis_url: str, consume: bool, watch: bool) -> None:
    """Publish (XADD + SET optmon:seq, as ingest's commit → publish), then read at once: the new value, every time.
    watch-only: the L1 hits before each publish skip the sequence read (nothing pushed), so the push alone must
    make the read after the publish re-validate."""
    server, port = await create_server(settings(bars_dsn, redis_url, query_consume_updates=consume,
                                                query_seq_watch=watch))
    app = server.optmon_app
    try:
        if watch:
            await asyncio.wait_for(app.watch.connected.wait(), 10)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            st = qg.QueryServiceStub(ch)
            first = await st.GetStrikeDistribution(DEFAULT)
            hits = _count("optmon_query_cache_hits_total", "l1")
            again = await st.GetStrikeDistribution(DEFAULT)
            assert again == first and _count("optmon_query_cache_hits_total", "l1") == hits + 1
            for seq in range(1, 21):
                value = 100_000 + seq
                await _bump_atm_call_oi(bars_dsn, (first.expiries[0].expiry, first.expiries[0].atm_strike), value)
                await _publish(redis_url, seq)
                assert _atm_call_oi(await st.GetStrikeDistribution(DEFAULT)) == value, seq
                hits = _count("optmon_query_cache_hits_total", "l1")
                assert _atm_call_oi(await st.GetStrikeDistribution(DEFAULT)) == value, seq
                if not consume:  # (with the consumer, the warmer's own hits count too)
                    assert _count("optmon_query_cache_hits_total", "l1") == hits + 1  # served from L1 again
                if watch:
                    assert app.watch.clean(), seq  # re-synced: the next hits skip the sequence read
    finally:
        await stop_server(server)


def _mget_calls(redis_url: str) -> int:
    import redis as redis_sync

    with redis_sync.Redis.from_url(redis_url) as r:
        return int(r.info("commandstats").get("cmdstat_mget", {}).get("calls", 0))


@pytest.mark.parametrize("watch", [True, False], ids=["watch", "no-watch"])
async def test_l1_hits_skip_the_sequence_read_while_nothing_is_pushed(bars_dsn: str, redis_url: str,
                                                                      watch: bool) -> None:
    """With the watch, 50 L1 hits in a row cost no Redis command; without it (check interval 0) each reads
    optmon:seq."""
    server, port = await create_server(settings(bars_dsn, redis_url, query_consume_updates=False,
                                                query_seq_watch=watch, query_fresh_check_ms=0))
    try:
        if watch:
            await asyncio.wait_for(server.optmon_app.watch.connected.wait(), 10)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            st = qg.QueryServiceStub(ch)
            first = await st.GetStrikeDistribution(DEFAULT)
            await st.GetStrikeDistribution(DEFAULT)  # (re-syncs the watch if a push came meanwhile)
            await server.optmon_app.cache.drain()
            before = _mget_calls(redis_url)
            for _ in range(50):
                assert await st.GetStrikeDistribution(DEFAULT) == first
            after = _mget_calls(redis_url)
        assert after - before == (0 if watch else 50)
    finally:
        await stop_server(server)


async def test_watch_refused_falls_back_to_the_sequence_read(bars_dsn: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis user without the CLIENT command (ACL): the watch set-up is refused and logged; every cached answer
    reads optmon:seq as without the watch, so a publish is still seen at once."""
    lines = structlog.testing.CapturingLogger()
    monkeypatch.setattr(seqwatch, "log", lines)
    rs = RedisServer(root=tmp_path / "redis", port=free_port())
    rs.start()
    try:
        import redis as redis_sync

        with redis_sync.Redis.from_url(rs.url) as admin:
            admin.acl_setuser("limited", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                              commands=["+@all", "-client"])
        url = f"redis://limited:pw@127.0.0.1:{rs.port}/0"
        server, port = await create_server(settings(bars_dsn, url, query_consume_updates=False))
        watch = server.optmon_app.watch
        try:
            while not [c for c in lines.calls if c.args == ("seqwatch.refused",)]:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            assert "NOPERM" in lines.calls[-1].kwargs["error"] and not watch.ready and not watch.clean()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                st = qg.QueryServiceStub(ch)
                first = await st.GetStrikeDistribution(DEFAULT)
                await _bump_atm_call_oi(bars_dsn, (first.expiries[0].expiry, first.expiries[0].atm_strike), 777)
                await _publish(rs.url, 3)
                assert _atm_call_oi(await st.GetStrikeDistribution(DEFAULT)) == 777
        finally:
            await stop_server(server)
    finally:
        rs.stop()


async def test_watch_reconnects_after_redis_restart_and_resyncs(bars_dsn: str, tmp_path: Path) -> None:
    """Redis restarted without its data: the watch reconnects by itself, the first read after it re-reads the
    sequences (lower now: a new epoch), and a publish after the restart is seen at once."""
    rs = RedisServer(root=tmp_path / "redis", port=free_port())
    rs.start()
    server, port = await create_server(settings(bars_dsn, rs.url, query_redis_retry_s=0.1,
                                                query_consume_updates=False))
    watch = server.optmon_app.watch
    try:
        await asyncio.wait_for(watch.connected.wait(), 10)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            st = qg.QueryServiceStub(ch)
            first = await st.GetStrikeDistribution(DEFAULT)
            atm = (first.expiries[0].expiry, first.expiries[0].atm_strike)
            await _bump_atm_call_oi(bars_dsn, atm, 555)
            await _publish(rs.url, 7)
            assert _atm_call_oi(await st.GetStrikeDistribution(DEFAULT)) == 555
            rs.kill()
            while watch.ready:  # noqa: ASYNC110 - waits for the loss to be noticed
                await asyncio.sleep(0.02)
            assert not watch.clean()
            shutil.rmtree(tmp_path / "redis", ignore_errors=True)  # no data survives the restart
            rs.start()
            await asyncio.wait_for(watch.connected.wait(), 10)
            other = q.ListExpiriesRequest(underlying="NIFTY")
            await st.ListExpiries(other)  # the gate's pooled connections died with Redis: let them be replaced
            while not server.optmon_app.gate.usable:  # noqa: ASYNC110 - a failed call pauses Redis for retry_s
                await asyncio.sleep(0.02)
            await st.ListExpiries(other)
            assert server.optmon_app.gate.up
            await _bump_atm_call_oi(bars_dsn, atm, 666)
            await _publish(rs.url, 1)  # the sequence starts over
            epoch = server.optmon_app.gens.epoch
            assert _atm_call_oi(await st.GetStrikeDistribution(DEFAULT)) == 666
            assert server.optmon_app.gens.epoch == epoch + 1 and watch.clean()
    finally:
        await stop_server(server)
        rs.stop()


async def test_l2_shared_by_replicas_compressed(bars_dsn: str, redis_url: str) -> None:
    a, pa = await create_server(settings(bars_dsn, redis_url, query_consume_updates=False))
    b, pb = await create_server(settings(bars_dsn, redis_url, query_consume_updates=False))
    req = q.GetOptionChainRequest(underlying="NIFTY", expiry="2026-08-25")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{pa}") as ca, \
                grpc.aio.insecure_channel(f"127.0.0.1:{pb}") as cb:
            lat = {layer: _latency_count(layer) for layer in ("l1", "l2", "pg")}
            ra = await qg.QueryServiceStub(ca).GetOptionChain(req)  # PostgreSQL
            assert _latency_count("pg") == lat["pg"] + 1
            await a.optmon_app.cache.drain()
            l2 = _count("optmon_query_cache_hits_total", "l2", "GetOptionChain")
            rb = await qg.QueryServiceStub(cb).GetOptionChain(req)  # replica b: L2
            assert rb == ra
            assert _count("optmon_query_cache_hits_total", "l2", "GetOptionChain") == l2 + 1
            assert _latency_count("l2") == lat["l2"] + 1 and _latency_count("pg") == lat["pg"] + 1
            assert await qg.QueryServiceStub(cb).GetOptionChain(req) == ra  # L1
            assert _latency_count("l1") == lat["l1"] + 1
        r = aioredis.from_url(redis_url)
        keys = [k async for k in r.scan_iter("optmon:qc:GetOptionChain:*")]
        blobs = [await r.get(k) for k in keys]
        await r.aclose()
        assert keys and all(bl[:1] == b"\x01" for bl in blobs)  # > 4 KiB: lz4
    finally:
        await stop_server(a)
        await stop_server(b)


async def test_one_request_encoded_differently_shares_l2_and_pg(bars_dsn: str, redis_url: str) -> None:
    """Envoy's transcoder writes a request's fields in query-parameter order: the same request in other bytes
    (here: fields concatenated in reverse order, protobuf's merge) is another L1 key but the same L2 entry and
    single-flight (keyed by the canonical bytes), so it costs no second PostgreSQL computation."""
    server, port = await create_server(settings(bars_dsn, redis_url, query_consume_updates=False))
    canonical = _day(q.ListBarsRequest(underlying="NIFTY", timeframe=2))
    parts = [q.ListBarsRequest(end_time=canonical.end_time), q.ListBarsRequest(start_time=canonical.start_time),
             q.ListBarsRequest(timeframe=2), q.ListBarsRequest(underlying="NIFTY")]
    reordered = b"".join(p.SerializeToString() for p in parts)
    assert reordered != canonical.SerializeToString() and q.ListBarsRequest.FromString(reordered) == canonical
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/optmon.v1.QueryService/ListBars")
            first = await call(canonical.SerializeToString())
            await server.optmon_app.cache.drain()
            l2_hits = _count("optmon_query_cache_hits_total", "l2", "ListBars")
            l2_misses = _count("optmon_query_cache_misses_total", "l2", "ListBars")
            assert await call(reordered) == first
            assert _count("optmon_query_cache_hits_total", "l2", "ListBars") == l2_hits + 1
            assert _count("optmon_query_cache_misses_total", "l2", "ListBars") == l2_misses
    finally:
        await stop_server(server)


async def test_warming_after_update(bars_dsn: str, redis_url: str) -> None:
    server, port = await create_server(settings(bars_dsn, redis_url, query_warm_debounce_ms=10))
    app = server.optmon_app
    try:
        await asyncio.wait_for(app.consumer.ready.wait(), 30)
        await _publish(redis_url, 1)
        while app.warmer.rounds < 1:  # noqa: ASYNC110 - waits for the warmer, asserts nothing about time
            await asyncio.sleep(0.02)
        hits = _count("optmon_query_cache_hits_total", "l1")
        misses = _count("optmon_query_cache_misses_total", "l1")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await qg.QueryServiceStub(ch).GetStrikeDistribution(DEFAULT)
        assert _count("optmon_query_cache_hits_total", "l1") == hits + 1
        assert _count("optmon_query_cache_misses_total", "l1") == misses
    finally:
        await stop_server(server)


async def test_redis_down_still_answers_then_recovers(bars_dsn: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis killed: answers from L1 and PostgreSQL, no client error, `optmon_query_redis_up` 0, errors counted,
    one `redis.down` warning; Redis back: `redis.recovered`, gauge 1."""
    lines = structlog.testing.CapturingLogger()
    monkeypatch.setattr(redis_gate, "log", lines)  # the gate's log lines, whatever structlog's configuration
    rs = RedisServer(root=tmp_path / "redis", port=free_port())
    rs.start()
    server, port = await create_server(settings(bars_dsn, rs.url, query_redis_retry_s=0.1))
    app = server.optmon_app
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            st = qg.QueryServiceStub(ch)
            first = await st.GetStrikeDistribution(DEFAULT)
            errors = REGISTRY.get_sample_value("optmon_query_redis_errors_total") or 0.0
            rs.kill()
            assert await st.GetStrikeDistribution(DEFAULT) == first  # L1
            other = await st.GetStrikeDistribution(q.GetStrikeDistributionRequest(underlying="NIFTY",
                                                                                  strikes_around_atm=2))
            assert len(other.expiries[0].bars) == 5  # PostgreSQL, no Redis
            assert REGISTRY.get_sample_value("optmon_query_redis_up") == 0
            assert (REGISTRY.get_sample_value("optmon_query_redis_errors_total") or 0.0) > errors
            down = [c for c in lines.calls if c.args == ("redis.down",)]
            assert len(down) == 1 and down[0].method_name == "warning" and "error" in down[0].kwargs
            rs.start()
            while not app.gate.up:  # recovers by itself on a later call
                await st.GetStrikeDistribution(q.GetStrikeDistributionRequest(underlying="NIFTY", timeframe=2))
                await asyncio.sleep(0.05)
            assert REGISTRY.get_sample_value("optmon_query_redis_up") == 1
            assert [c.method_name for c in lines.calls if c.args == ("redis.recovered",)] == ["info"]
    finally:
        await stop_server(server)
        rs.stop()


def _day(req: Any) -> Any:
    """``req`` with start/end covering the 18-Aug day (UTC)."""
    req.start_time.FromDatetime(datetime(2026, 8, 18, tzinfo=UTC))
    req.end_time.FromDatetime(datetime(2026, 8, 19, tzinfo=UTC))
    return req


def _every_view(expiry: str, strike: float) -> list[tuple[str, Any, Any, str]]:
    """(RPC, request cached before the outage, a request never asked, REST path of the cached request) of every
    view. Requests without parameters (ListUnderlyings, ListExpiries of the one underlying with data) have no
    uncached variant on the warm server; the cold replica covers them."""
    bars = _day(q.ListBarsRequest(underlying="NIFTY", expiry=expiry, strike=strike, option_type=1))
    return [
        ("GetStrikeDistribution", DEFAULT, q.GetStrikeDistributionRequest(underlying="NIFTY", strikes_around_atm=4),
         "/v1/underlyings/NIFTY/strike-distribution"),
        ("GetMoneynessSeries", q.GetMoneynessSeriesRequest(underlying="NIFTY"),
         q.GetMoneynessSeriesRequest(underlying="NIFTY", levels=3), "/v1/underlyings/NIFTY/moneyness-series"),
        ("GetOptionChain", q.GetOptionChainRequest(underlying="NIFTY"),
         q.GetOptionChainRequest(underlying="NIFTY", expiry=expiry), "/v1/underlyings/NIFTY/option-chain"),
        ("ListBars", bars, _day(q.ListBarsRequest(underlying="NIFTY")),
         f"/v1/underlyings/NIFTY/bars?expiry={expiry}&strike={strike:g}&option_type=OPTION_TYPE_CALL"
         "&start_time=2026-08-18T00:00:00Z&end_time=2026-08-19T00:00:00Z"),
        ("ListExpiries", q.ListExpiriesRequest(underlying="NIFTY"), None, "/v1/underlyings/NIFTY/expiries"),
        ("ListUnderlyings", q.ListUnderlyingsRequest(), None, "/v1/underlyings"),
    ]


async def _pb(ch: grpc.aio.Channel, rpc: str, req: Any) -> Any:
    """The protobuf RPC's answer, parsed."""
    raw = await ch.unary_unary(f"/optmon.v1.QueryService/{rpc}")(req.SerializeToString())
    return getattr(q, rpc + "Response").FromString(raw)


async def _json_twin(ch: grpc.aio.Channel, rpc: str, req: Any) -> Any:
    """The ``<rpc>Json`` twin's body, parsed."""
    raw = await ch.unary_unary(f"/optmon.v1.QueryService/{rpc}Json")(req.SerializeToString())
    return json.loads(httpbody_pb2.HttpBody.FromString(raw).data)


def _marked(resp: Any, stale: bool) -> Any:
    """A copy of ``resp`` with ``stale`` set."""
    out = type(resp)()
    out.CopyFrom(resp)
    out.stale = stale
    return out


async def _assert_unavailable(call: Awaitable[Any], what: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await call
    err = ei.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (what, err.code(), err.details())
    text = err.details() or ""
    assert text.startswith("PostgreSQL unavailable: ") and text.endswith("; no cached answer for this request"), \
        (what, text)
    assert "127.0.0.1" not in text, text  # no internal addresses for clients
    info = error_details_pb2.ErrorInfo()
    status = rpc_status.from_call(err)
    assert status is not None and status.details[0].Unpack(info) and info.reason == "DEPENDENCY_UNAVAILABLE"


def _served(name: str, method: str) -> float:
    return REGISTRY.get_sample_value(name, {"method": method}) or 0.0


async def test_postgres_down_serves_stale_or_unavailable_then_recovers(
        redis_url: str, tmp_root: Path, nifty_1min_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every view, protobuf, JSON twin and REST path: PostgreSQL stopped → the cached answer with stale=true (the
    same answer otherwise), an uncached request (other parameters, or a cold replica with its own empty Redis)
    → UNAVAILABLE "PostgreSQL unavailable: …" / HTTP 503; PostgreSQL back → fresh answers, stale=false, with no
    restart. `pg.down` / `pg.recovered` logged once per server and transition."""
    lines = structlog.testing.CapturingLogger()
    monkeypatch.setattr(cache_core, "log", lines)
    root = tmp_root / f"pg-down-{free_port()}"  # tmp_root is world-readable: initdb runs as postgres
    cluster = PgCluster(root=root, port=free_port())
    cluster.init()
    cluster.start()
    try:
        migrations.apply(cluster.dsn)
        await load_nifty_day(cluster.dsn, nifty_1min_csv, minutes=20)
        server, port = await create_server(settings(cluster.dsn, redis_url, query_pg_connect_timeout_s=1.0))
        cold_redis = redis_url.rsplit("/", 1)[0] + "/1"  # an empty Redis database: no L2 / last-good copies
        cold, cold_port = await create_server(settings(cluster.dsn, cold_redis, query_pg_connect_timeout_s=1.0))
        gw = await start_envoy(tmp_path / "envoy", gateway_config(port, free_port()))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch, \
                    grpc.aio.insecure_channel(f"127.0.0.1:{cold_port}") as cold_ch:
                e0 = (await _pb(ch, "GetStrikeDistribution", DEFAULT)).expiries[0]
                views = _every_view(e0.expiry, e0.atm_strike)
                fresh = {}
                for rpc, req, _, _ in views:
                    fresh[rpc] = await _pb(ch, rpc, req)
                    assert not fresh[rpc].stale, rpc
                assert fresh["ListBars"].s == "ok" and fresh["ListUnderlyings"].underlyings
                await server.optmon_app.cache.drain()  # L2 + last-good copies written

                cluster.stop("fast")
                served = {rpc: _served("optmon_query_stale_served_total", rpc) for rpc, *_ in views}
                # new 1M and 5M data announced while PostgreSQL is down (as ingest does): every entry is old
                await _publish(redis_url, 1, tf=1)
                await _publish(redis_url, 2, tf=2)
                warmer = server.optmon_app.warmer
                while warmer.rounds < 1:  # noqa: ASYNC110 - waits for the warmer's round after the updates
                    await asyncio.sleep(0.02)
                # the warmer's attempts are neither stale answers served nor warmed views
                assert {rpc: _served("optmon_query_stale_served_total", rpc) for rpc, *_ in views} == served
                for rpc, req, other, path in views:
                    stale_before = _served("optmon_query_stale_served_total", rpc)
                    assert await _pb(ch, rpc, req) == _marked(fresh[rpc], True), rpc
                    assert _served("optmon_query_stale_served_total", rpc) == stale_before + 1, rpc
                    # the JSON (never asked before the outage): the protobuf's stale answer, rendered
                    want_json = json.loads(to_json(_marked(fresh[rpc], True)))
                    if rpc in JSON_TWINS:
                        assert await _json_twin(ch, rpc, req) == want_json, rpc
                    r = await http_request(gw.url, path)
                    assert r.status == 200 and r.json() == want_json, (rpc, r.status, r.body[:300])
                    if other is not None:
                        unavailable_before = _served("optmon_query_unavailable_total", rpc)
                        await _assert_unavailable(_pb(ch, rpc, other), rpc)
                        assert _served("optmon_query_unavailable_total", rpc) == unavailable_before + 1, rpc
                    await _assert_unavailable(_pb(cold_ch, rpc, req), f"cold {rpc}")
                    if rpc in JSON_TWINS:
                        await _assert_unavailable(_json_twin(cold_ch, rpc, req), f"cold {rpc}Json")
                r = await http_request(gw.url, "/v1/underlyings/NIFTY/strike-distribution?strikes_around_atm=4")
                assert r.status == 503 and "PostgreSQL unavailable" in r.json()["message"], (r.status, r.body)
                down = [c for c in lines.calls if c.args == ("pg.down",)]
                assert len(down) == 2 and "127.0.0.1" in down[0].kwargs["error"]  # warm + cold; the cause in full
                assert REGISTRY.get_sample_value("optmon_query_pg_up") == 0

                cluster.start()  # recovery: no restart, no call other than the clients' own
                for rpc, req, other, path in views:
                    assert await _pb(ch, rpc, req) == fresh[rpc], rpc  # recomputed (the publish made it old)
                    assert await _pb(cold_ch, rpc, req) == fresh[rpc], f"cold {rpc}"
                    if other is not None:
                        assert not (await _pb(ch, rpc, other)).stale, rpc
                    want_json = json.loads(to_json(fresh[rpc]))
                    assert want_json["stale"] is False
                    if rpc in JSON_TWINS:
                        assert await _json_twin(ch, rpc, req) == want_json, rpc
                    r = await http_request(gw.url, path)
                    assert r.status == 200 and r.json() == want_json, (rpc, r.status, r.body[:300])
                assert [c.method_name for c in lines.calls if c.args == ("pg.recovered",)] == ["info"] * 2
                assert REGISTRY.get_sample_value("optmon_query_pg_up") == 1
        finally:
            gw.stop()
            await stop_server(cold)
            await stop_server(server)
    finally:
        cluster.stop("immediate")


def test_template_is_reusable(bars_template: str, pg_cluster: PgCluster) -> None:
    """The loaded template has the whole day (guards the other tests' data)."""
    with psycopg.connect(pg_cluster.dsn.rsplit("/", 1)[0] + "/" + bars_template) as conn:
        assert conn.execute("SELECT count(DISTINCT bucket_time) FROM bars_1m").fetchone() == (288,)
