"""Background tasks: the BarUpdate stream consumer (generations) and the warmer (default views of the popular
underlyings recomputed right after updates, so clients polling them find them cached)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import structlog
from optmon.v1 import market_pb2

from services.query.cache import metrics
from services.query.cache.generations import Generations, seq_key
from services.query.cache.redis_gate import REDIS_ERRORS, RedisDown, RedisGate

log = structlog.get_logger("query.consumer")


def bars_stream(u: str) -> str:
    """Redis Stream of BarUpdates of ``u``."""
    return f"optmon:bars:{u}"


class UpdateConsumer:
    """XREAD BLOCK over ``optmon:bars:<U>`` of every configured underlying, from the newest entry at start-up
    (older ones are covered by reading ``optmon:seq:<U>``). Reconnects after Redis failures."""

    def __init__(self, url: str, gens: Generations, gate: RedisGate, block_ms: int = 1000):
        self.client = aioredis.from_url(url, socket_timeout=block_ms / 1000 + 2.0, socket_connect_timeout=0.5)
        self.gens = gens
        self.gate = gate
        self.block_ms = block_ms
        self.consumed = 0
        self.ready = asyncio.Event()

    async def _start_ids(self) -> dict[str, str]:
        ids = {}
        for u in self.gens.underlyings:
            last: Any = await self.client.xrevrange(bars_stream(u), count=1)
            ids[bars_stream(u)] = last[0][0].decode() if last else "0-0"
        vals = await self.client.mget([seq_key(u) for u in self.gens.underlyings])
        for u, v in zip(self.gens.underlyings, vals, strict=True):
            if v is not None:
                self.gens.observe_seq(u, int(v))
        return ids

    async def run(self) -> None:
        """Consume until cancelled."""
        ids: dict[str, str] | None = None
        while True:
            try:
                if ids is None:
                    ids = await self._start_ids()
                    self.ready.set()
                resp: Any = await self.client.xread(ids, block=self.block_ms, count=1000)  # type: ignore[arg-type]
                for stream, entries in resp or []:
                    name = stream.decode() if isinstance(stream, bytes) else stream
                    for entry_id, fields in entries:
                        ids[name] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                        pb = fields.get(b"pb")
                        if pb is None:
                            continue
                        try:
                            upd = market_pb2.BarUpdate.FromString(pb)
                        except Exception:  # a malformed entry must not stop invalidation
                            log.warning("bar_update.malformed", stream=name, id=ids[name])
                            continue
                        self.gens.apply_update(upd.underlying, upd.sequence, int(upd.timeframe))
                        self.consumed += 1
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as e:
                self.gate.mark_down(e)
                ids = None
                await asyncio.sleep(self.gate.retry_s)
            except Exception:
                log.exception("consumer.error")
                ids = None
                await asyncio.sleep(self.gate.retry_s)

    async def close(self) -> None:
        """Close the blocking client."""
        await self.client.aclose()


class Warmer:
    """After generations change, waits ``debounce_s`` and recomputes each ``(method, raw default request)`` job."""

    def __init__(self, gens: Generations, jobs: list[tuple[str, bytes]],
                 serve: Callable[[str, bytes], Awaitable[bytes]], debounce_s: float):
        self.gens = gens
        self.jobs = jobs
        self.serve = serve
        self.debounce_s = debounce_s
        self.event = asyncio.Event()
        gens.listeners.append(self.event)
        self.rounds = 0

    async def run(self) -> None:
        """Warm until cancelled."""
        while True:
            await self.event.wait()
            await asyncio.sleep(self.debounce_s)
            self.event.clear()
            for name, raw in self.jobs:
                try:
                    await self.serve(name, raw)
                    metrics.WARMED.labels(name).inc()
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # NotFound before data exists, PostgreSQL down, ...
                    log.debug("warm.skipped", method=name, error=type(e).__name__)
            self.rounds += 1


__all__ = ["RedisDown", "UpdateConsumer", "Warmer", "bars_stream"]
