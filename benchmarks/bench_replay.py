"""Replay benchmarks:

- ``replay.day_max_speed_s``: the whole real 18-Aug-2026 NIFTY day (153,990 rows, 288 snapshots) read from the
  .csv.gz and XADDed to ``optmon:ticks:NIFTY`` at max speed (parse + protobuf + Redis), wall seconds. Goal: a few
  seconds.
- ``replay.day_rows_per_s``: the same run in rows/s.
- ``replay.parse_rows_per_s``: reading alone (no Redis), rows/s, best of 3.
- ``replay.synthetic_ticks_per_s``: synthetic-session generation (4 underlyings × 528 contracts × 30 minutes), ticks/s.

Run alone: ``.venv/bin/python -m benchmarks.bench_replay``.
"""

from __future__ import annotations

import asyncio
import time
from datetime import date
from typing import Any

import redis.asyncio as aioredis

from benchmarks.harness import Result
from services.replay.publisher import publish
from services.replay.sources import ErrorLog, open_source
from services.replay.synthetic import synthetic_session

DAY_FILE = ("nifty-oc-1min-2026-08", "nifty_oc_1min_2026-08-18.csv.gz")


async def run(ctx: Any) -> list[Result]:
    """The replay figures (``ctx``: a ``benchmarks.run.BenchContext``; uses ``redis_url`` and ``shared_data``)."""
    path = ctx.shared_data.joinpath(*DAY_FILE)
    results: list[Result] = []

    parse = []
    for _ in range(3):
        t0 = time.perf_counter()
        rows = sum(len(s.batch.option_ticks) for s in open_source(path))
        parse.append(rows / (time.perf_counter() - t0))
    results.append(Result("replay.parse_rows_per_s", max(parse), "rows/s", note=f"{rows} rows, best of 3"))

    r = aioredis.Redis.from_url(ctx.redis_url)
    try:
        errors = ErrorLog()
        stats = await publish(open_source(path, errors), r, max_speed=True, errors=lambda: errors.count)
        assert stats.rows == 153_990 and stats.errors == 0, stats
        assert await r.xlen("optmon:ticks:NIFTY") == 288
    finally:
        await r.aclose()
    results.append(Result("replay.day_max_speed_s", stats.elapsed, "s", goal="a few seconds (≤ 5 s)",
                          note="153,990 rows, 288 XADDs, parse + protobuf + Redis"))
    results.append(Result("replay.day_rows_per_s", stats.rows_per_s, "rows/s"))

    t0 = time.perf_counter()
    ticks = sum(len(s.batch.option_ticks) for s in synthetic_session(day=date(2026, 8, 17), minutes=30, seed=1))
    results.append(Result("replay.synthetic_ticks_per_s", ticks / (time.perf_counter() - t0), "ticks/s",
                          note=f"{ticks} ticks"))
    return results


if __name__ == "__main__":
    from benchmarks.run import standalone

    asyncio.run(standalone(run))  # prints the table
