"""The dashboard in headless Debian Chromium (Playwright, never `playwright install`) through a real Envoy.

``test_dashboard_real_data``: the real QueryService and StreamService in-process over the real 18-Aug-2026 NIFTY
bars (tests/support/load_bars.py), a live BarUpdate XADDed like ingest does. The page loads, a strike's OI on screen
equals the API's value, the live update changes the page, the connection state shows "live"; the screenshot goes
to .artifacts/dashboard.png.

``test_dashboard_reconnects``: the gateway ends every stream after 2 s (max stream duration); the page shows
"reconnecting" and comes back "live" by itself.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import ParseDict
from playwright.async_api import Browser, Page, async_playwright

from optmon.v1 import market_pb2
from services.devstack.envoy import EnvoyProcess
from services.query.server import create_server as create_query_server
from services.query.server import stop_server as stop_query_server
from services.query.settings import QuerySettings
from services.stream.server import create_server as create_stream_server
from services.stream.settings import StreamSettings
from services.stream.testing import BarPublisher
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
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


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
    # record every connection state the page shows
    await page.add_init_script("""
        window.__states = [];
        new MutationObserver(() => {
          const el = document.getElementById('conn');
          if (el && window.__states[window.__states.length - 1] !== el.dataset.state) window.__states.push(el.dataset.state);
        }).observe(document, {subtree: true, attributes: true, childList: true, characterData: true});
    """)
    await page.goto(url)
    await page.wait_for_selector("body[data-ready='1']", timeout=15_000)
    return page, errors


async def cell_value(page: Page, key: str) -> float | None:
    v = await page.get_attribute(f"td[data-k='{key}']", "data-value")
    return float(v) if v not in (None, "") else None


async def test_dashboard_real_data(browser: Browser, bars_dsn: str, redis_url: str, tmp_path: Path) -> None:
    q_server, q_port = await create_query_server(QuerySettings(pg_dsn=bars_dsn, redis_url=redis_url, query_port=0))
    s_server, s_port = await create_stream_server(StreamSettings(
        redis_url=redis_url, stream_port=0, query_addr=f"127.0.0.1:{q_port}", stream_heartbeat_s=1))
    env: EnvoyProcess | None = None
    publisher = BarPublisher(redis_url, None)
    try:
        env = await start_envoy(tmp_path, gateway_config(q_port, s_port))
        page, errors = await open_dashboard(browser, env.url + "/")
        ready_ms = await page.evaluate("window.optmonReadyMs")
        assert await page.text_content("#conn") == "live" or await _wait_live(page)

        # the page shows the API's numbers: the ATM strike's CE and PE OI of the chain's expiry
        chain = (await http_request(env.url, "/v1/underlyings/NIFTY/option-chain")).json()
        atm = chain["atm_strike"]
        row = next(r for r in chain["rows"] if r["strike"] == atm)
        key = f"{atm:g}"
        assert await cell_value(page, f"ce-oi-{key}") == float(row["call"]["oi"])
        assert await cell_value(page, f"pe-oi-{key}") == float(row["put"]["oi"])
        shown = (await page.text_content(f"td[data-k='ce-oi-{key}']") or "").replace(",", "")
        assert shown == str(int(row["call"]["oi"]))
        assert chain["expiry"] in (await page.text_content("#chain-expiry") or "")

        # a live update (a BarUpdate as ingest publishes it after a commit) changes the page
        dist = (await http_request(env.url, f"/v1/underlyings/NIFTY/strike-distribution?expiries={chain['expiry']}"
                                            "&strikes_around_atm=10")).json()
        bar_json = next(b for b in dist["expiries"][0]["bars"] if b["strike"] == atm)
        bar = ParseDict(bar_json, market_pb2.StrikeBar())
        new_oi = bar.call.oi + 12_345
        bar.call.oi = new_oi
        bucket = _epoch(dist["bucket_time"])
        await publisher.publish("NIFTY", market_pb2.TIMEFRAME_1M, bucket, dist["underlying_price"], [bar])
        await page.wait_for_function(
            f"document.querySelector(\"td[data-k='ce-oi-{key}']\").dataset.value === '{new_oi}'", timeout=15_000)
        assert await page.get_attribute("#conn", "data-state") == "live"
        assert not errors, errors

        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        (ARTIFACTS / "dashboard.json").write_text(json.dumps({"dashboard_ready_ms": ready_ms, "atm": atm,
                                                              "expiry": chain["expiry"]}))
        await page.close()
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
