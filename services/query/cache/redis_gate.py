"""Redis access with degraded mode: a failing call marks Redis down for ``retry_s`` (calls fail fast meanwhile,
with :class:`RedisDown`), logs one line per transition and sets the ``optmon_query_redis_up`` gauge; the first
successful call after the pause marks it up again. The redis-py client reconnects by itself."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from services.query.cache import metrics

T = TypeVar("T")
log = structlog.get_logger("query.redis")

REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                                                 OSError, TimeoutError)


class RedisDown(Exception):
    """Redis is considered down (failed recently)."""


class RedisGate:
    """Wraps one ``redis.asyncio.Redis`` client (short socket timeouts)."""

    def __init__(self, url: str, retry_s: float = 1.0, socket_timeout: float = 0.5):
        # A blocking pool: a burst of concurrent calls waits for a connection instead of failing (which would
        # wrongly mark Redis down).
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=64, timeout=socket_timeout, socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout)
        self._pool = pool
        self.client = aioredis.Redis(connection_pool=pool)
        self.retry_s = retry_s
        self.up = True
        self._retry_at = 0.0
        metrics.REDIS_UP.set(1)

    @property
    def usable(self) -> bool:
        """False while Redis is down and the retry pause has not elapsed."""
        return self.up or time.monotonic() >= self._retry_at

    async def call(self, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """``await fn(client)``; RedisDown when Redis is down or the call fails."""
        if not self.usable:
            raise RedisDown("redis down")
        try:
            result = await fn(self.client)
        except REDIS_ERRORS as e:
            self.mark_down(e)
            raise RedisDown(str(e)) from e
        if not self.up:
            self.up = True
            metrics.REDIS_UP.set(1)
            log.info("redis.recovered")
        return result

    def mark_down(self, err: BaseException) -> None:
        """Record a failure (log once per outage)."""
        metrics.REDIS_ERRORS.inc()
        self._retry_at = time.monotonic() + self.retry_s
        if self.up:
            self.up = False
            metrics.REDIS_UP.set(0)
            log.warning("redis.down", error=f"{type(err).__name__}: {err}", retry_s=self.retry_s,
                        degraded="serving from L1 + PostgreSQL")

    async def close(self) -> None:
        """Close the client and its pool's connections."""
        await self.client.aclose()
        await self._pool.disconnect()
