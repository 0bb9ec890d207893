"""``python -m services.stream``: run StreamService until SIGTERM/SIGINT.

On a signal: EndOfStream to every subscriber, then the common graceful shutdown (NOT_SERVING → stop(grace)).
"""

from __future__ import annotations

import asyncio
import signal

from services.common.logging import configure_logging, get_logger
from services.common.server import shutdown, start_metrics, tune_gc
from services.stream.server import create_server
from services.stream.settings import StreamSettings


async def main() -> None:
    """Start the server from the environment and serve until signalled."""
    settings = StreamSettings()
    configure_logging(settings.log_level, settings.log_json)
    log = get_logger("stream")
    start_metrics(settings.metrics_port)
    server, port = await create_server(settings)
    tune_gc()
    log.info("stream.started", port=port, query_addr=settings.query_addr, metrics_port=settings.metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stream_close()  # type: ignore[attr-defined]
    await shutdown(server, server.stream_health, settings.shutdown_grace_s)  # type: ignore[attr-defined]


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is optional
        pass
    asyncio.run(main())
