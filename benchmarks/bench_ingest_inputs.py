"""Ingest-input benchmarks:

- ``ingest.validator_ticks_per_s``: ``Validator.check_option`` over the real 18-Aug-2026 NIFTY day (153,990 option
  ticks), best of 3, ticks/s. Goal ≥ 250,000: at most 4 µs, 20 % of the 20 µs per-tick budget of issue 3's
  50,000 ticks/s.
- ``ingest.stream_day_s``: the same day XADDed to ``optmon:ticks:NIFTY`` (one entry per minute snapshot) and consumed
  by an in-process ingest (create_server: stream consumer → committer → pipeline → PostgreSQL → XACK) until the group
  has acknowledged everything; wall seconds. Goal ≤ 10 s (issue 3's replay goal, here through the stream input).
- ``ingest.stream_day_ticks_per_s``: the same run in ticks/s (option + underlying ticks).

Run alone: ``.venv/bin/python -m benchmarks.bench_ingest_inputs``.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from benchmarks.harness import Result
from services.ingest.domain.validation import Validator
from services.ingest.server import app_of, create_server
from services.ingest.settings import IngestSettings
from services.replay.sources import open_source

DAY_FILE = ("nifty-oc-1min-2026-08", "nifty_oc_1min_2026-08-18.csv.gz")
KEY = "optmon:ticks:NIFTY"


async def run(ctx: Any) -> list[Result]:
    """The ingest-input figures (``ctx``: a ``benchmarks.run.BenchContext``)."""
    snaps = [s.batch for s in open_source(ctx.shared_data.joinpath(*DAY_FILE))]
    ticks = [t for b in snaps for t in b.option_ticks]
    total = len(ticks) + sum(len(b.underlying_ticks) for b in snaps)
    results: list[Result] = []

    settings = IngestSettings(pg_dsn=ctx.pg_dsn, redis_url=ctx.redis_url, ingest_port=0, metrics_port=0,
                              strike_steps={"NIFTY": 50.0}, ingest_pubsub_enabled=False)
    now = datetime.now(UTC)
    rates = []
    for _ in range(3):
        v = Validator(settings)
        check = v.check_option
        t0 = time.perf_counter()
        for t in ticks:
            check(t, now)
        rates.append(len(ticks) / (time.perf_counter() - t0))
    results.append(Result("ingest.validator_ticks_per_s", max(rates), "ticks/s", baseline=250_000.0,
                          goal=">= 250000 (baseline = goal)", note=f"{len(ticks)} ticks, best of 3"))

    r = aioredis.from_url(ctx.redis_url)
    server, _port = await create_server(settings)
    app = app_of(server)
    try:
        await app.wait_ready(60)
        async with r.pipeline(transaction=False) as pipe:
            for b in snaps:
                pipe.xadd(KEY, {"pb": b.SerializeToString()})
            await pipe.execute()
        t0 = time.perf_counter()
        while True:
            groups = {g["name"].decode(): g for g in await r.xinfo_groups(KEY)}
            g = groups.get("ingest")
            if g and int(g["entries-read"] or 0) >= len(snaps) and int(g["pending"]) == 0:
                break
            if time.perf_counter() - t0 > 600:
                raise TimeoutError("stream not drained in 600 s")
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - t0
    finally:
        await app.stop()
        await r.aclose()
    results.append(Result("ingest.stream_day_s", elapsed, "s", baseline=10.0, goal="<= 10 (baseline = goal)",
                          note=f"{len(snaps)} entries, {total} ticks, one process"))
    results.append(Result("ingest.stream_day_ticks_per_s", total / elapsed, "ticks/s", baseline=10_000.0,
                          goal="predecessor claimed 10k msg/s"))
    return results


if __name__ == "__main__":
    from benchmarks.run import standalone

    for row in asyncio.run(standalone(run)):
        print(row)
