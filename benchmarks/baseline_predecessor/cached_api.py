"""The predecessor's best (cached) read path, rebuilt for the query benchmark's baseline (benchmarks only).

A FastAPI app served by uvicorn with 1 worker, like the predecessor: ``GET /api/strike-distribution?underlying=NIFTY``
does a Redis ``GET`` of the cached JSON string at :data:`KEY` (``{underlying}`` filled in), ``json.loads`` it and
returns the dict, which FastAPI re-encodes to JSON (``jsonable_encoder`` + ``JSONResponse``). A missing key → 404.
The benchmark puts optmon's own strike-distribution answer there as JSON before it starts the server.

Run: ``python -m benchmarks.baseline_predecessor.cached_api --port P --redis-url redis://127.0.0.1:6379/0``.
uvicorn picks its HTTP parser and event loop itself (httptools/uvloop when installed, else h11/asyncio).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI, HTTPException

#: Redis key of the cached strike distribution JSON string (a format string taking ``underlying``).
KEY = "pred:strike_distribution:{underlying}"


def create_app(redis_url: str) -> FastAPI:
    """The predecessor's cached API app reading from the Redis at ``redis_url``."""
    state: dict[str, aioredis.Redis] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["redis"] = aioredis.from_url(redis_url)
        try:
            yield
        finally:
            await state["redis"].aclose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/api/strike-distribution")
    async def strike_distribution(underlying: str) -> Any:
        raw = await state["redis"].get(KEY.format(underlying=underlying))
        if raw is None:
            raise HTTPException(status_code=404, detail=f"no cached strike distribution for {underlying}")
        return json.loads(raw)

    return app


def main() -> None:
    """Serve the app on 127.0.0.1 with one uvicorn worker, no access log."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--redis-url", required=True)
    args = ap.parse_args()
    uvicorn.run(create_app(args.redis_url), host="127.0.0.1", port=args.port, workers=1, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
