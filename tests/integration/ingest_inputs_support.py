"""Helpers of the ingest-inputs integration tests: real CSV ticks as TickBatches, settings for in-process or
subprocess ingest (``python -m services.ingest`` started, awaited and killed), waiting for a drained consumer group,
reading every bar table for comparisons, and the BarUpdates published vs the stored bars."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import redis.asyncio as aioredis
from optmon.v1 import market_pb2

from services.common.domain.timeframes import Timeframe
from services.devstack.pg import PgCluster
from services.ingest.settings import IngestSettings
from services.ingest.store.events import bars_key, strike_bar
from services.ingest.store.pg import BAR_COLUMNS
from tests.conftest import NIFTY_1MIN, cloned_database

ROOT = Path(__file__).resolve().parents[2]
#: ``(timeframe number, expiry, strike, bucket epoch s)``: one bar of one of the four bar tables.
BarKey = tuple[int, str, float, int]

#: Tables whose full content must match between an interrupted and an uninterrupted run.
BAR_TABLES = ("bars_1m", "bars_5m", "bars_15m", "bars_1h", "bars_latest", "underlying_bars")
_EXCLUDED_COLUMNS = {"updated_at"}
#: Column names of each table as last read by :func:`fetch_bars`.
COLUMNS: dict[str, list[str]] = {}


@cache
def csv_snapshots(minutes: int) -> tuple[market_pb2.TickBatch, ...]:
    """The first ``minutes`` minute snapshots of the real 18-Aug NIFTY file (one TickBatch each: option ticks plus the
    spot as an UnderlyingTick), read with the replay's reader."""
    from services.replay.sources import open_source

    out: list[market_pb2.TickBatch] = []
    for snap in open_source(NIFTY_1MIN):
        out.append(snap.batch)
        if len(out) == minutes:
            break
    return tuple(out)


def chunked(batches: tuple[market_pb2.TickBatch, ...], size: int) -> list[market_pb2.TickBatch]:
    """Split snapshots into TickBatches of at most ``size`` option ticks (the underlying tick rides in the first)."""
    out: list[market_pb2.TickBatch] = []
    for b in batches:
        ticks = list(b.option_ticks)
        for i in range(0, max(len(ticks), 1), size):
            part = market_pb2.TickBatch(option_ticks=ticks[i : i + size])
            if i == 0:
                part.underlying_ticks.extend(b.underlying_ticks)
            out.append(part)
    return out


def settings_for(pg_dsn: str, redis_url: str, **over: Any) -> IngestSettings:
    """Settings for an in-process ingest on a free port, NIFTY only, quick recovery knobs."""
    base: dict[str, Any] = dict(
        pg_dsn=pg_dsn, redis_url=redis_url, ingest_port=0, metrics_port=0, strike_steps={"NIFTY": 50.0},
        ingest_claim_idle_ms=1000, ingest_maintenance_interval_s=0.5, ingest_retry_initial_s=0.05,
        ingest_retry_max_s=1.0, ingest_stream_block_ms=50, ingest_pubsub_flush_ms=20, shutdown_grace_s=5.0,
    )
    base.update(over)
    return IngestSettings(**base)


def subprocess_env(pg_dsn: str, redis_url: str, **over: str) -> dict[str, str]:
    """Environment for ``python -m services.ingest`` with the same knobs as :func:`settings_for`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTMON_")}
    env.update({
        "OPTMON_PG_DSN": pg_dsn, "OPTMON_REDIS_URL": redis_url, "OPTMON_INGEST_PORT": "0", "OPTMON_METRICS_PORT": "0",
        "OPTMON_STRIKE_STEPS": '{"NIFTY": 50}', "OPTMON_INGEST_CLAIM_IDLE_MS": "1000",
        "OPTMON_INGEST_MAINTENANCE_INTERVAL_S": "0.5", "OPTMON_INGEST_RETRY_INITIAL_S": "0.05",
        "OPTMON_INGEST_STREAM_BLOCK_MS": "50", "OPTMON_INGEST_PUBSUB_ENABLED": "false", "OPTMON_LOG_LEVEL": "WARNING",
    })
    env.update(over)
    return env


def spawn_ingest(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m services.ingest`` with ``env`` (see :func:`subprocess_env`), stderr appended to ``log``."""
    with log.open("ab") as err:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "services.ingest"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)


def log_tail(log: Path, n: int = 3000) -> str:
    """The last ``n`` characters of a subprocess log (for assertion messages)."""
    return log.read_text()[-n:]


def consumer_prefix(proc: subprocess.Popen[bytes]) -> str:
    """Start of the stream consumer name of an ingest subprocess (``<hostname>-<pid>-``)."""
    return f"{socket.gethostname()}-{proc.pid}-"


async def wait_acked(r: aioredis.Redis, key: str, proc: subprocess.Popen[bytes], acked: int, log: Path,
                     limit_s: float = 60.0) -> None:
    """Wait until group ``ingest`` acknowledged at least ``acked`` entries of ``key``; fails (with the log's tail)
    if ``proc`` exits or nothing moves for ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while (await group_state(r, key))[0] < acked:
        assert proc.poll() is None, log_tail(log)
        assert time.monotonic() < deadline, "ingest made no progress: " + log_tail(log)
        await asyncio.sleep(0.01)


async def wait_exit(proc: subprocess.Popen[bytes], log: Path, limit_s: float = 60.0) -> int:
    """Wait (without blocking the event loop) until ``proc`` exits; returns its exit code."""
    deadline = time.monotonic() + limit_s
    while proc.poll() is None:
        assert time.monotonic() < deadline, "ingest did not exit: " + log_tail(log)
        await asyncio.sleep(0.02)
    return proc.returncode


def kill_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """kill -9 and reap every process of ``procs`` still running (test clean-up)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


async def xadd_batches(r: aioredis.Redis, key: str, batches: list[market_pb2.TickBatch]) -> list[str]:
    """XADD each batch as one entry (field ``pb``); returns the ids."""
    ids: list[str] = []
    for i in range(0, len(batches), 500):
        async with r.pipeline(transaction=False) as pipe:
            for b in batches[i : i + 500]:
                pipe.xadd(key, {"pb": b.SerializeToString()})
            ids.extend(x.decode() if isinstance(x, bytes) else x for x in await pipe.execute())
    return ids


async def group_state(r: aioredis.Redis, key: str, group: str = "ingest") -> tuple[int, int]:
    """``(entries delivered and acknowledged, pending)`` of ``group`` on ``key`` (0, 0 when there is no group)."""
    try:
        groups = await r.xinfo_groups(key)
    except Exception:
        return 0, 0
    for g in groups:
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == group:
            read = int(g.get("entries-read") or 0)
            pending = int(g.get("pending") or 0)
            return read - pending, pending
    return 0, 0


async def wait_drained(r: aioredis.Redis, key: str, total: int, limit_s: float = 60.0) -> None:
    """Wait until all ``total`` entries of ``key`` are acknowledged by group ``ingest`` (nothing pending)."""
    deadline = time.monotonic() + limit_s
    while True:
        acked, pending = await group_state(r, key)
        if acked >= total and pending == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key}: {acked}/{total} acknowledged, {pending} pending")
        await asyncio.sleep(0.05)


async def fetch_bars(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every bar table (all columns but ``updated_at``), sorted, for equality checks."""
    conn = await asyncpg.connect(dsn)
    try:
        out: dict[str, list[tuple[Any, ...]]] = {}
        for table in BAR_TABLES:
            cols = [r["column_name"] for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_name=$1 ORDER BY ordinal_position",
                table) if r["column_name"] not in _EXCLUDED_COLUMNS]
            rows = await conn.fetch(f"SELECT {', '.join(cols)} FROM {table}")
            out[table] = sorted((tuple(r) for r in rows), key=repr)
            COLUMNS[table] = cols
        return out
    finally:
        await conn.close()


@contextlib.contextmanager
def extra_database(cluster: PgCluster) -> Iterator[str]:
    """One more fresh migrated database on the session cluster (like the ``pg_dsn`` fixture)."""
    with cloned_database(cluster, "optmon_template", prefix="x") as dsn:
        yield dsn


@contextlib.asynccontextmanager
async def reference_pipeline(dsn: str, redis_url: str, **over: Any) -> AsyncIterator[Any]:
    """A started real Pipeline (with its own Validator) on ``dsn``; yields it; closes the pool."""
    from services.ingest.domain.validation import Validator
    from services.ingest.pipeline import Pipeline

    settings = settings_for(dsn, redis_url, **over)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    r = aioredis.from_url(redis_url)
    try:
        pipeline = Pipeline(settings, pool, r, validator=Validator(settings))
        await pipeline.start()
        yield pipeline
        close = getattr(pipeline, "close", None) or getattr(pipeline, "stop", None)
        if close is not None:
            await close()
    finally:
        await pool.close()
        await r.aclose()


async def reference_bars(dsn: str, redis_url: str, batches: list[market_pb2.TickBatch],
                         per_call: int = 50) -> dict[str, list[tuple[Any, ...]]]:
    """Bars of an uninterrupted in-process run of the real pipeline over ``batches``."""
    async with reference_pipeline(dsn, redis_url) as pipeline:
        for i in range(0, len(batches), per_call):
            await pipeline.process([(b, "reference") for b in batches[i : i + per_call]])
    return await fetch_bars(dsn)


def redis_db(url: str, db: int) -> str:
    """The same Redis server, another database number (keeps a reference run's events apart)."""
    return url.rsplit("/", 1)[0] + f"/{db}"


def describe_diff(table: str, got: list[tuple[Any, ...]], ref: list[tuple[Any, ...]], limit: int = 5) -> str:
    """Human-readable first differences between two row lists of ``table`` (for assertion messages)."""
    cols = COLUMNS.get(table, [])
    key = 4 if table != "underlying_bars" else 3
    g = {r[:key]: r for r in got}
    f = {r[:key]: r for r in ref}
    lines = [f"{table}: {len(got)} rows vs {len(ref)} in the uninterrupted run"]
    for k in sorted(set(g) | set(f), key=repr):
        a, b = g.get(k), f.get(k)
        if a == b:
            continue
        if a is None or b is None:
            lines.append(f"  {k}: {'missing' if a is None else 'extra'}")
        else:
            diffs = [f"{c}={x!r}/{y!r}" for c, x, y in zip(cols, a, b, strict=False) if x != y]
            lines.append(f"  {k}: " + ", ".join(diffs))
        if len(lines) > limit:
            break
    return "\n".join(lines)


@contextlib.asynccontextmanager
async def grpc_ingest(settings: Any) -> AsyncIterator[tuple[Any, grpc.aio.Channel]]:
    """An in-process ingest server (``create_server(settings)``), ready, and a channel to it; stopped afterwards."""
    from services.ingest.server import app_of, create_server

    server, port = await create_server(settings)
    app = app_of(server)
    await app.wait_ready(30)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield app, channel
    finally:
        await channel.close()
        await app.stop()


def _stream_id(entry_id: Any) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


async def last_event_id(r: aioredis.Redis, underlying: str = "NIFTY") -> str:
    """Id of the newest entry of ``optmon:bars:<underlying>`` ("0-0" when empty)."""
    newest = await r.xrevrange(bars_key(underlying), count=1)
    return _stream_id(newest[0][0]) if newest else "0-0"


async def bar_events(r: aioredis.Redis, after: str = "0-0",
                     underlying: str = "NIFTY") -> tuple[list[Any], dict[BarKey, market_pb2.StrikeBar]]:
    """The BarUpdates of ``optmon:bars:<underlying>`` after entry id ``after``, in order, and the last published
    version of every bar in them."""
    updates: list[Any] = []
    last: dict[BarKey, market_pb2.StrikeBar] = {}
    for _id, fields in await r.xrange(bars_key(underlying), min=f"({after}" if after != "0-0" else "-"):
        upd = market_pb2.BarUpdate.FromString(fields[b"pb"])
        updates.append(upd)
        for b in upd.bars:
            last[(int(upd.timeframe), b.expiry, b.strike, b.bucket_time.seconds)] = b
    return updates, last


async def stored_strike_bars(dsn: str) -> dict[BarKey, market_pb2.StrikeBar]:
    """Every row of the four bar tables as the StrikeBar a BarUpdate would carry for it."""
    conn = await asyncpg.connect(dsn)
    try:
        out: dict[BarKey, market_pb2.StrikeBar] = {}
        for tf in Timeframe:
            for row in await conn.fetch(f"SELECT {', '.join(BAR_COLUMNS)} FROM {tf.table}"):
                b = strike_bar(row, tf)
                out[(int(tf), b.expiry, b.strike, b.bucket_time.seconds)] = b
        return out
    finally:
        await conn.close()


def bars_of_ticks(batches: list[market_pb2.TickBatch]) -> set[BarKey]:
    """Keys of the bars of every timeframe that contain an option tick of ``batches``."""
    out: set[BarKey] = set()
    for b in batches:
        for t in b.option_ticks:
            sec = t.exchange_time.seconds
            for tf in Timeframe:
                out.add((int(tf), t.expiry, t.strike, sec - sec % tf.seconds))
    return out
