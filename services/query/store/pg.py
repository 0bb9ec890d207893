"""PostgreSQL reads of the query views (asyncpg). Every statement is parameterized; the only identifiers spliced
into SQL are bar table names from ``Timeframe.table`` and leg column names from fixed maps (whitelists).

Connection failures surface as :class:`services.common.errors.Unavailable`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import date, datetime, timedelta
from typing import Any, TypeVar

import asyncpg

from services.common.domain.timeframes import Timeframe
from services.common.errors import Unavailable

T = TypeVar("T")

#: Exceptions that mean "PostgreSQL is unreachable / went away" (as opposed to a bug in a statement).
PG_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.InternalClientError,
)

LEG_COLUMNS = ("open", "high", "low", "close", "iv", "delta", "gamma", "theta", "vega", "oi", "oi_change", "volume",
               "day_volume")
BAR_SELECT = "expiry, strike, bucket_time, underlying_close, atm_strike, moneyness_level, " + ", ".join(
    f"{s}_{c}" for s in ("ce", "pe") for c in LEG_COLUMNS)
_SIDE = {1: "ce", 2: "pe"}
_VALUE_COLS = {1: "close", 2: "iv", 3: "delta", 4: "gamma", 5: "theta", 6: "vega", 7: "oi", 8: "oi_change",
               9: "volume"}


def session_start(bucket: datetime) -> datetime:
    """09:15 IST (03:45 UTC) of the IST trading day containing ``bucket``."""
    ist = bucket + timedelta(hours=5, minutes=30)
    return datetime(ist.year, ist.month, ist.day, 3, 45, tzinfo=bucket.tzinfo)


def ist_date(t: datetime) -> date:
    """IST calendar date of a UTC time."""
    return (t + timedelta(hours=5, minutes=30)).date()


class PgStore:
    """Read queries over the bar tables. ``dsn`` libpq URL; the pool connects lazily (start-up never blocks on
    PostgreSQL) and reconnects by itself after an outage."""

    def __init__(self, dsn: str, max_size: int = 8, connect_timeout: float = 2.0, command_timeout: float = 10.0):
        self._dsn = dsn
        self._max = max_size
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self._dsn, min_size=0, max_size=self._max, timeout=self._connect_timeout,
                        command_timeout=self._command_timeout, max_inactive_connection_lifetime=60.0,
                        statement_cache_size=256)
        return self._pool

    async def close(self) -> None:
        """Close the pool (terminating connections if closing hangs)."""
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 5)
            except PG_DOWN_ERRORS:
                self._pool.terminate()
            self._pool = None

    async def run(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run ``fn(conn)`` on a pooled connection; PostgreSQL outages → Unavailable."""
        try:
            pool = await self._get_pool()
            async with pool.acquire(timeout=self._connect_timeout) as conn:
                return await fn(conn)
        except PG_DOWN_ERRORS as e:
            # The client sees the kind of failure only (no addresses); the cause (``__cause__``) is logged once per
            # outage by the cache.
            raise Unavailable(f"PostgreSQL unavailable: {type(e).__name__}") from e

    # --- snapshot views -------------------------------------------------------------------------------------

    @staticmethod
    async def bucket_at(conn: asyncpg.Connection, u: str, tf: Timeframe,
                        as_of: datetime | None) -> tuple[datetime, float] | None:
        """(bucket start, underlying close) of the newest bucket of ``tf`` at or before ``as_of`` (latest when
        None), from underlying_bars, else from the bar table's underlying_close. None without data."""
        row = await conn.fetchrow(
            "SELECT bucket_time, close FROM underlying_bars WHERE underlying = $1 AND timeframe = $2"
            " AND bucket_time <= coalesce($3::timestamptz, 'infinity') ORDER BY bucket_time DESC LIMIT 1",
            u, int(tf), as_of)
        if row is None:
            row = await conn.fetchrow(
                f"SELECT bucket_time, underlying_close AS close FROM {tf.table} WHERE underlying = $1"
                " AND bucket_time <= coalesce($2::timestamptz, 'infinity') ORDER BY bucket_time DESC LIMIT 1",
                u, as_of)
        return (row["bucket_time"], float(row["close"])) if row else None

    @staticmethod
    async def listed(conn: asyncpg.Connection, u: str, tf: Timeframe, lo: datetime, hi: datetime,
                     expiries: list[date] | None) -> list[asyncpg.Record]:
        """Distinct (expiry, strike) with a bar in (lo, hi] — the strikes "listed" at a bucket."""
        return await conn.fetch(
            f"SELECT DISTINCT expiry, strike FROM {tf.table} WHERE underlying = $1 AND bucket_time > $2"
            " AND bucket_time <= $3 AND ($4::date[] IS NULL OR expiry = ANY($4)) ORDER BY expiry, strike",
            u, lo, hi, expiries)

    @staticmethod
    async def snapshot(conn: asyncpg.Connection, u: str, tf: Timeframe, lo: datetime, hi: datetime,
                       expiries: list[date], strikes: list[float]) -> list[asyncpg.Record]:
        """The newest bar in (lo, hi] of each (expiry, strike) among ``expiries`` × ``strikes``."""
        return await conn.fetch(
            f"SELECT DISTINCT ON (expiry, strike) {BAR_SELECT} FROM {tf.table} WHERE underlying = $1"
            " AND bucket_time > $2 AND bucket_time <= $3 AND expiry = ANY($4) AND strike = ANY($5)"
            " ORDER BY expiry, strike, bucket_time DESC",
            u, lo, hi, expiries, strikes)

    @staticmethod
    async def first_oi(conn: asyncpg.Connection, u: str, expiry: date, strikes: list[float], since: datetime,
                       until: datetime) -> list[asyncpg.Record]:
        """Per strike, the CE and PE OI of the contract's first 1-minute bar in [since, until] (ΔOI base)."""
        return await conn.fetch(
            "SELECT s.strike,"
            " (SELECT ce_oi FROM bars_1m b WHERE b.underlying = $1 AND b.expiry = $2 AND b.strike = s.strike"
            "   AND b.bucket_time >= $4 AND b.bucket_time <= $5 AND ce_oi IS NOT NULL"
            "   ORDER BY b.bucket_time LIMIT 1) AS ce_oi0,"
            " (SELECT pe_oi FROM bars_1m b WHERE b.underlying = $1 AND b.expiry = $2 AND b.strike = s.strike"
            "   AND b.bucket_time >= $4 AND b.bucket_time <= $5 AND pe_oi IS NOT NULL"
            "   ORDER BY b.bucket_time LIMIT 1) AS pe_oi0"
            " FROM unnest($3::float8[]) AS s(strike)",
            u, expiry, strikes, since, until)

    @staticmethod
    async def atm_iv_history(conn: asyncpg.Connection, u: str, expiry: date, since: datetime, until: datetime,
                             current: float) -> asyncpg.Record:
        """min, max, count and count below ``current`` of the ATM IV (mean of CE/PE IV, either alone) of the
        1-minute bars at moneyness level 0 of ``expiry`` in [since, until]."""
        return await conn.fetchrow(
            "WITH h AS (SELECT (coalesce(ce_iv, pe_iv) + coalesce(pe_iv, ce_iv)) / 2 AS v FROM bars_1m"
            " WHERE underlying = $1 AND expiry = $2 AND moneyness_level = 0 AND bucket_time >= $3"
            " AND bucket_time <= $4)"
            " SELECT min(v) AS lo, max(v) AS hi, count(v) AS n, count(v) FILTER (WHERE v < $5) AS below FROM h",
            u, expiry, since, until, current)

    # --- series ---------------------------------------------------------------------------------------------

    @staticmethod
    async def moneyness_series(conn: asyncpg.Connection, u: str, tf: Timeframe, expiries: list[date],
                               indicator: int, side: int, levels: int, start: datetime,
                               end: datetime) -> list[asyncpg.Record]:
        """Per (expiry, stored moneyness_level in −levels..levels): arrays of epoch seconds, values, strikes,
        ascending by time; only bars where the indicator's column is not NULL."""
        col = f"{_SIDE[side]}_{_VALUE_COLS[indicator]}"
        return await conn.fetch(
            "SELECT expiry, moneyness_level AS level,"
            " array_agg(extract(epoch FROM bucket_time)::bigint ORDER BY bucket_time) AS times,"
            f" array_agg({col}::float8 ORDER BY bucket_time) AS vals,"
            " array_agg(strike ORDER BY bucket_time) AS strikes"
            f" FROM {tf.table} WHERE underlying = $1 AND expiry = ANY($2) AND moneyness_level BETWEEN $3 AND $4"
            f" AND bucket_time >= $5 AND bucket_time <= $6 AND {col} IS NOT NULL"
            " GROUP BY expiry, moneyness_level ORDER BY expiry, moneyness_level",
            u, expiries, -levels, levels, start, end)

    @staticmethod
    async def latest_bucket(conn: asyncpg.Connection, u: str, tf: Timeframe) -> datetime | None:
        """Newest bucket start of ``tf`` with option bars (from bars_latest)."""
        return await conn.fetchval(  # type: ignore[no-any-return]
            "SELECT max(bucket_time) FROM bars_latest WHERE underlying = $1 AND timeframe = $2", u, int(tf))

    # --- lists ----------------------------------------------------------------------------------------------

    @staticmethod
    async def expiries(conn: asyncpg.Connection, u: str) -> list[date]:
        """Expiries with any retained bar of ``u`` (from bars_latest), ascending."""
        rows = await conn.fetch("SELECT DISTINCT expiry FROM bars_latest WHERE underlying = $1 ORDER BY 1", u)
        return [r["expiry"] for r in rows]

    @staticmethod
    async def underlyings(conn: asyncpg.Connection, names: list[str]) -> list[asyncpg.Record]:
        """Per configured underlying with data: the latest 1M bucket and close (underlying_bars, else bars_latest)."""
        return await conn.fetch(
            "SELECT n.u AS underlying, coalesce(ub.bucket_time, bl.bucket_time) AS bucket_time,"
            " coalesce(ub.close, bl.underlying_close) AS price FROM unnest($1::text[]) AS n(u)"
            " LEFT JOIN LATERAL (SELECT bucket_time, close FROM underlying_bars WHERE underlying = n.u"
            "   AND timeframe = 1 ORDER BY bucket_time DESC LIMIT 1) ub ON TRUE"
            " LEFT JOIN LATERAL (SELECT bucket_time, underlying_close FROM bars_latest WHERE underlying = n.u"
            "   AND timeframe = 1 ORDER BY bucket_time DESC LIMIT 1) bl ON TRUE"
            " WHERE ub.bucket_time IS NOT NULL OR bl.bucket_time IS NOT NULL ORDER BY 1",
            names)

    @staticmethod
    async def contract_bars(conn: asyncpg.Connection, u: str, tf: Timeframe, expiry: date, strike: float,
                            side: int, after: datetime | None, start: datetime, end: datetime,
                            limit: int) -> Any:
        """Up to ``limit`` bars of one contract in [start, end] (strictly after ``after`` when set), as one row of
        parallel arrays t, o, h, l, c, v, oi, iv (NULL arrays when none)."""
        s = _SIDE[side]
        # Each aggregate sorts by t: PostgreSQL does not promise to keep a subquery's order through array_agg.
        return await conn.fetchrow(
            "SELECT array_agg(t ORDER BY t) AS t, array_agg(o ORDER BY t) AS o, array_agg(h ORDER BY t) AS h,"
            " array_agg(l ORDER BY t) AS l, array_agg(c ORDER BY t) AS c, array_agg(v ORDER BY t) AS v,"
            " array_agg(oi ORDER BY t) AS oi, array_agg(iv ORDER BY t) AS iv"
            f" FROM (SELECT extract(epoch FROM bucket_time)::bigint AS t, {s}_open AS o, {s}_high AS h,"
            f"  {s}_low AS l, {s}_close AS c, coalesce({s}_volume, 0) AS v, coalesce({s}_oi, 0) AS oi,"
            f"  coalesce({s}_iv, 0) AS iv FROM {tf.table} WHERE underlying = $1 AND expiry = $2 AND strike = $3"
            "  AND bucket_time >= $4 AND bucket_time <= $5"
            "  AND bucket_time > coalesce($6::timestamptz, '-infinity'::timestamptz)"
            f"  AND {s}_close IS NOT NULL ORDER BY bucket_time LIMIT $7) b",
            u, expiry, strike, start, end, after, limit)

    @staticmethod
    async def underlying_bars(conn: asyncpg.Connection, u: str, tf: Timeframe, after: datetime | None,
                              start: datetime, end: datetime, limit: int) -> Any:
        """As :meth:`contract_bars` for the underlying's own bars (v, oi, iv are zeros)."""
        return await conn.fetchrow(
            "SELECT array_agg(t ORDER BY t) AS t, array_agg(o ORDER BY t) AS o, array_agg(h ORDER BY t) AS h,"
            " array_agg(l ORDER BY t) AS l, array_agg(c ORDER BY t) AS c"
            " FROM (SELECT extract(epoch FROM bucket_time)::bigint AS t, open AS o, high AS h, low AS l, close AS c"
            "  FROM underlying_bars WHERE underlying = $1 AND timeframe = $2"
            "  AND bucket_time >= $3 AND bucket_time <= $4"
            "  AND bucket_time > coalesce($5::timestamptz, '-infinity'::timestamptz)"
            "  ORDER BY bucket_time LIMIT $6) b",
            u, int(tf), start, end, after, limit)
