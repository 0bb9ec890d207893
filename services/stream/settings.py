"""Stream settings (``OPTMON_*`` environment variables; see :class:`services.common.settings.CommonSettings`)."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import CommonSettings


class StreamSettings(CommonSettings):
    """Stream knobs. Environment: ``OPTMON_STREAM_PORT``, ``OPTMON_QUERY_ADDR`` and the fields below upper-cased
    with ``OPTMON_`` (e.g. ``OPTMON_STREAM_HEARTBEAT_S``)."""

    #: gRPC port of StreamService (0 = pick a free port, for tests).
    stream_port: int = 50053
    #: Address (host:port) of QueryService, for snapshots.
    query_addr: str = "127.0.0.1:50052"
    #: Seconds between heartbeats on an otherwise idle subscription.
    stream_heartbeat_s: float = Field(default=5.0, gt=0)
    #: XREAD BLOCK time of the BarUpdate consumers, milliseconds.
    stream_block_ms: int = Field(default=1000, ge=10)
    #: Timeout of one QueryService snapshot call, seconds.
    stream_snapshot_timeout_s: float = Field(default=5.0, gt=0)
    #: A strike stays in windows this many buckets after its last bar (keep equal to OPTMON_QUERY_CARRY_BUCKETS).
    stream_carry_buckets: int = Field(default=5, ge=0)
    #: How long a new subscription waits for Redis before it gets UNAVAILABLE, seconds.
    stream_redis_wait_s: float = Field(default=5.0, gt=0)
