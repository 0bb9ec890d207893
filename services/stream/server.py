"""StreamService server factory: ``await create_server(settings) -> (server, port)``.

The returned server carries ``server.stream_hub`` (the :class:`~services.stream.fanout.Hub`) and
``server.stream_close()`` (EndOfStream to every subscriber, consumers stopped, query channel closed): call it
before ``server.stop`` / :func:`services.common.server.shutdown`.
"""

from __future__ import annotations

import grpc

from services.common.server import bind, new_server
from services.stream.fanout import Hub
from services.stream.servicer import SERVICE_NAME, StreamServicer
from services.stream.settings import StreamSettings
from services.stream.store.query import QuerySnapshots


async def create_server(settings: StreamSettings) -> tuple[grpc.aio.Server, int]:
    """Build, bind (``settings.host:settings.stream_port``, 0 = free port) and start the stream server."""
    snapshots = QuerySnapshots(settings.query_addr, settings.stream_snapshot_timeout_s)
    hub = Hub(settings.redis_url, snapshots, dict(settings.strike_steps), heartbeat_s=settings.stream_heartbeat_s,
              block_ms=settings.stream_block_ms, redis_wait_s=settings.stream_redis_wait_s,
              carry_buckets=settings.stream_carry_buckets)
    servicer = StreamServicer(hub, dict(settings.strike_steps), settings.stream_heartbeat_s)
    server, health = new_server([SERVICE_NAME])
    server.add_generic_rpc_handlers((servicer.handler(),))

    async def close() -> None:
        await hub.close()
        await snapshots.close()

    server.stream_hub = hub  # type: ignore[attr-defined]
    server.stream_close = close  # type: ignore[attr-defined]
    server.stream_health = health  # type: ignore[attr-defined]
    port = await bind(server, health, settings.host, settings.stream_port)
    return server, port
