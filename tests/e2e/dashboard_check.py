"""A reusable browser check of the dashboard against any running gateway (in-process services or the full
``optmon up`` stack during a replay). Synchronous (Playwright sync API): call it from a sync test, or from an async
test through ``asyncio.to_thread``.

    from tests.e2e.dashboard_check import check_dashboard
    report = check_dashboard("http://127.0.0.1:8080", Path(".artifacts/dashboard.png"))

It loads the page in headless Debian Chromium, waits for the first usable paint, checks that the connection state
shows "live", that the ATM strike's CE and PE OI on screen equal the API's option chain (same bucket, via
``as_of_time``; call it while the data is at rest, e.g. between replays), then calls ``on_live`` (start a replay,
publish an update), waits for a live message (snapshot → delta: ``state.lastSeq`` grows) and writes a full-page
screenshot. AssertionError on any
failed check; TimeoutError (Playwright) when something never happens.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

#: Records every connection state the page shows in window.__states.
STATE_RECORDER = """
    window.__states = [];
    new MutationObserver(() => {
      const el = document.getElementById('conn');
      const s = window.__states;
      if (el && s[s.length - 1] !== el.dataset.state) s.push(el.dataset.state);
    }).observe(document, {subtree: true, attributes: true, childList: true, characterData: true});
"""


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


#: The page's strike distribution (snapshot + deltas as app.js applied them): {expiry: {strike: {call, put}}}.
HELD_DISTRIBUTION_JS = """(() => {
  const out = {};
  for (const [e, ex] of window.optmon.state.dist) {
    const bars = {};
    for (const [k, b] of ex.bars) bars[String(k)] = { call: b.call, put: b.put };
    out[e] = bars;
  }
  return out;
})()"""


def check_dashboard(base_url: str, screenshot: Path, underlying: str = "NIFTY",
                    on_live: Callable[[], None] | None = None, live_timeout_s: float = 60.0,
                    after_live_js: str | None = None) -> dict[str, Any]:
    """Run the checks of the module docstring; ``on_live`` is called once the page is live (e.g. to publish an
    update); ``after_live_js`` (e.g. :data:`HELD_DISTRIBUTION_JS`) is evaluated once the live message arrived.
    Returns {"ready_ms", "atm", "expiry", "ce_oi", "pe_oi", "ce_oi_after_live", "states", "after_live"}."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.add_init_script(STATE_RECORDER)
            page.goto(f"{base_url}/?underlying={underlying}")
            page.wait_for_selector("body[data-ready='1']", timeout=15_000)
            ready_ms = float(page.evaluate("window.optmonReadyMs"))
            page.wait_for_selector("#conn[data-state='live']", timeout=15_000)

            # the ATM strike's OI on screen equals the API's option chain of the same bucket and expiry
            shown = page.evaluate("[window.optmon.state.chain.bucket_time, window.optmon.state.chain.expiry]")
            chain = _get_json(f"{base_url}/v1/underlyings/{underlying}/option-chain?expiry={shown[1]}"
                              f"&as_of_time={shown[0]}")
            assert chain["bucket_time"] == shown[0], (chain["bucket_time"], shown)
            atm = chain["atm_strike"]
            row = next(r for r in chain["rows"] if r["strike"] == atm)
            key = f"{atm:g}"

            def cell(k: str) -> float | None:
                v = page.get_attribute(f"td[data-k='{k}']", "data-value")
                return float(v) if v not in (None, "") else None

            ce_oi, pe_oi = cell(f"ce-oi-{key}"), cell(f"pe-oi-{key}")
            assert ce_oi == float(row["call"]["oi"]), (ce_oi, row)
            assert pe_oi == float(row["put"]["oi"]), (pe_oi, row)
            text = (page.text_content(f"td[data-k='ce-oi-{key}']") or "").replace(",", "")
            assert text == str(int(row["call"]["oi"])), text

            # a live message after the snapshot changes the page state
            seq0 = page.evaluate("window.optmon.state.lastSeq")
            if on_live is not None:
                on_live()
            page.wait_for_function(f"window.optmon.state.lastSeq > {seq0}", timeout=live_timeout_s * 1000)
            assert page.get_attribute("#conn", "data-state") == "live"
            after = cell(f"ce-oi-{key}")
            after_live = page.evaluate(after_live_js) if after_live_js else None
            page.wait_for_timeout(1200)  # let the 1 s "changed" flash fade before the screenshot
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            assert not errors, errors
            return {"ready_ms": ready_ms, "atm": atm, "expiry": chain["expiry"], "ce_oi": ce_oi, "pe_oi": pe_oi,
                    "ce_oi_after_live": after, "states": page.evaluate("window.__states"), "after_live": after_live}
        finally:
            browser.close()
