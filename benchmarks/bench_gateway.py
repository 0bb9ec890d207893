"""Gateway and dashboard figures, on the real 18-Aug-2026 NIFTY bars (first 90 minutes, tests/support/load_bars.py)
behind the real QueryService and StreamService (in-process) and a real Envoy (rate limit off):

* ``gateway.dashboard_ready_ms``: headless Chromium loads the dashboard with an empty cache; time from navigation
  start to the first usable paint (strike charts and option chain filled: ``window.optmonReadyMs``), median of 5
  loads. Goal ≤ 2,000 ms (baseline = goal; the predecessor's sister app took ~100 s to become usable).
* ``gateway.strike_distribution_rps`` / ``_p50_ms``: JSON GET of the default strike distribution through Envoy with
  ``wrk`` at 16 connections for 5 s (the predecessor's best design: ≈ 1.6k rps, p50 ≈ 9.5 ms at 16 connections).
* ``gateway.sse_first_event_ms``: from opening ``/subscribe`` to the snapshot event, median of 10.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import Result, median
from services.devstack.envoy import EnvoyProcess, GatewayConfig

NIFTY_DAY = ("nifty-oc-1min-2026-08", "nifty_oc_1min_2026-08-18.csv.gz")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
READY_GOAL_MS = 2000.0
SD_PATH = "/v1/underlyings/NIFTY/strike-distribution"


async def _ready_times(url: str, loads: int) -> list[float]:
    from playwright.async_api import async_playwright

    out: list[float] = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            for _ in range(loads):
                ctx = await browser.new_context(viewport={"width": 1400, "height": 1000})  # empty cache each time
                page = await ctx.new_page()
                await page.goto(url)
                await page.wait_for_selector("body[data-ready='1']", timeout=30_000)
                out.append(float(await page.evaluate("window.optmonReadyMs")))
                await ctx.close()
        finally:
            await browser.close()
    return out


def _wrk(url: str, seconds: int = 5, connections: int = 16) -> tuple[float, float] | None:
    exe = shutil.which("wrk")
    if not exe:
        return None
    r = subprocess.run([exe, "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url],
                       capture_output=True, text=True, timeout=seconds + 30)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", r.stdout)
    if not rps or not p50:
        return None
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p50.group(2)]
    return float(rps.group(1)), float(p50.group(1)) * scale


def _sse_first_event(base: str, n: int) -> list[float]:
    import http.client
    import urllib.parse

    u = urllib.parse.urlsplit(base)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10)
        conn.request("GET", "/v1/underlyings/NIFTY/subscribe?strikes_around_atm=10")
        r = conn.getresponse()
        line = r.readline()
        out.append((time.perf_counter() - t0) * 1000)
        conn.close()
        assert line.startswith(b"data: "), line
    return out


async def run(ctx: Any) -> list[Result]:
    """The figures of the module docstring (``ctx``: benchmarks.run.BenchContext)."""
    from services.query.server import create_server as create_query
    from services.query.server import stop_server as stop_query
    from services.query.settings import QuerySettings
    from services.stream.server import create_server as create_stream
    from services.stream.settings import StreamSettings
    from tests.support.load_bars import load_nifty_day

    await load_nifty_day(ctx.pg_dsn, Path(ctx.shared_data).joinpath(*NIFTY_DAY), minutes=90)
    q_server, q_port = await create_query(QuerySettings(pg_dsn=ctx.pg_dsn, redis_url=ctx.redis_url, query_port=0))
    s_server, s_port = await create_stream(StreamSettings(redis_url=ctx.redis_url, stream_port=0,
                                                          query_addr=f"127.0.0.1:{q_port}"))
    env = EnvoyProcess(root=Path(ctx.work_dir) / "gateway-bench", concurrency=2, cfg=GatewayConfig(
        listen_port=0, admin_port=0, query_addr=f"127.0.0.1:{q_port}", stream_addr=f"127.0.0.1:{s_port}",
        rate_limit_rps=0))
    out: list[Result] = []
    try:
        await asyncio.to_thread(env.start)
        ready = await _ready_times(env.url + "/", 5)
        out.append(Result("gateway.dashboard_ready_ms", median(ready), "ms", baseline=READY_GOAL_MS,
                          goal="≤ 2000 ms first usable paint (baseline = goal)",
                          note=f"median of {len(ready)} cold loads; max {max(ready):.0f} ms"))
        sse = await asyncio.to_thread(_sse_first_event, env.url, 10)
        out.append(Result("gateway.sse_first_event_ms", statistics.median(sse), "ms",
                          note="open /subscribe → snapshot event, median of 10"))
        w = await asyncio.to_thread(_wrk, env.url + SD_PATH)
        if w is not None:
            out.append(Result("gateway.strike_distribution_rps", w[0], "1/s", baseline=1600.0,
                              goal="beat the predecessor (≈1.6k rps at 16 connections)", note="wrk -c16 -d5s"))
            out.append(Result("gateway.strike_distribution_p50_ms", w[1], "ms", baseline=9.5,
                              goal="beat the predecessor (p50 ≈ 9.5 ms at 16 connections)", note="wrk -c16 -d5s"))
    finally:
        env.stop()
        await s_server.stream_close()  # type: ignore[attr-defined]
        await s_server.stop(0)
        await stop_query(q_server)
    return out


if __name__ == "__main__":
    from benchmarks.harness import format_table
    from benchmarks.run import standalone

    print(format_table(asyncio.run(standalone(run))))
