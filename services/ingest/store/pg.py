"""PostgreSQL adapter of the ingest pipeline (asyncpg): batched, idempotent bar upserts, exact rollups, latest
snapshot, underlying bars, partitions, retention and crash-recovery reads.

Every write is a set-based statement fed with column arrays (``unnest``), so one statement per table handles a whole
batch. Upserts merge instead of overwrite (open by earliest ``*_open_time``, high/low by GREATEST/LEAST, close and
the close-time values by latest ``*_close_time``, day volume by GREATEST), and touch a row only when a value really
changes (``ON CONFLICT .. DO UPDATE .. WHERE ROW(new) IS DISTINCT FROM ROW(old)``): replaying the same ticks gives
identical rows, and ``RETURNING`` yields exactly the changed bars (what the BarUpdate events carry).

Rollups are recomputed from the sub-bars of each touched bucket inside the same transaction:
5M from 1M, 15M from 5M, 1H from 15M (the aggregation — first, last, max, min, sum — is associative, so this equals
aggregating the 1M bars directly; ``tests/integration/test_ingest_rollup*.py`` checks it against an independent
aggregation of the CSV).

Times passed in: bucket starts as epoch seconds (int8), exchange times as epoch microseconds (int8).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from typing import Any

import asyncpg

from services.common.domain.timeframes import Timeframe


class DatabaseUnavailable(Exception):
    """PostgreSQL is unreachable (connection refused/lost, server shutting down, pool closed): nothing of the call
    was committed. Retry later."""


#: Exceptions meaning "the database is not reachable" rather than "the statement is wrong".
_CONN_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ConnectionError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.ConnectionFailureError,
)


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means PostgreSQL cannot be reached (as opposed to a bug or a constraint error)."""
    return isinstance(exc, _CONN_ERRORS)


#: Per-leg columns, in table order, plus the open time added by migration 0002.
LEG_FIELDS = ("open", "high", "low", "close", "iv", "delta", "gamma", "theta", "vega", "oi", "oi_change", "volume",
              "day_volume", "close_time")
#: The "at close" fields: taken from the latest tick / sub-bar.
CLOSE_FIELDS = ("close", "iv", "delta", "gamma", "theta", "vega", "oi", "close_time")
SIDES = ("ce", "pe")
#: Columns of every bar table (and of bars_latest besides ``timeframe``), without updated_at and open times.
BAR_COLUMNS = ("underlying", "expiry", "strike", "bucket_time", "underlying_close", "atm_strike", "moneyness_level",
               *[f"{s}_{f}" for s in SIDES for f in LEG_FIELDS])
_VALUE_COLUMNS = [c for c in BAR_COLUMNS if c not in ("underlying", "expiry", "strike", "bucket_time")]
_ALL_COLUMNS = (*BAR_COLUMNS, "ce_open_time", "pe_open_time")

_RETURNING = ", ".join(BAR_COLUMNS)


def _ts(expr: str) -> str:
    """SQL turning epoch microseconds (int8) into timestamptz, exactly."""
    return f"('epoch'::timestamptz + ({expr}) * interval '1 microsecond')"


def _latest_cte(tf: Timeframe, src: str) -> str:
    cols = ", ".join(BAR_COLUMNS)
    sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in BAR_COLUMNS if c not in ("underlying", "expiry", "strike"))
    src_cols = ", ".join(f"{c}" if c != "underlying" else "underlying" for c in BAR_COLUMNS)
    # The newest row per contract: ``src`` is the output of one statement on a table keyed by (underlying, expiry,
    # strike, bucket_time), so each contract's newest bucket is one row. A hashed max over the four narrow key
    # columns and a hashed semi-join cost a fraction of sorting the wide rows (DISTINCT ON).
    return (
        f"lat AS (INSERT INTO bars_latest AS l (timeframe, {cols}) "
        f"SELECT {int(tf)}::smallint, {src_cols} FROM {src} "
        f"WHERE (underlying, expiry, strike, bucket_time) IN (SELECT underlying, expiry, strike, max(bucket_time) "
        f"FROM {src} GROUP BY underlying, expiry, strike) "
        f"ON CONFLICT (underlying, timeframe, expiry, strike) DO UPDATE SET {sets}, updated_at = now() "
        f"WHERE EXCLUDED.bucket_time >= l.bucket_time)"
    )


#: Per-side arguments of the 1M upsert: (name, SQL array type).
_SIDE_ARRAYS = (("open_us", "int8[]"), ("open", "float8[]"), ("high", "float8[]"), ("low", "float8[]"),
                ("close_us", "int8[]"), ("close", "float8[]"), ("iv", "float8[]"), ("delta", "float8[]"),
                ("gamma", "float8[]"), ("theta", "float8[]"), ("vega", "float8[]"), ("oi", "int8[]"),
                ("day_volume", "int8[]"), ("volume", "int8[]"), ("oi_change", "int8[]"))


def _upsert_1m_arg_types() -> list[str]:
    """SQL array types of the 37 arguments of the 1M upsert, in order."""
    return ["text[]", "text[]", "float8[]", "int8[]", "float8[]", "float8[]", "int4[]",
            *[t for _s in SIDES for _n, t in _SIDE_ARRAYS]]


#: Input columns of the 1M upsert sent as rows of the 2-D float8 / int8 parameter ($3 / $4), in row order.
_UPSERT_1M_FLOAT_ROWS = [i for i, t in enumerate(_upsert_1m_arg_types()) if t == "float8[]"]
_UPSERT_1M_INT_ROWS = [i for i, t in enumerate(_upsert_1m_arg_types()) if i >= 2 and t != "float8[]"]


def _upsert_1m_sql(insert_only: bool = False) -> str:
    """The 1M merge-upsert (``insert_only``: insert of the new bars only) of 37 input columns: underlying, expiry
    (text), strike, bucket (epoch s), underlying_close, atm_strike, moneyness_level; then per side (ce, pe) 15
    columns: open_us, open, high, low, close_us, close, iv, delta, gamma, theta, vega, oi (the layout of a
    ``domain.bars`` leg aggregate), day_volume, volume, oi_change. They travel as 4 parameters (see
    :func:`upsert_1m`): $1 underlying and $2 expiry as text array literals, $3 every float column as the rows of one
    2-D float8 array, $4 every integer column as the rows of one 2-D int8 array (both binary; each column is
    unnested from its row slice).

    The merge returns the changed rows (columns :data:`BAR_COLUMNS`). ``insert_only`` leaves bars that already exist
    untouched (``ON CONFLICT DO NOTHING``) and returns only the keys of the inserted ones (underlying, expiry text,
    strike, bucket epoch s): they are stored exactly as given, so the caller need not read them back."""
    arr_types = _upsert_1m_arg_types()
    names = ["u", "e", "s", "b", "uc", "atm", "lvl"] + [f"{s}_{n}" for s in SIDES for n, _t in _SIDE_ARRAYS]
    # Numbers travel in asyncpg's binary format (exact IEEE doubles; no decimal formatting and parsing). One 2-D
    # array per type rather than one array per column: asyncpg checks every element of a 1-D array for being a
    # nested array (an ABC isinstance, ~0.15 µs), but only the first row of a 2-D one.
    args = []
    for i, t in enumerate(arr_types):
        if i < 2:
            args.append(f"${i + 1}::text::{t}")
        elif t == "float8[]":
            k = _UPSERT_1M_FLOAT_ROWS.index(i) + 1
            args.append(f"($3::float8[])[{k}:{k}]")
        else:
            k = _UPSERT_1M_INT_ROWS.index(i) + 1
            args.append(f"($4::int8[])[{k}:{k}]" + ("::int4[]" if t == "int4[]" else ""))
    params = ", ".join(args)
    select = ["n.u", "n.e::date", "n.s", "to_timestamp(n.b)", "n.uc", "n.atm", "n.lvl"]
    for s in SIDES:
        for f in LEG_FIELDS:
            select.append(_ts(f"n.{s}_close_us") if f == "close_time" else f"n.{s}_{f}")
    for s in SIDES:
        select.append(_ts(f"n.{s}_open_us"))
    merged: dict[str, str] = {
        "underlying_close": "COALESCE(EXCLUDED.underlying_close, o.underlying_close)",
        "atm_strike": "COALESCE(EXCLUDED.atm_strike, o.atm_strike)",
        "moneyness_level": "COALESCE(EXCLUDED.moneyness_level, o.moneyness_level)",
    }
    for s in SIDES:
        newer_open = (f"(EXCLUDED.{s}_open_time IS NOT NULL AND (o.{s}_open_time IS NULL "
                      f"OR EXCLUDED.{s}_open_time < o.{s}_open_time))")
        newer_close = (f"(EXCLUDED.{s}_close_time IS NOT NULL AND (o.{s}_close_time IS NULL "
                       f"OR EXCLUDED.{s}_close_time >= o.{s}_close_time))")
        merged[f"{s}_open"] = f"CASE WHEN {newer_open} THEN EXCLUDED.{s}_open ELSE o.{s}_open END"
        merged[f"{s}_open_time"] = f"CASE WHEN {newer_open} THEN EXCLUDED.{s}_open_time ELSE o.{s}_open_time END"
        merged[f"{s}_high"] = f"GREATEST(o.{s}_high, EXCLUDED.{s}_high)"
        merged[f"{s}_low"] = f"LEAST(o.{s}_low, EXCLUDED.{s}_low)"
        for f in CLOSE_FIELDS:
            merged[f"{s}_{f}"] = f"CASE WHEN {newer_close} THEN EXCLUDED.{s}_{f} ELSE o.{s}_{f} END"
        merged[f"{s}_day_volume"] = f"GREATEST(o.{s}_day_volume, EXCLUDED.{s}_day_volume)"
        merged[f"{s}_volume"] = f"COALESCE(EXCLUDED.{s}_volume, o.{s}_volume)"
        merged[f"{s}_oi_change"] = f"COALESCE(EXCLUDED.{s}_oi_change, o.{s}_oi_change)"
    sets = ", ".join(f"{c} = {e}" for c, e in merged.items())
    new_row = ", ".join(merged.values())
    old_row = ", ".join(f"o.{c}" for c in merged)
    if insert_only:
        conflict = "DO NOTHING"
        result = "SELECT underlying, expiry::text, strike, extract(epoch FROM bucket_time)::int8 FROM up"
    else:
        conflict = (f"DO UPDATE SET {sets}, updated_at = now() "
                    f"WHERE ROW({new_row}) IS DISTINCT FROM ROW({old_row})")
        result = "SELECT * FROM up"
    return (
        f"WITH n AS (SELECT * FROM unnest({params}) AS n({', '.join(names)})), "
        f"up AS (INSERT INTO bars_1m AS o ({', '.join(_ALL_COLUMNS)}) SELECT {', '.join(select)} FROM n "
        f"ON CONFLICT (underlying, expiry, strike, bucket_time) {conflict} RETURNING {_RETURNING}), "
        f"{_latest_cte(Timeframe.M1, 'up')} {result}"
    )


def _rollup_sql(tf: Timeframe, src: Timeframe) -> str:
    """Recompute ``tf`` bars of the given groups from the ``src`` bars they contain. $1..$7 = underlying, expiry
    (text), strike, bucket (epoch s), underlying_close, atm_strike, moneyness_level.

    Each group reads its sub-bars with one PK index range scan (a LATERAL subquery, so the plan is a nested loop
    whatever the statistics) in bucket order; first/last values are taken from arrays aggregated in that order."""
    inner: list[str] = []
    outer: list[str] = []
    for s in SIDES:
        has = f"FILTER (WHERE m.{s}_close_time IS NOT NULL)"
        inner.append(f"count(*) {has} AS {s}_n")
        for f in LEG_FIELDS:
            col = f"{s}_{f}"
            if f == "high":
                inner.append(f"max(m.{col}) AS {col}")
                outer.append(f"a.{col}")
            elif f == "low":
                inner.append(f"min(m.{col}) AS {col}")
                outer.append(f"a.{col}")
            elif f in ("volume", "oi_change"):
                inner.append(f"sum(m.{col})::bigint AS {col}")
                outer.append(f"a.{col}")
            elif f == "close_time":
                inner.append(f"max(m.{col}) AS {col}")
                outer.append(f"a.{col}")
            elif f == "open":
                inner.append(f"array_agg(m.{col}) {has} AS {col}")
                outer.append(f"a.{col}[1] AS {col}")
            else:  # close, iv, Greeks, oi, day_volume: the last sub-bar with data for the leg
                inner.append(f"array_agg(m.{col}) {has} AS {col}")
                outer.append(f"a.{col}[a.{s}_n] AS {col}")
        inner.append(f"min(m.{s}_open_time) AS {s}_open_time")
        outer.append(f"a.{s}_open_time")
    cols = ", ".join(_ALL_COLUMNS)
    val_cols = (*_VALUE_COLUMNS, "ce_open_time", "pe_open_time")
    sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in val_cols)
    all_src_cols = ", ".join(f"m.{c}" for c in _ALL_COLUMNS)
    return (
        "WITH g AS (SELECT u, e::date AS e, s, to_timestamp(b) AS lo, to_timestamp(b + "
        f"{tf.seconds}) AS hi, uc, atm, lvl FROM unnest($1::text[], $2::text[], $3::float8[], $4::int8[], "
        "$5::float8[], $6::float8[], $7::int4[]) AS g(u, e, s, b, uc, atm, lvl)), "
        f"agg AS (SELECT g.u AS underlying, g.e AS expiry, g.s AS strike, g.lo AS bucket_time, "
        f"g.uc AS underlying_close, g.atm AS atm_strike, g.lvl AS moneyness_level, {', '.join(outer)} "
        f"FROM g CROSS JOIN LATERAL (SELECT {', '.join(inner)} FROM (SELECT {all_src_cols} FROM {src.table} m "
        f"WHERE m.underlying = g.u AND m.expiry = g.e AND m.strike = g.s AND m.bucket_time >= g.lo "
        f"AND m.bucket_time < g.hi ORDER BY m.underlying, m.expiry, m.strike, m.bucket_time) m) a "
        f"WHERE a.ce_n + a.pe_n > 0), "
        f"up AS (INSERT INTO {tf.table} AS o ({cols}) SELECT {cols} FROM agg "
        f"ON CONFLICT (underlying, expiry, strike, bucket_time) DO UPDATE SET {sets}, updated_at = now() "
        f"WHERE ROW({', '.join('o.' + c for c in val_cols)}) IS DISTINCT FROM "
        f"ROW({', '.join('EXCLUDED.' + c for c in val_cols)}) RETURNING {_RETURNING}), "
        f"{_latest_cte(tf, 'up')} SELECT * FROM up"
    )


def _recompute_sql(side: str) -> str:
    """Recompute day_volume (running max), volume and oi_change of one side over whole sessions of the given legs
    ($1 underlying, $2 expiry text, $3 strike, $4 session start epoch s). Used after late ticks."""
    s = side
    return (
        "WITH k AS (SELECT DISTINCT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::int8[]) AS k(u, e, s, d)), "
        f"w AS (SELECT m.underlying, m.expiry, m.strike, m.bucket_time, m.{s}_oi AS oi, "
        f"max(m.{s}_day_volume) OVER win AS dv, lag(m.{s}_oi) OVER win AS prev_oi "
        f"FROM k JOIN bars_1m m ON m.underlying = k.u AND m.expiry = k.e::date AND m.strike = k.s "
        f"AND m.bucket_time >= to_timestamp(k.d) AND m.bucket_time < to_timestamp(k.d + 86400) "
        f"AND m.{s}_close_time IS NOT NULL "
        f"WINDOW win AS (PARTITION BY m.underlying, m.expiry, m.strike ORDER BY m.bucket_time)), "
        f"w2 AS (SELECT underlying, expiry, strike, bucket_time, dv, "
        f"dv - COALESCE(lag(dv) OVER (PARTITION BY underlying, expiry, strike ORDER BY bucket_time), 0) AS vol, "
        f"COALESCE(oi - prev_oi, 0) AS oic FROM w), "
        f"up AS (UPDATE bars_1m o SET {s}_day_volume = w2.dv, {s}_volume = w2.vol, {s}_oi_change = w2.oic, "
        f"updated_at = now() FROM w2 WHERE o.underlying = w2.underlying AND o.expiry = w2.expiry "
        f"AND o.strike = w2.strike AND o.bucket_time = w2.bucket_time "
        f"AND ROW(o.{s}_day_volume, o.{s}_volume, o.{s}_oi_change) IS DISTINCT FROM ROW(w2.dv, w2.vol, w2.oic) "
        f"RETURNING {', '.join('o.' + c for c in BAR_COLUMNS)}), "
        f"{_latest_cte(Timeframe.M1, 'up')} SELECT * FROM up"
    )


_UNDERLYING_1M_SQL = (
    "WITH n AS (SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::float8[], $5::float8[], $6::float8[], "
    "$7::int8[], $8::float8[]) AS n(u, b, open_us, open, high, low, close_us, close)) "
    "INSERT INTO underlying_bars AS o (underlying, timeframe, bucket_time, open, high, low, close, close_time, "
    f"open_time) SELECT n.u, 1, to_timestamp(n.b), n.open, n.high, n.low, n.close, {_ts('n.close_us')}, "
    f"{_ts('n.open_us')} FROM n "
    "ON CONFLICT (underlying, timeframe, bucket_time) DO UPDATE SET "
    "open = CASE WHEN o.open_time IS NULL OR EXCLUDED.open_time < o.open_time THEN EXCLUDED.open ELSE o.open END, "
    "open_time = LEAST(o.open_time, EXCLUDED.open_time), "
    "high = GREATEST(o.high, EXCLUDED.high), low = LEAST(o.low, EXCLUDED.low), "
    "close = CASE WHEN EXCLUDED.close_time >= o.close_time THEN EXCLUDED.close ELSE o.close END, "
    "close_time = GREATEST(o.close_time, EXCLUDED.close_time), updated_at = now() "
    "WHERE ROW(CASE WHEN o.open_time IS NULL OR EXCLUDED.open_time < o.open_time THEN EXCLUDED.open ELSE o.open END, "
    "LEAST(o.open_time, EXCLUDED.open_time), GREATEST(o.high, EXCLUDED.high), LEAST(o.low, EXCLUDED.low), "
    "CASE WHEN EXCLUDED.close_time >= o.close_time THEN EXCLUDED.close ELSE o.close END, "
    "GREATEST(o.close_time, EXCLUDED.close_time)) IS DISTINCT FROM ROW(o.open, o.open_time, o.high, o.low, o.close, "
    "o.close_time) RETURNING underlying, bucket_time, close, close_time"
)

_UNDERLYING_ROLLUP_SQL = (
    "WITH g AS (SELECT * FROM unnest($1::text[], $2::int8[]) AS g(u, b)), "
    "agg AS (SELECT g.u, to_timestamp(g.b) AS bucket_time, (array_agg(m.open ORDER BY m.bucket_time))[1] AS open, "
    "max(m.high) AS high, min(m.low) AS low, (array_agg(m.close ORDER BY m.bucket_time DESC))[1] AS close, "
    "max(m.close_time) AS close_time, min(m.open_time) AS open_time FROM g JOIN underlying_bars m "
    "ON m.underlying = g.u AND m.timeframe = 1 AND m.bucket_time >= to_timestamp(g.b) "
    "AND m.bucket_time < to_timestamp(g.b + $3::int8) GROUP BY g.u, g.b) "
    "INSERT INTO underlying_bars AS o (underlying, timeframe, bucket_time, open, high, low, close, close_time, "
    "open_time) SELECT u, $4::smallint, bucket_time, open, high, low, close, close_time, open_time FROM agg "
    "ON CONFLICT (underlying, timeframe, bucket_time) DO UPDATE SET open = EXCLUDED.open, high = EXCLUDED.high, "
    "low = EXCLUDED.low, close = EXCLUDED.close, close_time = EXCLUDED.close_time, open_time = EXCLUDED.open_time, "
    "updated_at = now() WHERE ROW(o.open, o.high, o.low, o.close, o.close_time, o.open_time) IS DISTINCT FROM "
    "ROW(EXCLUDED.open, EXCLUDED.high, EXCLUDED.low, EXCLUDED.close, EXCLUDED.close_time, EXCLUDED.open_time) "
    "RETURNING underlying"
)

UPSERT_1M_SQL = _upsert_1m_sql()
INSERT_1M_SQL = _upsert_1m_sql(insert_only=True)
ROLLUP_SQL = {Timeframe.M5: _rollup_sql(Timeframe.M5, Timeframe.M1),
              Timeframe.M15: _rollup_sql(Timeframe.M15, Timeframe.M5),
              Timeframe.H1: _rollup_sql(Timeframe.H1, Timeframe.M15)}
RECOMPUTE_SQL = {s: _recompute_sql(s) for s in SIDES}


def pg_array(values: Sequence[Any], text: bool = False) -> str:
    """A PostgreSQL array literal of numbers (``str`` of an int/float round-trips exactly; None → NULL) or, with
    ``text``, of double-quoted strings."""
    if text:  # few distinct values (underlyings, expiries): quote each once
        quoted = {v: "NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
                  for v in set(values)}
        return "{" + ",".join(map(quoted.__getitem__, values)) + "}"
    # str(None) is "None", and no number's str contains it: one C-level join, then NULLs in one pass.
    return "{" + ",".join(map(str, values)).replace("None", "NULL") + "}"


async def upsert_1m(conn: asyncpg.Connection, arrays: Sequence[Sequence[Any]],
                    insert_only: bool = False) -> list[asyncpg.Record]:
    """Merge-upsert 1-minute bars (37 column arrays as documented on :func:`_upsert_1m_sql`) and bars_latest;
    returns the changed rows (columns :data:`BAR_COLUMNS`). ``insert_only``: insert the bars that do not exist yet,
    leave the others untouched, and return the keys ``(underlying, expiry text, strike, bucket_s)`` of the inserted
    ones (each stored exactly as given)."""
    if not arrays or not arrays[0]:
        return []
    return await conn.fetch(INSERT_1M_SQL if insert_only else UPSERT_1M_SQL, pg_array(arrays[0], True),
                            pg_array(arrays[1], True), [list(arrays[i]) for i in _UPSERT_1M_FLOAT_ROWS],
                            [list(arrays[i]) for i in _UPSERT_1M_INT_ROWS])


async def rollup(conn: asyncpg.Connection, tf: Timeframe, groups: Sequence[Sequence[Any]]) -> list[asyncpg.Record]:
    """Recompute the ``tf`` bars of ``groups`` (7 arrays: underlying, expiry, strike, bucket_s, underlying_close,
    atm_strike, moneyness_level) and their bars_latest rows; returns the changed rows."""
    if not groups or not groups[0]:
        return []
    return await conn.fetch(ROLLUP_SQL[tf], *groups)


async def recompute_sessions(conn: asyncpg.Connection, side: str,
                             legs: Sequence[Sequence[Any]]) -> list[asyncpg.Record]:
    """Recompute day_volume/volume/oi_change of ``side`` ("ce"/"pe") over the sessions of ``legs`` (4 arrays:
    underlying, expiry, strike, session start epoch s); returns the changed 1M rows."""
    if not legs or not legs[0]:
        return []
    return await conn.fetch(RECOMPUTE_SQL[side], *legs)


async def upsert_underlying(conn: asyncpg.Connection, arrays: Sequence[Sequence[Any]]) -> list[asyncpg.Record]:
    """Merge-upsert 1-minute underlying bars (8 arrays: underlying, bucket_s, open_us, open, high, low, close_us,
    close); returns changed rows (underlying, bucket_time, close, close_time)."""
    if not arrays or not arrays[0]:
        return []
    return await conn.fetch(_UNDERLYING_1M_SQL, *arrays)


async def rollup_underlying(conn: asyncpg.Connection, tf: Timeframe, underlyings: Sequence[str],
                            buckets: Sequence[int]) -> int:
    """Recompute underlying bars of ``tf`` for the (underlying, bucket_s) pairs from the 1-minute underlying bars;
    returns how many rows changed."""
    if not underlyings:
        return 0
    rows = await conn.fetch(_UNDERLYING_ROLLUP_SQL, list(underlyings), list(buckets), tf.seconds, int(tf))
    return len(rows)


#: Fill factor of the daily bar partitions: room for HOT updates of the open buckets' rows.
PARTITION_FILLFACTOR = 70


async def ensure_partitions(conn: asyncpg.Connection, first: dt.date, last: dt.date) -> int:
    """Create the daily partitions of every bar table for [first, last] (UTC days) and set their fill factor to
    :data:`PARTITION_FILLFACTOR`; returns how many partitions were created. Call outside a transaction: when another
    session creates the same partition at the same moment (two replicas at a day's first tick), PostgreSQL fails the
    loser's CREATE with a unique or duplicate-table violation once the winner commits; the call is then retried (the
    partition exists by then)."""
    for attempt in range(3):
        try:
            n = int(await conn.fetchval("SELECT optmon_ensure_partitions($1::date, $2::date)", first, last))
            break
        except (asyncpg.exceptions.UniqueViolationError, asyncpg.exceptions.DuplicateTableError):
            if attempt == 2:
                raise
    if n:
        day = first
        while day <= last:
            for tf in Timeframe:
                await conn.execute(f"ALTER TABLE {tf.table}_{day:%Y%m%d} SET (fillfactor = {PARTITION_FILLFACTOR})")
            day += dt.timedelta(days=1)
    return n


async def drop_partitions_before(conn: asyncpg.Connection, before: dt.date) -> int:
    """Drop daily bar partitions whose whole UTC day is before ``before``; returns how many were dropped."""
    return int(await conn.fetchval("SELECT optmon_drop_partitions_before($1::date)", before))


async def load_underlying_closes(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every 1-minute underlying bar (underlying, bucket_s, close_us, close) — small: ≈ 375 rows per underlying-day."""
    return await conn.fetch(
        "SELECT underlying, extract(epoch FROM bucket_time)::int8 AS bucket_s, "
        "(extract(epoch FROM close_time) * 1000000)::int8 AS close_us, close "
        "FROM underlying_bars WHERE timeframe = 1")


async def latest_session_start(conn: asyncpg.Connection) -> int | None:
    """Start (epoch s) of the UTC day of the newest 1-minute bar, from bars_latest (no scan); None when empty."""
    v = await conn.fetchval(
        "SELECT extract(epoch FROM date_trunc('day', max(bucket_time) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')::int8 "
        "FROM bars_latest WHERE timeframe = 1")
    return None if v is None else int(v)


async def load_newest_buckets(conn: asyncpg.Connection, underlyings: Sequence[str] | None = None) -> dict[str, int]:
    """Newest 1-minute strike-bar bucket (epoch s) per underlying (all, or only ``underlyings``), from bars_latest
    (no scan of the bar tables); underlyings without bars are absent."""
    rows = await conn.fetch(
        "SELECT underlying, extract(epoch FROM max(bucket_time))::int8 AS b FROM bars_latest WHERE timeframe = 1 "
        "AND ($1::text[] IS NULL OR underlying = ANY($1::text[])) GROUP BY underlying",
        None if underlyings is None else list(underlyings))
    return {r["underlying"]: int(r["b"]) for r in rows}


async def load_listed_strikes(conn: asyncpg.Connection, since_s: int) -> list[asyncpg.Record]:
    """First 1-minute bucket (epoch s) of every (underlying, expiry, strike, UTC day) since ``since_s``."""
    return await conn.fetch(
        "SELECT underlying, expiry::text AS expiry, strike, "
        "min(extract(epoch FROM bucket_time))::int8 AS first_s FROM bars_1m WHERE bucket_time >= to_timestamp($1) "
        "GROUP BY underlying, expiry, strike, date_trunc('day', bucket_time AT TIME ZONE 'UTC')", since_s)


async def load_leg_states(conn: asyncpg.Connection, side: str, since_s: int) -> list[asyncpg.Record]:
    """The two newest 1-minute bars with data for ``side`` of every contract since ``since_s``, newest first:
    (underlying, expiry, strike, rn, bucket_s, close_us, oi, day_volume, close (₹))."""
    assert side in SIDES
    return await conn.fetch(
        f"SELECT * FROM (SELECT underlying, expiry::text AS expiry, strike, "
        f"row_number() OVER (PARTITION BY underlying, expiry, strike ORDER BY bucket_time DESC) AS rn, "
        f"extract(epoch FROM bucket_time)::int8 AS bucket_s, "
        f"(extract(epoch FROM {side}_close_time) * 1000000)::int8 AS close_us, "
        f"{side}_oi AS oi, {side}_day_volume AS day_volume, {side}_close AS close FROM bars_1m "
        f"WHERE bucket_time >= to_timestamp($1) AND {side}_close_time IS NOT NULL) x WHERE rn <= 2", since_s)


async def load_leg_rows(conn: asyncpg.Connection, side: str, underlying: str, expiry: str, strike: float,
                        session_s: int) -> list[asyncpg.Record]:
    """The two newest 1-minute bars with data for ``side`` of one contract in the session starting at
    ``session_s``, newest first: (bucket_s, close_us, oi, day_volume). Used after a late-tick recompute."""
    assert side in SIDES
    return await conn.fetch(
        f"SELECT extract(epoch FROM bucket_time)::int8 AS bucket_s, "
        f"(extract(epoch FROM {side}_close_time) * 1000000)::int8 AS close_us, {side}_oi AS oi, "
        f"{side}_day_volume AS day_volume FROM bars_1m "
        f"WHERE underlying = $1 AND expiry = $2::text::date AND strike = $3 "
        f"AND bucket_time >= to_timestamp($4) AND bucket_time < to_timestamp($4 + 86400) "
        f"AND {side}_close_time IS NOT NULL ORDER BY bucket_time DESC LIMIT 2",
        underlying, expiry, strike, session_s)


async def analyze_day(conn: asyncpg.Connection, day: dt.date) -> None:
    """ANALYZE the four bar partitions of one UTC day. Fresh partitions have no statistics, and without them the
    planner may read rollup sub-bars through the snapshot index instead of the primary key (a per-strike range
    becomes a per-expiry range); the pipeline calls this as a day's partitions grow."""
    names = ", ".join(f"{tf.table}_{day:%Y%m%d}" for tf in Timeframe)
    await conn.execute(f"ANALYZE {names}")


async def analyze_if_never(conn: asyncpg.Connection, tf: Timeframe, day: dt.date) -> bool:
    """ANALYZE the ``tf`` partition of one UTC day when it has no statistics yet (``reltuples`` < 0: never analyzed
    or vacuumed); returns True when it did. Meant to run inside the call's transaction right after the first rows of
    a fresh day were written and before the rollup that reads them: without statistics the planner reads the rollup
    sub-bars through the snapshot index and filters on strike (≈ 4× slower than the primary-key range scan)."""
    name = f"{tf.table}_{day:%Y%m%d}"
    rt = await conn.fetchval("SELECT reltuples FROM pg_class WHERE oid = to_regclass($1)", name)
    if rt is None or rt >= 0:
        return False
    await conn.execute(f"ANALYZE {name}")
    return True


def _refresh_sql(tf: Timeframe) -> str:
    """Set underlying_close / atm_strike / moneyness_level of EVERY bar of the given (underlying, expiry, bucket)
    groups ($1 underlying, $2 expiry text, $3 bucket epoch s, $4 underlying close, $5 ATM strike, $6 strike step);
    returns the rows that changed."""
    lvl = "CASE WHEN g.atm IS NULL THEN NULL ELSE round((o.strike - g.atm) / g.step)::int END"
    return (
        "WITH g AS (SELECT u, e::date AS e, to_timestamp(b) AS bt, uc, atm, step FROM unnest($1::text[], $2::text[], "
        "$3::int8[], $4::float8[], $5::float8[], $6::float8[]) AS g(u, e, b, uc, atm, step)), "
        f"up AS (UPDATE {tf.table} o SET underlying_close = g.uc, atm_strike = g.atm, moneyness_level = {lvl}, "
        "updated_at = now() FROM g WHERE o.underlying = g.u AND o.expiry = g.e AND o.bucket_time = g.bt "
        f"AND ROW(o.underlying_close, o.atm_strike, o.moneyness_level) IS DISTINCT FROM ROW(g.uc, g.atm, {lvl}) "
        f"RETURNING {', '.join('o.' + c for c in BAR_COLUMNS)}), "
        f"{_latest_cte(tf, 'up')} SELECT * FROM up"
    )


REFRESH_SQL = {tf: _refresh_sql(tf) for tf in Timeframe}


async def refresh_moneyness(conn: asyncpg.Connection, tf: Timeframe,
                            groups: Sequence[Sequence[Any]]) -> list[asyncpg.Record]:
    """Re-stamp the underlying close, ATM strike and moneyness level of every bar of the ``tf`` buckets in
    ``groups`` (6 arrays: underlying, expiry, bucket_s, underlying_close, atm_strike, strike_step) — used when the
    index close of a bucket or its listed strikes changed, so that strikes not traded since keep a consistent
    moneyness. Returns the changed rows."""
    if not groups or not groups[0]:
        return []
    return await conn.fetch(REFRESH_SQL[tf], *groups)


def _read_bars_sql(tf: Timeframe) -> str:
    """Every ``tf`` bar (columns :data:`BAR_COLUMNS`) of the given (underlying, expiry, bucket) groups ($1 underlying,
    $2 expiry text, $3 bucket epoch s), then every ``tf`` bar of the given contracts in the given bucket ranges ($4
    underlying, $5 expiry text, $6 strike, $7 from epoch s inclusive, $8 to epoch s exclusive). A bar in both parts
    comes twice."""
    cols = ", ".join(f"m.{c}" for c in BAR_COLUMNS)
    return (
        f"SELECT {cols} FROM unnest($1::text[], $2::text[], $3::int8[]) AS g(u, e, b) "
        f"JOIN {tf.table} m ON m.underlying = g.u AND m.expiry = g.e::date AND m.bucket_time = to_timestamp(g.b) "
        f"UNION ALL SELECT {cols} FROM unnest($4::text[], $5::text[], $6::float8[], $7::int8[], $8::int8[]) "
        f"AS r(u, e, s, lo, hi) JOIN {tf.table} m ON m.underlying = r.u AND m.expiry = r.e::date AND m.strike = r.s "
        f"AND m.bucket_time >= to_timestamp(r.lo) AND m.bucket_time < to_timestamp(r.hi)"
    )


READ_BARS_SQL = {tf: _read_bars_sql(tf) for tf in Timeframe}


async def read_bars(conn: asyncpg.Connection, tf: Timeframe, groups: Sequence[Sequence[Any]],
                    ranges: Sequence[Sequence[Any]]) -> list[asyncpg.Record]:
    """The stored ``tf`` bars (columns :data:`BAR_COLUMNS`) of whole (underlying, expiry, bucket) ``groups`` (3
    arrays: underlying, expiry text, bucket_s) and of contracts over bucket ``ranges`` (5 arrays: underlying, expiry
    text, strike, from_s inclusive, to_s exclusive). Used to publish again the bars of re-delivered stream entries
    (``Pipeline.process(..., republish=True)``); a bar may appear twice."""
    if not (groups and groups[0]) and not (ranges and ranges[0]):
        return []
    g = [list(a) for a in groups] if groups and groups[0] else [[], [], []]
    r = [list(a) for a in ranges] if ranges and ranges[0] else [[], [], [], [], []]
    return await conn.fetch(READ_BARS_SQL[tf], *g, *r)


_TX_SETTINGS_SQL = "SET LOCAL jit = off; SET LOCAL work_mem = '32MB'"


async def lock_underlyings(conn: asyncpg.Connection, underlyings: Sequence[str]) -> dict[str, int]:
    """Inside a transaction: set the transaction's planner settings (JIT off, work_mem), take the per-underlying
    advisory locks (in name order, so writers never deadlock) and return the current writer version of each
    underlying (0 when never written)."""
    # Planner settings for this transaction only (they change plans and speed, never results): no JIT — compiling
    # the rollup statements costs ~60 ms per call, more than they run — and sorts (the DISTINCT ON of the
    # bars_latest upserts) in memory rather than spilled to disk.
    await conn.execute(_TX_SETTINGS_SQL)
    await conn.execute(
        "SELECT count(pg_advisory_xact_lock(hashtext('optmon.ingest.' || u))) "
        "FROM (SELECT u FROM unnest($1::text[]) AS u ORDER BY u) x", list(underlyings))
    rows = await conn.fetch("SELECT underlying, version FROM ingest_writers WHERE underlying = ANY($1::text[])",
                            list(underlyings))
    out = dict.fromkeys(underlyings, 0)
    out.update({r["underlying"]: int(r["version"]) for r in rows})
    return out


async def bump_versions(conn: asyncpg.Connection, underlyings: Sequence[str]) -> dict[str, int]:
    """Increment the writer version of each underlying (inside the commit's transaction); returns the new ones."""
    rows = await conn.fetch(
        "INSERT INTO ingest_writers AS w (underlying, version) SELECT u, 1 FROM unnest($1::text[]) AS u "
        "ON CONFLICT (underlying) DO UPDATE SET version = w.version + 1, updated_at = now() "
        "RETURNING underlying, version", list(underlyings))
    return {r["underlying"]: int(r["version"]) for r in rows}


async def load_versions(conn: asyncpg.Connection) -> dict[str, int]:
    """Writer version of every underlying."""
    rows = await conn.fetch("SELECT underlying, version FROM ingest_writers")
    return {r["underlying"]: int(r["version"]) for r in rows}


async def load_leg_states_for(conn: asyncpg.Connection, side: str, legs: Sequence[Sequence[Any]],
                              since_s: int) -> list[asyncpg.Record]:
    """The two newest 1-minute bars with data for ``side`` since ``since_s`` of the given legs (3 arrays:
    underlying, expiry text, strike), newest first: (underlying, expiry, strike, rn, bucket_s, close_us, oi,
    day_volume). One primary-key backward scan per leg."""
    assert side in SIDES
    return await conn.fetch(
        f"SELECT k.u AS underlying, k.e AS expiry, k.s AS strike, x.* FROM unnest($1::text[], $2::text[], "
        f"$3::float8[]) AS k(u, e, s) CROSS JOIN LATERAL (SELECT row_number() OVER (ORDER BY m.bucket_time DESC) "
        f"AS rn, extract(epoch FROM m.bucket_time)::int8 AS bucket_s, "
        f"(extract(epoch FROM m.{side}_close_time) * 1000000)::int8 AS close_us, m.{side}_oi AS oi, "
        f"m.{side}_day_volume AS day_volume FROM bars_1m m WHERE m.underlying = k.u AND m.expiry = k.e::date "
        f"AND m.strike = k.s AND m.bucket_time >= to_timestamp($4) AND m.{side}_close_time IS NOT NULL "
        f"ORDER BY m.underlying, m.expiry, m.strike, m.bucket_time DESC LIMIT 2) x",
        [k[0] for k in legs], [k[1] for k in legs], [k[2] for k in legs], since_s)


async def load_underlying_closes_for(conn: asyncpg.Connection, underlying: str, since_s: int) -> list[asyncpg.Record]:
    """1-minute underlying bars (bucket_s, close_us, close) of one underlying since ``since_s``."""
    return await conn.fetch(
        "SELECT extract(epoch FROM bucket_time)::int8 AS bucket_s, "
        "(extract(epoch FROM close_time) * 1000000)::int8 AS close_us, close FROM underlying_bars "
        "WHERE timeframe = 1 AND underlying = $1 AND bucket_time >= to_timestamp($2)", underlying, since_s)


async def load_listed_strikes_for(conn: asyncpg.Connection, underlying: str, since_s: int) -> list[asyncpg.Record]:
    """First 1-minute bucket of every (expiry, strike, UTC day) of one underlying since ``since_s``."""
    return await conn.fetch(
        "SELECT expiry::text AS expiry, strike, min(extract(epoch FROM bucket_time))::int8 AS first_s FROM bars_1m "
        "WHERE underlying = $1 AND bucket_time >= to_timestamp($2) "
        "GROUP BY expiry, strike, date_trunc('day', bucket_time AT TIME ZONE 'UTC')", underlying, since_s)
