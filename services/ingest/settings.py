"""Ingest settings (``OPTMON_*`` environment variables; see :class:`services.common.settings.CommonSettings`)."""

from __future__ import annotations

from services.common.settings import CommonSettings


class IngestSettings(CommonSettings):
    """Ingest knobs. Environment: ``OPTMON_INGEST_PORT`` and the fields below upper-cased with ``OPTMON_``."""

    #: gRPC port of IngestService (0 = pick a free port, for tests).
    ingest_port: int = 50051
