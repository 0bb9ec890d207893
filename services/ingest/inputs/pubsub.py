"""Compatibility input: the predecessor's Redis pub/sub channels ``ticker:<U>:options`` and ``ticker:<U>:underlying``
carrying JSON ticks (schema in :mod:`services.ingest.inputs.legacy_json` and docs/ingest.md).

**Pub/sub is lossy**: Redis delivers a message only to subscribers connected at that instant and keeps nothing, so
ticks published while ingest is down, restarting or disconnected are lost, and Redis disconnects a subscriber that
falls behind its output-buffer limit. Use the streams ``optmon:ticks:<U>`` for anything that must not be lost.

Messages are converted as they arrive and committed every ``ingest_pubsub_flush_ms`` (or once
``ingest_publish_commit_ticks`` are buffered). While PostgreSQL is down the buffer grows up to the shared in-memory
bound; beyond it new pub/sub ticks are dropped and counted in ``optmon_ingest_pubsub_dropped_total`` (pub/sub
cannot be paused). Unparseable objects become MALFORMED dead letters.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
import structlog
from optmon.v1 import ingest_service_pb2, market_pb2

from services.ingest.domain.validation import MALFORMED, REASON_NAMES
from services.ingest.inputs import metrics
from services.ingest.inputs.committer import REDIS_ERRORS, Committer, CommitterClosed, count_ticks
from services.ingest.inputs.legacy_json import parse_message
from services.ingest.settings import IngestSettings
from services.ingest.store.deadletter import write_dead_letters

log = structlog.get_logger("ingest.pubsub")


def legacy_channels(underlyings: list[str]) -> dict[str, tuple[str, str]]:
    """``{channel: (underlying, kind)}`` for every configured underlying; kind is ``options`` or ``underlying``."""
    out: dict[str, tuple[str, str]] = {}
    for u in underlyings:
        out[f"ticker:{u}:options"] = (u, "options")
        out[f"ticker:{u}:underlying"] = (u, "underlying")
    return out


class PubSubInput:
    """Subscribes to the legacy channels until :meth:`stop`. ``received`` / ``dropped`` / ``committed`` count ticks."""

    def __init__(self, redis: aioredis.Redis, committer: Committer, settings: IngestSettings) -> None:
        self._redis = redis
        self._committer = committer
        self._settings = settings
        self.channels = legacy_channels(settings.underlyings)
        self._buf: list[tuple[market_pb2.TickBatch, str]] = []
        self._buf_ticks = 0
        self._has_data = asyncio.Event()
        self._stopping = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.received = 0
        self.dropped = 0
        self.committed = 0

    def start(self) -> None:
        """Start the reader and flusher tasks."""
        self._reader = asyncio.create_task(self._read(), name="ingest-pubsub-reader")
        self._flusher = asyncio.create_task(self._flush_loop(), name="ingest-pubsub-flusher")

    async def wait_subscribed(self, limit_s: float = 10.0) -> None:
        """Wait until the subscription is active (tests publish only after it)."""
        await asyncio.wait_for(self._subscribed.wait(), limit_s)

    async def stop(self) -> None:
        """Unsubscribe, commit what is buffered (unless the committer is closed), stop."""
        self._stopping.set()
        self._has_data.set()
        for task in (self._reader, self._flusher):
            if task is not None:
                await task
        self._reader = self._flusher = None

    async def _read(self) -> None:
        backoff = self._settings.ingest_retry_initial_s
        while not self._stopping.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*self.channels)
                self._subscribed.set()
                backoff = self._settings.ingest_retry_initial_s
                while not self._stopping.is_set():
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                    if msg is not None and msg.get("type") == "message":
                        await self._on_message(msg["channel"], msg["data"])
            except REDIS_ERRORS as e:
                self._subscribed.clear()
                log.warning("ingest.pubsub_disconnected", error=str(e), retry_in_s=backoff)
                try:
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, self._settings.ingest_retry_max_s)
            except Exception:
                log.exception("ingest.pubsub_error")
                await asyncio.sleep(backoff)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass

    async def _on_message(self, channel: bytes | str, data: bytes | str) -> None:
        ch = channel.decode() if isinstance(channel, bytes) else channel
        raw = data.encode() if isinstance(data, str) else data
        target = self.channels.get(ch)
        if target is None:
            return
        underlying, kind = target
        metrics.PUBSUB_MESSAGES.labels(kind).inc()
        source = f"pubsub:{ch}"
        batch, errors = parse_message(raw, underlying, kind)
        if errors:
            dead = [ingest_service_pb2.DeadLetter(reason=MALFORMED, detail=e.detail[:500], source=source, raw=e.raw)
                    for e in errors]
            try:
                await write_dead_letters(self._redis, dead, maxlen=self._settings.ingest_deadletter_maxlen)
            except REDIS_ERRORS:
                log.warning("ingest.pubsub_deadletter_failed", count=len(dead))
            try:
                from services.ingest.metrics import REJECTED

                REJECTED.labels(REASON_NAMES[MALFORMED]).inc(len(dead))
            except ImportError:  # pragma: no cover
                pass
        n = count_ticks(batch)
        if not n:
            return
        self.received += n
        if not self._committer.try_reserve(n):
            self.dropped += n
            metrics.PUBSUB_DROPPED.inc(n)
            if self.dropped == n or self.dropped % 10_000 < n:
                log.warning("ingest.pubsub_dropped", ticks=n, dropped_total=self.dropped)
            return
        self._buf.append((batch, source))
        self._buf_ticks += n
        if self._buf_ticks >= self._settings.ingest_publish_commit_ticks or len(self._buf) == 1:
            self._has_data.set()

    async def _flush_loop(self) -> None:
        interval = self._settings.ingest_pubsub_flush_ms / 1000
        while True:
            await self._has_data.wait()
            self._has_data.clear()
            if not self._stopping.is_set() and self._buf_ticks < self._settings.ingest_publish_commit_ticks:
                try:  # coalesce messages for up to one flush interval
                    await asyncio.wait_for(self._stopping.wait(), interval)
                except TimeoutError:
                    pass
            if self._buf:
                await self.flush()
            if self._stopping.is_set() and (self._reader is None or self._reader.done()):
                if self._buf:
                    await self.flush()
                return
            if self._stopping.is_set():
                self._has_data.set()
                await asyncio.sleep(0.05)

    async def flush(self) -> None:
        """Commit every buffered tick (waits and retries while the database is down)."""
        batches, n = self._buf, self._buf_ticks
        self._buf, self._buf_ticks = [], 0
        if not batches:
            return
        try:
            await self._committer.commit(batches)
            self.committed += n
        except CommitterClosed:
            self.dropped += n
            metrics.PUBSUB_DROPPED.inc(n)
            log.warning("ingest.pubsub_dropped_on_shutdown", ticks=n)
        except Exception:
            self.dropped += n
            metrics.PUBSUB_DROPPED.inc(n)
            log.exception("ingest.pubsub_commit_failed", ticks=n)
        finally:
            await self._committer.release(n)
