"""Helpers of the ingest-core integration tests (no tests here): real-data snapshots, pipelines on real PG/Redis,
table dumps, and a TCP proxy that cuts PostgreSQL connections on demand."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from optmon.v1 import market_pb2

from services.ingest.pipeline import Pipeline
from services.ingest.settings import IngestSettings
from services.replay.sources import open_source

IST = timedelta(hours=5, minutes=30)
#: First snapshot of the 18-Aug file: 10:43 IST.
DAY_START_IST = dtime(10, 43)

#: Bar tables compared by the idempotency / recovery tests (updated_at excluded).
TABLES = ("bars_1m", "bars_5m", "bars_15m", "bars_1h")


def snapshots(csv: Path, minutes: int) -> list[market_pb2.TickBatch]:
    """The first ``minutes`` minute-snapshots of the real 18-Aug file as TickBatches (via services.replay)."""
    end = (datetime.combine(datetime(2026, 8, 18), DAY_START_IST) + timedelta(minutes=minutes - 1)).time()
    return [s.batch for s in open_source(csv, start=DAY_START_IST, end=end)]


def settings_for(pg_dsn: str, redis_url: str) -> IngestSettings:
    """Ingest settings for a test database (retention off: the 2026 replay must not be dropped)."""
    return IngestSettings(pg_dsn=pg_dsn, redis_url=redis_url, ingest_retention_days=0)


@contextlib.asynccontextmanager
async def pipeline(pg_dsn: str, redis_url: str, *, validator: bool = False, dsn: str | None = None,
                   **pool_kw: Any) -> AsyncIterator[tuple[Pipeline, asyncpg.Pool, aioredis.Redis]]:
    """A started Pipeline on a fresh pool (``dsn`` overrides the pool's DSN, e.g. a proxy) and Redis client."""
    s = settings_for(pg_dsn, redis_url)
    pool = await asyncpg.create_pool(dsn or pg_dsn, min_size=1, max_size=2, **pool_kw)
    r = aioredis.from_url(redis_url)
    v = None
    if validator:
        from services.ingest.domain.validation import Validator

        v = Validator(s)
    p = Pipeline(s, pool, r, validator=v)
    try:
        await p.start()
        yield p, pool, r
    finally:
        await p.close()
        pool.terminate()
        await r.aclose()


async def run_batches(p: Pipeline, batches: list[market_pb2.TickBatch], per_call: int) -> list[Any]:
    """Process ``batches`` ``per_call`` at a time; returns the ProcessResults."""
    out = []
    for i in range(0, len(batches), per_call):
        out.append(await p.process([(b, f"test:{i + j}") for j, b in enumerate(batches[i:i + per_call])]))
    return out


async def dump(pg_dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the bar tables, bars_latest and underlying_bars (without updated_at), sorted."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        out = {}
        for t in (*TABLES, "bars_latest", "underlying_bars"):
            rows = await conn.fetch(f"SELECT * FROM {t}")
            out[t] = sorted((tuple(v for k, v in r.items() if k != "updated_at") for r in rows), key=repr)
        return out
    finally:
        await conn.close()


class CuttingProxy:
    """A TCP proxy to PostgreSQL that can refuse new connections (``down``) or cut every connection as soon as a
    client message contains ``cut_on`` (bytes), simulating PostgreSQL dying in the middle of a transaction."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.down = False
        self.cut_on: bytes | None = None
        self.cuts = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._cut_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def stop_postgres(self) -> None:
        """Behave like a stopped server: cut every connection and refuse new ones until ``down`` is reset."""
        self.down = True
        self._cut_all()

    def _cut_all(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, uw))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, inspect: bool) -> None:
            tail = b""
            try:
                while data := await src.read(65536):
                    if inspect and self.cut_on is not None and self.cut_on in tail + data:
                        self.cuts += 1
                        self._cut_all()
                        return
                    tail = data[-256:]
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, uw, True), pump(ur, writer, False))


def proxy_dsn(pg_dsn: str, port: int) -> str:
    """``pg_dsn`` with its port replaced."""
    head, rest = pg_dsn.rsplit(":", 1)
    return f"{head}:{port}/{rest.split('/', 1)[1]}"


def utc(ts_ist: str) -> datetime:
    """'YYYY-MM-DD HH:MM' IST → aware UTC datetime."""
    return (datetime.fromisoformat(ts_ist) - IST).replace(tzinfo=UTC)
