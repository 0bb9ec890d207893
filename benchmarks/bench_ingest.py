"""Ingest-core benchmarks (services/ingest/pipeline.py on real PostgreSQL + Redis, one process):

- ``ingest.ticks_per_s``: synthetic load, 5 underlyings × 4 expiries × 100 strikes × CE/PE (4,000 contracts, one tick
  each per exchange second, IV/Greeks supplied), validated (Validator) → bars 1M/5M/15M/1H + latest + events, as fast
  as it goes, 40,000 ticks per ``Pipeline.process`` call. Baseline: the predecessor's claimed 10,000 msg/s.
- ``ingest.stream_ticks_per_s``: the same synthetic load XADDed to the Redis Streams first, then drained by one
  in-process ingest server (stream consumer → committer → pipeline → XACK), ticks/s until all acknowledged.
- ``ingest.tick_to_commit_p50_ms`` / ``_p99_ms``: the same load paced at 50 % of the measured rate, produced every
  50 ms; latency from a batch's creation to the return of the ``process`` call that committed (and published) it.
- ``ingest.replay_day_s``: the whole real 18-Aug-2026 NIFTY day (153,990 option ticks + 288 index ticks) at max speed
  into PostgreSQL, 64 minute-snapshots per call (the stream consumer's default XREADGROUP COUNT). Baseline = goal
  10 s.
- ``ingest.burst_rss_mib``: peak RSS of the process while a burst of 10× the sustained rate (produced lazily,
  consumed in 40,000-tick calls) goes through. Memory stays bounded by the call size.

Run alone (own PostgreSQL/Redis): ``.venv/bin/python -m benchmarks.bench_ingest``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from optmon.v1 import market_pb2

from benchmarks.harness import Result, percentile
from services.ingest.domain.validation import Validator
from services.ingest.pipeline import Pipeline
from services.ingest.settings import IngestSettings

DAY_FILE = ("nifty-oc-1min-2026-08", "nifty_oc_1min_2026-08-18.csv.gz")
#: Underlying → (strike step, spot). SENSEX is added to the configured underlyings for the 5-underlying load.
UNDERLYINGS = {"NIFTY": (50.0, 24200.0), "BANKNIFTY": (100.0, 52000.0), "FINNIFTY": (50.0, 23500.0),
               "MIDCPNIFTY": (25.0, 12500.0), "SENSEX": (100.0, 80000.0)}
EXPIRIES = ("2026-08-20", "2026-08-27", "2026-09-03", "2026-09-24")
STRIKES = 100
START = int(datetime(2026, 8, 18, 4, 0, tzinfo=UTC).timestamp())  # 09:30 IST
TICKS_PER_CALL = 40_000
#: Minute snapshots per call in the day replay (= the stream consumer's default XREADGROUP COUNT).
REPLAY_PER_CALL = 64
BASELINE_MSGS = 10_000.0


def _settings(ctx: Any) -> IngestSettings:
    return IngestSettings(pg_dsn=ctx.pg_dsn, redis_url=ctx.redis_url, ingest_retention_days=0,
                          strike_steps={u: s for u, (s, _) in UNDERLYINGS.items()})


class Synthetic:
    """One TickBatch per underlying and exchange second: every contract ticks once (random-walk LTP, growing
    cumulative volume, drifting OI, IV and Greeks present) plus one UnderlyingTick."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.second = START
        self.state: dict[tuple[str, str, float, int], list[float]] = {}
        self.spot = {u: s for u, (_, s) in UNDERLYINGS.items()}
        for u, (step, spot) in UNDERLYINGS.items():
            atm = round(spot / step) * step
            for e in EXPIRIES:
                for i in range(STRIKES):
                    k = atm + (i - STRIKES // 2) * step
                    for ot in (market_pb2.OPTION_TYPE_CALL, market_pb2.OPTION_TYPE_PUT):
                        intrinsic = max(0.0, (spot - k) if ot == market_pb2.OPTION_TYPE_CALL else (k - spot))
                        self.state[(u, e, k, ot)] = [intrinsic + 50.0 + self.rng.random() * 50, 0.0, 10_000.0]

    def next_second(self) -> list[market_pb2.TickBatch]:
        """The batches (one per underlying) of the next exchange second."""
        out = []
        rnd = self.rng.random
        sec = self.second
        self.second += 1
        for u in UNDERLYINGS:
            b = market_pb2.TickBatch()
            self.spot[u] *= 1.0 + (rnd() - 0.5) * 1e-4
            ut = b.underlying_ticks.add(underlying=u, price=round(self.spot[u], 2))
            ut.exchange_time.seconds = sec
            for (uu, e, k, ot), st in self.state.items():
                if uu != u:
                    continue
                st[0] = max(0.05, round(st[0] * (1.0 + (rnd() - 0.5) * 0.01), 2))
                st[1] += int(rnd() * 20)
                st[2] += int((rnd() - 0.5) * 10)
                t = b.option_ticks.add(underlying=u, expiry=e, strike=k, option_type=ot, ltp=st[0], volume=int(st[1]),
                                       oi=max(0, int(st[2])), iv=12.0 + rnd(), delta=0.5, gamma=0.001, theta=-5.0,
                                       vega=10.0)
                t.exchange_time.seconds = sec
            out.append(b)
        return out

    def calls(self, n_ticks: int, per_call: int = TICKS_PER_CALL) -> Iterator[list[market_pb2.TickBatch]]:
        """Lazily, lists of batches of about ``per_call`` option ticks until ``n_ticks`` are produced."""
        done = 0
        cur: list[market_pb2.TickBatch] = []
        size = 0
        while done < n_ticks:
            for b in self.next_second():
                cur.append(b)
                size += len(b.option_ticks)
                done += len(b.option_ticks)
            if size >= per_call:
                yield cur
                cur, size = [], 0
        if cur:
            yield cur


def _n_ticks(batches: list[market_pb2.TickBatch]) -> int:
    return sum(len(b.option_ticks) + len(b.underlying_ticks) for b in batches)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return math.nan


@contextlib.asynccontextmanager
async def _pipeline(ctx: Any, dsn: str | None = None) -> Any:
    s = _settings(ctx)
    pool = await asyncpg.create_pool(dsn or ctx.pg_dsn, min_size=2, max_size=4)
    r = aioredis.from_url(ctx.redis_url)
    p = Pipeline(s, pool, r, validator=Validator(s))
    try:
        await p.start()
        yield p
    finally:
        await p.close()
        await pool.close()
        await r.aclose()


async def _throughput(ctx: Any, seconds_of_load: int) -> tuple[float, int]:
    gen = Synthetic()
    calls = list(gen.calls(seconds_of_load * 4000))
    async with _pipeline(ctx) as p:
        await p.process([(b, "bench") for b in calls[0]])  # warm-up (partitions, prepared statements)
        t0 = time.perf_counter()
        n = 0
        for c in calls[1:]:
            res = await p.process([(b, "bench") for b in c])
            n += res.accepted
        return n / (time.perf_counter() - t0), n


async def _latency(ctx: Any, rate: float, duration_s: float) -> list[float]:
    """Ticks paced at ``rate`` per second in 50 ms batches; returns one latency (ms) per tick."""
    gen = Synthetic(seed=11)
    gen.second = START + 3600  # another hour: fresh buckets
    pending: list[market_pb2.TickBatch] = []
    buffered: list[market_pb2.TickBatch] = []
    lat: list[float] = []
    queue: asyncio.Queue[tuple[float, list[market_pb2.TickBatch]]] = asyncio.Queue()
    per_tick = 50e-3
    want = max(1, int(rate * per_tick))

    async def produce() -> None:
        nonlocal buffered
        t_next = time.perf_counter()
        end = t_next + duration_s
        produced = 0
        target = 0
        while t_next < end:
            out: list[market_pb2.TickBatch] = []
            target += want
            while produced < target:  # cumulative target: the average rate is exactly ``rate``
                if not buffered:
                    buffered = gen.next_second()
                b = buffered.pop()
                out.append(b)
                produced += len(b.option_ticks) + 1
            queue.put_nowait((time.perf_counter(), out))
            t_next += per_tick
            await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
        queue.put_nowait((0.0, []))

    async with _pipeline(ctx) as p:
        prod = asyncio.create_task(produce())
        done = False
        while not done:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            if items[-1][0] == 0.0:
                done = True
                items.pop()
            if not items:
                continue
            pending = [b for _, bs in items for b in bs]
            await p.process([(b, "bench") for b in pending])
            t = time.perf_counter()
            for created, bs in items:
                lat.extend([(t - created) * 1000.0] * _n_ticks(bs))
        await prod
    return lat


async def _replay_day(ctx: Any) -> tuple[float, int]:
    from services.replay.sources import open_source

    snaps = [s.batch for s in open_source(ctx.shared_data.joinpath(*DAY_FILE))]
    dsn = ctx.new_database() if hasattr(ctx, "new_database") else ctx.pg_dsn
    async with _pipeline(ctx, dsn) as p:
        t0 = time.perf_counter()
        n = 0
        for i in range(0, len(snaps), REPLAY_PER_CALL):
            res = await p.process([(b, "replay") for b in snaps[i:i + REPLAY_PER_CALL]])
            n += res.accepted
        return time.perf_counter() - t0, n


async def _burst_rss(ctx: Any, rate: float) -> tuple[float, float, int]:
    gen = Synthetic(seed=13)
    gen.second = START + 7200
    n_burst = int(rate * 10 * 2)  # 10× the sustained rate for 2 s
    before = _rss_mib()
    peak = before
    n = 0
    async with _pipeline(ctx) as p:
        for c in gen.calls(n_burst):
            res = await p.process([(b, "bench") for b in c])
            n += res.accepted
            peak = max(peak, _rss_mib())
    return peak, before, n


async def _stream_throughput(ctx: Any, seconds_of_load: int) -> tuple[float, int]:
    """Synthetic entries XADDed to ``optmon:ticks:<U>`` first, then one in-process ingest server (stream consumer →
    committer → pipeline → XACK) drains them: ticks/s from ready to fully acknowledged."""
    from services.ingest.server import app_of, create_server

    dsn = ctx.new_database() if hasattr(ctx, "new_database") else ctx.pg_dsn
    settings = _settings(ctx).model_copy(update={"pg_dsn": dsn, "ingest_port": 0, "metrics_port": 0,
                                                 "ingest_pubsub_enabled": False})
    gen = Synthetic(seed=17)
    gen.second = START + 3 * 3600
    r = aioredis.from_url(ctx.redis_url)
    n = 0
    counts: dict[str, int] = {}
    async with r.pipeline(transaction=False) as pipe:
        for _ in range(seconds_of_load):
            for b in gen.next_second():
                u = b.underlying_ticks[0].underlying
                pipe.xadd(f"optmon:ticks:{u}", {"pb": b.SerializeToString()})
                counts[u] = counts.get(u, 0) + 1
                n += _n_ticks([b])
        await pipe.execute()
    server, _port = await create_server(settings)
    app = app_of(server)
    try:
        await app.wait_ready(120)
        t0 = time.perf_counter()
        while True:
            done = 0
            for u, c in counts.items():
                g = {x["name"].decode(): x for x in await r.xinfo_groups(f"optmon:ticks:{u}")}.get("ingest")
                if g and int(g["entries-read"] or 0) >= c and int(g["pending"]) == 0:
                    done += 1
            if done == len(counts):
                break
            if time.perf_counter() - t0 > 600:
                raise TimeoutError("streams not drained in 600 s")
            await asyncio.sleep(0.02)
        return n / (time.perf_counter() - t0), n
    finally:
        await app.stop()
        await r.aclose()


async def run(ctx: Any) -> list[Result]:
    """The ingest-core figures (``ctx``: ``benchmarks.run.BenchContext`` or any object with ``pg_dsn``,
    ``redis_url`` and ``shared_data``)."""
    results: list[Result] = []
    rate, n = await _throughput(ctx, seconds_of_load=40)
    results.append(Result("ingest.ticks_per_s", rate, "ticks/s", baseline=BASELINE_MSGS, goal=">= 50000",
                          note=f"synthetic 5x4x100xCE/PE, {n} ticks, Validator on, {TICKS_PER_CALL} ticks/call"))
    try:
        srate, sn = await _stream_throughput(ctx, seconds_of_load=30)
        results.append(Result("ingest.stream_ticks_per_s", srate, "ticks/s", baseline=BASELINE_MSGS, goal=">= 50000",
                              note=f"same synthetic load via Redis Streams -> ingest server -> committed, {sn} ticks"))
    except ImportError:  # the ingest server (ingest-inputs) is not there
        pass
    lat = await _latency(ctx, rate * 0.5, duration_s=8.0)
    results.append(Result("ingest.tick_to_commit_p50_ms", percentile(lat, 50), "ms",
                          note=f"paced at {rate * 0.5:.0f} ticks/s in 50 ms batches, {len(lat)} ticks"))
    results.append(Result("ingest.tick_to_commit_p99_ms", percentile(lat, 99), "ms"))
    secs, n_day = await _replay_day(ctx)
    results.append(Result("ingest.replay_day_s", secs, "s", baseline=10.0, goal="<= 10 (baseline = goal)",
                          note=f"18-Aug-2026 NIFTY, {n_day} ticks, {REPLAY_PER_CALL} snapshots/call, Validator on"))
    peak, before, n_b = await _burst_rss(ctx, rate)
    results.append(Result("ingest.burst_rss_mib", peak, "MiB",
                          note=f"{n_b} ticks at 10x {rate:.0f}/s, consumed in {TICKS_PER_CALL}-tick calls; "
                               f"RSS before {before:.0f} MiB"))
    return results


if __name__ == "__main__":
    from benchmarks.run import standalone

    asyncio.run(standalone(run, "bench_ingest"))
