"""Query service figures on the real 18-Aug-2026 NIFTY day plus N days of synthetic history generated in SQL
(default 30: the day's bars shifted back by k days, same expiries, LTP scaled slightly), against the predecessor's
read path rebuilt on the same data (``benchmarks/baseline_predecessor``), measured in the same run.

* ``query.strike_distribution.cached.grpc.p50_ms`` / ``.p99_ms`` (1 in-flight request) and ``.rps`` (h2load,
  4 connections × 16 streams; the grpc.aio client's 32-in-flight figure is in the note) against
  ``python -m services.query`` in its own process.
* ``query.strike_distribution.cached.gateway.p50_ms`` / ``.p99_ms`` — wrk through Envoy, 1 connection, and
  ``.rps`` at 16 connections (the 16-connection p50/p99 are in the notes); medians of 3 rounds of 5 s. The body is
  the query service's cached JSON (``GetStrikeDistributionJson`` → ``google.api.HttpBody``): Envoy only copies it.
* Baseline of the cached figures: the predecessor's best design (Redis GET + json.loads + FastAPI re-encoding, uvicorn
  1 worker, ``baseline_predecessor.cached_api``) serving optmon's own answer (``MessageToDict`` JSON), measured by wrk
  in the same run: 1 connection for the p50/p99 baselines, 16 connections for the rps baseline.
* ``query.strike_distribution.uncached.p50_ms`` — the compute path (PostgreSQL → proto bytes) vs the predecessor's
  enriched JOIN view + MAX CTE + JSON (baseline measured here).
* ``query.moneyness_series.uncached.p50_ms`` — 6 h, 3 expiries, 21 levels, 5M, vs Python-side classification.
* ``query.bars_30d.p50_ms`` — ListBars over gRPC, 30 days of 1M bars of one contract, all pages (5000/page).
* ``query.cache.hit_ratio`` — 200 clients polling 3 views every 5 s for 20 s while updates are published every
  second (as ingest does during a replay); (L1+L2 hits) / requests from the server's Prometheus counters.

Standalone: ``python -m benchmarks.bench_query`` (own PostgreSQL/Redis). ``OPTMON_BENCH_QUERY_DAYS`` sets the
history length (default 30). ``OPTMON_BENCH_QUERY_ONLY=gateway`` measures only the gateway figures and their
predecessor baseline (about a minute with ``OPTMON_BENCH_QUERY_DAYS=0``).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from google.protobuf import json_format
from optmon.v1 import market_pb2
from optmon.v1 import query_service_pb2 as q

from benchmarks import baseline_predecessor as pred
from benchmarks.harness import Result, median, percentile
from services.devstack.redis import free_port, terminate, wait_port

NIFTY_DAY = ("nifty-oc-1min-2026-08", "nifty_oc_1min_2026-08-18.csv.gz")
SD_PATH = "/v1/underlyings/NIFTY/strike-distribution"
SD = "/optmon.v1.QueryService/GetStrikeDistribution"
LB = "/optmon.v1.QueryService/ListBars"


async def synth_history(dsn: str, days: int) -> None:
    """Copy the loaded day's 1M/5M bars and underlying bars ``days`` times into the past (one INSERT per table)."""
    from tests.support.load_bars import BAR_COLUMNS

    conn = await asyncpg.connect(dsn, command_timeout=3600)
    try:
        await conn.execute("SELECT optmon_ensure_partitions($1, $2)", datetime(2026, 8, 18).date()
                           - timedelta(days=days), datetime(2026, 8, 18).date())
        cols = ", ".join(BAR_COLUMNS)
        sel = []
        for c in BAR_COLUMNS:
            if c in ("bucket_time", "ce_close_time", "pe_close_time"):
                sel.append(f"{c} - k * interval '1 day'")
            elif c.split("_", 1)[-1] in ("open", "high", "low", "close"):
                sel.append(f"{c} * (1 + 0.02 * sin(k))")
            else:
                sel.append(c)
        for table in ("bars_1m", "bars_5m"):
            await conn.execute(
                f"INSERT INTO {table} ({cols}) SELECT {', '.join(sel)} FROM {table}"
                f" CROSS JOIN generate_series(1, {int(days)}) AS k WHERE bucket_time >= '2026-08-18'")
        await conn.execute(
            "INSERT INTO underlying_bars (underlying, timeframe, bucket_time, open, high, low, close, close_time)"
            " SELECT underlying, timeframe, bucket_time - k * interval '1 day', open, high, low, close,"
            " close_time - k * interval '1 day' FROM underlying_bars"
            f" CROSS JOIN generate_series(1, {int(days)}) AS k WHERE bucket_time >= '2026-08-18'")
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


def _spawn_query(dsn: str, redis_url: str, port: int, metrics_port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OPTMON_PG_DSN=dsn, OPTMON_REDIS_URL=redis_url, OPTMON_QUERY_PORT=str(port),
               OPTMON_METRICS_PORT=str(metrics_port), OPTMON_LOG_LEVEL="WARNING")
    root = Path(__file__).resolve().parent.parent
    p = subprocess.Popen([sys.executable, "-m", "services.query"], env=env, cwd=root, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    wait_port(port, 30)
    return p


async def _load(addr: str, method: str, payload: bytes, concurrency: int, seconds: float,
                channels: int = 2) -> tuple[list[float], float]:
    """Latencies (ms) and rps of ``concurrency`` workers calling ``method`` with raw bytes for ``seconds``."""
    chans = [grpc.aio.insecure_channel(addr) for _ in range(channels)]
    calls = [c.unary_unary(method) for c in chans]
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        call = calls[i % channels]
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await call(payload)
            lat.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*[worker(i) for i in range(concurrency)])
    el = time.perf_counter() - t0
    for c in chans:
        await c.close()
    return lat, len(lat) / el


async def _timed(fn: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def _wrk(url: str, seconds: int = 5, connections: int = 16) -> tuple[float, float, float] | None:
    exe = shutil.which("wrk")
    if not exe:
        raise RuntimeError("wrk is missing: run `make install` (it installs the Debian package wrk)")
    r = subprocess.run([exe, f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency", url],
                       capture_output=True, text=True, timeout=seconds + 30)
    sc = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    m50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", r.stdout)
    m99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", r.stdout)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
    if not (m50 and m99 and rps):
        return None
    return float(m50.group(1)) * sc[m50.group(2)], float(m99.group(1)) * sc[m99.group(2)], float(rps.group(1))


def _pred_cached(redis_url: str, sd: bytes) -> tuple[tuple[float, float, float], tuple[float, float, float], int] \
        | None:
    """wrk (p50 ms, p99 ms, rps) at 1 and at 16 connections, 5 s each, and the body size (bytes) of the predecessor's
    cached API serving the strike distribution ``sd`` (GetStrikeDistributionResponse bytes) put into Redis as JSON;
    None when wrk's output could not be read. Blocking (run it in a thread)."""
    import redis

    from benchmarks.baseline_predecessor import cached_api

    doc = json_format.MessageToDict(q.GetStrikeDistributionResponse.FromString(sd))
    with redis.Redis.from_url(redis_url) as r:
        r.set(cached_api.KEY.format(underlying="NIFTY"), json.dumps(doc))
    port = free_port()
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.baseline_predecessor.cached_api", "--port", str(port),
                             "--redis-url", redis_url], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, 30)
        url = f"http://127.0.0.1:{port}/api/strike-distribution?underlying=NIFTY"
        with urllib.request.urlopen(url, timeout=5) as resp:  # fails the benchmark unless it serves the document
            body = resp.read()
            if json.loads(body) != doc:
                raise RuntimeError("predecessor cached API served a different document")
        _wrk(url, 1, 16)  # warm-up
        w1 = _wrk(url, 5, 1)
        w16 = _wrk(url, 5, 16)
    finally:
        terminate(proc)
    return (w1, w16, len(body)) if w1 is not None and w16 is not None else None


def _h2load_grpc(addr: str, method: str, payload: bytes, work: Path, seconds: int = 5) -> tuple[float, int] | None:
    """rps and succeeded count of h2load posting a gRPC frame (4 connections × 16 streams) for ``seconds``."""
    exe = shutil.which("h2load")
    if not exe:
        return None
    body = work / "grpc-body.bin"
    body.write_bytes(b"\x00" + len(payload).to_bytes(4, "big") + payload)
    r = subprocess.run([exe, "-D", str(seconds), "-c", "4", "-m", "16", "-t", "1", "-d", str(body),
                        "-H", "content-type: application/grpc", "-H", "te: trailers",
                        f"http://{addr}{method}"], capture_output=True, text=True, timeout=seconds + 60)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", r.stdout)
    ok = re.search(r"(\d+) succeeded", r.stdout)
    if not rps or not ok:
        return None
    return float(rps.group(1)), int(ok.group(1))


def _metric_sum(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}\{{[^}}]*\}} ([\d.e+-]+)$", text, re.M))


async def run(ctx: Any) -> list[Result]:
    """The figures of the module docstring (``ctx``: benchmarks.run.BenchContext)."""
    from tests.support.load_bars import load_nifty_day

    days = int(os.environ.get("OPTMON_BENCH_QUERY_DAYS", "30"))
    only_gateway = os.environ.get("OPTMON_BENCH_QUERY_ONLY", "") == "gateway"
    t0 = time.perf_counter()
    await load_nifty_day(ctx.pg_dsn, Path(ctx.shared_data).joinpath(*NIFTY_DAY))
    await synth_history(ctx.pg_dsn, days)
    out: list[Result] = []
    if not only_gateway:
        await _uncached(ctx, days, t0, out)
    await _served(ctx, days, only_gateway, out)
    return out


async def _uncached(ctx: Any, days: int, t0: float, out: list[Result]) -> None:
    from services.query import views
    from services.query.domain.requests import validate_distribution, validate_series
    from services.query.store.pg import PgStore

    conn = await asyncpg.connect(ctx.pg_dsn, command_timeout=3600)
    await pred.build(conn)
    setup_s = time.perf_counter() - t0
    note_data = f"18-Aug + {days} synthetic days (setup {setup_s:.0f} s)"

    # --- uncached: our compute path vs the predecessor's, same process, same data --------------------------
    steps = {"NIFTY": 50.0}
    store = PgStore(ctx.pg_dsn, max_size=2)
    dq = validate_distribution("NIFTY", 0, [], 0, [], None, steps)
    sq = validate_series("NIFTY", 0, [], 0, 0, 0, None, None, steps)

    async def ours_sd() -> bytes:
        return (await views.strike_distribution(store, dq, 50.0, 5)).SerializeToString()  # type: ignore[no-any-return]

    async def ours_ms() -> bytes:
        return (await views.moneyness_series(store, sq)).SerializeToString()  # type: ignore[no-any-return]

    end = await conn.fetchval("SELECT max(bucket_time) FROM bars_5m")
    exps = [r["expiry"] for r in await conn.fetch(
        "SELECT DISTINCT expiry FROM bars_latest WHERE expiry >= '2026-08-18' ORDER BY 1 LIMIT 3")]
    await _timed(ours_sd, 5)
    ours = await _timed(ours_sd, 50)
    base = await _timed(lambda: pred.strike_distribution(conn, "NIFTY"), 5)
    out.append(Result("query.strike_distribution.uncached.p50_ms", median(ours), "ms", baseline=median(base),
                      goal="≤ 5 ms and ≥ 40× the predecessor",
                      note=f"PG→proto bytes, 1M, 3 expiries, ATM±10; baseline enriched JOIN view + MAX CTE "
                           f"(5 runs); {note_data}"))
    await _timed(ours_ms, 3)
    ours = await _timed(ours_ms, 30)
    base = await _timed(lambda: pred.moneyness_series(conn, "NIFTY", end, exps), 5)
    out.append(Result("query.moneyness_series.uncached.p50_ms", median(ours), "ms", baseline=median(base),
                      goal="≤ 25 ms", note="6 h, 3 expiries, 21 levels, 5M; baseline: Python classification"))
    await store.close()
    await conn.close()


async def _served(ctx: Any, days: int, only_gateway: bool, out: list[Result]) -> None:
    """The cached figures against ``python -m services.query`` in its own process (gRPC, gateway, hit ratio)."""
    port, mport = free_port(), free_port()
    proc = _spawn_query(ctx.pg_dsn, ctx.redis_url, port, mport)
    addr = f"127.0.0.1:{port}"
    try:
        sd_req = q.GetStrikeDistributionRequest(underlying="NIFTY").SerializeToString()
        async with grpc.aio.insecure_channel(addr) as ch:
            call = ch.unary_unary(SD)
            pc = await asyncio.to_thread(_pred_cached, ctx.redis_url, await call(sd_req))
            b1, b16, nbody = pc if pc is not None else (None, None, 0)
            pred_note = (f"baseline predecessor cached API (FastAPI, uvicorn 1 worker, JSON {nbody / 1024:.0f} KiB), "
                         f"wrk 5 s: 1 conn p50 "
                         f"{b1[0]:.2f} ms, p99 {b1[1]:.2f} ms; 16 conns p50 {b16[0]:.2f} ms, p99 {b16[1]:.2f} ms, "
                         f"{b16[2]:.0f} rps" if b1 is not None and b16 is not None else "no baseline (wrk missing)")
        if not only_gateway:
            await _grpc_figures(addr, sd_req, b1, b16, pred_note, days, ctx, out)
        await _gateway_figures(ctx, addr, b1, b16, pred_note, out)
        if not only_gateway:
            out.append(await _hit_ratio(addr, ctx.redis_url, mport))
    finally:
        proc.terminate()
        proc.wait(10)


async def _grpc_figures(addr: str, sd_req: bytes, b1: Any, b16: Any, pred_note: str, days: int, ctx: Any,
                        out: list[Result]) -> None:
    async with grpc.aio.insecure_channel(addr) as ch:
        lat, _ = await _load(addr, SD, sd_req, 1, 3.0, channels=1)
        out.append(Result("query.strike_distribution.cached.grpc.p50_ms", percentile(lat, 50), "ms",
                          baseline=b1[0] if b1 else None, goal="≤ 1 ms",
                          note=f"grpc.aio client, 1 in flight, 3 s; {pred_note}"))
        out.append(Result("query.strike_distribution.cached.grpc.p99_ms", percentile(lat, 99), "ms",
                          goal="≤ 5 ms", note="grpc.aio client, 1 in flight, 3 s"))
        lat, rps = await _load(addr, SD, sd_req, 32, 5.0)
        h2 = await asyncio.to_thread(_h2load_grpc, addr, SD, sd_req, Path(ctx.work_dir))
        if h2 is not None:
            out.append(Result("query.strike_distribution.cached.grpc.rps", h2[0], "1/s",
                              baseline=b16[2] if b16 else None, goal="≥ 3,000 rps",
                              note=f"h2load gRPC, 4 conns × 16 streams, 5 s, {h2[1]} ok; grpc.aio Python client "
                                   f"(32 in flight) reached {rps:.0f} rps, p50 {percentile(lat, 50):.2f} ms; "
                                   f"{pred_note}"))
        else:
            out.append(Result("query.strike_distribution.cached.grpc.rps", rps, "1/s",
                              baseline=b16[2] if b16 else None, goal="≥ 3,000 rps",
                              note=f"grpc.aio client (Python, same 2 cores), 32 in flight; p50 "
                                   f"{percentile(lat, 50):.2f} ms; {pred_note}"))

        # ListBars over 30 days, one contract, all pages; end varies per run so the cache never answers
        async def bars_all(i: int) -> int:
            token, n = "", 0
            while True:
                r = q.ListBarsRequest(underlying="NIFTY", expiry="2026-08-25", strike=24200,
                                      option_type=market_pb2.OPTION_TYPE_CALL, page_token=token)
                r.start_time.FromDatetime(datetime(2026, 8, 18, tzinfo=UTC) - timedelta(days=days + 40))
                r.end_time.FromDatetime(datetime(2026, 8, 19, tzinfo=UTC) + timedelta(microseconds=i))
                resp = q.ListBarsResponse.FromString(await ch.unary_unary(LB)(r.SerializeToString()))
                n += len(resp.t)
                token = resp.next_page_token
                if not token:
                    return n

        bars_lat = []
        n_bars = 0
        for i in range(10):
            t = time.perf_counter()
            n_bars = await bars_all(i + 1)
            bars_lat.append((time.perf_counter() - t) * 1000)
        out.append(Result("query.bars_30d.p50_ms", median(bars_lat), "ms", goal="≤ 50 ms",
                          note=f"ListBars 1M, one contract, {n_bars} bars, all pages of 5000, uncached"))



def _get_json(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body: bytes = resp.read()
        if resp.headers["content-type"] != "application/json" or json.loads(body)["underlying"] != "NIFTY":
            raise RuntimeError(f"{url} did not serve the strike distribution as JSON")
    return body


async def _gateway_figures(ctx: Any, addr: str, b1: Any, b16: Any, pred_note: str, out: list[Result]) -> None:
    """wrk through Envoy in front of the query process: 3 rounds of (1 connection 5 s, 16 connections 5 s),
    medians."""
    from services.devstack.envoy import EnvoyProcess, GatewayConfig

    if not shutil.which("wrk"):  # `make install` installs it (apt); never skip a figure silently
        raise RuntimeError("wrk is missing: run `make install` (it installs the Debian package wrk)")
    env = EnvoyProcess(root=Path(ctx.work_dir) / "query-gw", concurrency=2, cfg=GatewayConfig(
        listen_port=0, admin_port=0, query_addr=addr, stream_addr=f"127.0.0.1:{free_port()}", rate_limit_rps=0))
    await asyncio.to_thread(env.start)
    r1: list[tuple[float, float, float]] = []
    r16: list[tuple[float, float, float]] = []
    try:
        body = await asyncio.to_thread(_get_json, env.url + SD_PATH)  # the JSON, before measuring it
        await asyncio.to_thread(_wrk, env.url + SD_PATH, 1, 16)  # warm-up
        for _ in range(3):
            w1 = await asyncio.to_thread(_wrk, env.url + SD_PATH, 5, 1)
            w16 = await asyncio.to_thread(_wrk, env.url + SD_PATH, 5, 16)
            if w1 is not None and w16 is not None:
                r1.append(w1)
                r16.append(w16)
    finally:
        env.stop()
    if not r1:
        return

    def med(rows: list[tuple[float, float, float]], i: int) -> float:
        return median([r[i] for r in rows])

    runs = "; ".join(f"{a[0]:.2f}/{a[1]:.2f} ms, {b[0]:.2f}/{b[1]:.2f} ms {b[2]:.0f} rps"
                     for a, b in zip(r1, r16, strict=True))
    at16 = (f"at 16 connections: p50 {med(r16, 0):.2f} ms, p99 {med(r16, 1):.2f} ms, {med(r16, 2):.0f} rps "
            f"(medians of {len(r16)} rounds; per round 1-conn p50/p99, 16-conn p50/p99 rps: {runs})")
    what = f"JSON {len(body) / 1024:.0f} KiB printed once per cache entry by the query service (HttpBody)"
    out.append(Result("query.strike_distribution.cached.gateway.p50_ms", med(r1, 0), "ms",
                      baseline=b1[0] if b1 else None, goal="≤ 2 ms",
                      note=f"wrk 1 connection, 5 s × {len(r1)}, through Envoy (2 workers), {what}; {at16}; "
                           f"{pred_note}"))
    out.append(Result("query.strike_distribution.cached.gateway.p99_ms", med(r1, 1), "ms",
                      baseline=b1[1] if b1 else None, goal="≤ 10 ms",
                      note=f"wrk 1 connection, 5 s × {len(r1)}; {at16}; {pred_note}"))
    out.append(Result("query.strike_distribution.cached.gateway.rps", med(r16, 2), "1/s",
                      baseline=b16[2] if b16 else None, goal="beat the predecessor's cached path",
                      note=f"wrk 16 connections, 5 s × {len(r16)}; {at16}; {pred_note}"))


async def _hit_ratio(addr: str, redis_url: str, mport: int, clients: int = 200, seconds: float = 20.0) -> Result:
    """200 clients poll the default strike distribution, option chain and moneyness series every 5 s (random
    phase) while a BarUpdate is published every second."""
    import redis.asyncio as aioredis

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
            return r.read().decode()

    reqs = [(SD, q.GetStrikeDistributionRequest(underlying="NIFTY").SerializeToString()),
            ("/optmon.v1.QueryService/GetOptionChain", q.GetOptionChainRequest(underlying="NIFTY").SerializeToString()),
            ("/optmon.v1.QueryService/GetMoneynessSeries",
             q.GetMoneynessSeriesRequest(underlying="NIFTY").SerializeToString())]
    before = await asyncio.to_thread(scrape)
    r = aioredis.from_url(redis_url)
    seq = int(await r.get("optmon:seq:NIFTY") or 0)
    stop = time.perf_counter() + seconds
    ch = grpc.aio.insecure_channel(addr)

    async def client() -> None:
        await asyncio.sleep(random.uniform(0, 5))
        while time.perf_counter() < stop:
            for m, p in reqs:
                await ch.unary_unary(m)(p)
            await asyncio.sleep(5)

    async def publisher() -> None:
        nonlocal seq
        while time.perf_counter() < stop:
            seq += 1
            upd = market_pb2.BarUpdate(underlying="NIFTY", sequence=seq, timeframe=market_pb2.TIMEFRAME_1M)
            await r.xadd("optmon:bars:NIFTY", {"pb": upd.SerializeToString()})
            await r.set("optmon:seq:NIFTY", seq)
            await asyncio.sleep(1)

    await asyncio.gather(publisher(), *[client() for _ in range(clients)])
    await ch.close()
    await r.aclose()
    after = await asyncio.to_thread(scrape)
    hits = _metric_sum(after, "optmon_query_cache_hits_total") - _metric_sum(before, "optmon_query_cache_hits_total")
    l1_miss = (_metric_sum(after, "optmon_query_cache_misses_total")
               - _metric_sum(before, "optmon_query_cache_misses_total"))
    l2_hits = (sum(float(m.group(1)) for m in re.finditer(
        r'^optmon_query_cache_hits_total\{layer="l2"[^}]*\} ([\d.e+-]+)$', after, re.M))
        - sum(float(m.group(1)) for m in re.finditer(
            r'^optmon_query_cache_hits_total\{layer="l2"[^}]*\} ([\d.e+-]+)$', before, re.M)))
    l2_misses_etc = l1_miss - l2_hits  # l1 misses not answered by L2 went to PostgreSQL
    total = hits - l2_hits + l1_miss  # every request is one L1 hit or one L1 miss
    ratio = (hits / total) if total else 0.0
    return Result("query.cache.hit_ratio", ratio, "ratio", goal="high (most polls served from cache)",
                  note=f"{clients} clients × 3 default views every 5 s, 1 update/s, {seconds:.0f} s; "
                       f"{int(total)} requests, {int(l2_misses_etc)} computed (incl. warmer)")


if __name__ == "__main__":
    from benchmarks.run import standalone

    asyncio.run(standalone(run, "query"))
