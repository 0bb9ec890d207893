"""The ingest pipeline: validated ticks → 1-minute bars → exact 5M/15M/1H rollups, latest snapshot and underlying
bars in ONE PostgreSQL transaction per call → BarUpdate events on Redis after the commit.

Used by every input (Redis Streams consumer, PublishTicks, legacy pub/sub — ``services/ingest/inputs``) through
:meth:`Pipeline.process`. Field definitions of the bars: ``services/ingest/domain/bars.py`` and ``docs/bars.md``.

Events are at least once: a call made with ``republish=True`` (the stream consumer does it for re-delivered entries,
whose first processing may have committed and died before publishing) publishes every bar its ticks may have changed,
read back after the writes, not only the bars this call changed (see ``docs/ingest.md``).

Concurrency: calls are serialized by an asyncio lock; across processes (replicas sharing the streams) writers of an
underlying are serialized by a PostgreSQL advisory lock, and a process reloads its per-contract state when the
``ingest_writers`` version shows that another process committed in between (see ``docs/bars.md``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import math
import os
import re
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import asyncpg
import numpy as np
import redis.asyncio as aioredis
import structlog
from optmon.v1 import ingest_service_pb2, market_pb2

from services.common.domain.timeframes import ROLLUPS, Timeframe
from services.ingest import metrics
from services.ingest.domain import bars as B
from services.ingest.settings import IngestSettings
from services.ingest.store import events
from services.ingest.store import pg as store
from services.ingest.store.pg import DatabaseUnavailable

if TYPE_CHECKING:
    from services.ingest.domain.validation import Validator

__all__ = ["DatabaseUnavailable", "Pipeline", "ProcessResult"]

log = structlog.get_logger("optmon.ingest.pipeline")

_CALL = market_pb2.OPTION_TYPE_CALL
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
_STREAM_ID = re.compile(r":(\d+)-\d+$")
#: Committed-but-unpublished BarUpdates kept for the next call at most (older ones are dropped and logged).
_MAX_PENDING_EVENTS = 10_000
_SIDE_INDEX = {"ce": 0, "pe": 1}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_NONE14 = (None,) * 14


@dataclass
class ProcessResult:
    """Outcome of one :meth:`Pipeline.process` call."""

    #: Option + underlying ticks accepted and committed.
    accepted: int = 0
    #: Rejected ticks by reason name without prefix (e.g. ``"NON_POSITIVE_LTP"``) → count.
    rejected: dict[str, int] = field(default_factory=dict)
    #: Accepted ticks flagged as suspicious (LTP jump).
    suspicious: int = 0
    #: BarUpdate messages published by this call.
    bar_updates: int = 0
    #: ``republish=True`` only: stored bars read back and published whether or not this call changed them.
    republished_bars: int = 0


def _reason_name(reason: int | str) -> str:
    if isinstance(reason, str):
        return reason.removeprefix("REJECT_REASON_")
    return ingest_service_pb2.RejectReason.Name(reason).removeprefix("REJECT_REASON_")


def _receive_us(source: str, default_us: int) -> int:
    """Wall-clock receive time of a batch: the Redis stream entry id's milliseconds when the source names one
    (``stream:<key>:<ms>-<seq>``), else ``default_us``."""
    m = _STREAM_ID.search(source)
    if m:
        return min(int(m.group(1)) * 1000, default_us)
    return default_us


class _GcPause:
    """Context manager: the cyclic garbage collector is off while at least one ``process`` call of the process runs.

    A call allocates a few hundred thousand short-lived container objects (tick aggregates, leg bars, rows) that
    reference counting frees; with the collector on, their allocation triggers repeated generation-2 collections that
    cost ≈ 1 s of CPU per replayed day (≈ 20 % of the call's Python time). Nothing of a call forms reference cycles
    that must be reclaimed during the call; the collector is re-enabled (if it was on) when the last call ends, even
    on an error, and collects any cycles then as usual."""

    __slots__ = ("active", "was_enabled")

    def __init__(self) -> None:
        self.active = 0
        self.was_enabled = False

    def __enter__(self) -> None:
        if self.active == 0:
            self.was_enabled = gc.isenabled()
            gc.disable()
        self.active += 1

    def __exit__(self, *exc: object) -> None:
        self.active -= 1
        if self.active == 0 and self.was_enabled:
            gc.enable()


_gc_pause = _GcPause()


def _gc_paused() -> _GcPause:
    return _gc_pause


def _day_to_date(day: int) -> dt.date:
    return dt.date.fromordinal(_EPOCH_ORDINAL + day)


class Pipeline:
    """Validates, aggregates and commits tick batches; publishes BarUpdates.

    ``settings``: strike steps (moneyness), retention, event stream cap, IV rate/dividend yield. ``pool``: asyncpg
    pool of the migrated database. ``redis``: asyncio Redis client (events, dead letters). ``validator``: optional
    :class:`services.ingest.domain.validation.Validator`; None accepts everything. The caller owns the validator's
    begin/commit/rollback (``services/ingest/inputs/committer.py``).
    """

    def __init__(self, settings: IngestSettings, pool: asyncpg.Pool, redis: aioredis.Redis,
                 validator: Validator | None = None) -> None:
        self._settings = settings
        self._pool = pool
        self._redis = redis
        self._validator = validator
        self._steps = {u.upper(): float(s) for u, s in settings.strike_steps.items()}
        self._lock = asyncio.Lock()
        self._states: dict[B.LegKey, B.LegState] = {}
        self._closes = B.UnderlyingCloses()
        self._listed = B.ListedStrikes()
        self._horizon_s = 0
        self._known_days: set[int] = set()
        self._pending_events: list[market_pb2.BarUpdate] = []
        self._last_retention = -math.inf
        self._expiry_text: dict[dt.date, str] = {}
        #: UTC day → [1M rows written since start, rows at the last ANALYZE] (see :meth:`_maybe_analyze`).
        self._day_rows: dict[int, list[int]] = {}
        self._analyze_task: asyncio.Task[None] | None = None
        #: Writer version of each underlying as of this process' last commit (table ingest_writers).
        self._versions: dict[str, int] = {}
        #: UTC days whose partitions are known to have planner statistics (see :func:`store.analyze_if_never`).
        self._stats_days: set[int] = set()
        #: Newest committed 1-minute strike-bar bucket (epoch s) per underlying, by any writer (see
        #: :meth:`_refresh_groups`: a bucket after it has no rows but the ones the current call writes).
        self._newest: dict[str, int] = {}
        #: Successful commits since start (for ``ingest_fault_exit_after_commits``).
        self._commits = 0

    # -- start-up / recovery -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover per-contract state from PostgreSQL (newest session's last two bars per leg, listed strikes,
        1-minute underlying closes), create today's and tomorrow's partitions and run retention once.
        Raises DatabaseUnavailable when PostgreSQL cannot be reached (safe to call again)."""
        async with self._lock:
            try:
                async with self._pool.acquire() as conn:
                    # Versions first: a commit by another writer after this read makes the next call reload.
                    versions = await store.load_versions(conn)
                    newest = await store.load_newest_buckets(conn)
                    horizon = await store.latest_session_start(conn) or 0
                    closes = B.UnderlyingCloses()
                    for r in await store.load_underlying_closes(conn):
                        closes.merge(r["underlying"], int(r["bucket_s"]), int(r["close_us"]), float(r["close"]))
                    listed = B.ListedStrikes()
                    for r in await store.load_listed_strikes(conn, max(horizon - B.DAY_S, 0)):
                        listed.observe(r["underlying"], r["expiry"], float(r["strike"]), int(r["first_s"]))
                    states: dict[B.LegKey, B.LegState] = {}
                    last_ltp: list[tuple[tuple[str, str, float, int], float, int]] = []
                    for side in store.SIDES:
                        is_call = side == "ce"
                        option_type = _CALL if is_call else market_pb2.OPTION_TYPE_PUT
                        for r in sorted(await store.load_leg_states(conn, side, horizon),
                                        key=lambda r: -int(r["rn"])):
                            key = (r["underlying"], r["expiry"], float(r["strike"]), is_call)
                            if r["rn"] == 1 and r["close"] is not None:
                                last_ltp.append(((key[0], key[1], key[2], option_type), float(r["close"]),
                                                 int(r["close_us"])))
                            st = B.LegState(int(r["bucket_s"]), int(r["close_us"]), int(r["oi"] or 0),
                                            int(r["day_volume"] or 0))
                            prev = states.get(key)
                            if prev is not None:  # rn=2 came first: it is the prior bar
                                st.prior_bucket, st.prior_oi, st.prior_day_volume = (
                                    prev.bucket, prev.oi, prev.day_volume)
                            states[key] = st
                    today = self._today()
                    await store.ensure_partitions(conn, _day_to_date(today), _day_to_date(today + 1))
            except Exception as e:
                if store.is_unavailable(e):
                    raise DatabaseUnavailable(f"PostgreSQL unreachable: {type(e).__name__}: {e}") from e
                raise
            self._states, self._closes, self._listed, self._horizon_s = states, closes, listed, horizon
            self._versions = versions
            self._newest = newest
            self._known_days = {today, today + 1}
            # The validator's jump rule compares with the contract's previous tick: after a restart, its close.
            seeded = self._validator.seed_last_ltp(last_ltp) if self._validator is not None else 0
            log.info("ingest.pipeline.started", leg_states=len(states), horizon_s=horizon,
                     underlyings=len(closes.bars), validator_seeded=seeded)
        await self.enforce_retention()

    async def close(self) -> None:
        """Wait for background work (a partition ANALYZE) to finish; call before closing the pool (the ingest server
        does, on shutdown)."""
        task, self._analyze_task = self._analyze_task, None
        if task is not None:
            await task

    @staticmethod
    def _today() -> int:
        """Today's UTC day number (wall clock)."""
        return int(time.time()) // B.DAY_S

    def maintenance_due(self) -> bool:
        """True when the last :meth:`maintain` (or retention pass) is older than ``ingest_retention_interval_s``."""
        return time.monotonic() - self._last_retention > self._settings.ingest_retention_interval_s

    async def maintain(self) -> int:
        """Periodic upkeep, serialized with :meth:`process`: create today's and tomorrow's daily partitions (UTC
        days, wall clock) if this process has not seen them yet — so a new day's partitions exist before its first
        tick, and a long-running process keeps creating them ahead — then :meth:`enforce_retention`. Run by
        ``process`` every ``ingest_retention_interval_s`` and by the ingest server's timer (an idle ingest too).
        Best effort: errors are logged, not raised. Returns the partitions dropped."""
        async with self._lock:
            return await self._maintain()

    async def _maintain(self) -> int:
        self._last_retention = time.monotonic()
        today = self._today()
        if {today, today + 1} - self._known_days:
            try:
                async with self._pool.acquire() as conn:
                    made = await store.ensure_partitions(conn, _day_to_date(today), _day_to_date(today + 1))
            except Exception as e:  # the call that writes a new day creates its partitions anyway
                log.warning("ingest.partitions_ahead_failed", error=f"{type(e).__name__}: {e}")
            else:
                self._known_days |= {today, today + 1}
                if made:
                    log.info("ingest.partitions_created", partitions=made, first=_day_to_date(today).isoformat())
        return await self.enforce_retention()

    async def enforce_retention(self) -> int:
        """Drop daily bar partitions older than ``ingest_retention_days`` before the newest data day (not the wall
        clock, so a replay of an old day keeps its bars). Returns how many were dropped; 0 when disabled. Errors are
        logged, not raised."""
        self._last_retention = time.monotonic()
        days = self._settings.ingest_retention_days
        if days <= 0 or self._horizon_s <= 0:
            return 0
        before = _day_to_date(self._horizon_s // B.DAY_S - days)
        try:
            async with self._pool.acquire() as conn:
                n = await store.drop_partitions_before(conn, before)
        except Exception as e:  # retention is best effort
            log.warning("ingest.retention_failed", error=f"{type(e).__name__}: {e}")
            return 0
        if n:
            metrics.PARTITIONS_DROPPED.inc(n)
            self._known_days = {d for d in self._known_days if d >= before.toordinal() - _EPOCH_ORDINAL}
            log.info("ingest.retention", dropped=n, before=before.isoformat())
        return n

    # -- processing ------------------------------------------------------------------------------------------

    async def process(self, batches: Sequence[tuple[market_pb2.TickBatch, str]], *,
                      republish: bool = False) -> ProcessResult:
        """Validate, aggregate and commit ``(batch, source)`` pairs in one transaction, then publish BarUpdates.

        The BarUpdates carry the bars this call changed. With ``republish`` they also carry, as stored after the
        call's writes, every bar the same ticks may have changed in an earlier commit (see :meth:`_read_back`): use
        it for ticks that may have been committed before without their BarUpdates being published (a re-delivered
        stream entry whose first processing died between commit and publish). Duplicates are harmless: updates
        carry complete bars.

        Returns after commit + publish. Raises :class:`DatabaseUnavailable` when PostgreSQL is unreachable (nothing
        committed, in-memory state unchanged: retry the same batches later); raises the redis error when Redis is
        unreachable after the commit (the updates are kept and published by the next call; a retry of the same
        batches changes no rows).
        """
        async with self._lock:
            with _gc_paused():
                return await self._process(batches, republish)

    async def _process(self, batches: Sequence[tuple[market_pb2.TickBatch, str]],
                       republish: bool = False) -> ProcessResult:
        now = dt.datetime.now(dt.UTC)
        now_us = int(now.timestamp() * 1_000_000)
        result = ProcessResult()
        validator = self._validator
        builder = B.BarBuilder()
        dead: list[ingest_service_pb2.DeadLetter] = []
        rejected = result.rejected
        first_receive: dict[str, int] = {}
        needs_greeks: list[tuple[market_pb2.OptionTick, int]] = []
        add_option = builder.add_option
        add_underlying = builder.add_underlying

        for batch, source in batches:
            recv_us = _receive_us(source, now_us)
            seen: set[str] = set()
            for ut in batch.underlying_ticks:
                if validator is not None:
                    reason, detail = validator.check_underlying(ut, now)
                    if reason:
                        name = _reason_name(reason)
                        rejected[name] = rejected.get(name, 0) + 1
                        dead.append(ingest_service_pb2.DeadLetter(
                            reason=cast(Any, reason), detail=detail, source=source, underlying_tick=ut))
                        continue
                ts = ut.exchange_time
                add_underlying(ut.underlying, ts.seconds * 1_000_000 + ts.nanos // 1000, ut.price)
                seen.add(ut.underlying)
                result.accepted += 1
            for t in batch.option_ticks:
                if validator is not None:
                    reason, detail, susp = validator.check_option(t, now)
                    if reason:
                        name = _reason_name(reason)
                        rejected[name] = rejected.get(name, 0) + 1
                        dead.append(ingest_service_pb2.DeadLetter(
                            reason=cast(Any, reason), detail=detail, source=source, option_tick=t))
                        continue
                    if susp:
                        result.suspicious += 1
                u = t.underlying
                ts = t.exchange_time
                ts_us = ts.seconds * 1_000_000 + ts.nanos // 1000
                if t.HasField("underlying_price"):
                    add_underlying(u, ts_us, t.underlying_price, is_tick=False)
                if (t.HasField("iv") and t.HasField("delta") and t.HasField("gamma") and t.HasField("theta")
                        and t.HasField("vega")):
                    add_option(u, t.expiry, t.strike, t.option_type == _CALL, ts_us, t.ltp, t.volume, t.oi,
                               t.iv, t.delta, t.gamma, t.theta, t.vega)
                else:
                    needs_greeks.append((t, ts_us))
                seen.add(u)
                result.accepted += 1
            for u in seen:
                if u not in first_receive or recv_us < first_receive[u]:
                    first_receive[u] = recv_us

        # Pending copies of the in-memory state: applied only after the commit.
        closes = self._closes.copy_for({k[0] for k in builder.legs} | set(builder.underlying))
        for u, ubars in builder.underlying.items():
            for b, a in ubars.items():
                closes.merge(u, b, int(a[4]), a[5])
        if needs_greeks:
            self._add_with_greeks(builder, needs_greeks, closes)

        listed_keys = {(k[0], k[1], b // B.DAY_S) for k, bks in builder.legs.items() for b in bks}
        listed = self._listed.copy_for(listed_keys)
        for (u, e, s, _c), bks in builder.legs.items():
            for b in bks:
                listed.observe(u, e, s, b)

        touched = sorted({k[0] for k in builder.legs} | set(builder.underlying))
        derived = self._derive(builder, self._states.get, closes, listed)
        uarrays = self._underlying_arrays(builder)
        call_days = builder.dates()
        new_days = call_days - self._known_days

        changed: dict[Timeframe, list[Any]] = {tf: [] for tf in Timeframe}
        prices = {u: closes.latest(u) for u in touched}
        m1_rows: list[Any] = []
        m1_updates: list[market_pb2.BarUpdate] = []
        late_state_rows: dict[B.LegKey, list[Any]] = {}
        stale: list[str] = []
        reloaded: dict[B.LegKey, B.LegState] = {}
        new_versions: dict[str, int] = {}
        readback: dict[Timeframe, list[Any]] = {}
        newest = self._newest
        t0 = time.perf_counter()
        try:
            async with self._pool.acquire() as conn:
                if new_days:
                    await store.ensure_partitions(conn, _day_to_date(min(new_days)), _day_to_date(max(new_days)))
                async with conn.transaction():
                    # Serialize writers per underlying (replicas share the streams) and detect another writer.
                    versions = await store.lock_underlyings(conn, touched)
                    stale = [u for u in touched if versions[u] != self._versions.get(u, 0)]
                    if stale:
                        # Under the lock: what the other writers committed is authoritative (-1: no bars).
                        db_newest = await store.load_newest_buckets(conn, stale)
                        newest = {**self._newest, **{u: db_newest.get(u, -1) for u in stale}}
                        reloaded = await self._reload(conn, stale, builder, closes, listed)
                        stale_set = set(stale)

                        def state_of(k: B.LegKey) -> B.LegState | None:
                            return reloaded.get(k) if k[0] in stale_set else self._states.get(k)

                        derived = self._derive(builder, state_of, closes, listed)
                        log.info("ingest.state_reloaded", underlyings=stale, legs=len(reloaded))
                    _rows, new_states, late, mem_rows, refresh_candidates = derived
                    if uarrays[0]:
                        await store.upsert_underlying(conn, uarrays)
                        for tf in ROLLUPS:
                            pairs = sorted({(u, b - b % tf.seconds) for u, bks in builder.underlying.items()
                                            for b in bks})
                            await store.rollup_underlying(conn, tf, [p[0] for p in pairs], [p[1] for p in pairs])
                    changed[Timeframe.M1] = await self._upsert_1m(conn, mem_rows, newest)
                    stats_days = sorted(call_days - self._stats_days)
                    for d in stats_days:  # first rows of a fresh day: statistics before the rollup reads them
                        await store.analyze_if_never(conn, Timeframe.M1, _day_to_date(d))
                    if late:
                        await self._recompute_late(conn, late, changed, late_state_rows)
                    m1_rows = list(changed[Timeframe.M1])
                    prices = {u: closes.latest(u) for u in touched}  # after a possible reload of closes
                    # PostgreSQL computes the rollups while this coroutine builds the 1M BarUpdates (it yields to
                    # the event loop every few hundred bars, so the next statement goes out without waiting).
                    db = asyncio.ensure_future(self._rollups(conn, changed, closes, listed, refresh_candidates,
                                                             touched, stats_days, newest))
                    try:
                        m1_updates = await events.build_updates_async(
                            {Timeframe.M1: m1_rows}, first_tick_us=builder.first_tick_us,
                            first_receive_us=first_receive,
                            underlying_price=prices) if m1_rows and not republish else []
                    finally:
                        new_versions = await db
                    if republish:
                        readback = await self._read_back(conn, late, refresh_candidates)
            commit_time = dt.datetime.now(dt.UTC)
        except Exception as e:
            if store.is_unavailable(e):
                metrics.DB_UNAVAILABLE.inc()
                raise DatabaseUnavailable(f"PostgreSQL unreachable: {type(e).__name__}: {e}") from e
            raise
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - t0)
        self._known_days |= new_days
        self._stats_days.update(stats_days)
        if newest is not self._newest:
            self._newest = dict(newest)
        for (u, _e, _s, _c), bks in builder.legs.items():
            top = max(bks)
            if top > self._newest.get(u, -1):
                self._newest[u] = top

        # Committed: apply the in-memory state.
        self._versions.update(new_versions)
        if stale:
            self._states.update(reloaded)
        self._states.update(new_states)
        for key, state_rows in late_state_rows.items():
            self._states[key] = _state_from_rows(state_rows)
        self._closes = closes
        self._listed = listed
        days = call_days
        if days and max(days) * B.DAY_S > self._horizon_s:
            self._horizon_s = max(days) * B.DAY_S
            self._prune()

        metrics.ACCEPTED.inc(result.accepted)
        if result.suspicious:
            metrics.SUSPICIOUS.inc(result.suspicious)
        for name, n in rejected.items():
            metrics.REJECTED.labels(name).inc(n)
        for tf, rws in changed.items():
            if rws:
                metrics.BARS_WRITTEN.labels(tf.label).inc(len(rws))

        if republish:  # changed rows first, the rows read back last: the stored version of each bar wins
            result.republished_bars = sum(len(rws) for rws in readback.values())
            metrics.REPUBLISHED_BARS.inc(result.republished_bars)
            updates = events.build_updates(
                {tf: [*changed[tf], *readback.get(tf, ())] for tf in Timeframe if changed[tf] or readback.get(tf)},
                commit_time=commit_time, first_tick_us=builder.first_tick_us, first_receive_us=first_receive,
                underlying_price=prices)
            log.info("ingest.republished", bars=result.republished_bars, updates=len(updates),
                     sources=len(batches))
        else:
            if len(changed[Timeframe.M1]) != len(m1_rows):  # the moneyness re-stamp changed 1M rows too: rebuild
                m1_updates = events.build_updates({Timeframe.M1: changed[Timeframe.M1]}, commit_time=commit_time,
                                                  first_tick_us=builder.first_tick_us,
                                                  first_receive_us=first_receive, underlying_price=prices)
            else:
                events.set_commit_time(m1_updates, commit_time)
            updates = m1_updates + events.build_updates(
                {tf: rws for tf, rws in changed.items() if rws and tf != Timeframe.M1}, commit_time=commit_time,
                first_tick_us=builder.first_tick_us, first_receive_us=first_receive, underlying_price=prices)
        result.bar_updates = len(updates)
        self._commits += 1
        if self._commits == self._settings.ingest_fault_exit_after_commits:
            _fault_exit(self._commits)
        self._pending_events.extend(updates)
        if len(self._pending_events) > _MAX_PENDING_EVENTS:
            drop = len(self._pending_events) - _MAX_PENDING_EVENTS
            log.error("ingest.events_dropped", dropped=drop)
            del self._pending_events[:drop]
        metrics.EVENTS_PENDING.set(len(self._pending_events))
        await events.publish(self._redis, self._pending_events, self._settings.ingest_events_maxlen)
        metrics.EVENTS_PUBLISHED.inc(len(self._pending_events))
        self._pending_events = []
        metrics.EVENTS_PENDING.set(0)
        if dead:
            from services.ingest.store.deadletter import write_dead_letters

            await write_dead_letters(self._redis, dead, self._settings.ingest_deadletter_maxlen)
        await self._maybe_analyze(changed[Timeframe.M1], set(stats_days))
        if self.maintenance_due():
            await self._maintain()
        return result

    async def _read_back(self, conn: asyncpg.Connection, late: set[tuple[str, str, float, int, str]],
                         candidates: set[tuple[str, str, int]]) -> dict[Timeframe, list[Any]]:
        """Republish mode, inside the call's transaction after every write: the stored bars of every timeframe that
        a commit of this call's ticks may have changed, whatever state it ran from (a superset; complete rows).

        - every bar of the (underlying, expiry, bucket) groups of ``candidates`` (the 1M buckets of the call's rows
          and of its index ticks' listed expiries, see :meth:`_derive`), at each timeframe's bucket: the written
          bars, their rollups and the moneyness re-stamps of strikes not in the call;
        - for ``late`` legs (a bucket older than the leg's newest committed bar), the leg's bars from that bucket to
          the end of its session (UTC day): what the late-tick recompute of day volume, volume and ΔOI, and the
          rollups of those bars, may have changed. A first processing ran from an older state, so its late legs are
          a subset of these.
        """
        out: dict[Timeframe, list[Any]] = {}
        for tf in Timeframe:
            sec = tf.seconds
            groups = sorted({(u, e, b - b % sec) for u, e, b in candidates})
            start: dict[tuple[str, str, float, int], int] = {}
            for u, e, s, b, _side in late:
                k = (u, e, s, (b // B.DAY_S + 1) * B.DAY_S)
                f = b - b % sec
                if f < start.get(k, f + 1):
                    start[k] = f
            ranges = sorted((u, e, s, f, end) for (u, e, s, end), f in start.items())
            out[tf] = list(await store.read_bars(conn, tf, _columns(groups), _columns(ranges)))
        return out

    async def _maybe_analyze(self, rows_1m: list[Any], analyzed: Collection[int] = ()) -> None:
        """ANALYZE a day's partitions when the 1M rows written to it since the last ANALYZE doubled (from 500 rows
        on): keeps the rollup plans on the primary key. Best effort (errors logged). ``analyzed``: days whose
        partitions got statistics inside this call (:func:`store.analyze_if_never`): counted as analyzed now."""
        per_bucket: dict[dt.datetime, int] = {}
        for r in rows_1m:
            bt = r[3]
            per_bucket[bt] = per_bucket.get(bt, 0) + 1
        counts: dict[int, int] = {}
        for bt, n in per_bucket.items():
            d = int(bt.timestamp()) // B.DAY_S
            counts[d] = counts.get(d, 0) + n
        for d, n in counts.items():
            st = self._day_rows.setdefault(d, [0, 0])
            st[0] += n
            if d in analyzed:
                st[1] = st[0]
            if st[0] >= 500 and st[0] >= 2 * st[1] and (self._analyze_task is None or self._analyze_task.done()):
                st[1] = st[0]
                # In the background, on its own connection: ANALYZE does not block writes, nor this call.
                self._analyze_task = asyncio.create_task(self._analyze(_day_to_date(d)))

    async def _analyze(self, day: dt.date) -> None:
        try:
            async with self._pool.acquire() as conn:
                await store.analyze_day(conn, day)
        except Exception as e:  # best effort
            log.warning("ingest.analyze_failed", error=f"{type(e).__name__}: {e}")

    # -- helpers ---------------------------------------------------------------------------------------------

    def _prune(self) -> None:
        """Bound memory when a new session starts: forget leg states and listed strikes of sessions more than two
        days before it, and index closes older than the retention (late ticks that old take the slow SQL path)."""
        keep_from = self._horizon_s - 2 * B.DAY_S
        self._states = {k: st for k, st in self._states.items() if st.bucket >= keep_from}
        self._listed = B.ListedStrikes({k: v for k, v in self._listed.first.items() if k[2] * B.DAY_S >= keep_from})
        days = max(self._settings.ingest_retention_days, 3)
        self._closes.prune_before(self._horizon_s - days * B.DAY_S)
        self._day_rows = {d: v for d, v in self._day_rows.items() if d * B.DAY_S >= keep_from}


    def _add_with_greeks(self, builder: B.BarBuilder, ticks: list[tuple[market_pb2.OptionTick, int]],
                         closes: B.UnderlyingCloses) -> None:
        """Add option ticks lacking IV or a Greek, computing the missing values (vectorized, one call per batch).
        Spot = the tick's ``underlying_price`` or the index close of its minute (carried forward); IV from LTP when
        absent (Black-76 when ``futures_price`` is given). Values that cannot be computed are stored as NULL."""
        from services.ingest.domain import greeks as G

        n = len(ticks)
        ltp = np.empty(n)
        spot = np.full(n, np.nan)
        strike = np.empty(n)
        t_exp = np.full(n, np.nan)
        now_s = np.empty(n)
        is_call = np.empty(n, dtype=bool)
        fut = np.full(n, np.nan)
        given_iv = np.full(n, np.nan)
        for i, (t, ts_us) in enumerate(ticks):
            ltp[i] = t.ltp
            strike[i] = t.strike
            is_call[i] = t.option_type == _CALL
            now_s[i] = ts_us / 1e6
            if t.HasField("underlying_price"):
                spot[i] = t.underlying_price
            else:
                sec = ts_us // 1_000_000
                p = closes.price_at(t.underlying, sec - sec % 60)
                if p is not None:
                    spot[i] = p
            if t.HasField("futures_price"):
                fut[i] = t.futures_price
            if t.HasField("iv"):
                given_iv[i] = t.iv
            try:
                t_exp[i] = G.expiry_close_epoch(t.expiry)
            except ValueError:
                pass
        t_years = G.time_to_expiry_years(now_s, t_exp)
        r, q = self._settings.iv_rate, self._settings.iv_dividend_yield
        iv, delta, gamma, theta, vega = G.compute_iv_and_greeks(ltp, spot, strike, t_years, is_call, r, q,
                                                                 futures=fut)
        # A computed IV above the validation bound (500 %) is stored as NULL: on expiry afternoons T → 0 makes the
        # solver's exact answer (up to ~4,800 % on 18 Aug 2026) meaningless for charts. The Greeks are kept.
        iv = np.where(iv > 500.0, np.nan, iv)
        has_iv = ~np.isnan(given_iv)
        if has_iv.any():  # Greeks from the feed's IV where it gave one
            g = G.greeks(spot, strike, t_years, given_iv / 100.0, is_call, r, q, futures=fut)
            iv = np.where(has_iv, given_iv, iv)
            delta, gamma = np.where(has_iv, g["delta"], delta), np.where(has_iv, g["gamma"], gamma)
            theta, vega = np.where(has_iv, g["theta"], theta), np.where(has_iv, g["vega"], vega)
        metrics.GREEKS_COMPUTED.inc(n)

        def val(t: market_pb2.OptionTick, name: str, arr: np.ndarray, i: int) -> float | None:
            if t.HasField(name):
                return float(getattr(t, name))
            x = float(arr[i])
            return None if math.isnan(x) else x

        for i, (t, ts_us) in enumerate(ticks):
            builder.add_option(t.underlying, t.expiry, t.strike, t.option_type == _CALL, ts_us, t.ltp, t.volume,
                               t.oi, val(t, "iv", iv, i), val(t, "delta", delta, i), val(t, "gamma", gamma, i),
                               val(t, "theta", theta, i), val(t, "vega", vega, i))

    async def _rollups(self, conn: asyncpg.Connection, changed: dict[Timeframe, list[Any]],
                       closes: B.UnderlyingCloses, listed: B.ListedStrikes,
                       refresh_candidates: set[tuple[str, str, int]], touched: list[str],
                       stats_days: Sequence[int] = (), newest: dict[str, int] | None = None) -> dict[str, int]:
        """In the call's transaction: 5M from the changed 1M rows, 15M from 5M, 1H from 15M, the moneyness re-stamp
        of every timeframe, and the writer-version bump (returned). Appends the changed rows to ``changed``.
        ``stats_days``: UTC days whose 5M/15M partitions get statistics (when they have none) before the next
        rollup reads them. ``newest``: newest committed 1M bucket per underlying before this call (default: as of
        this process' last commit)."""
        src = changed[Timeframe.M1]
        for tf in ROLLUPS:
            if not src:
                break
            src = changed[tf] = list(await store.rollup(conn, tf, self._rollup_groups(src, tf, closes, listed)))
            if tf != Timeframe.H1:
                for d in stats_days:
                    await store.analyze_if_never(conn, tf, _day_to_date(d))
        for tf in Timeframe:
            groups = self._refresh_groups(tf, refresh_candidates, closes, listed,
                                          self._newest if newest is None else newest)
            if groups[0]:
                changed[tf].extend(await store.refresh_moneyness(conn, tf, groups))
        return await store.bump_versions(conn, touched) if touched else {}

    def _derive(self, builder: B.BarBuilder, state_of: Any, closes: B.UnderlyingCloses,
                listed: B.ListedStrikes) -> tuple[dict[tuple[str, str, float, int], list[B.LegBar | None]],
                                                  dict[B.LegKey, B.LegState], set[tuple[str, str, float, int, str]],
                                                  list[list[Any]], set[tuple[str, str, int]]]:
        """Leg bars of the call from the per-leg states (``state_of(key)``): (rows by (u, expiry, strike, bucket),
        new states, late legs (u, expiry, strike, bucket, side), 1M upsert rows (see :meth:`_bar_rows`), moneyness
        refresh candidates)."""
        rows: dict[tuple[str, str, float, int], list[B.LegBar | None]] = {}
        new_states: dict[B.LegKey, B.LegState] = {}
        late: set[tuple[str, str, float, int, str]] = set()
        for key, bks in builder.legs.items():
            leg_bars, st = B.derive_leg(bks, state_of(key), self._horizon_s)
            if st is not None:
                new_states[key] = st
            u, e, s, is_call = key
            i = 0 if is_call else 1
            for b, lb in leg_bars.items():
                slot = rows.get((u, e, s, b))
                if slot is None:
                    slot = rows[(u, e, s, b)] = [None, None]
                slot[i] = lb
                if lb.late:
                    late.add((u, e, s, b, "ce" if is_call else "pe"))
        arrays = self._bar_rows(rows, closes, listed)
        # (underlying, expiry, 1M bucket) whose index close or listed strikes may have changed: every bar of their
        # buckets (all timeframes) is re-stamped when the underlying close / ATM differs from the committed state.
        refresh_candidates = {(u, e, b) for (u, e, _s, b) in rows}
        for u, ubars in builder.underlying.items():
            expiries = listed.expiries(u)
            for b in ubars:
                sess = b // B.DAY_S
                refresh_candidates.update((u, e, b) for e, d in expiries if d == sess)
        return rows, new_states, late, arrays, refresh_candidates

    async def _reload(self, conn: asyncpg.Connection, stale: list[str], builder: B.BarBuilder,
                      closes: B.UnderlyingCloses, listed: B.ListedStrikes) -> dict[B.LegKey, B.LegState]:
        """Another writer committed for ``stale`` underlyings since this process' last commit: reload the states of
        the legs this call touches, and merge that writer's index closes and listed strikes into the pending
        ``closes`` / ``listed`` (which are this call's private copies)."""
        days = builder.dates()
        since = (min(days) - 1) * B.DAY_S if days else 0
        since = min(since, self._horizon_s - B.DAY_S) if self._horizon_s else since
        stale_set = set(stale)
        out: dict[B.LegKey, B.LegState] = {}
        legs = sorted({(u, e, s) for (u, e, s, _c) in builder.legs if u in stale_set})
        for side in store.SIDES:
            is_call = side == "ce"
            recs = await store.load_leg_states_for(conn, side, legs, max(since, 0)) if legs else []
            for r in sorted(recs, key=lambda r: -int(r["rn"])):
                key = (r["underlying"], r["expiry"], float(r["strike"]), is_call)
                st = B.LegState(int(r["bucket_s"]), int(r["close_us"]), int(r["oi"] or 0), int(r["day_volume"] or 0))
                prev = out.get(key)
                if prev is not None:
                    st.prior_bucket, st.prior_oi, st.prior_day_volume = prev.bucket, prev.oi, prev.day_volume
                out[key] = st
        for u in stale:
            for r in await store.load_underlying_closes_for(conn, u, max(since, 0)):
                closes.merge(u, int(r["bucket_s"]), int(r["close_us"]), float(r["close"]))
            recs = await store.load_listed_strikes_for(conn, u, max(since, 0))
            for k in {(u, r["expiry"], int(r["first_s"]) // B.DAY_S) for r in recs}:
                listed.first[k] = dict(listed.first.get(k, {}))  # private copy before observing
            for r in recs:
                listed.observe(u, r["expiry"], float(r["strike"]), int(r["first_s"]))
        return out

    def _bar_rows(self, rows: dict[tuple[str, str, float, int], list[B.LegBar | None]],
                  closes: B.UnderlyingCloses, listed: B.ListedStrikes) -> list[list[Any]]:
        """Input rows of the 1M upsert: the 37 columns of ``store.pg._upsert_1m_sql`` per (underlying, expiry,
        strike, bucket)."""
        atm_memo: dict[tuple[str, str, int], tuple[float | None, float | None]] = {}
        #: (strike, ATM, step) → moneyness level (a pure function of the three; most rows share a few ATMs).
        lvl_memo: dict[tuple[float, float | None, float | None], int | None] = {}
        steps = self._steps
        none15 = [None] * 15
        out: list[list[Any]] = []
        append = out.append
        for (u, e, s, b), (ce, pe) in rows.items():
            m = atm_memo.get((u, e, b))
            if m is None:
                uc = closes.price_at(u, b)
                m = atm_memo[(u, e, b)] = (uc, listed.atm(u, e, b, uc))
            step = steps.get(u)
            lk = (s, m[1], step)
            if lk in lvl_memo:
                lvl = lvl_memo[lk]
            else:
                lvl = lvl_memo[lk] = B.moneyness(s, m[1], step) if step else None
            row = [u, e, s, b, m[0], m[1], lvl]
            if ce is None:
                row += none15
            else:
                row += ce.agg[:12]
                row += (ce.day_volume, ce.volume, ce.oi_change)
            if pe is None:
                row += none15
            else:
                row += pe.agg[:12]
                row += (pe.day_volume, pe.volume, pe.oi_change)
            append(row)
        return out

    async def _upsert_1m(self, conn: asyncpg.Connection, rows: list[list[Any]],
                         newest: dict[str, int]) -> list[Any]:
        """Write the 1M ``rows`` (layout of :meth:`_bar_rows`); returns the changed bars (``store.BAR_COLUMNS``
        order). Rows of buckets after ``newest[u]`` (the newest 1M bucket committed before the call) are almost
        certainly new: they are inserted with ``ON CONFLICT DO NOTHING`` and, being stored exactly as given, not
        read back (in a replay that is every row). The others, and any of those that did exist, go through the
        merge-upsert, which returns the stored (merged) rows."""
        fresh: list[list[Any]] = []
        merge: list[list[Any]] = []
        for r in rows:
            (fresh if r[3] > newest.get(r[0], -1) else merge).append(r)
        out: list[Any] = []
        if fresh:
            keys = {tuple(k) for k in await store.upsert_1m(conn, _columns(fresh), insert_only=True)}
            inserted: list[list[Any]] = []
            for r in fresh:
                (inserted if (r[0], r[1], r[2], r[3]) in keys else merge).append(r)
            out = self._bar_tuples(inserted)
        if merge:
            out.extend(await store.upsert_1m(conn, _columns(merge)))
        return out

    @staticmethod
    def _bar_tuples(rows: list[list[Any]]) -> list[tuple[Any, ...]]:
        """Input rows (layout of :meth:`_bar_rows`) as bar tuples in ``store.BAR_COLUMNS`` order, as the database
        would return them."""
        out: list[tuple[Any, ...]] = []
        append = out.append
        dates: dict[str, dt.date] = {}
        times: dict[int, dt.datetime] = {}
        epoch = _EPOCH
        us = dt.timedelta(microseconds=1)
        for m in rows:
            e = dates.get(m[1])
            if e is None:
                e = dates[m[1]] = dt.date.fromisoformat(m[1])
            bt = times.get(m[3] * 1_000_000)
            if bt is None:
                bt = times[m[3] * 1_000_000] = epoch + m[3] * 1_000_000 * us
            legs: list[Any] = []
            for j in (7, 22):  # ce, pe: open_us, open, high, low, close_us, close, iv..vega, oi, dv, volume, ΔOI
                c_us = m[j + 4]
                if c_us is None:
                    legs += _NONE14
                    continue
                ct = times.get(c_us)
                if ct is None:
                    ct = times[c_us] = epoch + c_us * us
                legs += (m[j + 1], m[j + 2], m[j + 3], m[j + 5], m[j + 6], m[j + 7], m[j + 8], m[j + 9], m[j + 10],
                         m[j + 11], m[j + 14], m[j + 13], m[j + 12], ct)
            append((m[0], e, m[2], bt, m[4], m[5], m[6], *legs))
        return out

    @staticmethod
    def _underlying_arrays(builder: B.BarBuilder) -> list[list[Any]]:
        cols: list[list[Any]] = [[] for _ in range(8)]
        for u, ubars in builder.underlying.items():
            for b, a in ubars.items():
                cols[0].append(u)
                cols[1].append(b)
                cols[2].append(a[0])
                cols[3].append(a[1])
                cols[4].append(a[2])
                cols[5].append(a[3])
                cols[6].append(a[4])
                cols[7].append(a[5])
        return cols

    def _expiry_str(self, d: dt.date) -> str:
        s = self._expiry_text.get(d)
        if s is None:
            s = self._expiry_text[d] = d.isoformat()
        return s

    def _rollup_groups(self, src_rows: list[Any], tf: Timeframe, closes: B.UnderlyingCloses,
                       listed: B.ListedStrikes) -> list[list[Any]]:
        """Groups (7 arrays) of the ``tf`` rollup touched by the changed ``src_rows``; underlying close = the index
        close of the bucket's last minute (carried forward), ATM among the strikes listed at that minute."""
        keys: set[tuple[str, str, float, int]] = set()
        ts_memo: dict[dt.datetime, int] = {}
        for r in src_rows:
            bt = r[3]
            b = ts_memo.get(bt)
            if b is None:
                b = int(bt.timestamp())
                b = ts_memo[bt] = b - b % tf.seconds
            keys.add((r[0], self._expiry_str(r[1]), r[2], b))
        cols: list[list[Any]] = [[] for _ in range(7)]
        memo: dict[tuple[str, str, int], tuple[float | None, float | None]] = {}
        for u, e, s, b in sorted(keys):
            m = memo.get((u, e, b))
            if m is None:
                last = B.last_minute_of(b, tf)
                uc = closes.price_at(u, last)
                m = memo[(u, e, b)] = (uc, listed.atm(u, e, last, uc))
            step = self._steps.get(u)
            cols[0].append(u)
            cols[1].append(e)
            cols[2].append(s)
            cols[3].append(b)
            cols[4].append(m[0])
            cols[5].append(m[1])
            cols[6].append(B.moneyness(s, m[1], step) if step else None)
        return cols

    def _refresh_groups(self, tf: Timeframe, candidates: set[tuple[str, str, int]], closes: B.UnderlyingCloses,
                        listed: B.ListedStrikes, newest: dict[str, int]) -> list[list[Any]]:
        """Groups (6 arrays) of ``tf`` buckets whose underlying close or ATM strike (at the bucket's last minute)
        differs between the committed state and ``closes``/``listed``. Buckets that start after ``newest[u]`` (the
        newest 1M bucket committed before this call, -1 when none) are left out: their only rows are the ones this
        call wrote, already stamped with ``closes``/``listed`` (in a replay, almost every bucket of a call)."""
        keys = {(u, e, b - b % tf.seconds) for u, e, b in candidates}
        cols: list[list[Any]] = [[] for _ in range(6)]
        for u, e, b in sorted(keys):
            step = self._steps.get(u)
            if not step or b > newest.get(u, -1):
                continue
            last = B.last_minute_of(b, tf)
            uc = closes.price_at(u, last)
            if uc is None:
                continue
            atm = listed.atm(u, e, last, uc)
            old_uc = self._closes.price_at(u, last)
            if uc == old_uc and atm == self._listed.atm(u, e, last, old_uc):
                continue
            for c, v in zip(cols, (u, e, b, uc, atm, step), strict=True):
                c.append(v)
        return cols

    async def _recompute_late(self, conn: asyncpg.Connection, late: set[tuple[str, str, float, int, str]],
                              changed: dict[Timeframe, list[Any]],
                              late_state_rows: dict[B.LegKey, list[Any]]) -> None:
        """Late ticks: recompute day_volume/volume/oi_change over the whole session of every late leg whose bar
        changed, and re-read those legs' state (two newest bars of their newest session)."""
        changed_keys = {(r[0], self._expiry_str(r[1]), float(r[2]), int(r[3].timestamp()))
                        for r in changed[Timeframe.M1]}
        todo: dict[str, set[tuple[str, str, float, int]]] = {"ce": set(), "pe": set()}
        for u, e, s, b, side in late:
            if (u, e, s, b) in changed_keys:
                todo[side].add((u, e, s, b - b % B.DAY_S))
        for side, legs in todo.items():
            if not legs:
                continue
            ls = sorted(legs)
            rows = await store.recompute_sessions(conn, side, [[x[0] for x in ls], [x[1] for x in ls],
                                                               [x[2] for x in ls], [x[3] for x in ls]])
            changed[Timeframe.M1].extend(rows)
            for u, e, s, _d in ls:
                key = (u, e, s, side == "ce")
                st = self._states.get(key)
                sess = (st.bucket if st is not None else _d) // B.DAY_S * B.DAY_S
                state_rows = list(await store.load_leg_rows(conn, side, u, e, s, sess))
                if state_rows:
                    late_state_rows[key] = state_rows


def _fault_exit(commits: int) -> None:
    """``ingest_fault_exit_after_commits`` (tests only): die like a kill -9 between a commit and its publish."""
    log.error("ingest.fault_exit_after_commit", commits=commits)
    os._exit(70)


def _columns(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Rows (equal lengths) transposed into column lists."""
    return [list(c) for c in zip(*rows, strict=True)]


def _state_from_rows(rows: list[Any]) -> B.LegState:
    """LegState from the (up to) two newest bars of a leg, newest first."""
    r0 = rows[0]
    st = B.LegState(int(r0["bucket_s"]), int(r0["close_us"]), int(r0["oi"] or 0), int(r0["day_volume"] or 0))
    if len(rows) > 1:
        r1 = rows[1]
        st.prior_bucket, st.prior_oi, st.prior_day_volume = int(r1["bucket_s"]), int(r1["oi"] or 0), int(
            r1["day_volume"] or 0)
    return st
