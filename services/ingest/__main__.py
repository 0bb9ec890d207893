"""``python -m services.ingest``: run the ingest service until SIGTERM/SIGINT.

Configuration: ``OPTMON_*`` environment variables (:class:`services.ingest.settings.IngestSettings`); a malformed
value fails fast with pydantic's message. Logs are JSON lines on stderr; Prometheus metrics on
``OPTMON_METRICS_PORT`` (0 = off). Migrations are not run here (``optmon migrate``).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from typing import Any

import structlog
from pydantic import ValidationError

from services.common.logging import configure_logging
from services.common.server import start_metrics


async def _main() -> None:
    from services.ingest.server import app_of, create_server, stop_server
    from services.ingest.settings import IngestSettings

    settings = IngestSettings()
    configure_logging(settings.log_level, settings.log_json)
    structlog.contextvars.bind_contextvars(service="ingest")
    start_metrics(settings.metrics_port)
    server, _port = await create_server(settings)
    app = app_of(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(app.failed.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    await stop_server(server)
    if app.failed.is_set():
        sys.exit(1)


def main() -> None:
    """Entry point."""
    runner: Callable[..., Any]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        runner(_main())
    except ValidationError as e:
        print(f"ingest: invalid configuration:\n{e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
