"""Stream settings (``OPTMON_*`` environment variables; see :class:`services.common.settings.CommonSettings`)."""

from __future__ import annotations

from services.common.settings import CommonSettings


class StreamSettings(CommonSettings):
    """Stream knobs. Environment: ``OPTMON_STREAM_PORT``, ``OPTMON_QUERY_ADDR`` and the fields below."""

    #: gRPC port of StreamService (0 = pick a free port, for tests).
    stream_port: int = 50053
    #: Address (host:port) of QueryService, for snapshots.
    query_addr: str = "127.0.0.1:50052"
