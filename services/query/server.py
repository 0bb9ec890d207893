"""QueryService server factory: ``create_server(settings) -> (server, port)`` (port 0 picks a free one).

The returned server carries ``server.optmon_app`` (:class:`QueryApp`: store, cache, background tasks, health);
``await stop_server(server)`` shuts everything down (tests); ``python -m services.query`` runs it until SIGTERM.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.common.logging import get_logger
from services.common.server import bind, new_server, shutdown
from services.query.cache.consumer import UpdateConsumer, Warmer
from services.query.cache.core import ResponseCache
from services.query.cache.generations import Generations
from services.query.cache.l1 import L1Cache
from services.query.cache.redis_gate import RedisGate
from services.query.cache.seqwatch import SeqWatch
from services.query.servicer import SERVICE, QueryServicer
from services.query.settings import QuerySettings
from services.query.store.pg import PgStore

log = get_logger("query.server")

#: Seconds :meth:`QueryApp.close` waits for its cancelled background tasks.
CLOSE_WAIT_S = 5.0


@dataclass
class QueryApp:
    """Everything a running query server owns."""

    settings: QuerySettings
    store: PgStore
    gate: RedisGate
    gens: Generations
    cache: ResponseCache
    servicer: QueryServicer
    health: Any = None
    consumer: UpdateConsumer | None = None
    warmer: Warmer | None = None
    watch: SeqWatch | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def close(self) -> None:
        """Cancel background tasks, close Redis clients and the PostgreSQL pool."""
        for t in self.tasks:
            t.cancel()
        if self.tasks:
            # Bounded: a task that does not end within CLOSE_WAIT_S after its cancellation must not hold up the
            # shutdown (seen twice in CI: the warmer stayed "cancelling" in Event.wait with the loop idle).
            _, pending = await asyncio.wait(self.tasks, timeout=CLOSE_WAIT_S)
            for t in pending:
                log.warning("query.close.task_stuck", task=t.get_name(), stack=repr(t.get_stack(limit=5)))
        await self.cache.drain()
        if self.watch is not None:
            self.watch.close()
        if self.consumer is not None:
            await self.consumer.close()
        await self.gate.close()
        await self.store.close()


def build_app(settings: QuerySettings) -> QueryApp:
    """Wire store, Redis gate, generations, cache and servicer (no I/O)."""
    store = PgStore(settings.pg_dsn, settings.query_pg_pool_max, settings.query_pg_connect_timeout_s,
                    settings.query_pg_command_timeout_s)
    gate = RedisGate(settings.redis_url, settings.query_redis_retry_s)
    watch = SeqWatch(settings.redis_url, settings.query_redis_retry_s) if settings.query_seq_watch else None
    gens = Generations(settings.underlyings, gate, settings.query_fresh_check_ms, watch=watch)
    cache = ResponseCache(L1Cache(settings.query_l1_max_entries, settings.query_l1_max_bytes), gate, gens,
                          l1_ttl_s=settings.query_l1_ttl_s, l2_ttl_s=settings.query_l2_ttl_s,
                          last_good_ttl_s=settings.query_l2_last_good_ttl_s,
                          compress_threshold=settings.query_compress_threshold_bytes)
    servicer = QueryServicer(settings, store, cache)
    return QueryApp(settings, store, gate, gens, cache, servicer, watch=watch)


async def create_server(settings: QuerySettings) -> tuple[grpc.aio.Server, int]:
    """Start QueryService (health, reflection) on ``settings.host:settings.query_port`` and the background
    consumer/warmer. Returns the started server and the bound port."""
    app = build_app(settings)
    server, health = new_server([SERVICE])
    app.health = health
    server.add_generic_rpc_handlers([app.servicer.generic_handler()])
    port = await bind(server, health, settings.host, settings.query_port)
    if settings.query_consume_updates:
        app.consumer = UpdateConsumer(settings.redis_url, app.gens, app.gate)
        app.warmer = Warmer(app.gens, app.servicer.warm_jobs(), app.servicer.warm,
                            settings.query_warm_debounce_ms / 1000.0)
        app.tasks = [asyncio.create_task(app.consumer.run(), name="query.consumer"),
                     asyncio.create_task(app.warmer.run(), name="query.warmer")]
    if app.watch is not None:
        app.tasks.append(asyncio.create_task(app.watch.run(), name="query.seqwatch"))
    server.optmon_app = app  # type: ignore[attr-defined]
    return server, port


async def stop_server(server: grpc.aio.Server, grace: float = 0.0) -> None:
    """Graceful stop of a server made by :func:`create_server` (health NOT_SERVING, stop, close resources)."""
    app: QueryApp = server.optmon_app  # type: ignore[attr-defined]
    await shutdown(server, app.health, grace, [app.close])
