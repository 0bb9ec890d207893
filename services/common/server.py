"""gRPC server lifecycle shared by the three services.

Every service builds its server with :func:`new_server` (health + reflection + request-id logging), binds it with
:func:`bind`, and hands control to :func:`serve_until_signalled`, which on SIGTERM/SIGINT sets health to
NOT_SERVING, stops accepting, lets in-flight RPCs finish for ``grace`` seconds and then runs the cleanups
(closing pools) in reverse order.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

log = structlog.get_logger()

#: Options applied to every server: generous message size for option chains, keepalive for long streams.
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", 32 * 1024 * 1024),
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
]


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Binds ``request_id`` (the client's ``x-request-id`` metadata, or a new UUID) and ``rpc`` to the log context."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        md = dict(handler_call_details.invocation_metadata or ())
        structlog.contextvars.bind_contextvars(
            request_id=md.get("x-request-id") or uuid.uuid4().hex[:16], rpc=handler_call_details.method
        )
        return await continuation(handler_call_details)


def new_server(
    service_full_names: Sequence[str], *, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
) -> tuple[grpc.aio.Server, HealthServicer]:
    """A ``grpc.aio.Server`` with the health service (every name SERVING once :func:`bind` ran) and reflection.

    ``service_full_names`` are the fully qualified names of the services the caller will add, e.g.
    ``["optmon.v1.QueryService"]``. Returns the server and its health servicer (to flip status later).
    """
    server = grpc.aio.server(interceptors=[RequestIdInterceptor(), *interceptors], options=SERVER_OPTIONS)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [*service_full_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    server._optmon_service_names = list(service_full_names)  # type: ignore[attr-defined]
    return server, health


async def bind(server: grpc.aio.Server, health: HealthServicer, host: str, port: int) -> int:
    """Bind ``host:port`` (port 0 picks a free one), start the server, mark every service SERVING.

    Returns the bound port. Raises RuntimeError when the port cannot be bound.
    """
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind {host}:{port}")
    await server.start()
    await set_serving(server, health, True)
    return bound


async def set_serving(server: grpc.aio.Server, health: HealthServicer, serving: bool) -> None:
    """Set the overall health ("") and every named service to SERVING or NOT_SERVING."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *getattr(server, "_optmon_service_names", [])]:
        await health.set(name, status)


#: Generation-0 threshold of the cyclic GC for the serving processes (CPython's default is 700).
GC_GEN0_THRESHOLD = 50_000


def tune_gc(gen0_threshold: int = GC_GEN0_THRESHOLD) -> None:
    """Make CPython's cyclic garbage collector cheap for a long-running server holding many live objects.

    Measured on the stream service with 2,000 subscribers (benchmarks/bench_stream.py): with the default thresholds
    (700, 10, 10) the collector ran ~46 young and ~0.3 full collections a second, took ~23 % of the process's CPU,
    and each full collection paused the event loop for ~120 ms in the middle of fan-out bursts. Almost everything
    here is freed by reference counting (bars, messages), while the live set (one task, generator and gRPC call per
    subscriber, the books) is large and long-lived. So: objects alive after start-up (modules, classes, protobuf
    descriptors) are moved to the permanent generation (``gc.freeze``), and a young collection runs only after
    ``gen0_threshold`` net new container objects (then generation 1 every 20 young collections, generation 2 every
    10 of those — and, as always in CPython, only when 25 % of the long-lived objects are new). Cyclic garbage is
    still collected, later. Call once, after start-up and before serving.

    Used by the stream service only: in the query service (few live objects, latency of single requests matters)
    the rarer but larger young collections raised the 1-connection gateway p99 (1.6 → 4.7 ms in an A/B run).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(gen0_threshold, 20, 10)


def start_metrics(port: int) -> None:
    """Expose prometheus-client's default registry on ``0.0.0.0:port`` (no-op for port 0)."""
    if port:
        start_http_server(port)


async def serve_until_signalled(
    server: grpc.aio.Server,
    health: HealthServicer,
    grace: float,
    cleanups: Sequence[Callable[[], Awaitable[None]]] = (),
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully (NOT_SERVING → stop(grace) → cleanups)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await shutdown(server, health, grace, cleanups)


async def shutdown(
    server: grpc.aio.Server,
    health: HealthServicer,
    grace: float,
    cleanups: Sequence[Callable[[], Awaitable[None]]] = (),
) -> None:
    """Graceful stop used by :func:`serve_until_signalled` and by tests."""
    log.info("shutdown.begin", grace_s=grace)
    await health.enter_graceful_shutdown()
    await server.stop(grace)
    for cleanup in reversed(cleanups):
        try:
            await cleanup()
        except Exception:  # a failing cleanup must not block the others
            log.exception("shutdown.cleanup_failed")
    log.info("shutdown.done")
