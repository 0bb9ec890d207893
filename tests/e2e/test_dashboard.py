"""The dashboard in headless Debian Chromium (Playwright, never `playwright install`) through a real Envoy.

``test_dashboard_real_data``: the real QueryService and StreamService in-process over the real 18-Aug-2026 NIFTY
bars (tests/support/load_bars.py), a live BarUpdate XADDed like ingest does. The page loads, a strike's OI on screen
equals the API's value, the live update changes the page, the connection state shows "live"; the screenshot goes
to .artifacts/dashboard.png.

``test_dashboard_reconnects``: the gateway ends every stream after 2 s (max stream duration); the page shows
"reconnecting" and comes back "live" by itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict, ParseDict
from optmon.v1 import market_pb2
from playwright.async_api import Browser, Page, async_playwright

from services.devstack.envoy import EnvoyProcess
from services.devstack.redis import free_port
from services.query.server import create_server as create_query_server
from services.query.server import stop_server as stop_query_server
from services.query.settings import QuerySettings
from services.stream.domain.fixed import on_grid
from services.stream.server import create_server as create_stream_server
from services.stream.settings import StreamSettings
from services.stream.testing import BarPublisher
from tests.e2e.dashboard_check import CHROMIUM_ARGS, HELD_DISTRIBUTION_JS, STATE_RECORDER, check_dashboard
from tests.integration.gateway_support import (
    gateway_config,
    http_request,
    start_envoy,
    start_stub_backends,
)
from tests.support.load_bars import load_nifty_day

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".artifacts"


@pytest.fixture
async def bars_dsn(pg_dsn: str, nifty_1min_csv: Path) -> str:
    """A fresh migrated database holding the first 90 minutes of the real 18-Aug NIFTY day as bars."""
    await load_nifty_day(pg_dsn, nifty_1min_csv, minutes=90)
    return pg_dsn


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        await b.close()


async def open_dashboard(browser: Browser, url: str) -> tuple[Page, list[str]]:
    """A page on the dashboard, waited until its first paint with data; returns it and its JS errors."""
    page = await browser.new_page(viewport={"width": 1400, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.add_init_script(STATE_RECORDER)  # records every connection state in window.__states
    await page.goto(url)
    await page.wait_for_selector("body[data-ready='1']", timeout=15_000)
    return page, errors


async def test_dashboard_real_data(browser: Browser, bars_dsn: str, redis_url: str, tmp_path: Path) -> None:
    q_server, q_port = await create_query_server(QuerySettings(pg_dsn=bars_dsn, redis_url=redis_url, query_port=0))
    s_server, s_port = await create_stream_server(StreamSettings(
        redis_url=redis_url, stream_port=0, query_addr=f"127.0.0.1:{q_port}", stream_heartbeat_s=1))
    env: EnvoyProcess | None = None
    publisher = BarPublisher(redis_url, None)
    try:
        env = await start_envoy(tmp_path, gateway_config(q_port, s_port))
        # the live update to send once the page is live: the ATM bar of the nearest expiry with CE OI + 12,345,
        # as a BarUpdate like ingest publishes after a commit
        chain = (await http_request(env.url, "/v1/underlyings/NIFTY/option-chain")).json()
        atm = chain["atm_strike"]
        dist = (await http_request(env.url, f"/v1/underlyings/NIFTY/strike-distribution?expiries={chain['expiry']}"
                                            "&strikes_around_atm=10")).json()
        bar = ParseDict(next(b for b in dist["expiries"][0]["bars"] if b["strike"] == atm), market_pb2.StrikeBar())
        new_oi = bar.call.oi + 12_345
        bar.call.oi = new_oi
        # LTP and IV move too (on NSE's grid: the stream sends them as fixed-point changes the page applies)
        bar.call.ltp, bar.call.iv = round(bar.call.ltp + 1.05, 2), round(bar.call.iv + 0.37, 2)
        bar.put.ltp = round(bar.put.ltp - 0.5, 2)
        assert all(on_grid(v, s) is not None for v, s in ((bar.call.ltp, 20), (bar.call.iv, 100), (bar.put.ltp, 20)))
        loop = asyncio.get_running_loop()

        def publish() -> None:
            asyncio.run_coroutine_threadsafe(publisher.publish(
                "NIFTY", market_pb2.TIMEFRAME_1M, _epoch(dist["bucket_time"]), dist["underlying_price"], [bar]),
                loop).result(10)

        report = await asyncio.to_thread(check_dashboard, env.url, ARTIFACTS / "dashboard-inprocess.png", "NIFTY",
                                         publish, 15, HELD_DISTRIBUTION_JS)
        assert report["atm"] == atm and report["expiry"] == chain["expiry"]
        assert report["ce_oi_after_live"] == new_oi, report
        # what the page holds after applying the delta in the browser = the bars it was built from, value for value
        shown = report["after_live"][chain["expiry"]]
        want = {b["strike"]: b for b in dist["expiries"][0]["bars"]}
        want[atm] = MessageToDict(bar, preserving_proto_field_name=True)
        assert sorted(float(k) for k in shown) == sorted(want)
        for s, b in want.items():
            for side in ("call", "put"):
                got = shown[f"{s:g}"][side] or {}
                assert {f: float(v) for f, v in got.items()} == {f: float(v) for f, v in b.get(side, {}).items()}, (
                    s, side, got, b.get(side))
        assert report["states"][0] == "connecting" and report["states"][-1] == "live", report
        (ARTIFACTS / "dashboard-inprocess.json").write_text(json.dumps(report))
    finally:
        await publisher.close()
        if env is not None:
            env.stop()
        await s_server.stream_close()  # type: ignore[attr-defined]
        await s_server.stop(0)
        await stop_query_server(q_server)


async def _wait_live(page: Page) -> bool:
    await page.wait_for_selector("#conn[data-state='live']", timeout=15_000)
    return True


def _epoch(rfc3339: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp())


async def test_dashboard_reconnects(browser: Browser, tmp_path: Path) -> None:
    backends = await start_stub_backends(heartbeat_s=0.5)
    env = await start_envoy(tmp_path, gateway_config(backends.query_port, backends.stream_port,
                                                     stream_max_duration_s=2))
    try:
        page, errors = await open_dashboard(browser, env.url + "/")
        await _wait_live(page)
        # the gateway cuts the stream after 2 s; the page must notice, say so, and come back live by itself
        await page.wait_for_function(
            "(() => { const s = window.__states; const i = s.indexOf('reconnecting');"
            " return i >= 0 && s.slice(i).includes('live'); })()", timeout=20_000)
        states: list[Any] = await page.evaluate("window.__states")
        assert states[0] == "connecting" and "live" in states, states
        assert not errors, errors
        await page.close()
    finally:
        env.stop()
        await backends.stop()


def _full_stack_check(state_dir: Path, csv: Path) -> dict[str, Any]:
    names = ["gateway", "envoy_admin", "ingest", "query", "stream", "pg", "redis"]
    ports = {n: free_port() for n in names}
    env = {**os.environ, **{f"OPTMON_{k.upper()}_PORT": str(v) for k, v in ports.items()},
           "OPTMON_INGEST_METRICS_PORT": "0", "OPTMON_QUERY_METRICS_PORT": "0", "OPTMON_STREAM_METRICS_PORT": "0"}
    for var in ("OPTMON_PG_DSN", "OPTMON_REDIS_URL"):  # private servers
        env.pop(var, None)
    log = state_dir.parent / "up.log"
    base = f"http://127.0.0.1:{ports['gateway']}"

    def replay(*args: str, **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "services.cli", "replay", str(csv), *args, "--redis-url",
                                 f"redis://127.0.0.1:{ports['redis']}/0", "--no-progress"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)

    with log.open("w") as out:
        up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--no-replay",
                               "--state-dir", str(state_dir)], env=env, stdin=subprocess.DEVNULL, stdout=out,
                               stderr=subprocess.STDOUT)
    live: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.monotonic() + 180
        while "stack up" not in log.read_text():
            assert up.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        # the first 20 minutes of the day at max speed, then wait until the query sees the last one
        assert replay("--max-speed", "--start", "10:43", "--end", "11:02").wait(300) == 0
        deadline = time.monotonic() + 120
        while True:
            with urllib.request.urlopen(base + "/v1/underlyings", timeout=5) as r:
                u = json.loads(r.read())["underlyings"]
            if u and u[0]["bucket_time"] == "2026-08-18T05:32:00Z":  # 11:02 IST
                break
            assert time.monotonic() < deadline, u
            time.sleep(0.5)
        # once the page is live, the next minutes replay at 60x: the page must get live messages
        def start_live_replay() -> None:
            live.append(replay("--speed", "60", "--start", "11:03", "--end", "11:12"))

        report = check_dashboard(base, ARTIFACTS / "dashboard.png", "NIFTY", on_live=start_live_replay,
                                 live_timeout_s=60)
    finally:
        for p in live:
            p.terminate()
            p.wait(10)
        up.send_signal(signal.SIGTERM)
        try:
            code = up.wait(90)
        except subprocess.TimeoutExpired:
            up.kill()
            code = up.wait()
    assert code == 0, "optmon up did not stop cleanly:\n" + log.read_text()[-3000:]
    return report


@pytest.mark.slow
async def test_dashboard_full_stack(tmp_root: Path, nifty_1min_csv: Path) -> None:
    """The whole `optmon up` stack (ingest → PostgreSQL → query/stream → Envoy) during a replay of the real day."""
    work = tmp_root / f"dashboard-stack-{free_port()}"  # tmp_root is searchable by the postgres user
    work.mkdir()
    report = await asyncio.to_thread(_full_stack_check, work / "state", nifty_1min_csv)
    assert report["states"][0] == "connecting" and "live" in report["states"], report
    assert report["ready_ms"] > 0
    (ARTIFACTS / "dashboard.json").write_text(json.dumps(report))
