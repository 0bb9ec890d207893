"""Query settings (``OPTMON_*`` environment variables; see :class:`services.common.settings.CommonSettings`)."""

from __future__ import annotations

from services.common.settings import CommonSettings


class QuerySettings(CommonSettings):
    """Query knobs. Environment: ``OPTMON_QUERY_PORT`` and the fields below upper-cased with ``OPTMON_``."""

    #: gRPC port of QueryService (0 = pick a free port, for tests).
    query_port: int = 50052
