"""Query settings (``OPTMON_*`` environment variables; see :class:`services.common.settings.CommonSettings`)."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import CommonSettings


class QuerySettings(CommonSettings):
    """Query knobs. Environment: ``OPTMON_QUERY_PORT`` and the fields below upper-cased with ``OPTMON_``
    (e.g. ``OPTMON_QUERY_L1_MAX_BYTES``, ``OPTMON_QUERY_POPULAR_UNDERLYINGS='["NIFTY"]'``)."""

    #: gRPC port of QueryService (0 = pick a free port, for tests).
    query_port: int = 50052
    #: asyncpg pool size (max connections to PostgreSQL).
    query_pg_pool_max: int = 8
    #: Seconds to wait for a PostgreSQL connection before treating it as down.
    query_pg_connect_timeout_s: float = 2.0
    #: Per-statement timeout, seconds.
    query_pg_command_timeout_s: float = 10.0
    #: L1 (in-process) cache bounds: entries, bytes of response payload, TTL seconds (the backstop; invalidation
    #: is by generation).
    query_l1_max_entries: int = 4096
    query_l1_max_bytes: int = 64 * 1024 * 1024
    query_l1_ttl_s: float = 60.0
    #: L2 (Redis) cache TTL, seconds; and the TTL of the "last good answer" copies served (stale) when
    #: PostgreSQL is down.
    query_l2_ttl_s: float = 300.0
    query_l2_last_good_ttl_s: float = 86400.0
    #: Responses larger than this many bytes are stored lz4-compressed in L2.
    query_compress_threshold_bytes: int = 4096
    #: Seconds to skip Redis after a failure before retrying (L2 and sequence checks).
    query_redis_retry_s: float = 1.0
    #: A cached answer is re-validated against ``optmon:seq:<U>`` when the last check of that underlying is older
    #: than this many milliseconds (closes the window between XADD and the consumer seeing it). 0 = every read.
    query_fresh_check_ms: float = 1.0
    #: Skip that re-validation while Redis has pushed no change of any ``optmon:seq:*`` key since the last read
    #: (RESP3 client tracking, ``CLIENT TRACKING ON BCAST PREFIX optmon:seq:``; services/query/cache/seqwatch.py).
    #: False = a Redis round trip per cached answer as above.
    query_seq_watch: bool = True
    #: Underlyings whose default views are recomputed right after each update (cache warming).
    query_popular_underlyings: list[str] = Field(default_factory=lambda: ["NIFTY"])
    #: Debounce of warming after updates, milliseconds.
    query_warm_debounce_ms: float = 25.0
    #: Disable the background stream consumer / warmer (tests of pure PostgreSQL paths).
    query_consume_updates: bool = True
    #: A strike without a bar in the chosen bucket carries its newest bar from at most this many buckets back
    #: (strike distribution and option chain).
    query_carry_buckets: int = 5
    #: Calendar days of ATM-IV history for IV rank / percentile.
    query_iv_history_days: int = 30
