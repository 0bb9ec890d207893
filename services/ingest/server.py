"""Ingest server wiring: gRPC (IngestService + health + reflection) first, then — in the background, after the port
answers — the PostgreSQL pool, the pipeline, the committer and the inputs (Redis Streams consumer, legacy pub/sub).

Health: NOT_SERVING until the background start-up finished, SERVING afterwards, NOT_SERVING again while degraded
(PostgreSQL unreachable, commits retried) and during shutdown. Migrations are not run here (``optmon migrate``).

Use :func:`create_server` (tests: ``settings.ingest_port = 0``), then :func:`stop_server` — or run
``python -m services.ingest``, which does both around SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import grpc
import redis.asyncio as aioredis
import structlog
from grpc_health.v1._async import HealthServicer
from optmon.v1 import ingest_service_pb2, ingest_service_pb2_grpc

from services.common.server import new_server, set_serving
from services.ingest.domain.validation import Validator
from services.ingest.inputs.committer import Committer
from services.ingest.inputs.pubsub import PubSubInput
from services.ingest.inputs.streams import StreamConsumer
from services.ingest.servicer import IngestServicer
from services.ingest.settings import IngestSettings

log = structlog.get_logger("ingest.server")

#: Fully qualified gRPC service name.
SERVICE_NAME = ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name


async def _create_pool(settings: IngestSettings) -> asyncpg.Pool:
    try:  # the pipeline's own pool factory (codecs, sizes) when it provides one
        from services.ingest.store import pg

        factory = getattr(pg, "create_pool", None)
    except ImportError:
        factory = None
    if factory is not None:
        return await factory(settings)  # type: ignore[no-any-return]
    return await asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=4)


class IngestApp:
    """Everything behind the gRPC port of one ingest process. ``ready`` is set once the inputs run."""

    def __init__(self, settings: IngestSettings, server: grpc.aio.Server, health: HealthServicer) -> None:
        self.settings = settings
        self.server = server
        self.health = health
        self.redis: aioredis.Redis | None = None
        self.pool: asyncpg.Pool | None = None
        self.pipeline: Any = None
        self.validator = Validator(settings)  # cheap; raises ValueError on bad rules at once
        self.committer: Committer | None = None
        self.consumer: StreamConsumer | None = None
        self.pubsub: PubSubInput | None = None
        self.ready = asyncio.Event()
        #: Set when the background start-up failed for good (not a retried outage): the process should exit.
        self.failed = asyncio.Event()
        self._stopping = False
        self._bring_up_task: asyncio.Task[None] | None = None
        self._maintenance_task: asyncio.Task[None] | None = None

    async def _on_degraded(self, degraded: bool) -> None:
        if not self._stopping:
            await set_serving(self.server, self.health, not degraded)

    def start(self) -> None:
        """Start the background bring-up (returns at once)."""
        self._bring_up_task = asyncio.create_task(self._bring_up(), name="ingest-bring-up")
        self._bring_up_task.add_done_callback(self._bring_up_done)

    def _bring_up_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("ingest.startup_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            self.failed.set()

    async def _retry(self, what: str, op: Any) -> Any:
        delay = self.settings.ingest_retry_initial_s
        while not self._stopping:
            try:
                return await op()
            except Exception as e:
                log.warning("ingest.startup_retry", step=what, error=f"{type(e).__name__}: {e}", retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.ingest_retry_max_s)
        raise asyncio.CancelledError

    async def _bring_up(self) -> None:
        s = self.settings
        from services.ingest.pipeline import Pipeline  # heavy import (numpy) after the port answers

        self.redis = aioredis.from_url(s.redis_url)
        self.pool = await self._retry("postgres", lambda: _create_pool(s))
        self.pipeline = Pipeline(s, self.pool, self.redis, validator=self.validator)
        await self._retry("pipeline", self.pipeline.start)
        self._maintenance_task = asyncio.create_task(self._maintenance_loop(), name="ingest-maintenance")
        self.committer = Committer(
            self.pipeline,
            max_pending_ticks=s.ingest_max_pending_ticks,
            retry_initial_s=s.ingest_retry_initial_s,
            retry_max_s=s.ingest_retry_max_s,
            validator=self.validator,
            on_degraded=self._on_degraded,
        )
        if s.ingest_streams_enabled:
            self.consumer = StreamConsumer(self.redis, self.committer, s)
            await self._retry("redis", self.consumer.ensure_groups)
            self.consumer.start()
        if s.ingest_pubsub_enabled:
            self.pubsub = PubSubInput(self.redis, self.committer, s)
            self.pubsub.start()
        if not self._stopping:
            await set_serving(self.server, self.health, True)
        self.ready.set()
        log.info("ingest.ready", consumer=self.consumer.name if self.consumer else None,
                 underlyings=s.underlyings)

    async def _maintenance_loop(self) -> None:
        """Every ``ingest_retention_interval_s``: the pipeline's upkeep (partitions ahead, retention) when no commit
        did it meanwhile — so an idle ingest (overnight) still creates the next day's partitions ahead."""
        while True:
            await asyncio.sleep(self.settings.ingest_retention_interval_s)
            if self.pipeline.maintenance_due():
                try:
                    await self.pipeline.maintain()
                except Exception:  # maintain logs its own failures; never let the timer die
                    log.exception("ingest.maintenance_failed")

    async def wait_ready(self, limit_s: float = 30.0) -> None:
        """Wait for the bring-up (tests). Raises what the bring-up raised, or TimeoutError."""
        assert self._bring_up_task is not None
        done, _ = await asyncio.wait({self._bring_up_task, asyncio.ensure_future(self.ready.wait())},
                                     timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
        if self._bring_up_task in done and self._bring_up_task.exception() is not None:
            raise self._bring_up_task.exception()  # type: ignore[misc]
        if not self.ready.is_set():
            raise TimeoutError("ingest did not become ready")

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING → stop reading → finish (commit + ack) the in-flight batches within ``grace``
        seconds (then give up on them: they stay pending and are reclaimed later) → stop gRPC → close pools."""
        grace = self.settings.shutdown_grace_s if grace is None else grace
        self._stopping = True
        log.info("ingest.stopping", grace_s=grace)
        await self.health.enter_graceful_shutdown()
        if self._bring_up_task is not None and not self._bring_up_task.done():
            self._bring_up_task.cancel()
            with contextlib.suppress(BaseException):
                await self._bring_up_task
        inputs = [i.stop() for i in (self.consumer, self.pubsub) if i is not None]
        server_stop = asyncio.ensure_future(self.server.stop(grace))
        if inputs:
            gathered = asyncio.gather(*inputs)
            try:
                await asyncio.wait_for(asyncio.shield(gathered), grace)
            except TimeoutError:
                log.warning("ingest.stop_abandoning_inflight")
                if self.committer is not None:
                    self.committer.close()
                    await self.committer.wake()
                with contextlib.suppress(Exception):
                    await gathered
        await server_stop
        if self._maintenance_task is not None:
            self._maintenance_task.cancel()
            with contextlib.suppress(BaseException):
                await self._maintenance_task
        close = getattr(self.pipeline, "close", None) or getattr(self.pipeline, "stop", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.close(), 5)
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()
        log.info("ingest.stopped")


async def create_server(settings: IngestSettings) -> tuple[grpc.aio.Server, int]:
    """Build, bind (``settings.host:settings.ingest_port``; 0 = free port) and start the ingest gRPC server; returns
    ``(server, port)`` as soon as the port answers (health NOT_SERVING until the background start-up connected to
    PostgreSQL and Redis). ``server.ingest_app`` is the :class:`IngestApp` (stop it with :func:`stop_server`).

    Raises RuntimeError when the port cannot be bound.
    """
    server, health = new_server([SERVICE_NAME])
    app = IngestApp(settings, server, health)
    servicer = IngestServicer(lambda: app.committer if app.ready.is_set() else None,
                              settings.ingest_publish_commit_ticks)
    ingest_service_pb2_grpc.add_IngestServiceServicer_to_server(servicer, server)
    await set_serving(server, health, False)
    port = server.add_insecure_port(f"{settings.host}:{settings.ingest_port}")
    if port == 0:
        raise RuntimeError(f"cannot bind {settings.host}:{settings.ingest_port}")
    await server.start()
    server.ingest_app = app  # type: ignore[attr-defined]
    app.start()
    log.info("ingest.listening", port=port)
    return server, port


def app_of(server: grpc.aio.Server) -> IngestApp:
    """The :class:`IngestApp` behind a server made by :func:`create_server`."""
    return server.ingest_app  # type: ignore[attr-defined,no-any-return]


async def stop_server(server: grpc.aio.Server, grace: float | None = None) -> None:
    """Graceful stop of a server made by :func:`create_server` (see :meth:`IngestApp.stop`)."""
    await app_of(server).stop(grace)
