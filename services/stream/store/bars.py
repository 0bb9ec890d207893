"""Redis Stream consumer of ingest's ``BarUpdate`` events (``optmon:bars:<U>``, field ``pb``), one per underlying.

Reads with ``XREAD BLOCK`` from the last id seen (no consumer group: every stream replica reads every update).
On a Redis error it reconnects with exponential backoff (0.1 s → 5 s), restarts from the newest entry and calls
``on_reset`` so the subscribers get a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis.exceptions import RedisError

from services.common.logging import get_logger
from services.stream import metrics
from services.stream.codec import BarUpdateIn, bar_update_from_bytes

log = get_logger("stream.bars")

_UPDATE_SECONDS = metrics.UPDATE_SECONDS


def bars_key(underlying: str) -> str:
    """The Redis Stream of an underlying's BarUpdates."""
    return f"optmon:bars:{underlying}"


class BarConsumer:
    """Feeds every BarUpdate of one underlying to ``on_update`` (awaited, in stream order).

    ``ready`` is set once the start position is known (updates from then on are delivered); ``on_reset(reason)`` is
    awaited after a reconnect, before the first update read on the new connection.
    """

    def __init__(
        self,
        redis_url: str,
        underlying: str,
        on_update: Callable[[BarUpdateIn], Awaitable[None]],
        on_reset: Callable[[str], Awaitable[None]],
        block_ms: int = 1000,
        batch: int = 256,
    ) -> None:
        self.redis_url = redis_url
        self.underlying = underlying
        self.key = bars_key(underlying)
        self.on_update = on_update
        self.on_reset = on_reset
        self.block_ms = block_ms
        self.batch = batch
        self.ready = asyncio.Event()
        self.last_id = "0-0"
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the background task."""
        self._task = asyncio.create_task(self._run(), name=f"bars-consumer-{self.underlying}")

    async def stop(self) -> None:
        """Cancel the task and wait for it."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _newest_id(self, r: Any) -> str:
        last = await r.xrevrange(self.key, count=1)
        return last[0][0].decode() if last else "0-0"

    async def _run(self) -> None:
        backoff = 0.1
        first = True
        while True:
            r: Any = aioredis.from_url(self.redis_url, socket_timeout=self.block_ms / 1000 + 10,
                                  socket_connect_timeout=2, health_check_interval=0)
            try:
                self.last_id = await self._newest_id(r)
                if not first:
                    metrics.REDIS_RECONNECTS.inc()
                    log.warning("redis.reconnected", underlying=self.underlying, last_id=self.last_id)
                    await self.on_reset("redis_reconnect")
                first = False
                self.ready.set()
                backoff = 0.1
                while True:
                    resp = await r.xread({self.key: self.last_id}, count=self.batch, block=self.block_ms)
                    for _key, entries in resp or ():
                        for entry_id, fields in entries:
                            t_read = time.perf_counter()
                            self.last_id = entry_id.decode()
                            payload = fields.get(b"pb")
                            if payload is None:
                                continue
                            try:
                                upd = bar_update_from_bytes(payload)
                            except DecodeError:
                                metrics.BAD_UPDATES.inc()
                                log.warning("bar_update.undecodable", id=self.last_id)
                                continue
                            await self.on_update(upd)
                            _UPDATE_SECONDS.observe(time.perf_counter() - t_read)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                metrics.REDIS_ERRORS.inc()
                log.warning("redis.error", underlying=self.underlying, error=repr(exc), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                try:
                    await r.aclose()
                except Exception:  # a broken connection may fail to close; nothing to do
                    pass
