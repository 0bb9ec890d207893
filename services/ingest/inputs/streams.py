"""Durable input: the Redis Streams ``optmon:ticks:<UNDERLYING>`` read through the consumer group ``ingest``.

Each entry holds one serialized ``optmon.v1.TickBatch`` in field ``pb``. The consumer (name ``<hostname>-<pid>``)
loops: wait until the in-memory bound has room → ``XREADGROUP ... COUNT ingest_stream_read_count BLOCK ...`` over
every configured underlying → one ``Committer.commit`` for all the entries read → ``XACK`` them. An entry is
acknowledged only after the commit containing its ticks returned, so a crash (even kill -9) loses nothing: the
entries stay pending and are reclaimed (``XPENDING ... IDLE`` + ``XCLAIM``) once idle for ``ingest_claim_idle_ms`` (by
any replica, or by the restarted process, which reclaims them *before* reading new entries). Reprocessing a committed
but unacknowledged entry changes no bar (the pipeline's upserts are idempotent); a reclaimed entry is processed on
its own and in republish mode, which publishes every bar it touches, so BarUpdates of a commit that died before its
publish still go out (at least once). An entry delivered more than ``ingest_max_deliveries`` times is not processed
again: it is dead-lettered as POISON and acknowledged.

Undecodable entries (no ``pb`` field, or bytes that are not a TickBatch) are written to the dead-letter stream as
MALFORMED with the raw payload, counted, and acknowledged: never a crash, never silent.

Trimming: every ``ingest_maintenance_interval_s`` a stream longer than ``ingest_stream_maxlen`` is trimmed with
``XTRIM MINID ~ <safe id>``, where the safe id is the smallest of every group's oldest pending id and last-delivered
id: only entries that every consumer group has acknowledged are ever removed. Producers must XADD without MAXLEN.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
import structlog
from google.protobuf.message import DecodeError
from optmon.v1 import ingest_service_pb2, market_pb2

from services.ingest.domain.validation import MALFORMED, POISON, REASON_NAMES
from services.ingest.inputs import metrics
from services.ingest.inputs.committer import REDIS_ERRORS, Committer, CommitterClosed, count_ticks
from services.ingest.settings import IngestSettings
from services.ingest.store.deadletter import write_dead_letters

log = structlog.get_logger("ingest.streams")

#: Consumer group every ingest replica joins.
GROUP = "ingest"


def tick_stream_key(underlying: str) -> str:
    """``optmon:ticks:<UNDERLYING>``."""
    return f"optmon:ticks:{underlying}"


def default_consumer_name() -> str:
    """``<hostname>-<pid>-<6 hex>``: unique per consumer instance (also when one process runs several, as tests do),
    so a restarted process never mistakes a dead one's entries for its own in-flight ones."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def _increment_rejected(reason: str, n: int = 1) -> None:
    try:
        from services.ingest.metrics import REJECTED
    except ImportError:  # pragma: no cover - metrics module not there yet
        return
    REJECTED.labels(reason).inc(n)


class StreamConsumer:
    """Consumes the tick streams of ``settings.underlyings`` until :meth:`stop`.

    ``decoded`` / ``malformed`` / ``acked`` count entries since start (for tests and logs).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        committer: Committer,
        settings: IngestSettings,
        consumer_name: str | None = None,
    ) -> None:
        self._redis = redis
        self._committer = committer
        self._settings = settings
        self.name = consumer_name or default_consumer_name()
        self.keys = [tick_stream_key(u) for u in settings.underlyings]
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.acked = 0
        self.malformed = 0
        self.claimed = 0

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def ensure_groups(self) -> None:
        """Create the group on every stream (from id 0, creating empty streams): ticks published before the first
        ingest start are consumed too. Idempotent."""
        for key in self.keys:
            try:
                await self._redis.xgroup_create(key, GROUP, id="0", mkstream=True)
            except redis.exceptions.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def start(self) -> None:
        """Start the consuming task."""
        self._task = asyncio.create_task(self._run(), name="ingest-stream-consumer")

    async def stop(self) -> None:
        """Stop reading; the batch in flight is committed and acknowledged first (unless the committer is closed)."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None

    @property
    def running(self) -> bool:
        """True while the consuming task runs."""
        return self._task is not None and not self._task.done()

    # -- main loop -----------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = self._settings.ingest_retry_initial_s
        groups_ready = False
        recovered = False
        next_maintenance = 0.0
        while not self._stopping.is_set():
            try:
                if not groups_ready:
                    await self.ensure_groups()
                    groups_ready = True
                if not recovered:
                    await self._recover_on_start()
                    recovered = True
                if time.monotonic() >= next_maintenance:
                    await self.maintenance()
                    next_maintenance = time.monotonic() + self._settings.ingest_maintenance_interval_s
                await self._committer.wait_for_room()
                if self._stopping.is_set():
                    break
                resp = await self._redis.xreadgroup(
                    GROUP,
                    self.name,
                    {k: ">" for k in self.keys},
                    count=self._settings.ingest_stream_read_count,
                    block=self._settings.ingest_stream_block_ms,
                )
                entries = [(_s(key), _s(eid), fields) for key, items in resp or () for eid, fields in items]  # type: ignore[misc,union-attr,str-unpack]
                if entries:
                    await self._handle(entries)
                backoff = self._settings.ingest_retry_initial_s
            except CommitterClosed:
                log.info("ingest.stream_consumer_closed_with_pending")
                break
            except redis.exceptions.ResponseError as e:
                if "NOGROUP" in str(e):  # stream deleted under us: recreate the group
                    groups_ready = False
                    continue
                log.exception("ingest.stream_error")
                await self._pause(backoff)
                backoff = min(backoff * 2, self._settings.ingest_retry_max_s)
            except REDIS_ERRORS as e:
                log.warning("ingest.redis_unreachable", error=str(e), retry_in_s=backoff)
                await self._pause(backoff)
                backoff = min(backoff * 2, self._settings.ingest_retry_max_s)
            except Exception:
                log.exception("ingest.stream_consumer_error")
                await self._pause(backoff)
                backoff = min(backoff * 2, self._settings.ingest_retry_max_s)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    # -- one batch of entries ------------------------------------------------------------------------------------
    async def _handle(self, entries: Sequence[tuple[str, str, Any]], republish: bool = False) -> None:
        """Decode, commit, dead-letter the undecodable ones, then XACK all of them. ``republish``: re-delivered
        entries (see :meth:`claim_idle`)."""
        batches: list[tuple[market_pb2.TickBatch, str]] = []
        dead: list[ingest_service_pb2.DeadLetter] = []
        for key, eid, fields in entries:
            raw = fields.get(b"pb") if isinstance(fields, dict) else None
            source = f"stream:{key}:{eid}"  # the entry id also gives the pipeline the receive time
            if raw is None:
                dead.append(ingest_service_pb2.DeadLetter(
                    reason=MALFORMED, detail=f"entry {eid} has no field 'pb'", source=source,
                    raw=repr(fields).encode()[:65536]))
                continue
            try:
                batch = market_pb2.TickBatch.FromString(raw)
            except (DecodeError, ValueError) as e:
                dead.append(ingest_service_pb2.DeadLetter(
                    reason=MALFORMED, detail=f"entry {eid}: not a TickBatch ({e})", source=source, raw=raw))
                continue
            batches.append((batch, source))
        if batches:
            n = sum(count_ticks(b) for b, _ in batches)
            await self._committer.reserve(n)
            try:
                await self._commit(batches, entries, republish)
            finally:
                await self._committer.release(n)
        if dead:
            await self._retry_redis(lambda: write_dead_letters(
                self._redis, dead, maxlen=self._settings.ingest_deadletter_maxlen))
            await _increment_rejected(REASON_NAMES[MALFORMED], len(dead))
            self.malformed += len(dead)
            log.warning("ingest.stream_malformed", entries=len(dead))
        await self._ack(entries)

    async def _commit(self, batches: list[tuple[market_pb2.TickBatch, str]],
                      entries: Sequence[tuple[str, str, Any]], republish: bool = False) -> None:
        ids_by_key: dict[str, list[Any]] = {}
        for key, eid, _ in entries:
            ids_by_key.setdefault(key, []).append(eid)

        async def keep_claimed() -> None:
            # While waiting for the database, keep our pending entries fresh so no replica reclaims them.
            for key, ids in ids_by_key.items():
                await self._redis.xclaim(key, GROUP, self.name, 0, ids, justid=True)

        try:
            await self._committer.commit(batches, on_retry=keep_claimed, republish=republish)
            return
        except CommitterClosed:
            raise
        except Exception:
            log.exception("ingest.batch_failed_isolating", entries=len(batches))
        # A batch the pipeline cannot process (not an outage: those are retried inside commit). Retry entry by entry,
        # a few times each, so a single poison entry cannot block the stream; one that keeps failing on its own goes
        # to the dead-letter stream (POISON, raw TickBatch bytes) and is acknowledged with the others. The failure
        # may have come after the commit (events, dead letters), so the retries republish.
        for one in batches:
            delay = self._settings.ingest_retry_initial_s
            for attempt in range(3):
                try:
                    await self._committer.commit([one], on_retry=keep_claimed, republish=True)
                    break
                except CommitterClosed:
                    raise
                except Exception as e:
                    if attempt < 2:
                        await asyncio.sleep(delay)
                        delay *= 2
                        continue
                    log.exception("ingest.entry_dead_lettered", source=one[1])
                    item = ingest_service_pb2.DeadLetter(
                        reason=POISON, detail=f"failed the pipeline 3 times on its own: {e!r}"[:500],
                        source=one[1], raw=one[0].SerializeToString())
                    await self._retry_redis(lambda item=item: write_dead_letters(
                        self._redis, [item], maxlen=self._settings.ingest_deadletter_maxlen))
                    await _increment_rejected(REASON_NAMES[POISON], max(1, count_ticks(one[0])))

    async def _retry_redis(self, op: Any) -> Any:
        """Run a Redis operation until it succeeds (the ticks are committed; they must now be acknowledged)."""
        delay = self._settings.ingest_retry_initial_s
        while True:
            try:
                return await op()
            except REDIS_ERRORS as e:
                log.warning("ingest.redis_retry", error=str(e), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.ingest_retry_max_s)

    async def _ack(self, entries: Sequence[tuple[str, str, Any]]) -> None:
        ids_by_key: dict[str, list[str]] = {}
        for key, eid, _ in entries:
            ids_by_key.setdefault(key, []).append(eid)

        async def ack() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, ids in ids_by_key.items():
                    pipe.xack(key, GROUP, *ids)
                await pipe.execute()

        await self._retry_redis(ack)
        for key, ids in ids_by_key.items():
            metrics.STREAM_ACKED.labels(key).inc(len(ids))
        self.acked += len(entries)

    # -- recovery and trimming -----------------------------------------------------------------------------------
    async def claim_idle(self) -> int:
        """Take over every entry idle longer than ``ingest_claim_idle_ms`` on every stream (entries of a consumer
        that died or is stuck), one at a time in stream order; returns how many were taken over.

        Each one is ``XCLAIM``ed (which adds one to its delivery count; skipped when another consumer took it
        meanwhile), then, by its delivery count (``XPENDING``):

        - more than ``ingest_max_deliveries``: not processed again — written to the dead-letter stream as POISON
          with its bytes, counted, logged and acknowledged (:meth:`_poison`);
        - else processed on its own (one commit: a poison entry cannot take the entries after it to the cap with it,
          they are not even claimed while it crashes the process) in republish mode: its first processing may have
          committed and died before publishing, so every bar it touches is published again (at-least-once events).
        """
        total = 0
        idle = self._settings.ingest_claim_idle_ms
        for key in self.keys:
            start = "-"
            while not self._stopping.is_set():
                idle_entries = await self._redis.xpending_range(
                    key, GROUP, min=start, max="+", count=self._settings.ingest_stream_read_count, idle=idle)
                if not idle_entries:
                    break
                for p in idle_entries:
                    if self._stopping.is_set():
                        break
                    eid = _s(p["message_id"])
                    start = "(" + eid
                    claimed: list[tuple[Any, Any]] = await self._redis.xclaim(  # type: ignore[assignment]
                        key, GROUP, self.name, idle, [eid])
                    entries = [(key, _s(i), f) for i, f in claimed if f is not None]
                    if not entries:
                        continue  # claimed by another consumer meanwhile, or deleted from the stream
                    deliveries = await self._deliveries(key, eid)
                    total += 1
                    metrics.STREAM_CLAIMED.inc()
                    if deliveries > self._settings.ingest_max_deliveries:
                        await self._poison(entries[0], deliveries)
                    else:
                        log.info("ingest.stream_reclaimed", stream=key, entry=eid, deliveries=deliveries)
                        await self._handle(entries, republish=True)
        self.claimed += total
        return total

    async def _deliveries(self, key: str, eid: str) -> int:
        """Delivery count of the pending entry ``eid`` (1 = first read); 0 when it is not pending."""
        rows = await self._redis.xpending_range(key, GROUP, min=eid, max=eid, count=1)
        return int(rows[0]["times_delivered"]) if rows else 0

    async def _poison(self, entry: tuple[str, str, Any], deliveries: int) -> None:
        """Dead-letter (POISON, the entry's bytes in ``raw``) and acknowledge an entry delivered ``deliveries``
        times, more than the cap; counts its ticks (at least 1) in ``optmon_ingest_rejected_total{reason="POISON"}``.
        Its ticks may have been committed by a delivery that died after the commit: the dead letter keeps them for
        a manual replay."""
        key, eid, fields = entry
        raw = fields.get(b"pb") if isinstance(fields, dict) else None
        ticks = 1
        if raw is not None:
            try:
                ticks = max(1, count_ticks(market_pb2.TickBatch.FromString(raw)))
            except (DecodeError, ValueError):
                pass
        cap = self._settings.ingest_max_deliveries
        item = ingest_service_pb2.DeadLetter(
            reason=POISON, source=f"stream:{key}:{eid}",
            detail=(f"entry {eid} delivered {deliveries} times, more than OPTMON_INGEST_MAX_DELIVERIES={cap}: ingest "
                    "died or was stopped while processing it each time; not processed again"),
            raw=raw if raw is not None else repr(fields).encode()[:65536])
        await self._retry_redis(lambda: write_dead_letters(
            self._redis, [item], maxlen=self._settings.ingest_deadletter_maxlen))
        await _increment_rejected(REASON_NAMES[POISON], ticks)
        log.error("ingest.entry_poison", stream=key, entry=eid, deliveries=deliveries, max_deliveries=cap,
                  ticks=ticks)
        await self._ack([entry])

    async def _others_pending(self) -> int:
        """Pending entries owned by other consumers that look dead (idle beyond a few read blocks)."""
        idle_floor = 2 * self._settings.ingest_stream_block_ms + 500
        n = 0
        for key in self.keys:
            for c in await self._redis.xinfo_consumers(key, GROUP):
                name = _s(c.get("name", ""))
                if name != self.name and int(c.get("pending", 0)) > 0 and int(c.get("idle", 0)) >= idle_floor:
                    n += int(c["pending"])
        return n

    async def _recover_on_start(self) -> None:
        """Before reading new entries, take over the entries a crashed predecessor left pending (so ticks are
        processed in stream order). Waits at most ``ingest_claim_idle_ms`` + 2 s for them to become claimable."""
        deadline = time.monotonic() + self._settings.ingest_claim_idle_ms / 1000 + 2.0
        while not self._stopping.is_set():
            await self.claim_idle()
            if await self._others_pending() == 0 or time.monotonic() > deadline:
                return
            await self._pause(0.1)

    async def safe_trim_id(self, key: str) -> str | None:
        """The smallest id any consumer group still needs on ``key`` (oldest pending, else last delivered), or None
        when the stream has no group."""
        groups = await self._redis.xinfo_groups(key)
        if not groups:
            return None
        best: tuple[int, int] | None = None
        for g in groups:
            cands = [_s(g.get("last-delivered-id", "0-0"))]
            if int(g.get("pending", 0)) > 0:
                summary = await self._redis.xpending(key, _s(g["name"]))
                if summary.get("min"):
                    cands.append(_s(summary["min"]))
            for c in cands:
                k = _id_key(c)
                if best is None or k < best:
                    best = k
        if best is None:
            return None
        return f"{best[0]}-{best[1]}"

    async def trim(self) -> int:
        """Trim every stream longer than ``ingest_stream_maxlen`` to the acknowledged boundary (``MINID ~``);
        returns the entries removed."""
        removed = 0
        for key in self.keys:
            if await self._redis.xlen(key) <= self._settings.ingest_stream_maxlen:
                continue
            safe = await self.safe_trim_id(key)
            if safe is None or safe == "0-0":
                continue
            n = await self._redis.xtrim(key, minid=safe, approximate=True)
            removed += int(n or 0)
        if removed:
            metrics.STREAM_TRIMMED.inc(removed)
            log.info("ingest.stream_trimmed", entries=removed)
        return removed

    async def forget_dead_consumers(self) -> int:
        """XGROUP DELCONSUMER every other consumer with nothing pending that has been idle for more than 10 ×
        ``ingest_claim_idle_ms`` (restarted processes leave their names behind); returns how many were removed.
        A live consumer is never idle that long: every read, claim and retry refreshes its idle time."""
        limit = 10 * self._settings.ingest_claim_idle_ms
        removed = 0
        for key in self.keys:
            for c in await self._redis.xinfo_consumers(key, GROUP):
                name = _s(c.get("name", ""))
                if name != self.name and int(c.get("pending", 0)) == 0 and int(c.get("idle", 0)) > limit:
                    await self._redis.xgroup_delconsumer(key, GROUP, name)
                    removed += 1
        return removed

    async def maintenance(self) -> None:
        """Reclaim idle entries of crashed consumers, forget long-dead consumers, then trim."""
        await self.claim_idle()
        await self.forget_dead_consumers()
        await self.trim()
