"""The single door from every input to the pipeline: bounded memory, serialized commits, retry with back-off.

Every input (stream consumer, pub/sub subscriber, PublishTicks servicer) first *reserves* room for the ticks it
holds (:meth:`Committer.try_reserve` / :meth:`Committer.reserve`), then calls :meth:`Committer.commit`, then
releases. ``commit`` runs one ``Pipeline.process`` at a time; when PostgreSQL (or Redis) is unreachable it keeps the
batch, marks ingest degraded (health NOT_SERVING, ``optmon_ingest_degraded`` = 1), undoes the validator's state
changes of the failed attempt and retries with exponential back-off until it succeeds or the committer is closed.
Nothing is acknowledged by the inputs before ``commit`` returns, so a tick is neither lost nor counted twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import asyncpg
import redis.exceptions
import structlog
from optmon.v1 import market_pb2

from services.ingest.domain.validation import Validator
from services.ingest.inputs import metrics

log = structlog.get_logger("ingest.committer")

#: (batch, source) pairs as handed to ``Pipeline.process``; source e.g. ``stream:optmon:ticks:NIFTY``.
Batches = Sequence[tuple[market_pb2.TickBatch, str]]


class PipelineLike(Protocol):
    """What the committer needs of ``services.ingest.pipeline.Pipeline``."""

    async def process(self, batches: Batches, *, republish: bool = False) -> Any: ...


class Overloaded(Exception):
    """The in-memory bound (``ingest_max_pending_ticks``) would be exceeded."""


class CommitterClosed(Exception):
    """The committer was closed while a batch was still waiting for the database (shutdown); nothing committed."""


def _database_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [
        asyncpg.PostgresConnectionError,
        asyncpg.CannotConnectNowError,
        asyncpg.InterfaceError,
        # transient server-side conditions: retrying the whole batch later is right, dead-lettering it is not
        asyncpg.exceptions.DeadlockDetectedError,
        asyncpg.exceptions.SerializationError,
        asyncpg.exceptions.TooManyConnectionsError,
        asyncpg.exceptions.QueryCanceledError,
        asyncpg.exceptions.InsufficientResourcesError,
        asyncpg.exceptions.AdminShutdownError,
        asyncpg.exceptions.CrashShutdownError,
        OSError,
        asyncio.TimeoutError,
    ]
    try:
        from services.ingest.store.pg import DatabaseUnavailable

        errors.insert(0, DatabaseUnavailable)
    except ImportError:  # pipeline not there yet
        pass
    return tuple(errors)


#: Exceptions meaning "Redis is unreachable right now" (retried by every input).
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def count_ticks(batch: market_pb2.TickBatch) -> int:
    """Option + underlying ticks of a batch."""
    return len(batch.option_ticks) + len(batch.underlying_ticks)


class Committer:
    """Serializes ``pipeline.process`` calls and owns the back-pressure state.

    ``on_degraded(bool)`` is awaited when the degraded state flips (the server maps it to health NOT_SERVING /
    SERVING). ``validator`` is the one the pipeline was built with (its attempt is rolled back on failure).
    """

    def __init__(
        self,
        pipeline: PipelineLike,
        *,
        max_pending_ticks: int,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 5.0,
        validator: Validator | None = None,
        on_degraded: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._validator = validator
        self._max = max_pending_ticks
        self._retry_initial = retry_initial_s
        self._retry_max = retry_max_s
        self._on_degraded = on_degraded
        self._lock = asyncio.Lock()
        self._room = asyncio.Condition()
        self._closed = asyncio.Event()
        self._db_errors = _database_errors()
        self.held = 0
        self.degraded = False

    # -- memory bound --------------------------------------------------------------------------------------------
    @property
    def max_pending_ticks(self) -> int:
        """The bound on ticks held in memory."""
        return self._max

    def try_reserve(self, n: int) -> bool:
        """Reserve room for ``n`` ticks; False (nothing reserved) when that would exceed the bound. A single
        reservation larger than the bound is allowed while nothing else is held (so no batch can block forever)."""
        if self.held and self.held + n > self._max:
            return False
        self.held += n
        metrics.PENDING_TICKS.set(self.held)
        return True

    async def reserve(self, n: int) -> None:
        """Wait until room for ``n`` ticks is free, then reserve it. Raises CommitterClosed when closed."""
        async with self._room:
            while not self.try_reserve(n):
                if self._closed.is_set():
                    raise CommitterClosed("committer closed")
                await self._room.wait()

    async def wait_for_room(self) -> None:
        """Return once less than the bound is held (the stream consumer calls it before reading)."""
        async with self._room:
            while self.held >= self._max and not self._closed.is_set():
                await self._room.wait()

    async def release(self, n: int) -> None:
        """Give back a reservation (after the commit, or when the ticks were dropped)."""
        self.held = max(0, self.held - n)
        metrics.PENDING_TICKS.set(self.held)
        async with self._room:
            self._room.notify_all()

    # -- commit --------------------------------------------------------------------------------------------------
    async def _set_degraded(self, degraded: bool, why: str = "") -> None:
        if degraded == self.degraded:
            return
        self.degraded = degraded
        metrics.DEGRADED.set(1 if degraded else 0)
        if degraded:
            log.warning("ingest.degraded", reason=why)
        else:
            log.info("ingest.recovered")
        if self._on_degraded is not None:
            try:
                await self._on_degraded(degraded)
            except Exception:
                log.exception("ingest.health_update_failed")

    async def commit(self, batches: Batches, on_retry: Callable[[], Awaitable[None]] | None = None, *,
                     republish: bool = False) -> Any:
        """``pipeline.process(batches)`` until it succeeds; returns its ``ProcessResult``. ``republish``: the
        batches may have been committed before without their BarUpdates (re-delivered stream entries): passed to
        ``process``, which then publishes every bar they touch.

        Retries (exponential back-off from ``retry_initial_s`` to ``retry_max_s``) while PostgreSQL or Redis is
        unreachable, awaiting ``on_retry`` before each pause (the stream consumer refreshes its pending entries
        there). Any other exception is raised after the validator state of the attempt was rolled back. Raises
        CommitterClosed when :meth:`close` is called while waiting to retry.
        """
        async with self._lock:
            delay = self._retry_initial
            while True:
                if self._closed.is_set():
                    raise CommitterClosed("committer closed before the batch could be committed")
                if self._validator is not None:
                    self._validator.begin()
                try:
                    result = await (self._pipeline.process(batches, republish=True) if republish
                                    else self._pipeline.process(batches))
                except self._db_errors as exc:
                    cause, err = "database", exc
                except REDIS_ERRORS as exc:
                    cause, err = "redis", exc
                except BaseException:
                    if self._validator is not None:
                        self._validator.rollback()
                    raise
                else:
                    if self._validator is not None:
                        self._validator.commit()
                    await self._set_degraded(False)
                    return result
                if self._validator is not None:
                    self._validator.rollback()
                metrics.COMMIT_RETRIES.labels(cause).inc()
                await self._set_degraded(True, f"{cause}: {type(err).__name__}: {err}")
                log.warning("ingest.commit_retry", cause=cause, error=str(err), retry_in_s=round(delay, 3))
                if on_retry is not None:
                    try:
                        await on_retry()
                    except Exception as e:  # best effort (e.g. Redis down as well)
                        log.debug("ingest.on_retry_failed", error=str(e))
                try:
                    await asyncio.wait_for(self._closed.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, self._retry_max)

    def close(self) -> None:
        """Stop retrying: a commit waiting for the database raises CommitterClosed (its input does not ack)."""
        self._closed.set()

    async def wake(self) -> None:
        """Wake reservation waiters (after :meth:`close`)."""
        async with self._room:
            self._room.notify_all()
