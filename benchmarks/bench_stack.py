"""The embedded stack: time from ``optmon up`` to the first answer through the gateway (cold: a new state folder,
so initdb runs; warm: the same folder again), time to stop, and the replay's publishing rate.

Figures: ``stack.first_answer_cold_s``, ``stack.first_answer_warm_s``, ``stack.stop_s`` (goal: the stack answers within
10 s after installation; the baseline column holds that goal), ``stack.replay_day_rows_per_s`` (the whole 18-Aug day
at max speed into Redis; baseline: the ingest goal of 50,000 ticks/s, which the replay must not limit).
Runs alone with ``python -m benchmarks.bench_stack``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import Result
from services.devstack.redis import free_port
from services.devstack.supervisor import REPO_ROOT, http_get

GOAL_S = 10.0
DAY_FILE = Path("nifty-oc-1min-2026-08") / "nifty_oc_1min_2026-08-18.csv.gz"


def _up(state_dir: Path) -> tuple[subprocess.Popen[bytes], int, float]:
    """Start ``optmon up --no-replay`` on free ports; returns (process, gateway port, start time)."""
    ports = {k: free_port() for k in ("GATEWAY", "ENVOY_ADMIN", "INGEST", "QUERY", "STREAM", "PG", "REDIS")}
    env = {**os.environ, **{f"OPTMON_{k}_PORT": str(v) for k, v in ports.items()},
           "OPTMON_INGEST_METRICS_PORT": "0", "OPTMON_QUERY_METRICS_PORT": "0", "OPTMON_STREAM_METRICS_PORT": "0"}
    env.pop("OPTMON_PG_DSN", None)
    env.pop("OPTMON_REDIS_URL", None)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--no-replay", "--state-dir", str(state_dir)],
                            env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, ports["GATEWAY"], t0


async def _first_answer(state_dir: Path) -> tuple[float, float]:
    """Seconds to the first HTTP 200 of ``/v1/underlyings`` and seconds to stop after SIGTERM."""
    proc, port, t0 = _up(state_dir)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"optmon up exited with {proc.returncode}; logs in {state_dir}/logs")
            try:
                status, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/v1/underlyings", 1.0)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() - t0 > 120:
                raise RuntimeError("no answer within 120 s")
            await asyncio.sleep(0.02)
        first = time.monotonic() - t0
    finally:
        t1 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 120)
        stop = time.monotonic() - t1
    return first, stop


async def _replay_rate(ctx: Any) -> float | None:
    path = Path(ctx.shared_data) / DAY_FILE
    if not path.exists():
        return None
    from services.common.settings import CommonSettings
    from services.replay import cli as replay_cli

    parser = argparse.ArgumentParser()
    replay_cli.add_arguments(parser)
    args = parser.parse_args([str(path), "--max-speed", "--redis-url", ctx.redis_url, "--no-progress"])
    stats = await replay_cli.run(args, CommonSettings())
    return float(stats.rows_per_s)


async def run(ctx: Any) -> list[Result]:
    """The figures of the module docstring (``ctx``: benchmarks.run.BenchContext)."""
    state = Path(ctx.work_dir) / "stack-state"
    cold, _ = await _first_answer(state)
    warm, stop = await _first_answer(state)
    goal = f"≤ {GOAL_S:g} s after installation (baseline = goal)"
    out = [
        Result("stack.first_answer_cold_s", cold, "s", baseline=GOAL_S, goal=goal, note="new state dir: initdb"),
        Result("stack.first_answer_warm_s", warm, "s", baseline=GOAL_S, goal=goal),
        Result("stack.stop_s", stop, "s", goal="clean stop after SIGTERM"),
    ]
    rate = await _replay_rate(ctx)
    if rate is not None:
        out.append(Result("stack.replay_day_rows_per_s", rate, "1/s", baseline=50_000.0,
                          goal="replay must not limit ingest (baseline = 50,000 ticks/s goal)"))
    return out


if __name__ == "__main__":
    from benchmarks.run import standalone

    asyncio.run(standalone(run, "bench_stack"))
