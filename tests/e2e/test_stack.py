"""End to end: the real ``optmon up --no-replay`` (private PostgreSQL and Redis, ingest, query, stream, Envoy) on free
ports, 30 minutes of the real 18-Aug-2026 NIFTY day replayed at max speed with ``optmon replay``, then through the
JSON gateway:

- the strike distribution at a chosen minute (``as_of_time``) carries the CSV's OI, LTP and IV of the ATM±5 strikes
  (the CSV is read here independently of the replay code);
- an SSE client of ``/v1/underlyings/NIFTY/subscribe`` receives a snapshot, then at least one update while the last
  minutes are replayed;
- the dashboard in headless Chromium (tests/e2e/dashboard_check.py) shows the API's ATM OI and goes live
  (screenshot: .artifacts/stack-dashboard.png);
- SIGTERM stops the whole stack cleanly (exit 0, every port released).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import http.client
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.devstack.redis import free_port
from services.devstack.supervisor import REPO_ROOT, http_get, port_free
from tests.e2e.dashboard_check import check_dashboard

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Replay window: the first 30 minutes of the day; the SSE client connects after the first 25.
MINUTES = 30
FIRST_PART = 25
#: The minute checked against the CSV (index into the day's minutes) and the expiries checked.
CHECK_MINUTE = 12
CHECK_EXPIRIES = ("2026-08-25", "2026-09-01")
N_AROUND_ATM = 5
STRIKE_STEP = 50.0

Row = dict[str, str]


# --- the CSV, read independently --------------------------------------------------------------------------------
def read_minutes(path: Path, n: int) -> tuple[list[str], dict[str, list[Row]]]:
    """The first ``n`` distinct ``ts_ist`` values of the file and its rows grouped by them."""
    by_ts: dict[str, list[Row]] = defaultdict(list)
    order: list[str] = []
    with gzip.open(path, "rt", newline="") as f:
        for row in csv.DictReader(f):
            ts = row["ts_ist"]
            if ts not in by_ts:
                if len(order) == n:
                    break
                order.append(ts)
            by_ts[ts].append(row)
    return order, by_ts


def utc(ts_ist: str) -> datetime:
    return datetime.fromisoformat(ts_ist).astimezone(UTC)


def hhmm(ts_ist: str) -> str:
    return datetime.fromisoformat(ts_ist).strftime("%H:%M")


def rfc3339(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- proto3 JSON (camelCase or preserved field names; int64 as strings) ----------------------------------------
def field(obj: dict[str, Any], name: str, default: Any = None) -> Any:
    if name in obj:
        return obj[name]
    parts = name.split("_")
    camel = parts[0] + "".join(p.title() for p in parts[1:])
    return obj.get(camel, default)


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- the stack as a real command --------------------------------------------------------------------------------
class UpProcess:
    """``optmon up --no-replay`` in a subprocess, its output collected by a thread."""

    def __init__(self, state_dir: Path, env: dict[str, str]) -> None:
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up", "--no-replay", "--state-dir", str(state_dir)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.output)

    def stop(self, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def wait_until(what: str, check: Callable[[], Any], timeout: float, proc: UpProcess | None = None) -> Any:
    """Poll ``check`` until it returns a truthy value; fail with ``what`` (and the stack's output) on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if proc is not None and proc.proc.poll() is not None:
            pytest.fail(f"optmon up exited ({proc.proc.returncode}) while waiting for {what}:\n{proc.text}")
        try:
            last = check()
            if last:
                return last
        except OSError as e:
            last = e
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})" + (f"\n{proc.text}" if proc else ""))


# --- SSE ------------------------------------------------------------------------------------------------------
class SSEClient:
    """A text/event-stream reader on a thread: each ``data:`` event is parsed as JSON into ``events``."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=120)
        self.conn.request("GET", path, headers={"Accept": "text/event-stream"})
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.content_type = self.resp.getheader("content-type", "")
        self.events: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        data: list[str] = []
        try:
            while True:
                raw = self.resp.readline()
                if not raw:
                    break
                line = raw.decode().rstrip("\r\n")
                if line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line == "" and data:
                    event = json.loads("\n".join(data))
                    data = []
                    with self._cv:
                        self.events.append(event)
                        self._cv.notify_all()
        except Exception as e:  # includes the reader's errors after close() shut the socket
            self.error = e
        with self._cv:
            self._cv.notify_all()

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for ev in self.events:
                    if pred(ev):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return None
                self._cv.wait(min(left, 1.0))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.conn.sock is not None:
                self.conn.sock.shutdown(2)
        self.conn.close()
        self._thread.join(5)


# --- the test ---------------------------------------------------------------------------------------------------
@pytest.fixture
def stack(tmp_root: Path) -> Iterator[tuple[UpProcess, dict[str, int], dict[str, str]]]:
    names = ["gateway", "envoy_admin", "ingest", "query", "stream", "pg", "redis"]
    ports = {n: free_port() for n in names}
    env = {
        **os.environ,
        "OPTMON_GATEWAY_PORT": str(ports["gateway"]),
        "OPTMON_ENVOY_ADMIN_PORT": str(ports["envoy_admin"]),
        "OPTMON_INGEST_PORT": str(ports["ingest"]),
        "OPTMON_QUERY_PORT": str(ports["query"]),
        "OPTMON_STREAM_PORT": str(ports["stream"]),
        "OPTMON_PG_PORT": str(ports["pg"]),
        "OPTMON_REDIS_PORT": str(ports["redis"]),
        "OPTMON_INGEST_METRICS_PORT": "0",
        "OPTMON_QUERY_METRICS_PORT": "0",
        "OPTMON_STREAM_METRICS_PORT": "0",
        "OPTMON_GATEWAY_RATE_LIMIT_RPS": "0",
    }
    for var in ("OPTMON_PG_DSN", "OPTMON_REDIS_URL"):  # private servers, whatever the caller's environment says
        env.pop(var, None)
    up = UpProcess(tmp_root / f"e2e-stack-{ports['gateway']}", env)
    try:
        yield up, ports, env
    finally:
        code = up.stop()
        print(up.text)
        assert code == 0, f"optmon up did not stop cleanly (exit {code}):\n{up.text}"
        for name, port in ports.items():
            assert port_free(port), f"{name} port {port} still taken after stop"


def replay(env: dict[str, str], redis_port: int, path: Path, start: str, end: str) -> str:
    """``optmon replay PATH --max-speed --start HH:MM --end HH:MM`` (IST, inclusive) into the stack's Redis."""
    r = subprocess.run(
        [sys.executable, "-m", "services.cli", "replay", str(path), "--max-speed", "--start", start, "--end", end,
         "--redis-url", f"redis://127.0.0.1:{redis_port}/0", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def get_json(base: str, path: str) -> tuple[int, Any]:
    status, body = http_get(base + path, timeout=10)
    return status, json.loads(body) if body else None


def latest_bucket(base: str) -> datetime | None:
    status, body = get_json(base, "/v1/underlyings/NIFTY/strike-distribution?strikes_around_atm=1")
    if status != 200 or not field(body, "bucket_time"):
        return None
    return parse_time(field(body, "bucket_time"))


def test_replayed_day_through_gateway_and_sse(
    stack: tuple[UpProcess, dict[str, int], dict[str, str]], nifty_1min_csv: Path
) -> None:
    up, ports, env = stack
    base = f"http://127.0.0.1:{ports['gateway']}"
    minutes, rows_by_ts = read_minutes(nifty_1min_csv, MINUTES)
    assert len(minutes) == MINUTES

    # the stack is up and answers through the gateway (no data yet)
    wait_until("`optmon up` to report the stack up", lambda: "stack up: first answer" in up.text, 180, up)
    assert get_json(base, "/v1/underlyings")[0] == 200

    # 1) the first 25 minutes at max speed, and ingest has written their last minute
    out = replay(env, ports["redis"], nifty_1min_csv, hhmm(minutes[0]), hhmm(minutes[FIRST_PART - 1]))
    assert f"{sum(len(rows_by_ts[t]) for t in minutes[:FIRST_PART])} rows" in out, out
    wait_until(f"bars of {minutes[FIRST_PART - 1]}",
               lambda: latest_bucket(base) == utc(minutes[FIRST_PART - 1]), 120, up)

    # 2) an SSE subscriber gets a snapshot
    sse = SSEClient("127.0.0.1", ports["gateway"], "/v1/underlyings/NIFTY/subscribe?strikes_around_atm=5")
    try:
        assert sse.status == 200 and sse.content_type.startswith("text/event-stream"), (sse.status, sse.content_type)
        snap = sse.wait_for(lambda ev: "snapshot" in ev or "error" in ev, 60)
        assert snap is not None and "snapshot" in snap, (snap, sse.events, sse.error)

        # 3) the dashboard in headless Chromium shows the API's figures; while it is live the last 5 minutes are
        #    replayed: the page and the SSE subscriber both receive updates
        report = check_dashboard(base, REPO_ROOT / ".artifacts" / "stack-dashboard.png", on_live=lambda: replay(
            env, ports["redis"], nifty_1min_csv, hhmm(minutes[FIRST_PART]), hhmm(minutes[MINUTES - 1])))
        assert "live" in report["states"], report
        upd = sse.wait_for(lambda ev: "delta" in ev or "error" in ev, 90)
        assert upd is not None and "delta" in upd, (upd, sse.events[-3:], sse.error)
    finally:
        sse.close()
    wait_until(f"bars of {minutes[-1]}", lambda: latest_bucket(base) == utc(minutes[-1]), 120, up)

    # 4) the strike distribution at a chosen minute equals the CSV rows of that minute
    ts = minutes[CHECK_MINUTE]
    csv_rows = {(r["expiry"], float(r["strike"]), r["option_type"]): r for r in rows_by_ts[ts]}
    spot = float(rows_by_ts[ts][0]["spot"])
    query = (f"/v1/underlyings/NIFTY/strike-distribution?as_of_time={rfc3339(utc(ts))}"
             f"&strikes_around_atm={N_AROUND_ATM}" + "".join(f"&expiries={e}" for e in CHECK_EXPIRIES))
    status, dist = get_json(base, query)
    assert status == 200, dist
    assert parse_time(field(dist, "bucket_time")) == utc(ts)
    assert field(dist, "underlying_price") == pytest.approx(spot, abs=0.01)
    expiries = field(dist, "expiries")
    assert [e["expiry"] for e in expiries] == list(CHECK_EXPIRIES)
    compared = 0
    for exp in expiries:
        atm = float(field(exp, "atm_strike"))
        assert abs(atm - spot) <= STRIKE_STEP / 2 + 1e-9, (atm, spot)
        bars = exp["bars"]
        strikes = [float(b["strike"]) for b in bars]
        assert atm in strikes and strikes == sorted(strikes)
        assert len(bars) >= N_AROUND_ATM, strikes
        for bar in bars:
            strike = float(bar["strike"])
            assert abs(strike - atm) <= N_AROUND_ATM * STRIKE_STEP + 1e-9
            for side, opt in (("call", "CE"), ("put", "PE")):
                row = csv_rows.get((exp["expiry"], strike, opt))
                if row is None:  # no snapshot row this minute: nothing to compare
                    continue
                leg = bar.get(side) or {}
                where = f"{exp['expiry']} {strike:g} {opt} at {ts}"
                assert int(field(leg, "oi", -1)) == int(row["oi"]), (where, leg, row)
                assert float(field(leg, "ltp", math.nan)) == pytest.approx(float(row["ltp"]), abs=0.005), (where, leg)
                assert float(field(leg, "iv", math.nan)) == pytest.approx(float(row["iv"]), abs=0.005), (where, leg)
                compared += 1
    assert compared >= 2 * 2 * N_AROUND_ATM, f"only {compared} legs compared"
    print(f"e2e: {compared} legs at {ts} equal the CSV; SSE events {len(sse.events)}")
