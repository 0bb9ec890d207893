"""Publish replay snapshots: ``XADD`` each snapshot's ``TickBatch`` (field ``pb``) to ``optmon:ticks:<U>`` in time
order, paced by source time, or stream them to ``IngestService.PublishTicks`` over gRPC."""

from __future__ import annotations

import asyncio
import sys
import time as _time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

import grpc
import redis.asyncio as aioredis
import structlog
from optmon.v1 import ingest_service_pb2, ingest_service_pb2_grpc
from redis.exceptions import ResponseError
from tqdm import tqdm

from services.common.logging import get_logger
from services.replay.sources import IST, Snapshot


def _log() -> structlog.stdlib.BoundLogger:
    """The module's logger, built at each use so that it follows ``configure_logging`` called later."""
    return get_logger("replay.publisher")

#: Redis Stream of the ticks of one underlying.
TICKS_STREAM = "optmon:ticks:{}"
#: Consumer group ingest reads with; created at id 0 (MKSTREAM) before the first XADD so that entries published
#: before ingest starts are not skipped by a group created later at ``$``.
INGEST_GROUP = "ingest"
#: Source-time gaps longer than this (seconds) are shortened to it when pacing (overnight between files, gaps in the
#: 5-minute data), so a multi-day replay never sleeps for hours.
DEFAULT_MAX_GAP_S = 600.0
#: Snapshots sent per Redis pipeline round trip when not pacing.
PIPELINE_SNAPSHOTS = 32


@dataclass
class ReplayStats:
    """Outcome of a replay.

    ``rows``: option ticks published (for the NSE minute file, one per CSV row); ``underlying_ticks``: index ticks
    published; ``snapshots``: TickBatches published (Redis entries or gRPC messages); ``errors``: malformed source
    rows skipped; ``elapsed``: wall seconds; ``rows_per_s``: rows / elapsed; ``first_time``/``last_time``: source
    times (UTC) of the first/last snapshot; ``accepted``/``rejected``: ingest's counts (gRPC only, else None).
    """

    rows: int = 0
    underlying_ticks: int = 0
    snapshots: int = 0
    errors: int = 0
    elapsed: float = 0.0
    rows_per_s: float = 0.0
    first_time: datetime | None = None
    last_time: datetime | None = None
    accepted: int | None = None
    rejected: int | None = None
    rejected_by_reason: dict[str, int] | None = None

    def count(self, snap: Snapshot, bar: tqdm | None) -> None:  # type: ignore[type-arg]
        """Account one published snapshot (and advance the progress bar, when given)."""
        n = len(snap.batch.option_ticks)
        self.rows += n
        self.underlying_ticks += len(snap.batch.underlying_ticks)
        self.snapshots += 1
        if self.first_time is None:
            self.first_time = snap.time
        self.last_time = snap.time
        if bar is not None:
            bar.update(n)
            bar.set_postfix_str(f"{_ist(snap.time)} {snap.underlying}", refresh=False)

    def finish(self, started: float, errors: Callable[[], int] | None) -> ReplayStats:
        self.elapsed = _time.perf_counter() - started
        self.rows_per_s = self.rows / self.elapsed if self.elapsed > 0 else 0.0
        if errors is not None:
            self.errors = errors()
        return self


class _Pacer:
    """Maps source time to wall time: snapshot at source time t is due at w0 + virtual(t) / speed, where
    ``virtual`` is source time since the first snapshot with every gap capped at ``max_gap_s``."""

    def __init__(self, speed: float | None, max_gap_s: float) -> None:
        self.speed = speed
        self.max_gap_s = max_gap_s
        self.w0 = 0.0
        self.last: datetime | None = None
        self.virtual = 0.0

    def delay(self, t: datetime) -> float:
        """Seconds to wait before sending a snapshot of source time ``t`` (0 when due or not pacing)."""
        now = _time.monotonic()
        if self.last is None:
            self.w0, self.last = now, t
            return 0.0
        gap = (t - self.last).total_seconds()
        if gap > 0:
            self.virtual += min(gap, self.max_gap_s)
            self.last = t
        if not self.speed:
            return 0.0
        return max(0.0, self.w0 + self.virtual / self.speed - now)


def _progress(progress: bool, desc: str) -> tqdm:  # type: ignore[type-arg]
    return tqdm(total=None, unit=" rows", unit_scale=True, desc=desc, disable=not progress, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


def _ist(t: datetime) -> str:
    return (t + IST).strftime("%Y-%m-%d %H:%M:%S IST")


async def publish(
    snapshots: Iterable[Snapshot],
    redis: aioredis.Redis,
    *,
    speed: float | None = None,
    max_speed: bool = False,
    progress: bool = False,
    errors: Callable[[], int] | None = None,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
    ensure_group: str | None = INGEST_GROUP,
    stream_key: str = TICKS_STREAM,
) -> ReplayStats:
    """XADD each snapshot's TickBatch (field ``pb``) to ``optmon:ticks:<U>`` in the order given (time order).

    Pacing: with ``max_speed`` no pacing (pipelined, batches of ``PIPELINE_SNAPSHOTS``); otherwise the snapshot at
    source time t goes out ``(t − t0) / speed`` wall seconds after the first (``speed`` None means 1, real time), with
    source gaps capped at ``max_gap_s``. ``progress`` shows a tqdm bar on stderr. ``errors`` returns the number of
    malformed source rows so far (e.g. an ``ErrorLog``'s ``count``), copied into the stats at the end.
    ``ensure_group`` (None to skip) creates ingest's consumer group at id 0 on each stream first (BUSYGROUP ignored).
    The iteration of ``snapshots`` (file parsing) runs on the event loop. Redis errors propagate.
    """
    if speed is not None and speed <= 0:
        raise ValueError(f"speed must be > 0, got {speed}")
    pacer = _Pacer(None if max_speed else (speed or 1.0), max_gap_s)
    stats = ReplayStats()
    started = _time.perf_counter()
    known: set[str] = set()
    pending: list[tuple[str, bytes]] = []

    async def flush() -> None:
        if not pending:
            return
        pipe = redis.pipeline(transaction=False)
        for key, payload in pending:
            pipe.xadd(key, {"pb": payload})
        await pipe.execute()
        pending.clear()

    bar = _progress(progress, "replay")
    try:
        for snap in snapshots:
            key = stream_key.format(snap.underlying)
            if ensure_group and key not in known:
                await flush()
                try:
                    await redis.xgroup_create(key, ensure_group, id="0", mkstream=True)
                except ResponseError as e:
                    if "BUSYGROUP" not in str(e):
                        raise
            known.add(key)
            wait = pacer.delay(snap.time)
            if wait > 0:
                await flush()
                await asyncio.sleep(wait)
            pending.append((key, snap.batch.SerializeToString()))
            if max_speed:
                if len(pending) >= PIPELINE_SNAPSHOTS:
                    await flush()
            else:
                # Paced: send now, so the entry's arrival matches its source time; snapshots due at the same time
                # still share one round trip because the next one has no wait.
                await flush()
            stats.count(snap, bar if progress else None)
        await flush()
    finally:
        bar.close()
    stats.finish(started, errors)
    _log().info("replay_published", rows=stats.rows, snapshots=stats.snapshots, errors=stats.errors,
             elapsed_s=round(stats.elapsed, 3), rows_per_s=round(stats.rows_per_s))
    return stats


async def publish_grpc(
    snapshots: Iterable[Snapshot],
    channel: grpc.aio.Channel,
    *,
    speed: float | None = None,
    max_speed: bool = False,
    progress: bool = False,
    errors: Callable[[], int] | None = None,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
) -> ReplayStats:
    """Send every snapshot as one ``PublishTicksRequest`` on a single client stream of
    ``IngestService.PublishTicks`` (same pacing as :func:`publish`); the stats carry ingest's accepted/rejected
    counts. Raises ``grpc.aio.AioRpcError`` when the call fails."""
    if speed is not None and speed <= 0:
        raise ValueError(f"speed must be > 0, got {speed}")
    pacer = _Pacer(None if max_speed else (speed or 1.0), max_gap_s)
    stats = ReplayStats()
    started = _time.perf_counter()
    bar = _progress(progress, "replay→grpc")

    async def requests() -> AsyncIterator[ingest_service_pb2.PublishTicksRequest]:
        for snap in snapshots:
            wait = pacer.delay(snap.time)
            if wait > 0:
                await asyncio.sleep(wait)
            yield ingest_service_pb2.PublishTicksRequest(batch=snap.batch)
            stats.count(snap, bar if progress else None)

    stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
    try:
        resp = await stub.PublishTicks(requests())
    finally:
        bar.close()
    stats.accepted, stats.rejected = resp.accepted, resp.rejected
    stats.rejected_by_reason = dict(resp.rejected_by_reason)
    stats.finish(started, errors)
    _log().info("replay_published_grpc", rows=stats.rows, snapshots=stats.snapshots, errors=stats.errors,
             accepted=stats.accepted, rejected=stats.rejected, elapsed_s=round(stats.elapsed, 3))
    return stats
