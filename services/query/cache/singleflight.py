"""Single-flight: concurrent callers of one key share one execution (one PostgreSQL query per key)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """``await do(key, fn)``: the first caller runs ``fn()``; callers arriving while it runs await its result
    (or its exception). Nothing is remembered afterwards."""

    def __init__(self) -> None:
        self._inflight: dict[Hashable, asyncio.Future[T]] = {}
        self.shared = 0  # callers that joined an execution (for tests/metrics)

    async def do(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        fut = self._inflight.get(key)
        if fut is not None:
            self.shared += 1
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            result = await fn()
        except asyncio.CancelledError:
            if not fut.done():
                fut.cancel()
            raise
        except BaseException as e:
            if not fut.done():
                fut.set_exception(e)
                fut.exception()  # mark retrieved: no "exception never retrieved" when nobody joined
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            del self._inflight[key]
