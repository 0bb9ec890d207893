"""``python -m services.query``: run QueryService until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio

import structlog

from services.common.logging import configure_logging
from services.common.server import serve_until_signalled, start_metrics
from services.query.server import QueryApp, create_server
from services.query.settings import QuerySettings


async def main() -> None:
    """Parse settings, start the server and metrics endpoint, serve until signalled."""
    settings = QuerySettings()
    configure_logging(settings.log_level, settings.log_json)
    structlog.contextvars.bind_contextvars(service="query")
    start_metrics(settings.metrics_port)
    server, port = await create_server(settings)
    structlog.get_logger().info("query.started", port=port, metrics_port=settings.metrics_port)
    app: QueryApp = server.optmon_app  # type: ignore[attr-defined]
    await serve_until_signalled(server, app.health, settings.shutdown_grace_s, [app.close])


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(main())
